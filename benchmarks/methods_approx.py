"""The six structured approximations (DiagGGN, DiagGGN-MC, DiagH, KFAC, KFLR, KFRA) as method-table entries."""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks.methods import method
from benchmarks.table import approximations
from jax_impl.approx import APPROXIMATIONS

KRONECKER = ("kfac", "kflr", "kfra")


def structure_entry(struct, k: int, seconds: float) -> dict:
    """The common fields of a structured approximation: top-k eigenvalues, trace, time, kind."""
    return {"eigenvalues": np.asarray(struct.eigenvalues(k), np.float64).tolist(),
            "trace": float(struct.trace()), "seconds": seconds, "matvecs": 0,
            "structure": type(struct).__name__}


def jax_approximation(ctx, name: str):
    """(structure, seconds end to end, compilation included), cached per Context."""
    cache = ctx.__dict__.setdefault("_approx", {})
    if name not in cache:
        fn = APPROXIMATIONS[name]
        t0 = time.perf_counter()
        struct = jax.block_until_ready(fn(ctx.problem, ctx.arch, ctx.key(name), ctx.options.mc_samples,
                                          kfac_approx=ctx.options.kfac_approx))
        cache[name] = (struct, time.perf_counter() - t0)
    return cache[name]


def exact_eigenvectors(ctx, which: str) -> np.ndarray:
    """The exact top-k eigenvectors (k, d) of the dense Hessian or GGN, cached on ctx."""
    from jax_impl.approx.agreement import top_eigenvectors

    cache = ctx.__dict__.setdefault("_top_vectors", {})
    if which not in cache:
        matrix = (ctx.hessian if which == "hessian" else ctx.ggn)[0]
        cache[which] = top_eigenvectors(matrix, ctx.options.k)[1]
    return cache[which]


def eigenvector_overlaps(ctx, struct) -> dict:
    """{vs_hessian, vs_ggn: eigenvector_agreement} when the dense matrices fit, else a note."""
    from jax_impl.approx.agreement import eigenvector_agreement
    from jax_impl.errors import HessianApproxError
    from benchmarks.methods import check_dense_fits

    try:
        check_dense_fits(ctx)
    except HessianApproxError as err:
        return {"note": f"not computed: {err.problem}"}
    k = ctx.options.k
    return {f"vs_{w}": eigenvector_agreement(struct, exact_eigenvectors(ctx, w), k) for w in ("hessian", "ggn")}


def _register(name: str):
    def run(ctx):
        struct, secs = jax_approximation(ctx, name)
        entry = {**structure_entry(struct, ctx.options.k, secs), "mc_samples": ctx.options.mc_samples
                 if name in ("diag-ggn-mc", "kfac") else None}
        if name in KRONECKER:
            entry["kfac_approx"] = ctx.options.kfac_approx
        entry["eigenvectors"] = eigenvector_overlaps(ctx, struct)
        return entry

    method(name)(run)


for _name in approximations():
    _register(_name)
