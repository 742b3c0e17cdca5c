"""How a curvature estimate depends on the sample: the command's methods on disjoint batches (--batch-size), summarized."""

from __future__ import annotations

import numpy as np

from jax_impl.errors import HessianApproxError

DEFAULT_NUM_BATCHES = 10  # as PyHessian issue #5's ten runs
QUANTITIES = ("lambda_max", "trace")
LABELS = {"lambda_max": "λ_max", "trace": "trace"}


def plan_spread(n: int, batch_size, num_batches, seed: int) -> dict:
    """The batches: ``num_batches`` disjoint sets of ``batch_size`` rows of the n training samples.

    Rows are consecutive slices of ``default_rng(seed).permutation(n)``; ``num_batches`` defaults
    to min(10, n // batch_size). Returns {"batch_size", "num_batches", "seed", "rows": [(B,) int64]}.
    """
    if batch_size is None:
        raise HessianApproxError("--num-batches was given without --batch-size", "pass --batch-size B as well")
    if batch_size < 1:
        raise HessianApproxError(f"--batch-size is {batch_size}", "pass a positive number of samples")
    if batch_size > n:
        raise HessianApproxError(f"--batch-size {batch_size} is larger than the {n} training samples",
                                 f"pass a --batch-size up to {n}")
    most = n // batch_size
    if num_batches is None:
        num_batches = min(DEFAULT_NUM_BATCHES, most)
    if num_batches < 1:
        raise HessianApproxError(f"--num-batches is {num_batches}", "pass a positive number")
    if num_batches > most:
        raise HessianApproxError(
            f"--num-batches {num_batches} of --batch-size {batch_size} need {num_batches * batch_size} samples but "
            f"the training set has {n}", f"pass --num-batches up to {most} (the batches are disjoint)")
    perm = np.random.default_rng(seed).permutation(n)
    rows = [perm[i * batch_size:(i + 1) * batch_size].astype(np.int64) for i in range(num_batches)]
    return {"batch_size": int(batch_size), "num_batches": int(num_batches), "seed": int(seed), "rows": rows}


def quantities(entry: dict) -> dict:
    """{lambda_max, trace, trace_stderr, seconds} of a method's record entry, those it has."""
    out = {}
    eig = entry.get("eigenvalues") if isinstance(entry, dict) else None
    if eig:
        out["lambda_max"] = float(eig[0])
    if isinstance(entry, dict) and entry.get("trace") is not None:
        out["trace"] = float(entry["trace"])
        if entry.get("stderr") is not None:  # the probes' share of a stochastic trace's spread
            out["trace_stderr"] = float(entry["stderr"])
    if isinstance(entry, dict) and entry.get("seconds") is not None:
        out["seconds"] = float(entry["seconds"])
    return out


def summarize(values) -> dict:
    """{mean, std (ddof=1; None for one value), min, max, n} of a list of numbers."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def run_spread(ctx, names, plan: dict, record: dict) -> dict:
    """Run ``names`` on each planned batch (a Context on its rows) and summarize per method and quantity.

    Returns the record's "spread": {batch_size, num_batches, seed, full_samples, per_batch:
    {method: {quantity: [values]}}, summary: {method: {quantity: {mean, std, min, max, n, full}}}},
    ``full`` being the value over the command's own Hessian data (``record["results"]``).
    """
    from benchmarks.context import log, progress_bar
    from benchmarks.methods import run_methods

    per: dict = {}
    bar = progress_bar(plan["num_batches"], f"batches of {plan['batch_size']}")
    for b, rows in enumerate(plan["rows"]):
        log(f"batch {b + 1}/{plan['num_batches']} ({plan['batch_size']} samples)")
        sub = {"results": {}}
        run_methods(ctx.for_rows(rows), names, sub)
        for name, entry in sub["results"].items():
            for q, value in quantities(entry).items():
                per.setdefault(name, {}).setdefault(q, []).append(value)
        bar.update(1)
    bar.close()
    summary = {}
    for name, qs in per.items():
        full = quantities(record["results"].get(name, {}))
        summary[name] = {q: {**summarize(v), "full": full.get(q)} for q, v in qs.items()}
    return {"batch_size": plan["batch_size"], "num_batches": plan["num_batches"], "seed": plan["seed"],
            "disjoint": True, "full_samples": len(ctx.subset_rows), "train_size": len(ctx.dataset.x_train),
            "per_batch": per, "summary": summary}


def format_spread(spread: dict) -> str:
    """One line per method and quantity: mean, std, min, max over the batches and the full-data value."""
    n, total = spread["full_samples"], spread["train_size"]
    full = f"all {n}" if n == total else f"N={n}"
    head = (f"{spread['num_batches']} batches of {spread['batch_size']}:", "mean", "std", "min", "max", full)
    rows = [head]
    for name, qs in spread["summary"].items():
        for q in QUANTITIES:
            if q in qs:
                s = qs[q]
                rows.append((f"{name} {LABELS[q]}", *(_num(s[k]) for k in ("mean", "std", "min", "max", "full"))))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}" + "".join(f"{c:>12}" for c in r[1:]) for r in rows)


def _num(x) -> str:
    return "-" if x is None else f"{x:.5g}"
