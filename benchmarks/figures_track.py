"""Figures of tracked training: sharpness against step with the stability threshold, and the edge-of-stability panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.figures import _plt, _save


def _series(rows: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([r["step"] for r in rows if r.get(name) is not None], float)
    values = np.array([r[name] for r in rows if r.get(name) is not None], float)
    return steps, values


def draw_track(ax, record: dict, color="C0", label_prefix: str = "", loss_axis: bool = True) -> None:
    """Sharpness (and GGN / preconditioned sharpness) against step on ``ax``, the threshold dashed,
    the training loss on a twin axis."""
    s = record["settings"]
    rows = record["rows"]
    main = s.get("threshold_of", "sharpness")
    steps, lam = _series(rows, main)
    ax.plot(steps, lam, color=color, lw=1.8, label=f"{label_prefix}{'λmax(P⁻¹H)' if main != 'sharpness' else 'λmax(H)'}")
    if main != "sharpness":
        st, v = _series(rows, "sharpness")
        ax.plot(st, v, color=color, lw=1, alpha=0.5, label=f"{label_prefix}λmax(H)")
    st, v = _series(rows, "ggn_sharpness")
    if len(v):
        ax.plot(st, v, color=color, lw=1, ls=":", label=f"{label_prefix}λmax(GGN)")
    ax.axhline(s["threshold"], color=color, ls="--", lw=1, alpha=0.8,
               label=f"{label_prefix}{s['threshold_name']} = {s['threshold']:.3g}")
    if record.get("diverged_at") is not None:
        ax.axvline(record["diverged_at"], color=color, lw=0.8, alpha=0.5)
    if loss_axis:
        loss = np.array([np.nan if v is None else v for v in record["train_loss"]], float)
        ax2 = ax.twinx()
        ax2.plot(np.arange(len(loss)), loss, color="grey", lw=0.8, alpha=0.7, label="training loss")
        ax2.set_ylabel("training loss", color="grey")
        if np.nanmin(loss) > 0:
            ax2.set_yscale("log")


def fig_track(record: dict, path) -> None:
    """One tracked run: sharpness against step, threshold line, training loss on a second axis."""
    plt = _plt()
    s, p = record["settings"], record["provenance"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw_track(ax, record)
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"{p['model']}, {s['optimizer']} η={s['lr']:g}, batch {p['batch_size']} of {p['train_samples']}",
                 fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, Path(path))


def fig_eos(records: dict, path) -> None:
    """The edge-of-stability experiment: one panel per model, one colour per learning rate.

    ``records``: model name -> list of track records (one per η).
    """
    plt = _plt()
    fig, axes = plt.subplots(2, len(records), figsize=(6.5 * len(records), 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]}, sharex="col")
    for j, (model, recs) in enumerate(records.items()):
        ax, lx = axes[0, j], axes[1, j]
        for i, r in enumerate(recs):
            c = f"C{i}"
            draw_track(ax, r, color=c, label_prefix=f"η={r['settings']['lr']:g}: ", loss_axis=False)
            loss = np.array([np.nan if v is None else v for v in r["train_loss"]], float)
            lx.plot(np.arange(len(loss)), loss, color=c, lw=1, label=f"η={r['settings']['lr']:g}")
        top = max(max(r["settings"]["threshold"] for r in recs) * 1.6, 1)
        ax.set_ylim(0, top)
        ax.set_title(f"{model}: full-batch GD, {recs[0]['provenance']['train_samples']} MNIST samples", fontsize=10)
        ax.set_ylabel("λmax (solid), 2/η (dashed)")
        ax.legend(fontsize=6, ncol=2, loc="upper right")
        lx.set_yscale("log")
        lx.set_xlabel("step")
        lx.set_ylabel("training loss")
        lx.legend(fontsize=7)
    _save(fig, Path(path))
