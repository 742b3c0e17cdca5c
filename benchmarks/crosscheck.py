"""Side-by-side JAX and PyTorch on one network: loss, gradient, Hvps, Hessian, eigenvectors."""

from __future__ import annotations

import numpy as np

from benchmarks.methods_torch import torch_hessian, twin


def crosscheck(ctx, num_vectors: int = 3) -> dict:
    """Differences between the frameworks on the same weights and data (JAX flat order).

    Returns {"loss": {...}, "gradient": {...}, "hvp": {...}, "hessian": {...}} where each
    entry holds the errors of torch against JAX (bridge.metrics).
    """
    import jax

    from bridge import metrics, permutation
    from jax_impl import operators
    from torch_ref import exact

    model, x, y = twin(ctx)
    spec, loss = ctx.arch, ctx.options.loss
    out = {}
    l_jax = float(operators.loss(ctx.problem))
    l_torch, g_torch = exact.loss_and_grad(model, x, y, loss)
    out["loss"] = {"jax": l_jax, "torch": l_torch, "abs_err": abs(l_jax - l_torch),
                   "rel_err": abs(l_jax - l_torch) / abs(l_jax)}
    g_jax = np.asarray(jax.jit(lambda: operators.gradient(ctx.problem))())
    out["gradient"] = metrics.compare_vectors(permutation.to_jax_vector(g_torch, spec), g_jax)
    rng = np.random.default_rng(ctx.probe_seed)
    errs = []
    for _ in range(num_vectors):
        v = rng.standard_normal(ctx.problem.dim).astype(np.dtype(ctx.options.dtype))
        hv_jax = np.asarray(ctx.hvp(v))
        hv_torch = exact.hvp(model, x, y, loss, permutation.to_torch_vector(v, spec))
        errs.append(metrics.compare_vectors(permutation.to_jax_vector(hv_torch, spec), hv_jax))
    out["hvp"] = {"vectors": num_vectors, "max_rel_frobenius": max(e["rel_frobenius"] for e in errs),
                  "max_abs_err": max(e["max_abs_err"] for e in errs)}
    h_jax, _ = ctx.hessian
    h_torch, _ = torch_hessian(ctx)
    h_torch = permutation.to_jax_matrix(h_torch, spec)
    out["hessian"] = metrics.compare_matrices(h_torch, h_jax)
    k = ctx.options.k
    w_jax, v_jax = top_eigenpairs(h_jax, k)
    w_torch, v_torch = top_eigenpairs(h_torch, k)
    out["hessian"]["eigenvalues"] = metrics.eigenvalue_errors(w_torch, w_jax)
    out["hessian"]["subspace_overlap"] = metrics.subspace_overlap(v_torch, v_jax)
    return out


def top_eigenpairs(matrix: np.ndarray, k: int):
    """Top-k (algebraic) eigenpairs of a dense symmetric matrix by ARPACK (no full eigh)."""
    from scipy.sparse.linalg import eigsh

    m = np.asarray(matrix, np.float64)
    w, v = eigsh(m, k=k, which="LA", tol=1e-12)
    order = np.argsort(w)[::-1]
    return w[order], v[:, order]


def format_crosscheck(cc: dict) -> str:
    """A plain-text table of the crosscheck differences."""
    rows = [("loss", cc["loss"]["abs_err"], cc["loss"]["rel_err"]),
            ("gradient", cc["gradient"]["max_abs_err"], cc["gradient"]["rel_frobenius"]),
            (f"hvp ({cc['hvp']['vectors']} shared vectors)", cc["hvp"]["max_abs_err"], cc["hvp"]["max_rel_frobenius"]),
            ("exact Hessian", cc["hessian"]["max_abs_err"], cc["hessian"]["rel_frobenius"]),
            ("top-k eigenvalues", None, cc["hessian"]["eigenvalues"]["max_rel"]),
            ("trace", None, cc["hessian"]["trace_rel_err"])]
    lines = ["torch vs JAX".ljust(28) + "max abs err".rjust(14) + "rel err".rjust(14)]
    for name, a, r in rows:
        lines.append(name.ljust(28) + (f"{a:14.3e}" if a is not None else "-".rjust(14)) + f"{r:14.3e}")
    lines.append("top-k eigenvector subspace overlap".ljust(42) + f"{cc['hessian']['subspace_overlap']:14.6f}")
    return "\n".join(lines)
