"""The method table: a method's name -> function(Context) -> its entry of the result record."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from jax_impl import algorithms

METHODS: dict[str, Callable] = {}
CHECKS: dict[str, Callable] = {}


def method(name: str, check: Callable | None = None):
    """Register ``fn(ctx) -> dict`` as the implementation of ``name`` from the method table.

    The name, family, description and counterpart live in ``benchmarks.table``;
    ``check(ctx)``, when given, runs before any method of a command starts and
    raises HessianApproxError for inputs the method cannot take (e.g. a dense
    matrix that will not fit), so a command fails fast instead of half-way.
    """
    from benchmarks.table import TABLE

    assert name in TABLE and name not in METHODS, name

    def register(fn):
        METHODS[name] = fn
        if check is not None:
            CHECKS[name] = check
        return fn

    return register


def check_dense_fits(ctx) -> None:
    from jax_impl.materialize import check_fits

    check_fits(ctx.arch.num_params, ctx.dtype, what="dense Hessian", copies=3)  # matrix, device copy, eigh work


def check_k(ctx) -> None:
    from jax_impl.errors import HessianApproxError

    if ctx.options.k > ctx.arch.num_params:
        raise HessianApproxError(
            f"k={ctx.options.k} eigenvalues requested but the model has only {ctx.arch.num_params} parameters",
            f"choose -k between 1 and {ctx.arch.num_params}")


def check_lanczos(ctx) -> None:
    from jax_impl.errors import HessianApproxError

    check_k(ctx)
    steps, d, k = ctx.options.lanczos_steps, ctx.arch.num_params, ctx.options.k
    if steps is not None and not k <= steps <= d:
        raise HessianApproxError(f"--lanczos-steps {steps} is outside k..d = {k}..{d}",
                                 f"pass --lanczos-steps between {k} and {d}")


def check_slq(ctx) -> None:
    from jax_impl.errors import HessianApproxError

    if ctx.options.slq_steps > ctx.arch.num_params:
        raise HessianApproxError(f"--slq-steps {ctx.options.slq_steps} exceeds the {ctx.arch.num_params} parameters",
                                 f"pass --slq-steps <= {ctx.arch.num_params}")


def timed(fn, *args, **kwargs):
    """(result, seconds) with the result's arrays ready (compilation included)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def spectrum_entry(ctx, which: str) -> dict:
    """Exact eigenvalues and trace of the dense Hessian or GGN (cached on ctx)."""
    cache = ctx.__dict__.setdefault("_spectra", {})
    if which not in cache:
        matrix, t_dense = ctx.hessian if which == "hessian" else ctx.ggn
        route = ctx.exact_route(which)
        from benchmarks.context import log
        from jax_impl.errors import HessianApproxError

        if not np.isfinite(matrix).all():  # before a long eigendecomposition that cannot succeed
            bad = int(matrix.size - np.count_nonzero(np.isfinite(matrix)))
            raise HessianApproxError(f"the dense {which} holds {bad} NaN or Inf entries", ctx.overflow_hint())

        log(f"eigendecomposition of the {matrix.shape[0]}x{matrix.shape[0]} {which} ...")
        evals, t_eig = timed(algorithms.eigvalsh_descending, matrix)
        evals = np.asarray(evals)
        t0 = time.perf_counter()
        trace = float(np.trace(matrix))
        t_trace = time.perf_counter() - t0
        cache[which] = {
            "eigenvalues": evals[: ctx.options.k].tolist(), "trace": trace,
            "spectrum": evals.tolist(), "sum_eigenvalues": float(np.sum(evals)),
            "seconds": t_dense + t_eig, "seconds_dense": t_dense, "seconds_eigh": t_eig,
            "seconds_trace": t_dense + t_trace, "matvecs": int(matrix.shape[0]) if route == "hvp" else 0,
            "route": route,
        }
    return cache[which]


def check_dense(ctx) -> None:
    check_k(ctx)
    check_dense_fits(ctx)


@method("exact", check_dense)
def exact(ctx):
    return spectrum_entry(ctx, "hessian")


@method("ggn", check_dense)
def ggn(ctx):
    return spectrum_entry(ctx, "ggn")


