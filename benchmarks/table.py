"""The method table, the one registry: each method's name, family, framework, counterpart, description.

Light on purpose (no JAX, no torch), so ``--help`` and the command defaults need no numerics.
The implementations register under the same names with ``benchmarks.methods.method``;
``registry.load`` checks that every entry has exactly one implementation. Commands, the
report, the figures and the benchmarks select methods by querying this table. Adding an
estimator: one function in ``benchmarks/methods*.py`` and one ``entry(...)`` line here.
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("spectrum", "trace", "diagonal", "density", "structure", "block")
TORCH_PREFIXES = ("torch:", "pyhessian", "backpack:")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One method of the table.

    Attributes:
      name: plain for JAX (``lanczos``), prefixed for the reference libraries (``pyhessian``,
        ``torch:exact``, ``backpack:kfac``).
      family: what it estimates, one of FAMILIES.
      description: one line for --help and the report.
      counterpart: the method computing the same quantity in the other framework, or None.
      commands: the commands that run it by default.
    """

    name: str
    family: str
    description: str
    counterpart: str | None = None
    commands: tuple[str, ...] = ()

    @property
    def framework(self) -> str:
        return "torch" if self.name.startswith(TORCH_PREFIXES) else "jax"


TABLE: dict[str, Entry] = {}


def entry(name: str, family: str, description: str, counterpart: str | None = None,
          commands: tuple[str, ...] = ()) -> None:
    """Add one method to the table (names are unique; the family must be known)."""
    assert family in FAMILIES and name not in TABLE, name
    TABLE[name] = Entry(name, family, description, counterpart, tuple(commands))


ALL = ("eigs", "trace", "density", "diag", "approx", "crosscheck")
entry("exact", "spectrum", "dense Hessian (chunked vmap of jvp-of-grad Hvps), all eigenvalues, trace",
      "torch:exact", ALL)
entry("ggn", "spectrum", "dense generalized Gauss-Newton (Jᵀ H_ell J), all eigenvalues, trace", None, ("approx",))
entry("lanczos", "spectrum", "Lanczos with full reorthogonalization over Hvps: top-k Ritz values",
      "pyhessian", ("eigs", "crosscheck"))
entry("lanczos-certified", "spectrum",
      "adaptive Lanczos until every top-k explicit residual ||Hy - θy|| <= --tol·|θ₁|, with error bounds",
      "pyhessian", ("eigs",))
entry("block-lanczos", "spectrum", "block Lanczos (clusters of outliers, multiplicities), explicit residuals",
      "pyhessian")
entry("power", "spectrum", "power iteration with deflation over Hvps (PyHessian's algorithm and stopping rule)",
      "pyhessian", ("eigs", "crosscheck"))
entry("hutchinson", "trace", "Hutchinson's trace estimator with Rademacher probes over Hvps",
      "pyhessian:trace", ("trace", "crosscheck"))
entry("hutchpp", "trace", "Hutch++ (Meyer et al. 2021): low-rank sketch plus Hutchinson on the rest",
      "pyhessian:trace", ("trace",))
entry("xtrace", "trace", "XTrace (Epperly, Tropp & Webber 2024): exchangeable leave-one-out estimator",
      "pyhessian:trace", ("trace",))
entry("xnystrace", "trace", "XNysTrace (Epperly, Tropp & Webber 2024) on the GGN (PSD operators only)", None,
      ("trace",))
entry("slq", "density", "stochastic Lanczos quadrature: spectral density nodes and weights (PyHessian's conventions)",
      "pyhessian:density", ("density",))
entry("hutchinson-diag", "diagonal", "Hutchinson's diagonal estimator (Bekas et al. 2007), per-entry stderr",
      None, ("diag",))
entry("xdiag", "diagonal", "XDiag (Epperly, Tropp & Webber 2024): exchangeable diagonal estimator", None, ("diag",))
entry("blocks", "block", "per-layer blocks of the Hessian: top-k and trace of each layer's diagonal block")

_APPROX = {
    "diag-ggn": "diagonal of the exact GGN (BackPACK DiagGGNExact)",
    "diag-ggn-mc": "Monte-Carlo diagonal of the GGN (BackPACK DiagGGNMC, --mc-samples)",
    "diag-h": "exact Hessian diagonal without the Hessian (BackPACK DiagHessian)",
    "kfac": "Kronecker factors, Monte-Carlo loss-Hessian square root (BackPACK KFAC)",
    "kflr": "Kronecker factors, exact loss-Hessian square root (BackPACK KFLR)",
    "kfra": "Kronecker factors, recursive batch-averaged Hessian (BackPACK KFRA, Botev et al. 2017)",
}
for _name, _text in _APPROX.items():
    entry(_name, "structure", f"JAX: {_text}", f"backpack:{_name}", ("approx", "diag") if _name == "diag-h"
          else ("approx",))

entry("torch:exact", "spectrum",
      "PyTorch: dense Hessian by autodiff twice (fastest of torch.func/autograd/loop), eigvalsh, trace",
      "exact", ("crosscheck",))
entry("pyhessian", "spectrum", "PyHessian: top-k eigenvalues by power iteration with deflation", "power",
      ("crosscheck",))
entry("pyhessian:trace", "trace", "PyHessian: Hutchinson trace with its own stopping rule (maxIter, tol)",
      "hutchinson", ("crosscheck",))
entry("pyhessian:density", "density", "PyHessian: SLQ density (through the torch.eig compatibility layer)", "slq")
for _name, _text in _APPROX.items():
    entry(f"backpack:{_name}", "structure", f"BackPACK: {_text}", _name,
          ("approx", "diag") if _name == "diag-h" else ("approx",))


def names(family: str | None = None, framework: str | None = None, command: str | None = None) -> list[str]:
    """Method names in table order, filtered by family, framework ("jax"/"torch") and default command."""
    return [e.name for e in TABLE.values()
            if (family is None or e.family == family) and (framework is None or e.framework == framework)
            and (command is None or command in e.commands)]


def approximations() -> tuple[str, ...]:
    """The JAX structured approximations, in table order (each has a BackPACK counterpart)."""
    return tuple(names(family="structure", framework="jax"))


def counterpart(name: str) -> str | None:
    return TABLE[name].counterpart
