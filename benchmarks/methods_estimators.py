"""Method-table entries for the estimators the anchors lack: certified and block Lanczos, sketched traces and
diagonals, per-layer blocks."""

from __future__ import annotations

import numpy as np

from benchmarks.methods import check_k, method, timed
from jax_impl import algorithms
from jax_impl.errors import HessianApproxError


def _eig_entry(res, secs: float) -> dict:
    d = res.to_dict()
    return {"eigenvalues": d["eigenvalues"], "residuals": d["residuals"], "matvecs": d["matvecs"],
            "converged": d.get("converged"), "error_bounds": d.get("error_bounds"), "seconds": secs}


@method("lanczos-certified", check_k)
def lanczos_certified(ctx):
    o = ctx.options
    res, secs = timed(algorithms.adaptive_lanczos, ctx.hvp, ctx.key("lanczos-certified"), k=o.k, tol=o.tol)
    return {**_eig_entry(res, secs), "settings": {"tol": o.tol, "residuals": "explicit ||Hy - θy||"}}


def check_block(ctx) -> None:
    check_k(ctx)
    p, d = ctx.options.block_size, ctx.arch.num_params
    if not 1 <= p <= d:
        raise HessianApproxError(f"--block-size {p} is outside 1..{d}", f"pass --block-size between 1 and {d}")


@method("block-lanczos", check_block)
def block_lanczos(ctx):
    o = ctx.options
    p = o.block_size
    blocks = max(2, min(ctx.arch.num_params // p, -(-max(8 * o.k, 80) // p)))  # ~ the Krylov size of lanczos
    res, secs = timed(algorithms.block_lanczos, ctx.hvp, ctx.key("block-lanczos"), k=min(o.k, p * blocks),
                      block_size=p, num_blocks=blocks)
    return {**_eig_entry(res, secs), "settings": {"block_size": p, "num_blocks": blocks}}


def _trace_entry(fn, op, key, matvecs: int, what: str = "hessian") -> dict:
    res, secs = timed(fn, op, key, num_matvecs=matvecs)
    d = res.to_dict()
    return {"trace": d["trace"], "stderr": d["stderr"], "matvecs": d["matvecs"], "seconds": secs,
            "sketch_size": d.get("sketch_size"), "operator": what}


@method("hutchpp")
def hutchpp(ctx):
    return _trace_entry(algorithms.hutchpp, ctx.hvp, ctx.key("hutchpp"), ctx.options.hutchinson_samples)


@method("xtrace")
def xtrace(ctx):
    return _trace_entry(algorithms.xtrace, ctx.hvp, ctx.key("xtrace"), ctx.options.hutchinson_samples)


@method("xnystrace")
def xnystrace(ctx):
    """On the GGN: the Hessian is indefinite, which XNysTrace refuses (the record says which operator)."""
    entry = _trace_entry(algorithms.xnystrace, ctx.ggn_vp, ctx.key("xnystrace"), ctx.options.hutchinson_samples,
                         what="ggn")
    entry["note"] = "trace of the GGN (PSD), not of the Hessian"
    return entry


def exact_diagonal(ctx) -> np.ndarray:
    """The Hessian's exact diagonal: from the dense Hessian (cached on ctx)."""
    return np.diag(ctx.hessian[0])


def _diag_entry(ctx, res, secs) -> dict:
    diag = np.asarray(res.diagonal, np.float64)
    exact = exact_diagonal(ctx)
    return {"trace": float(diag.sum()), "matvecs": int(np.asarray(res.matvecs)), "seconds": secs,
            "mean_stderr": float(np.nanmean(np.asarray(res.stderr))),
            "diag_rel_err": float(np.linalg.norm(diag - exact) / np.linalg.norm(exact))}


@method("hutchinson-diag")
def hutchinson_diag(ctx):
    res, secs = timed(algorithms.hutchinson_diagonal, ctx.hvp, ctx.key("hutchinson-diag"),
                      num_samples=ctx.options.hutchinson_samples)
    return _diag_entry(ctx, res, secs)


@method("xdiag")
def xdiag(ctx):
    res, secs = timed(algorithms.xdiag, ctx.hvp, ctx.key("xdiag"), num_matvecs=ctx.options.hutchinson_samples)
    return _diag_entry(ctx, res, secs)


@method("blocks", check_k)
def blocks(ctx):
    """Top-k and trace of each layer's diagonal block (--blocks)."""
    import time

    from jax_impl.blocks import block_spectra

    t0 = time.perf_counter()
    spec = ctx.options.blocks
    if spec not in ("per-layer", "per-leaf"):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    out = block_spectra(ctx.problem, spec, k=ctx.options.k, key=ctx.key("blocks"),
                        num_samples=ctx.options.hutchinson_samples)
    out = {name: {k: (np.asarray(v).tolist() if hasattr(v, "shape") else v) for k, v in b.items()}
           for name, b in out.items()}
    top = max(out.values(), key=lambda b: b["eigenvalues"][0] if b["eigenvalues"] else -np.inf)
    return {"blocks": out, "eigenvalues": top["eigenvalues"], "trace": float(sum(b["trace"] for b in out.values())),
            "matvecs": int(sum(b["matvecs"] for b in out.values())), "seconds": time.perf_counter() - t0,
            "note": "eigenvalues: the block with the largest top eigenvalue; trace: the sum of the block traces "
                    "(equal to tr H when the blocks cover every parameter)"}
