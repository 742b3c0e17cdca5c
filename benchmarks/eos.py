"""The edge-of-stability experiment: full-batch GD at several η on an MNIST subset; sharpness plateau against 2/η.

``python -m benchmarks.eos`` runs ``hessian-approx track`` for each model and learning rate
(full batch, curvature on the whole training subset), then summarizes every run: the observed
plateau of λ_max against 2/η, the step it was first reached, and whether the loss kept
falling non-monotonically there (Cohen et al. 2021). Writes one track record and figure per
run, ``eos_summary.json``, ``eos.md`` (a report section) and ``fig_eos.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REACH = 0.9  # λ_max counts as having reached 2/η at 90% of it


def summarize(record: dict) -> dict:
    """The edge-of-stability figures of one full-batch GD record.

    ``reached_step``: the first measured step after the post-initialization minimum of λ_max at
    which λ_max >= REACH · 2/η (an initial sharpness above 2/η is first thrown down by the
    catapult mechanism, so the rise is counted from the minimum), or None. ``plateau``: the
    median λ_max over the measurements from ``reached_step`` on (over the last half of the run
    when never reached), with its 10%/90% quantiles. ``loss_increases``: the fraction of steps
    after ``reached_step`` whose loss exceeds the previous step's (non-monotone descent);
    ``loss_fell``: whether the final loss is below the loss at ``reached_step``.
    """
    s = record["settings"]
    thr = float(s["threshold"])
    rows = [r for r in record["rows"] if r["sharpness"] is not None]
    steps = np.array([r["step"] for r in rows])
    lam = np.array([r["sharpness"] for r in rows], float)
    loss = np.array([np.nan if v is None else v for v in record["train_loss"]], float)
    lo = int(np.argmin(lam))
    hit = [i for i in range(lo, len(lam)) if lam[i] >= REACH * thr]
    start = hit[0] if hit else len(lam) // 2
    window = lam[start:]
    out = {"lr": s["lr"], "threshold": thr, "initial_sharpness": float(lam[0]), "min_sharpness": float(lam[lo]),
           "max_sharpness_after_min": float(np.max(lam[lo:])),
           "reached_step": int(steps[start]) if hit else None,
           "plateau": float(np.median(window)), "plateau_q10": float(np.quantile(window, 0.1)),
           "plateau_q90": float(np.quantile(window, 0.9)), "plateau_over_threshold": float(np.median(window)) / thr,
           "final_loss": float(loss[-1]) if len(loss) else None, "diverged_at": record["diverged_at"],
           "steps": s["steps"], "lanczos_matvecs_mean": float(np.mean([r["lanczos_matvecs"] for r in rows]))}
    if hit and len(loss) > steps[start] + 1:
        seg = loss[int(steps[start]):]
        out["loss_increases"] = float(np.mean(np.diff(seg) > 0))
        out["loss_fell"] = bool(seg[-1] < seg[0])
    return out


def markdown(summary: dict) -> str:
    """The report section: one table per model."""
    lines = ["## Edge of stability", "",
             "Full-batch gradient descent on the first-seeded MNIST subset; λ_max tracked every "
             f"{summary['every']} steps by warm-started Lanczos (tol {summary['tol']:g}). Plateau: median λ_max "
             f"from the first step at which it reached {REACH:.0%} of 2/η after its post-initialization minimum "
             "(last half of the run when it never did); loss ↑: fraction of steps after that whose loss rose.", ""]
    for model, rows in summary["models"].items():
        lines += [f"### {model} ({summary['loss']}, {summary['samples'][model]} samples)", "",
                  "| η | 2/η | λ_max at step 0 | min | plateau (q10–q90) | plateau / (2/η) | reached at step | "
                  "loss ↑ | final loss |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            reached = "never" if r["reached_step"] is None else str(r["reached_step"])
            inc = "-" if "loss_increases" not in r else f"{r['loss_increases']:.0%}"
            fl = "diverged" if r["diverged_at"] is not None else f"{r['final_loss']:.4g}"
            lines.append(f"| {r['lr']:g} | {r['threshold']:.3g} | {r['initial_sharpness']:.4g} | {r['min_sharpness']:.3g} | "
                         f"{r['plateau']:.3g} ({r['plateau_q10']:.3g}–{r['plateau_q90']:.3g}) | "
                         f"{r['plateau_over_threshold']:.2f} | {reached} | {inc} | {fl} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eos", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--lrs", action="append", default=None, metavar="MODEL=η,η,η",
                   help="learning rates per model, e.g. mlp=0.1,0.2,0.4 (repeatable)")
    p.add_argument("--steps", action="append", default=None, metavar="MODEL=S", help="steps per model, e.g. mlp=2000")
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--samples", action="append", default=None, metavar="MODEL=N",
                   help="training subset per model (default 5000 each)")
    p.add_argument("--loss", default="mse", choices=["mse", "cross_entropy"])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--crosscheck", type=int, default=3, help="PyHessian checkpoints per run (default 3)")
    p.add_argument("--exact-max-dim", type=int, default=0,
                   help="also the exact λ_max at the cross-check steps up to this many parameters (default 0: "
                        "PyHessian only; the exact agreement is tested on small networks)")
    p.add_argument("--summarize-only", action="store_true",
                   help="only rebuild the summary, report and figure from the track_*.json already in --out")
    p.add_argument("--out", default="benchmarks/results/eos")
    a = p.parse_args(argv)
    from benchmarks.cli import main as cli
    from benchmarks.figures_track import fig_eos
    from jax_impl.fileio import atomic_write

    lrs = {"mlp": "0.2,0.3,0.4,0.5", "cnn": "0.01,0.02,0.04"}
    steps = {"mlp": "2000", "cnn": "1000"}
    lrs.update(dict(x.split("=", 1) for x in a.lrs or []))
    steps.update(dict(x.split("=", 1) for x in a.steps or []))
    samples = {"mlp": "5000", "cnn": "5000"}
    samples.update(dict(x.split("=", 1) for x in a.samples or []))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"loss": a.loss, "samples": samples, "every": a.every, "tol": 1e-3, "models": {}}
    records = {}
    for model in a.models.split(","):
        records[model] = []
        for lr in lrs[model].split(","):
            path = out / f"track_{model}_lr{lr}.json"
            if a.summarize_only:
                if path.exists():
                    records[model].append(json.loads(path.read_text()))
                continue
            argv_ = ["track", "--model", model, "--dataset", a.dataset, "--loss", a.loss, "--lr", lr,
                     "--steps", steps[model], "--every", str(a.every), "--train-samples", samples[model],
                     "--trace", "none", "--crosscheck", str(a.crosscheck), "--json", str(path)]
            argv_ += ["--crosscheck-exact-max-dim", str(a.exact_max_dim)]
            if a.data_dir:
                argv_ += ["--data-dir", a.data_dir]
            if cli(argv_) != 0:
                return 1
            records[model].append(json.loads(path.read_text()))
        if not records[model]:
            del records[model]
            continue
        summary["models"][model] = [summarize(r) for r in records[model]]
        for r, s in zip(records[model], summary["models"][model]):
            s["crosscheck"] = r.get("crosscheck", [])
            s["seconds"] = r["seconds"]
    text = json.dumps(summary, indent=1)
    atomic_write(out / "eos_summary.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    md = markdown(summary)
    atomic_write(out / "eos.md", lambda tmp: Path(tmp).write_text(md + "\n"))
    fig_eos(records, out / "fig_eos.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
