"""PyTorch reference methods (torch:exact, PyHessian, BackPACK) for the method table; registered only when torch imports."""

from __future__ import annotations

import copy
import time

import numpy as np

from benchmarks.methods import check_k, check_slq, method, slq_entry
from benchmarks.table import approximations


def twin(ctx):
    """(torch model with the run's weights, x (n, D), y (n,)) built once per Context through the bridge."""
    if "_twin" not in ctx.__dict__:
        import torch

        from bridge.convert import load_into_torch
        from torch_ref.models import build_twin

        dtype = torch.float64 if ctx.options.dtype == "float64" else torch.float32
        model = load_into_torch(build_twin(ctx.arch.to_dict(), dtype), ctx.params, ctx.arch)
        x, y = ctx.subset
        ctx.__dict__["_twin"] = (model, np.asarray(x, np.dtype(ctx.options.dtype)), np.asarray(y))
    return ctx.__dict__["_twin"]


def torch_hessian(ctx) -> tuple[np.ndarray, float]:
    """(dense Hessian in torch flat order, seconds), cached."""
    if "_torch_hessian" not in ctx.__dict__:
        from torch_ref import exact

        model, x, y = twin(ctx)
        t0 = time.perf_counter()
        h = exact.hessian(model, x, y, ctx.options.loss)
        ctx.__dict__["_torch_hessian"] = (h, time.perf_counter() - t0)
    return ctx.__dict__["_torch_hessian"]


def check_torch_dense(ctx) -> None:
    from torch_ref.exact import check_memory

    check_memory(ctx.arch.num_params, np.dtype(ctx.options.dtype).itemsize)


@method("torch:exact", check_torch_dense)
def torch_exact(ctx):
    import torch

    from torch_ref.exact import default_method

    h, t_dense = torch_hessian(ctx)
    t0 = time.perf_counter()
    evals = torch.linalg.eigvalsh(torch.from_numpy(h)).numpy()[::-1]
    t_eig = time.perf_counter() - t0
    return {"eigenvalues": evals[: ctx.options.k].tolist(), "spectrum": evals.tolist(),
            "trace": float(np.trace(h)), "seconds": t_dense + t_eig, "seconds_dense": t_dense,
            "seconds_eigh": t_eig, "matvecs": int(h.shape[0]), "hessian_method": default_method(twin(ctx)[0])}


@method("pyhessian", check_k)
def pyhessian_eigs(ctx):
    from torch_ref import pyhessian_runner

    model, x, y = twin(ctx)
    o = ctx.options
    r = pyhessian_runner.top_eigenvalues(model, x, y, o.loss, k=o.k, max_iter=o.power_max_iter,
                                         tol=o.power_tol, seed=ctx.probe_seed)
    return {"eigenvalues": np.sort(r["eigenvalues"])[::-1].tolist(),
            "eigenvalues_found_order": r["eigenvalues"].tolist(), "matvecs": r["matvecs"],
            "seconds": r["seconds"], "settings": r["settings"]}


@method("pyhessian:trace")
def pyhessian_trace(ctx):
    from torch_ref import pyhessian_runner

    model, x, y = twin(ctx)
    o = ctx.options
    r = pyhessian_runner.trace(model, x, y, o.loss, max_iter=o.hutchinson_samples, tol=o.pyhessian_trace_tol,
                               seed=ctx.probe_seed)
    est = np.asarray(r["estimates"])
    stderr = float(est.std(ddof=1) / np.sqrt(len(est))) if len(est) > 1 else None
    return {"trace": r["trace"], "stderr": stderr, "estimates": r["estimates"], "matvecs": r["matvecs"],
            "seconds": r["seconds"], "settings": r["settings"]}


@method("pyhessian:density", check_slq)
def pyhessian_density(ctx):
    from torch_ref import pyhessian_runner

    model, x, y = twin(ctx)
    o = ctx.options
    r = pyhessian_runner.density(model, x, y, o.loss, iters=o.slq_steps, n_v=o.slq_runs, seed=ctx.probe_seed)
    return {**slq_entry(r["nodes"], r["weights"], ctx.problem.dim), "matvecs": r["matvecs"],
            "seconds": r["seconds"], "settings": r.get("settings", {})}


def backpack_structure(ctx, name: str):
    """(BackPACK result as a JAX structure, seconds of its forward and backward), cached."""
    cache = ctx.__dict__.setdefault("_backpack", {})
    if name not in cache:
        import jax.numpy as jnp

        from bridge.backpack import to_diagonal, to_kronecker
        from torch_ref.backpack_runner import run_backpack

        model, x, y = twin(ctx)
        # BackPACK extends the module in place (hooks); keep the shared twin clean
        res = run_backpack(copy.deepcopy(model), x, y, ctx.options.loss, name, mc_samples=ctx.options.mc_samples,
                           seed=ctx.probe_seed)
        dtype = jnp.float64 if ctx.options.dtype == "float64" else jnp.float32
        conv = to_diagonal if name.startswith("diag") else to_kronecker
        cache[name] = (conv(res, ctx.arch, dtype=dtype), res["seconds"])
    return cache[name]


def _register_backpack(name: str):
    from benchmarks.methods_approx import jax_approximation, structure_entry

    def run(ctx):
        from bridge import metrics

        struct, secs = backpack_structure(ctx, name)
        entry = structure_entry(struct, ctx.options.k, secs)
        ours, _ = jax_approximation(ctx, name)
        # the same structure computed natively in JAX, compared factor by factor
        if hasattr(struct, "diag"):
            entry["vs_jax_rel_err"] = metrics.rel_frobenius(np.asarray(ours.diag), np.asarray(struct.diag))
        else:
            entry["vs_jax_rel_err"] = max(
                max(metrics.rel_frobenius(np.asarray(a), np.asarray(b)) for a, b in zip(ours.G, struct.G)),
                max(metrics.rel_frobenius(np.asarray(a), np.asarray(b)) for a, b in zip(ours.A, struct.A)))
        entry["seconds_note"] = "one forward and backward pass with the BackPACK extension"
        if name in ("kfac", "kflr", "kfra") and ctx.options.kfac_approx != "backpack":
            entry["vs_jax_note"] = (f"JAX factors in the {ctx.options.kfac_approx!r} convention, BackPACK's in its own: "
                                    "they differ by design on convolutions")
        return entry

    method(f"backpack:{name}")(run)


for _name in approximations():
    _register_backpack(_name)
