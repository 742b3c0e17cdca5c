"""Structured curvature approximations (BackPACK's second-order extensions) for described networks.

``APPROXIMATIONS[name](problem, arch, key, mc_samples=1, **options) -> Diagonal | KroneckerBlocks``
for name in diag-ggn, diag-ggn-mc, diag-h, kfac, kflr, kfra. ``arch`` is an Architecture,
its dict, or None (read from ``problem.apply.arch``). Exact methods ignore ``key`` and
``mc_samples``. Options: ``kfac_approx`` ("backpack", "expand" or "reduce"; the
convolution convention of kfac, kflr and kfra, see ``jax_impl.approx.kronecker``; the
diagonal methods accept and ignore it).
"""

from jax_impl.approx.diagonal import diag_ggn, diag_ggn_mc, diag_hessian
from jax_impl.approx.kronecker import CONVENTIONS, kfac, kflr, kfra
from jax_impl.approx.network import METHODS
from jax_impl.approx.structures import Diagonal, KroneckerBlocks
from jax_impl.errors import HessianApproxError


def _options(name: str, options: dict, allowed=("kfac_approx",)) -> dict:
    """The options for ``name``; one-line error for unknown ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise HessianApproxError(f"{name} got unknown option(s) {', '.join(unknown)}",
                                 f"pass only {', '.join(allowed)}")
    return dict(options)


def _diag_ggn(problem, arch=None, key=None, mc_samples=1, **options):
    _options("diag-ggn", options)
    return diag_ggn(problem, arch)


def _diag_ggn_mc(problem, arch, key, mc_samples=1, **options):
    _options("diag-ggn-mc", options)
    return diag_ggn_mc(problem, key, mc_samples, arch)


def _diag_h(problem, arch=None, key=None, mc_samples=1, **options):
    _options("diag-h", options)
    return diag_hessian(problem, arch)


def _kfac(problem, arch, key, mc_samples=1, **options):
    return kfac(problem, key, mc_samples, arch, **_options("kfac", options))


def _kflr(problem, arch=None, key=None, mc_samples=1, **options):
    return kflr(problem, arch, **_options("kflr", options))


def _kfra(problem, arch=None, key=None, mc_samples=1, **options):
    return kfra(problem, arch, **_options("kfra", options))


APPROXIMATIONS = {"diag-ggn": _diag_ggn, "diag-ggn-mc": _diag_ggn_mc, "diag-h": _diag_h,
                  "kfac": _kfac, "kflr": _kflr, "kfra": _kfra}

__all__ = ["APPROXIMATIONS", "CONVENTIONS", "METHODS", "Diagonal", "KroneckerBlocks", "diag_ggn",
           "diag_ggn_mc", "diag_hessian", "kfac", "kflr", "kfra"]
