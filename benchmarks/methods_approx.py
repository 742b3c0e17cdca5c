"""The six structured approximations (DiagGGN, DiagGGN-MC, DiagH, KFAC, KFLR, KFRA) as method-table entries."""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks.methods import method
from jax_impl.approx import APPROXIMATIONS

DESCRIPTIONS = {
    "diag-ggn": "diagonal of the exact GGN (BackPACK DiagGGNExact)",
    "diag-ggn-mc": "Monte-Carlo diagonal of the GGN (BackPACK DiagGGNMC, --mc-samples)",
    "diag-h": "exact Hessian diagonal without the Hessian (BackPACK DiagHessian)",
    "kfac": "Kronecker factors, Monte-Carlo loss-Hessian square root (BackPACK KFAC)",
    "kflr": "Kronecker factors, exact loss-Hessian square root (BackPACK KFLR)",
    "kfra": "Kronecker factors, recursive batch-averaged Hessian (BackPACK KFRA, Botev et al. 2017)",
}


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


def _register(name: str):
    def run(ctx):
        struct, secs = jax_approximation(ctx, name)
        entry = {**structure_entry(struct, ctx.options.k, secs), "mc_samples": ctx.options.mc_samples
                 if name in ("diag-ggn-mc", "kfac") else None}
        if name in KRONECKER:
            entry["kfac_approx"] = ctx.options.kfac_approx
        return entry

    method(name, f"JAX: {DESCRIPTIONS[name]}")(run)


for _name in APPROXIMATIONS:
    _register(_name)
