"""Cross-check of a tracked run: PyHessian's top eigenvalue on the torch twin, and the exact eigendecomposition, at saved steps."""

from __future__ import annotations

import numpy as np

EXACT_MAX_DIM = 8000  # the dense Hessian and its eigvalsh take ~10 s at 8,000 parameters on 2 cores
PYHESSIAN_MAX_ITER, PYHESSIAN_TOL = 100, 1e-3  # PyHessian's defaults
TIGHT_MAX_ITER, TIGHT_TOL = 1000, 1e-6  # PyHessian run to convergence


def crosscheck_track(ctx, result, batches, xs, ys, tracker_tol: float,
                     exact_max_dim: int = EXACT_MAX_DIM) -> list[dict]:
    """At each snapshot step: the tracked λ_max, PyHessian's (torch twin, same weights and data) and the exact one.

    ``batches`` and ``(xs, ys)`` are the data the tracker measured on (the fixed subset, or the
    whole training set of a full-batch run), as Batches and as arrays.

    PyHessian runs twice: at its defaults (maxIter 100, tol 1e-3) and to convergence (maxIter
    1000, tol 1e-6). Its stopping rule (relative change of the eigenvalue estimate below tol)
    bounds the error only up to a factor ``1 / (1 - λ₂/λ₁)`` and can stop early while the
    power iterate is still turning towards the top eigenvector (seen on the digits MLP at
    step 20 of a GD run: 4.19 at the defaults, 5.41 converged and exact). Agreement is judged
    on the converged run against ``rel_tol = 10 * max(tracker tol, 1e-3)``; the default run
    is recorded beside it. The tracker's own residual bound is ``tol · |θ|``. The exact value comes from the dense Hessian (``jax.hessian`` route via
    Hvp columns) in the run's dtype, for models of at most ``exact_max_dim`` parameters.
    """
    import torch

    from benchmarks.context import log
    from bridge.convert import load_into_torch
    from jax_impl import losses, models, operators
    from jax_impl.materialize import dense
    from torch_ref import pyhessian_runner
    from torch_ref.models import build_twin

    torch.set_num_threads(1)
    tdtype = torch.float64 if ctx.options.dtype == "float64" else torch.float32
    tracked = dict(zip(result.steps.tolist(), result.metrics["sharpness"].tolist()))
    out = []
    for step, params in sorted(result.snapshots.items()):
        log(f"cross-check at step {step}: PyHessian on the torch twin")
        model = load_into_torch(build_twin(ctx.arch.to_dict(), tdtype), params, ctx.arch)
        runs = {}
        for name, it, tol in (("default", PYHESSIAN_MAX_ITER, PYHESSIAN_TOL), ("tight", TIGHT_MAX_ITER, TIGHT_TOL)):
            ph = pyhessian_runner.top_eigenvalues(model, xs, ys, ctx.options.loss, k=1, max_iter=it, tol=tol,
                                                  seed=ctx.options.seed)
            runs[name] = (float(ph["eigenvalues"][0]), ph["matvecs"], ph["seconds"])
        lam_ph, lam_tight = runs["default"][0], runs["tight"][0]
        entry = {"step": int(step), "tracked": tracked[step], "pyhessian": lam_tight,
                 "pyhessian_matvecs": runs["tight"][1], "pyhessian_seconds": runs["tight"][2],
                 "rel_diff_pyhessian": abs(tracked[step] - lam_tight) / abs(lam_tight),
                 "pyhessian_default": lam_ph, "pyhessian_default_matvecs": runs["default"][1],
                 "rel_diff_pyhessian_default": abs(tracked[step] - lam_ph) / abs(lam_ph),
                 "rel_tol": 10 * max(tracker_tol, PYHESSIAN_TOL)}
        if ctx.arch.num_params <= exact_max_dim:
            log(f"cross-check at step {step}: exact eigendecomposition")
            problem = operators.Problem(models.make_apply(ctx.arch), losses.get_loss(ctx.options.loss),
                                        params, batches)
            h = np.asarray(dense(operators.hvp(problem), chunk_size=ctx.dense_columns), np.float64)
            lam = float(np.linalg.eigvalsh((h + h.T) / 2)[-1])
            entry.update(exact=lam, rel_diff_exact=abs(tracked[step] - lam) / abs(lam))
        entry["agrees"] = entry["rel_diff_pyhessian"] <= entry["rel_tol"] and entry.get("rel_diff_exact", 0) <= entry["rel_tol"]
        out.append(entry)
    return out
