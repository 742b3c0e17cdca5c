"""The study's figures (PNG) drawn from a result record: top-10 eigenvalues, traces, Hutchinson sweep, density."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.record import ran
from benchmarks.table import approximations, counterpart
from jax_impl.fileio import atomic_write

APPROX = approximations()  # the table's structured approximations



def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png",
                                                  metadata={"Software": "hessian-approx"}))
    _plt().close(fig)


ESTIMATORS = ("torch:exact", "ggn", "lanczos", "power", "pyhessian")


def fig_top_eigenvalues(record: dict, path: Path, k: int = 10) -> None:
    """Top-k eigenvalues against exact (black). Left: estimators of the Hessian's own
    eigenvalues; right: the structured approximations, JAX solid, BackPACK dashed."""
    plt = _plt()
    res = record["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    idx = np.arange(1, k + 1)
    markers = dict(zip(ESTIMATORS, ("x", "+", "s", "^", "v")))
    groups = ([n for n in ESTIMATORS if ran(res.get(n))],
              [n for a in APPROX for n in (a, counterpart(a)) if ran(res.get(n))])
    for ax, names, title in zip(axes, groups, ("Matrix-free estimates and PyTorch", "Structured approximations")):
        if ran(res.get("exact")):
            ex = np.asarray(res["exact"]["eigenvalues"][:k])
            ax.plot(idx[: len(ex)], ex, color="black", lw=3, alpha=0.35,
                    marker="o", ms=9, label="exact (JAX)", zorder=1)
        for i, name in enumerate(names):
            e = np.asarray(res[name]["eigenvalues"][:k], float)
            if ax is axes[0]:
                style = dict(marker=markers[name], ls="none", ms=8, mew=1.5)
            else:
                color = plt.get_cmap("tab10")(APPROX.index(name.split(":")[-1]))
                style = dict(color=color, marker="x" if name.startswith("backpack:") else ".",
                             ls="--" if name.startswith("backpack:") else "-")
            ax.plot(idx[: len(e)], np.clip(e, 1e-8, None), label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue index (descending)")
        ax.set_xticks(idx)
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=2 if ax is axes[1] else 1)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("eigenvalue (log scale)")
    fig.suptitle(f"Top-{k} Hessian eigenvalues: {record['provenance'].get('model', '')}")
    _save(fig, path)


def fig_trace(record: dict, path: Path) -> None:
    """Left: trace of each approximation (JAX, BackPACK) vs exact; right: Hutchinson and PyHessian vs exact."""
    plt = _plt()
    res = record["results"]
    exact = res.get("exact", {}).get("trace")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [n for n in ("ggn", *APPROX) if ran(res.get(n))]
    x = np.arange(len(names))
    a1.bar(x - 0.2, [res[n]["trace"] for n in names], 0.4, label="JAX")
    bp = [res.get(f"backpack:{n}", {}).get("trace") if ran(res.get(f"backpack:{n}")) else np.nan for n in names]
    a1.bar(x + 0.2, bp, 0.4, label="BackPACK")
    a1.set_xticks(x, names, rotation=30)
    a1.set_ylabel("trace")
    a1.set_title("Approximations against the exact trace")
    est = [(n, res[n]) for n in ("hutchinson", "pyhessian:trace", "slq", "pyhessian:density") if ran(res.get(n))]
    a2.errorbar(np.arange(len(est)), [e["trace"] for _, e in est],
                yerr=[e.get("stderr") or 0 for _, e in est], fmt="o", capsize=5)
    a2.set_xticks(np.arange(len(est)), [f"{n}\n({e.get('matvecs', '?')} Hvps)" for n, e in est])
    a2.set_ylabel("trace (± standard error)")
    a2.set_title("Stochastic estimates against the exact trace")
    for ax in (a1, a2):
        if exact is not None:
            ax.axhline(exact, color="black", ls="--", label=f"exact {exact:.4g}")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def fig_hutchinson(record: dict, path: Path) -> None:
    """Hutchinson's estimate against the number of probes: mean over seeds and a min-max band."""
    plt = _plt()
    sweep = record["hutchinson_sweep"]
    n = np.asarray(sweep["num_samples"])
    mean, lo, hi = (np.asarray(sweep[k]) for k in ("mean", "min", "max"))
    sd = np.asarray(sweep["std"])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.fill_between(n, lo, hi, alpha=0.2, label=f"min-max over {sweep['seeds']} seeds")
    ax.fill_between(n, mean - sd, mean + sd, alpha=0.35, label="mean ± 1 std over seeds")
    ax.plot(n, mean, lw=2, label="JAX Hutchinson, mean over seeds")
    exact = record["results"].get("exact", {}).get("trace")
    if exact is not None:
        ax.axhline(exact, color="black", ls="--", label=f"exact trace {exact:.4g}")
    ph = record["results"].get("pyhessian:trace")
    if ran(ph):
        ax.plot([ph["matvecs"]], [ph["trace"]], "rs", ms=8, label=f"PyHessian ({ph['matvecs']} probes)")
    ax.set_xscale("log")
    ax.set_xlabel("number of Rademacher probes (log scale)")
    ax.set_ylabel("trace estimate")
    ax.set_title("Hutchinson's estimate converges to the exact trace")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def fig_density(record: dict, path: Path) -> None:
    """SLQ density (JAX, PyHessian) over the histogram of the exact eigenvalues (log density axis)."""
    from jax_impl.algorithms import spectral_density

    plt = _plt()
    res = record["results"]
    fig, ax = plt.subplots(figsize=(8, 5))
    spectrum = res.get("exact", {}).get("spectrum")
    if spectrum:
        ax.hist(spectrum, bins=100, density=True, alpha=0.4, color="gray", label="exact eigenvalues (histogram)")
    for name, color in (("slq", "C0"), ("pyhessian:density", "C3")):
        if ran(res.get(name)):
            dens, grid = spectral_density(np.asarray(res[name]["nodes"]), np.asarray(res[name]["weights"]),
                                          num_bins=2000)
            ax.plot(np.asarray(grid), np.asarray(dens), color=color, label=f"{name} (Gaussian-smoothed)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-5)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title("Hessian spectral density")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def fig_trace_study(record: dict, path: Path) -> None:
    from benchmarks.trace_study import fig_trace_study as draw

    draw(record["trace_study"], path)


def fig_eigenvector_overlap(record: dict, path: Path) -> None:
    """Subspace overlap of each approximation's top-k eigenvectors with the exact Hessian's (and GGN's)."""
    plt = _plt()
    res = record["results"]
    names = [n for n in APPROX if ran(res.get(n)) and "eigenvectors" in res[n]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(names))
    for off, ref, color in ((-0.2, "vs_hessian", "C0"), (0.2, "vs_ggn", "C1")):
        vals = [res[n]["eigenvectors"].get(ref, {}).get("subspace_overlap", np.nan) for n in names]
        ax.bar(x + off, vals, width=0.4, color=color, label=f"top-k of the exact {ref[3:].replace('_', ' ')}")
    k = record["provenance"].get("num_params", 1)
    kk = len(res.get("exact", {}).get("eigenvalues", [])) or 10
    ax.axhline(kk / k, color="grey", ls=":", label=f"random subspace (k/d = {kk / k:.1e})")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("subspace overlap ‖UᵀV‖²_F / k")
    ax.set_title("Do the approximations point in the right directions? (1: same top-k subspace)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


FIGURES = {"fig1_top10_eigenvalues.png": fig_top_eigenvalues, "fig2_trace.png": fig_trace,
           "fig3_hutchinson_samples.png": fig_hutchinson, "fig4_density.png": fig_density,
           "fig5_trace_study.png": fig_trace_study, "fig6_eigenvector_overlap.png": fig_eigenvector_overlap}
NEEDS = {"fig5_trace_study.png": lambda r: "trace_study" in r,
         "fig6_eigenvector_overlap.png": lambda r: any("eigenvectors" in e for e in r["results"].values()
                                                       if isinstance(e, dict))}


def draw_all(record: dict, out_dir) -> list[Path]:
    """Write every figure into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = []
    for name, fn in FIGURES.items():
        if not NEEDS.get(name, lambda r: True)(record):
            continue
        fn(record, out / name)
        paths.append(out / name)
    return paths
