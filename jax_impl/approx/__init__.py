"""Structured curvature approximations (BackPACK's second-order extensions, natively in JAX).

``APPROXIMATIONS[name](problem, spec, key, mc_samples) -> Diagonal | KroneckerBlocks``
for name in diag-ggn, diag-ggn-mc, diag-h, kfac, kflr, kfra. Exact methods ignore
``key`` and ``mc_samples``.
"""

from jax_impl.approx.diagonal import diag_ggn, diag_ggn_mc, diag_hessian
from jax_impl.approx.kronecker import kfac, kflr, kfra
from jax_impl.approx.structures import Diagonal, KroneckerBlocks

APPROXIMATIONS = {
    "diag-ggn": lambda problem, spec, key, mc_samples=1: diag_ggn(problem, spec=spec),
    "diag-ggn-mc": lambda problem, spec, key, mc_samples=1: diag_ggn_mc(problem, key, mc_samples, spec=spec),
    "diag-h": lambda problem, spec, key, mc_samples=1: diag_hessian(problem, spec=spec),
    "kfac": lambda problem, spec, key, mc_samples=1: kfac(problem, key, mc_samples, spec=spec),
    "kflr": lambda problem, spec, key, mc_samples=1: kflr(problem, spec=spec),
    "kfra": lambda problem, spec, key, mc_samples=1: kfra(problem, spec=spec),
}

__all__ = ["APPROXIMATIONS", "Diagonal", "KroneckerBlocks", "diag_ggn", "diag_ggn_mc",
           "diag_hessian", "kfac", "kflr", "kfra"]