@method("power", check_k)
def power(ctx):
    o = ctx.options
    res, secs = timed(algorithms.power_iteration, ctx.hvp, ctx.key("power"),
                      k=o.k, max_iter=o.power_max_iter, tol=o.power_tol)
    d = res.sorted().to_dict()
    return {"eigenvalues": d["eigenvalues"], "eigenvalues_found_order": res.to_dict()["eigenvalues"],
            "matvecs": d["matvecs"], "seconds": secs,
            "settings": {"max_iter": o.power_max_iter, "tol": o.power_tol}}


@method("lanczos", check_lanczos)
def lanczos(ctx):
    o = ctx.options
    res, secs = timed(algorithms.lanczos, ctx.hvp, ctx.key("lanczos"),
                      k=o.k, num_steps=o.lanczos_steps)
    d = res.to_dict()
    return {"eigenvalues": d["eigenvalues"], "residuals": d["residuals"], "matvecs": d["matvecs"],
            "seconds": secs}


@method("hutchinson")
def hutchinson(ctx):
    o = ctx.options
    res, secs = timed(algorithms.hutchinson, ctx.hvp, ctx.key("hutchinson"),
                      num_samples=o.hutchinson_samples)
    d = res.to_dict()
    return {"trace": d["trace"], "stderr": d["stderr"], "matvecs": d["matvecs"], "seconds": secs,
            "running_mean": d["running_mean"], "running_stderr": d["running_stderr"]}


@method("slq", check_slq)
def slq(ctx):
    o = ctx.options
    (nodes, weights), secs = timed(algorithms.slq, ctx.hvp, ctx.key("slq"),
                                   num_steps=o.slq_steps, num_runs=o.slq_runs)
    return {**slq_entry(nodes, weights, ctx.problem.dim), "matvecs": o.slq_steps * o.slq_runs, "seconds": secs}


def slq_entry(nodes, weights, dim: int) -> dict:
    """SLQ nodes and weights (runs, steps) with the trace d·mean_r Σ w θ and the mean top node."""
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    return {"nodes": nodes.tolist(), "weights": weights.tolist(),
            "trace": float(dim * np.mean(np.sum(nodes * weights, axis=1))),
            "eigenvalues": [float(np.mean(nodes.max(axis=1)))]}


def preflight(ctx, names) -> None:
    """Run the checks of the named methods, then check the loss and gradient at the weights are finite
    (raises HessianApproxError before any curvature is computed)."""
    for name in names:
        if name in CHECKS:
            CHECKS[name](ctx)
    ctx.point()


# the quantities an entry reports; a NaN or Inf in any of them is an error, never a blank cell
CHECKED_FIELDS = ("eigenvalues", "trace", "spectrum", "sum_eigenvalues", "diagonal", "nodes", "weights")


def check_entry_finite(ctx, name: str, entry: dict) -> None:
    """Raise HessianApproxError naming ``name`` when a reported quantity of its entry is NaN or Inf."""
    from jax_impl.errors import HessianApproxError

    for field in CHECKED_FIELDS:
        value = entry.get(field) if isinstance(entry, dict) else None
        if value is None and field in ("eigenvalues", "trace") and isinstance(entry, dict) and field in entry:
            raise HessianApproxError(f"{name} produced no {field} (NaN or Inf)", ctx.overflow_hint())
        if value is None:
            continue
        a = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise HessianApproxError(f"{name} produced {np.size(a) - np.count_nonzero(np.isfinite(a))} NaN or Inf "
                                     f"value(s) in its {field}", ctx.overflow_hint())


def run_methods(ctx, names, record: dict, on_error: str = "raise") -> dict:
    """Run the named methods into ``record['results']`` in order, after their checks.

    With ``on_error == 'record'`` a HessianApproxError in one method is kept as that
    method's ``error`` and the others still run; by default it propagates.
    """
    from benchmarks.context import log
    from benchmarks.table import TABLE
    from jax_impl.errors import HessianApproxError

    preflight(ctx, names)
    for name in names:
        log(f"running {name}: {TABLE[name].description}")
        try:
            entry = METHODS[name](ctx)
            check_entry_finite(ctx, name, entry)
            record["results"][name] = entry
        except HessianApproxError as err:
            if on_error != "record":
                raise
            log(f"{name} not run: {err}")
            record["results"][name] = {"error": str(err)}
    return record
