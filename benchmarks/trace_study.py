"""Trace estimators against matvecs: Hutchinson, Hutch++, XTrace and PyHessian's trace on the Hessian,
XNysTrace on the GGN; relative error (mean and 10-90% band over seeds) to |tr| and to the Frobenius norm,
the matvecs each needs for 1%, a figure and a report section."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from benchmarks.context import progress_bar
from benchmarks.record import ran
from jax_impl import algorithms
from jax_impl.algorithms import sketch_trace
from jax_impl.errors import HessianApproxError

# name (the method table's) -> the operator it runs on
ESTIMATORS = {"hutchinson": "hessian", "hutchpp": "hessian", "xtrace": "hessian", "pyhessian:trace": "hessian",
              "xnystrace": "ggn"}
LABELS = {"hutchinson": "Hutchinson", "hutchpp": "Hutch++", "xtrace": "XTrace",
          "pyhessian:trace": "PyHessian trace (torch probes)", "xnystrace": "XNysTrace (GGN)"}
SKETCHES = {"hutchpp": sketch_trace.hutchpp, "xtrace": sketch_trace.xtrace, "xnystrace": sketch_trace.xnystrace}
TARGET = 0.01  # the relative error (to |tr|) whose matvec count the study reports
BASE = 6  # budgets are BASE * 2^j: Hutch++'s thirds and XTrace's halves are whole


def budgets(max_matvecs: int) -> list[int]:
    """Log-spaced matvec budgets ``6 * 2^j <= max_matvecs``: 6, 12, 24, 48, 96, 192, 384, ...

    Every one is a multiple of 6, so Hutch++ (thirds) and XTrace (halves) use the whole budget,
    and every one meets the estimators' minimums (Hutch++ and XTrace 4, XNysTrace 2).
    """
    if isinstance(max_matvecs, bool) or not isinstance(max_matvecs, (int, np.integer)) or max_matvecs < BASE:
        raise HessianApproxError(f"max_matvecs={max_matvecs!r} is below the smallest budget {BASE}",
                                 f"pass an int max_matvecs >= {BASE}")
    out, b = [], BASE
    while b <= max_matvecs:
        out.append(b)
        b *= 2
    return out


def _reference(matrix: np.ndarray) -> dict:
    m = np.asarray(matrix, np.float64)
    return {"trace": float(np.trace(m)), "fro": float(np.linalg.norm(m))}


def _summary(errors: np.ndarray) -> dict:
    """errors (seeds, budgets) -> {"mean", "q10", "q90"} per budget."""
    return {"mean": errors.mean(0).tolist(), "q10": np.quantile(errors, 0.1, axis=0).tolist(),
            "q90": np.quantile(errors, 0.9, axis=0).tolist()}


def matvecs_to(mean_errors, grid, target: float = TARGET) -> int | None:
    """The smallest budget of ``grid`` whose mean relative error is <= ``target``; None if none is."""
    hit = [b for b, e in zip(grid, mean_errors) if e is not None and e <= target]
    return int(hit[0]) if hit else None


def _hutchinson_runs(op, key, grid, seeds, batch_size, tick) -> np.ndarray:
    """(seeds, budgets): running means of one max(grid)-probe run per seed."""
    run = jax.jit(lambda k: algorithms.hutchinson(op, k, num_samples=grid[-1], batch_size=batch_size).running_mean)
    idx = np.asarray(grid) - 1
    out = np.empty((seeds, len(grid)))
    for s in range(seeds):
        out[s] = np.asarray(run(jax.random.fold_in(key, s)), np.float64)[idx]
        tick(len(grid))
    return out


def _sketch_runs(fn, op, key, grid, seeds, batch_size, tick) -> np.ndarray:
    """(seeds, budgets): one run per seed and budget, jitted once per budget (the budget static)."""
    out = np.empty((seeds, len(grid)))
    for j, b in enumerate(grid):
        run = jax.jit(lambda k, b=b: fn(op, k, num_matvecs=b, batch_size=batch_size).trace)
        for s in range(seeds):
            out[s, j] = float(run(jax.random.fold_in(key, s)))
            tick(1)
    return out


def _pyhessian_runs(ctx, key, grid, seeds, tick) -> np.ndarray:
    """(seeds, budgets): running means of PyHessian's per-probe vᵀHv, one max(grid)-probe run per seed.

    tol=-inf: PyHessian stops when |m_i - m_{i-1}| / (m_{i-1} + 1e-6) < tol, which with tol=0 still
    fires once a running mean is negative; with -inf it never does, so every run uses all probes.
    Each seed's torch seed is drawn from ``fold_in(key, s)``: its probes are torch's, not ours.
    """
    from benchmarks.methods_torch import twin
    from torch_ref import pyhessian_runner

    model, x, y = twin(ctx)
    idx = np.asarray(grid) - 1
    out = np.empty((seeds, len(grid)))
    for s in range(seeds):
        seed = int(jax.random.bits(jax.random.fold_in(key, s), (), np.uint32))
        r = pyhessian_runner.trace(model, x, y, ctx.options.loss, max_iter=grid[-1], tol=float("-inf"), seed=seed)
        est = np.asarray(r["estimates"], np.float64)
        if len(est) != grid[-1]:
            raise HessianApproxError(f"PyHessian's trace stopped after {len(est)} of {grid[-1]} probes",
                                     "report this: tol=-inf should disable its stopping rule")
        out[s] = (np.cumsum(est) / np.arange(1, len(est) + 1))[idx]
        tick(len(grid))
    return out


def trace_study(ctx, max_matvecs: int = 384, seeds: int = 20, torch_ok: bool = True,
                progress: Callable[[str], None] | None = None) -> dict:
    """Relative error of each trace estimator against its matvec budget, over ``seeds`` seeds.

    Hutchinson, Hutch++, XTrace (``ctx.hvp``) and PyHessian's trace (the torch twin) estimate
    tr(H); XNysTrace (PSD only) estimates tr(GGN) on ``ctx.ggn_vp``. Each runs at every budget of
    ``budgets(max_matvecs)`` no larger than the dimension (at the dimension the dense trace is
    as cheap). Hutchinson and PyHessian give every budget from the running mean of one run per
    seed; the sketches are jitted once per budget. Seed ``s`` of estimator ``name`` uses
    ``fold_in(ctx.key("trace-study-<name>"), s)``. The exact references come from the dense
    ``ctx.hessian`` / ``ctx.ggn`` (float64 sums). Relative errors: ``|estimate - exact| / |tr|``
    and ``/ ||.||_F`` of the estimator's operator.

    Args:
      ctx: a :class:`benchmarks.context.Context`.
      max_matvecs: the largest budget (>= 6).
      seeds: independent runs per estimator and budget (>= 2; the issue asks for >= 20).
      torch_ok: run PyHessian when torch imports; False (or no torch) marks it not run.
      progress: called with one line per finished estimator (e.g. ``benchmarks.context.log``).

    Returns:
      JSON-ready ``{"model", "dim", "budgets", "seeds", "target", "reference": {"hessian":
      {"trace", "fro"}, "ggn": {...}}, "estimators": {name: {"operator", "label", "estimates"
      (seeds x budgets), "rel_err_trace": {"mean", "q10", "q90"} (per budget), "rel_err_fro":
      {...}, "matvecs_to_1pct" (smallest budget whose mean error to |tr| <= 1%, else None),
      "seconds" (all seeds and budgets, compilation included)}}, "seconds"}``; an estimator
      that did not run is ``{"operator", "label", "status": "not run", "reason"}``.
    """
    from benchmarks import registry

    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 2:
        raise HessianApproxError(f"seeds={seeds!r} gives no spread over seeds", "pass seeds >= 2 (the study: 20)")
    dim = ctx.problem.dim
    grid = [b for b in budgets(max_matvecs) if b <= dim]
    if not grid:
        raise HessianApproxError(f"the model has {dim} parameters, fewer than the smallest budget {BASE}",
                                 "use the exact trace")
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    reference = {"hessian": _reference(ctx.hessian[0]), "ggn": _reference(ctx.ggn[0])}
    ops = {"hessian": ctx.hvp, "ggn": ctx.ggn_vp}
    why_not = ("torch_ok=False" if not torch_ok else registry.torch_available())
    names = [n for n in ESTIMATORS if n != "pyhessian:trace" or why_not is None]
    bar = progress_bar(len(names) * seeds * len(grid), "trace study")
    batch = ctx.dense_columns
    out = {}
    for name, what in ESTIMATORS.items():
        entry = {"operator": what, "label": LABELS[name]}
        if name not in names:
            out[name] = {**entry, "status": "not run", "reason": f"the torch extra is not available ({why_not})"
                         if torch_ok else "torch_ok=False"}
            continue
        key = ctx.key(f"trace-study-{name}")
        t0 = time.perf_counter()
        if name == "hutchinson":
            est = _hutchinson_runs(ops[what], key, grid, seeds, batch, bar.update)
        elif name == "pyhessian:trace":
            est = _pyhessian_runs(ctx, key, grid, seeds, bar.update)
        else:
            est = _sketch_runs(SKETCHES[name], ops[what], key, grid, seeds, batch, bar.update)
        secs = time.perf_counter() - t0
        ref = reference[what]
        err = np.abs(est - ref["trace"])
        rel_tr, rel_fro = _summary(err / abs(ref["trace"])), _summary(err / ref["fro"])
        out[name] = {**entry, "estimates": est.tolist(), "rel_err_trace": rel_tr, "rel_err_fro": rel_fro,
                     "matvecs_to_1pct": matvecs_to(rel_tr["mean"], grid), "seconds": secs}
        say(f"trace study: {name} on the {what}, {len(grid)} budgets x {seeds} seeds in {secs:.1f} s; "
            f"mean relative error at {grid[-1]} matvecs {rel_tr['mean'][-1]:.2%} of |tr|")
    bar.close()
    return {"model": ctx.arch.describe(), "dim": int(dim), "budgets": grid, "seeds": int(seeds), "target": TARGET,
            "reference": reference, "estimators": out, "seconds": time.perf_counter() - t_start}


def fig_trace_study(study: dict, path) -> None:
    """Relative error against matvecs (log-log): mean line and 10-90% band over seeds per estimator;
    left relative to |tr|, right to the Frobenius norm (of H, or of the GGN for XNysTrace); 1% dotted."""
    from benchmarks.figures import _plt, _save

    plt = _plt()
    grid = np.asarray(study["budgets"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    floor = 1e-12  # an exact estimate (a sketch past the rank) on a log axis
    for ax, key, ylabel in zip(axes, ("rel_err_trace", "rel_err_fro"),
                               ("|estimate − tr| / |tr|", "|estimate − tr| / ‖·‖$_F$")):
        for i, (name, e) in enumerate(study["estimators"].items()):
            if not ran(e):
                continue
            color = plt.get_cmap("tab10")(i)
            mean, lo, hi = (np.clip(np.asarray(e[key][q], float), floor, None) for q in ("mean", "q10", "q90"))
            ax.fill_between(grid, lo, hi, color=color, alpha=0.18)
            ax.plot(grid, mean, color=color, marker="o", ms=4, lw=2,
                    ls="--" if name.startswith("pyhessian") else "-", label=e.get("label", name))
        ax.axhline(study.get("target", TARGET), color="black", ls=":", lw=1.5, label="1%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(grid, [str(b) for b in grid])
        ax.minorticks_off()
        ax.set_xlabel("matvecs (Hessian- or GGN-vector products)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("relative to |tr| (H; the GGN for XNysTrace)")
    axes[1].set_title("relative to the Frobenius norm")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Trace estimators on {study.get('model', '?')}: mean and 10–90% band over "
                 f"{study['seeds']} seeds")
    _save(fig, Path(path))


def _pct(x) -> str:
    return "–" if x is None else f"{x:.2%}" if x >= 1e-4 else f"{x:.1e}"


def _ratio_phrase(ours: float, theirs: float) -> str:
    if theirs == 0 and ours == 0:
        return "the same"
    if ours <= theirs:
        return f"{theirs / ours:.1f}x smaller than" if ours > 0 else "zero, against"
    return f"{ours / theirs:.1f}x larger than"


def findings(study: dict) -> list[str]:
    """Sentences on what held, computed from the numbers."""
    est, grid = study["estimators"], study["budgets"]
    out = []
    hu = est.get("hutchinson")
    if ran(hu):
        base = np.asarray(hu["rel_err_trace"]["mean"])
        parts = []
        for name in ("xtrace", "hutchpp"):
            if ran(est.get(name)):
                m = np.asarray(est[name]["rel_err_trace"]["mean"])
                wins = int(np.sum(m < base))
                parts.append(f"{LABELS[name]} beat Hutchinson at {wins} of {len(grid)} equal budgets, and at "
                             f"{grid[-1]} matvecs its mean error ({_pct(m[-1])}) is "
                             f"{_ratio_phrase(m[-1], base[-1])} Hutchinson's ({_pct(base[-1])})")
        if parts:
            out.append("; ".join(parts) + ".")
        ph = est.get("pyhessian:trace")
        if ran(ph):
            p = np.asarray(ph["rel_err_trace"]["mean"])
            out.append(f"PyHessian's trace, the same estimator with torch's probes, has mean error {_pct(p[-1])} at "
                       f"{grid[-1]} matvecs against our Hutchinson's {_pct(base[-1])} "
                       f"(ratio {p[-1] / base[-1]:.2f}; an independent run, so only the scale should agree).")
    reached = [(e["matvecs_to_1pct"], LABELS[n]) for n, e in est.items() if ran(e) and e["matvecs_to_1pct"]]
    missed = [LABELS[n] for n, e in est.items() if ran(e) and not e["matvecs_to_1pct"]]
    text = ("Within 1% of |tr| on average: " + ", ".join(f"{lab} from {b} matvecs" for b, lab in sorted(reached))
            if reached else "No estimator reached 1% of |tr| on average")
    if missed:
        text += f"; {', '.join(missed)} did not within {grid[-1]} matvecs"
    out.append(text + ".")
    return out


def report_section(study: dict) -> str:
    """The study as a Markdown section: a table per estimator and what held."""
    grid, ref = study["budgets"], study["reference"]
    lines = [f"## Trace estimators against matvecs: {study.get('model', '')}", "",
             f"Relative error |estimate − tr| / |tr| (and / ‖·‖_F) over {study['seeds']} seeds at budgets "
             f"{', '.join(map(str, grid))} matvecs; tr(H) = {ref['hessian']['trace']:.6g}, ‖H‖_F = "
             f"{ref['hessian']['fro']:.6g}; tr(GGN) = {ref['ggn']['trace']:.6g}, ‖GGN‖_F = {ref['ggn']['fro']:.6g} "
             "(exact, dense). Matvecs to 1%: the smallest budget whose mean error to |tr| is at most 1%.", "",
             f"| estimator | operator | matvecs to 1% | mean rel. error to \\|tr\\| at {grid[-1]} | "
             f"mean rel. error to ‖·‖_F at {grid[-1]} | seconds |",
             "|---|---|---:|---:|---:|---:|"]
    for name, e in study["estimators"].items():
        if not ran(e):
            lines.append(f"| {name} | {e['operator']} | not run: {e.get('reason', '')} | | | |")
            continue
        hit = e["matvecs_to_1pct"]
        lines.append(f"| {name} | {e['operator']} | {hit if hit is not None else f'not within {grid[-1]}'} | "
                     f"{_pct(e['rel_err_trace']['mean'][-1])} | {_pct(e['rel_err_fro']['mean'][-1])} | "
                     f"{e['seconds']:.2f} |")
    lines += ["", *(f"- {s}" for s in findings(study)), "",
              "Figure: relative error against matvecs, mean and 10–90% band over seeds (times include compilation "
              "and, for PyHessian, its torch Hvps).", ""]
    return "\n".join(lines)
