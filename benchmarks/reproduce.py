"""The study end to end: train or load, every method in both frameworks, a Hutchinson sweep, figures and report."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import record as rec
from benchmarks.context import Context, log, progress_bar
from benchmarks.methods import preflight, run_methods
from benchmarks.registry import resolve
from jax_impl import algorithms
from jax_impl.checkpoint import save_checkpoint
from jax_impl.fileio import atomic_write, staged_dir

from benchmarks.table import approximations, counterpart
from jax_impl.errors import HessianApproxError

APPROX = approximations()
# the study's methods: its estimators with their counterparts, and every structured approximation with BackPACK's
METHODS = ["exact", "torch:exact", "ggn", "lanczos", "power", "pyhessian", "hutchinson", "pyhessian:trace",
           "slq", "pyhessian:density", *APPROX, *(counterpart(n) for n in APPROX)]


def sweep_grid(max_samples: int, points: int = 30) -> np.ndarray:
    """Log-spaced probe counts 1..max_samples (unique integers)."""
    return np.unique(np.round(np.logspace(0, np.log10(max_samples), points)).astype(int))


def hutchinson_sweep(ctx, max_samples: int = 1000, seeds: int = 10) -> dict:
    """Running Hutchinson means for ``seeds`` independent probe streams, summarized on a log grid.

    Returns {"num_samples": grid, "mean", "std", "min", "max" (over seeds, per grid point),
    "seeds", "max_samples", "seconds"}.
    """
    grid = sweep_grid(max_samples)
    dim = ctx.problem.dim
    run = jax.jit(lambda key: algorithms.hutchinson(ctx.hvp, key, num_samples=max_samples).running_mean)
    t0 = time.perf_counter()
    bar = progress_bar(seeds, "Hutchinson sweep")
    means = []
    for s in range(seeds):
        means.append(np.asarray(run(jax.random.fold_in(ctx.key("hutchinson-sweep"), s)))[grid - 1])
        bar.update(1)
    bar.close()
    m = np.stack(means)
    return {"num_samples": grid.tolist(), "mean": m.mean(0).tolist(), "std": m.std(0, ddof=1).tolist(),
            "min": m.min(0).tolist(), "max": m.max(0).tolist(), "seeds": seeds, "max_samples": max_samples,
            "seconds": time.perf_counter() - t0}


# Largest budget of the trace-estimator study: CNN matvecs cost ~40x an MLP's (see DEFAULT_SAMPLES)
TRACE_STUDY_MATVECS = {"mlp": 384, "cnn": 96}


def reproduce(ctx: Context, out_dir, sweep_samples: int = 1000, sweep_seeds: int = 10,
              trace_study_matvecs: int | None = None, trace_study_seeds: int = 20) -> dict:
    """Run the study into ``out_dir``: results.json, report.md, six figures, model.safetensors.

    The files are written into a hidden staging folder beside ``out_dir`` that replaces it as a
    whole at the end (``fileio.staged_dir``): an interrupted or failed run leaves ``out_dir`` as
    it was. ``trace_study_matvecs``: largest budget of the trace-estimator study (None: 384 for
    an MLP, 96 otherwise; 0 skips it), over ``trace_study_seeds`` seeds.
    """
    if sweep_seeds < 2 or sweep_samples < 10:
        raise HessianApproxError(f"--sweep-seeds {sweep_seeds} / --sweep-samples {sweep_samples} are too small",
                                 "pass --sweep-seeds >= 2 and --sweep-samples >= 10")
    names, skipped = resolve(METHODS, missing_torch="skip")
    _ = ctx.subset
    preflight(ctx, names)
    with staged_dir(out_dir) as out:
        return _reproduce(ctx, out, names, skipped, sweep_samples, sweep_seeds, trace_study_matvecs,
                          trace_study_seeds)


def _reproduce(ctx, out: Path, names, skipped, sweep_samples, sweep_seeds, trace_study_matvecs,
               trace_study_seeds) -> dict:
    from benchmarks.figures import draw_all
    from benchmarks.report import report_markdown

    t0 = time.perf_counter()
    record = rec.new_record("reproduce", ctx.provenance())
    if not ctx.options.checkpoint:
        save_checkpoint(out / "model.safetensors", ctx.params, ctx.arch,
                        {**ctx.train_info, **ctx.dataset.provenance()})
    run_methods(ctx, names, record, on_error="record")
    for name, why in skipped.items():
        record["results"][name] = {"status": "not run", "reason": why}
    log(f"Hutchinson sweep: 1..{sweep_samples} probes x {sweep_seeds} seeds")
    record["hutchinson_sweep"] = hutchinson_sweep(ctx, sweep_samples, sweep_seeds)
    if trace_study_matvecs is None:
        trace_study_matvecs = TRACE_STUDY_MATVECS["mlp" if ctx.arch.is_mlp else "cnn"]
    if trace_study_matvecs:
        from benchmarks.trace_study import trace_study

        log(f"trace-estimator study: up to {trace_study_matvecs} matvecs x {trace_study_seeds} seeds")
        record["trace_study"] = trace_study(ctx, trace_study_matvecs, trace_study_seeds,
                                            torch_ok="pyhessian:trace" not in skipped, progress=log)
    record["comparisons"] = rec.compare_to_reference(record, "exact", ctx.options.k)
    if not skipped and "torch:exact" in names:
        from benchmarks.crosscheck import crosscheck

        record["crosscheck"] = crosscheck(ctx)
    record["total_seconds"] = time.perf_counter() - t0
    plain = rec.to_jsonable(record)
    text = report_markdown(plain)  # figures and report first: results.json last marks a complete run
    draw_all(plain, out)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    rec.write_json(out / "results.json", record)
    return record
