"""Side-by-side timings, JAX against PyTorch (PyHessian, BackPACK), in one run: ratios, peak memory, a width sweep.

Every timed item is the median of ``repeats`` runs after one warm-up (JAX compilation
excluded), with min, max and the peak resident memory above the start. Results go to
``<out>/bench_<stamp>.json`` and are appended to ``<out>/bench.csv`` with the machine.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.context import Context, Options, log
from benchmarks.record import machine, to_jsonable, versions
from benchmarks.timing import measure
from jax_impl.fileio import atomic_write
from jax_impl import algorithms, operators
from benchmarks.table import approximations
from jax_impl.approx import APPROXIMATIONS
from jax_impl.approx.exact import hessian_by_structure, unsupported
from jax_impl.errors import HessianApproxError
from jax_impl.materialize import dense_fn

TARGETS = {  # (JAX item, PyTorch item, required speed-up): from issue 5
    "top-10 eigenvalues, matched accuracy": ("lanczos_top10_matched", "pyhessian_top10_matched", 10.0),
    "exact Hessian": ("jax_exact_hessian", "torch_exact_hessian", 3.0),
    "exact Hessian by layer structure": ("jax_exact_hessian_structure", "torch_exact_hessian", 4.0),  # issue 14
    "Hutchinson, same probe count": ("jax_hutchinson", "pyhessian_trace", 3.0),
    "exact Hessian + all eigenvalues": ("jax_exact_plus_eigvalsh", "torch_exact_plus_eigvalsh", 1.5),  # issue 14
}


def max_rel(a, exact) -> float:
    a = np.sort(np.asarray(a, float))[::-1]
    return float(np.max(np.abs(a - exact[: len(a)]) / np.abs(exact[: len(a)])))


def matched_accuracy(run, settings, exact, target=1e-3) -> dict:
    """The first setting whose top eigenvalues are all within ``target`` relative of exact.

    Returns {"setting", "max_rel_err", "hvps", "matched"}; ``matched`` is False when
    even the last setting missed the target (its ratio is then not a matched comparison).
    """
    for s in settings:
        eigs, matvecs = run(s)
        err = max_rel(eigs, exact)
        log(f"  setting {s}: max rel err {err:.2e}, {matvecs} Hvps")
        if err <= target:
            break
    return {"setting": s, "max_rel_err": err, "hvps": matvecs, "matched": bool(err <= target)}


def core_items(ctx: Context, repeats: int, torch_ok: bool) -> tuple[dict, dict]:
    """Timings and accuracy notes on ctx's network: Hvp, exact Hessian, eigh, top-10, trace, approximations."""
    prob, dim, hvp = ctx.problem, ctx.problem.dim, ctx.hvp
    key = jax.random.PRNGKey(ctx.options.seed)
    v = np.random.default_rng(0).standard_normal(dim).astype(ctx.dtype)
    t, notes = {}, {}
    log("Hvp")
    t["jax_hvp"] = measure(lambda: hvp(v), repeats=max(repeats, 20))
    log("exact Hessian")
    build = dense_fn(operators.hvp(prob), ctx.dense_columns)
    t["jax_exact_hessian"] = measure(build, repeats)
    h = jnp.asarray(build())
    if ctx.arch.is_mlp:  # jax.hessian pushes all d tangents at once: d copies of every activation
        flat = prob.flat_params
        whole = jax.jit(jax.hessian(lambda f: operators.loss(operators.Problem(prob.apply, prob.ell, prob.unravel(f),
                                                                                prob.batches))))
        t["jax_exact_hessian_jax.hessian"] = measure(lambda: whole(flat), repeats)
    why = unsupported(prob, ctx.arch, hessian=True)
    if why is None and not ctx.arch.is_mlp:  # see Context.exact_route
        why = "conv nets' structure route compiles for minutes (304 s first call on the default CNN)"
    if why is None:
        log("exact Hessian by layer structure (per-layer contractions, jax_impl.approx.exact)")
        t["jax_exact_hessian_structure"] = measure(lambda: hessian_by_structure(prob, ctx.arch), repeats)
        hs = hessian_by_structure(prob, ctx.arch)
        notes["exact_hessian_structure"] = {
            "max_abs_diff_vs_hvp_route": float(np.max(np.abs(hs - np.asarray(h)))),
            "max_abs_entry": float(np.max(np.abs(np.asarray(h))))}
    else:
        notes["exact_hessian_structure"] = {"not_run": why}
    log("full eigendecomposition (values only)")
    t["jax_eigvalsh"] = measure(lambda: algorithms.eigvalsh_descending(h), repeats)
    exact = np.asarray(algorithms.eigvalsh_descending(h), np.float64)
    eigensolvers(np.asarray(h), repeats, t, notes)
    build = t.get("jax_exact_hessian_structure", t["jax_exact_hessian"])
    t["jax_exact_plus_eigvalsh"] = _sum(build, t["jax_eigvalsh"])
    k = 10
    log("top-10 at matched accuracy (all ten within 1e-3 relative of exact)")
    lan = {}

    def run_lanczos(steps):
        lan[steps] = jax.jit(lambda kk: algorithms.lanczos(hvp, kk, k=k, num_steps=steps))
        return np.asarray(lan[steps](key).eigenvalues), steps

    m = notes["lanczos_top10_matched"] = matched_accuracy(
        run_lanczos, [s for s in (20, 25, 30, 40, 60, 80, 120) if s <= dim], exact)
    t["lanczos_top10_matched"] = measure(lambda: lan[m["setting"]](key), repeats)
    pw = {}

    def run_power(tol):
        pw[tol] = jax.jit(lambda kk: algorithms.power_iteration(hvp, kk, k=k, max_iter=1000, tol=tol))
        r = pw[tol](key)
        return np.asarray(r.eigenvalues), int(r.matvecs)

    m = notes["power_top10_matched"] = {**matched_accuracy(run_power, [1e-3, 1e-4, 1e-5, 1e-6], exact),
                                        "max_iter": 1000}
    t["power_top10_matched"] = measure(lambda: pw[m["setting"]](key), repeats)
    log("Hutchinson, 100 probes")
    hut = jax.jit(lambda kk: algorithms.hutchinson(hvp, kk, num_samples=100))
    t["jax_hutchinson"] = measure(lambda: hut(key), repeats)
    log("approximations (JAX end to end, jitted)")
    for name in approximations():
        fn = APPROXIMATIONS[name]
        # weights and data as arguments: captured, XLA folded whole approximations at compile time
        f = jax.jit(lambda kk, p, b, fn=fn: fn(operators.Problem(prob.apply, prob.ell, p, b), ctx.arch, kk, 1))
        t[f"jax_{name}"] = measure(lambda: f(key, prob.params, prob.batches), repeats)
    if torch_ok:
        torch_items(ctx, repeats, exact, t, notes)
    return t, notes


def _sum(a: dict, b: dict) -> dict:
    """Two timed items run one after the other: medians, mins, maxs and first calls added."""
    out = {k: a[k] + b[k] for k in ("median", "min", "max")}
    out.update(repeats=min(a["repeats"], b["repeats"]), peak_rss_bytes=max(a["peak_rss_bytes"], b["peak_rss_bytes"]),
               first_call=(a.get("first_call") or 0) + (b.get("first_call") or 0), runs=[], sum_of=True)
    return out


def eigensolvers(h: np.ndarray, repeats: int, t: dict, notes: dict) -> None:
    """The values-only eigensolvers reachable without torch, timed on the exact Hessian ``h`` (issue 14 item 3).

    ``jax_eigvalsh`` is what the product calls (:func:`jax_impl.algorithms.lapack.driver`);
    beside it OpenBLAS's ``?syevd`` and ``?syevd_2stage`` (SciPy's build) and numpy's
    ``eigvalsh``, each checked against the product's values.
    """
    from jax_impl.algorithms import lapack

    if jax.default_backend() != "cpu":
        return
    ref = np.sort(np.asarray(algorithms.eigvalsh_descending(h), np.float64))
    tried = {"eigvalsh_openblas_syevd": lambda: lapack.run_interruptibly(lapack._syevd_values, h.copy()),
             "eigvalsh_openblas_syevd_2stage": lambda: lapack.run_interruptibly(lapack._syevd_2stage_values, h.copy()),
             "eigvalsh_numpy": lambda: np.linalg.eigvalsh(h)}
    notes["eigensolvers"] = {"product_driver": lapack.driver(), "max_abs_diff_over_max": {}}
    for name, fn in tried.items():
        log(f"  eigensolver {name}")
        t[name] = measure(fn, max(1, min(repeats, 3)))
        notes["eigensolvers"]["max_abs_diff_over_max"][name] = float(
            np.max(np.abs(np.sort(fn()) - ref)) / max(np.max(np.abs(ref)), 1e-300))


def torch_items(ctx, repeats, exact, t, notes) -> None:
    import torch

    from benchmarks.methods_torch import twin
    from torch_ref import exact as texact
    from torch_ref import pyhessian_runner
    from torch_ref.backpack_runner import run_backpack

    model, x, y = twin(ctx)
    loss = ctx.options.loss
    dim = ctx.problem.dim
    v = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    log("PyTorch Hvp")
    t["torch_hvp"] = measure(lambda: texact.hvp(model, x, y, loss, v), repeats=max(repeats, 20))
    # all three ways on an mlp; on a conv net only the fastest ("loop" was 6x slower there, see torch_ref.exact)
    ways = texact.METHODS if ctx.arch.is_mlp else (texact.default_method(model),)
    log(f"PyTorch exact Hessian: {', '.join(ways)}")
    for way in ways:
        t[f"torch_exact_hessian_{way}"] = measure(lambda w=way: texact.hessian(model, x, y, loss, method=w), repeats)
    fastest = min(ways, key=lambda w: t[f"torch_exact_hessian_{w}"]["median"])
    t["torch_exact_hessian"] = {**t[f"torch_exact_hessian_{fastest}"], "way": fastest}
    h = torch.from_numpy(texact.hessian(model, x, y, loss))
    t["torch_eigvalsh"] = measure(lambda: torch.linalg.eigvalsh(h), repeats)
    t["torch_exact_plus_eigvalsh"] = _sum(t["torch_exact_hessian"], t["torch_eigvalsh"])
    log("PyHessian top-10, tightening tol until all ten are within 1e-3 relative")

    def run_ph(tol):
        r = pyhessian_runner.top_eigenvalues(model, x, y, loss, k=10, max_iter=1000, tol=tol, seed=0)
        return r["eigenvalues"], r["matvecs"]

    m = notes["pyhessian_top10_matched"] = {**matched_accuracy(run_ph, [1e-3, 1e-4, 1e-5, 1e-6], exact),
                                            "max_iter": 1000}
    t["pyhessian_top10_matched"] = measure(lambda: run_ph(m["setting"]), repeats)
    log("PyHessian trace, 100 probes (tol 0: all probes used)")
    used = pyhessian_runner.trace(model, x, y, loss, max_iter=100, tol=0.0)["matvecs"]
    notes["pyhessian_trace"] = {"probes": used, "same_probe_count": used == 100}
    t["pyhessian_trace"] = measure(lambda: pyhessian_runner.trace(model, x, y, loss, max_iter=100, tol=0.0), repeats)
    log("BackPACK approximations (one forward and backward with the extension)")
    bp_model = copy.deepcopy(model)
    for name in approximations():
        t[f"backpack_{name}"] = measure(lambda n=name: run_backpack(bp_model, x, y, loss, n), repeats)


def ratios(t: dict) -> dict:
    """PyTorch median / JAX median for every pair measured (>1: JAX faster)."""
    pairs = {"hvp": ("jax_hvp", "torch_hvp"), "exact Hessian": ("jax_exact_hessian", "torch_exact_hessian"),
             "exact Hessian by layer structure": ("jax_exact_hessian_structure", "torch_exact_hessian"),
             "full eigendecomposition": ("jax_eigvalsh", "torch_eigvalsh"),
             "top-10 eigenvalues, matched accuracy (Lanczos)": ("lanczos_top10_matched", "pyhessian_top10_matched"),
             "top-10 eigenvalues, matched accuracy (power)": ("power_top10_matched", "pyhessian_top10_matched"),
             "Hutchinson, same probe count": ("jax_hutchinson", "pyhessian_trace"),
             "exact Hessian + all eigenvalues": ("jax_exact_plus_eigvalsh", "torch_exact_plus_eigvalsh")}
    for name in approximations():
        pairs[f"approximation {name}"] = (f"jax_{name}", f"backpack_{name}")
    return {k: t[b]["median"] / t[a]["median"] for k, (a, b) in pairs.items() if a in t and b in t}


def valid_ratios(t: dict, notes: dict) -> dict:
    """ratios(), leaving out comparisons whose premise failed (accuracy not matched, probe counts differ)."""
    out = ratios(t)
    for name, (a, b) in {"top-10 eigenvalues, matched accuracy (Lanczos)": ("lanczos", "pyhessian"),
                         "top-10 eigenvalues, matched accuracy (power)": ("power", "pyhessian")}.items():
        if not (notes.get(f"{a}_top10_matched", {}).get("matched") and notes.get(f"{b}_top10_matched", {}).get("matched")):
            out.pop(name, None)
    if not notes.get("pyhessian_trace", {}).get("same_probe_count", True):
        out.pop("Hutchinson, same probe count", None)
    return out


def width_sweep(base: Options, widths, repeats: int, max_exact_dim: int, torch_ok: bool) -> list[dict]:
    """Matrix-free methods (and the exact Hessian while it fits) against hidden width."""
    rows = []
    for w in widths:
        ctx = Context(Options(**{**base.__dict__, "hidden": (w,), "epochs": 1, "checkpoint": None}))
        dim, hvp = ctx.problem.dim, ctx.hvp
        key = jax.random.PRNGKey(0)
        log(f"width {w}: {dim} parameters")
        v = np.ones(dim, ctx.dtype)
        row = {"width": w, "num_params": dim, "jax_hvp": measure(lambda: hvp(v), repeats)}
        lan = jax.jit(lambda kk: algorithms.lanczos(hvp, kk, k=10, num_steps=40))
        row["jax_lanczos40"] = measure(lambda: lan(key), repeats)
        hut = jax.jit(lambda kk: algorithms.hutchinson(hvp, kk, num_samples=100))
        row["jax_hutchinson100"] = measure(lambda: hut(key), repeats)
        from benchmarks.bench_overhead import time_operator

        per = time_operator(hvp, repeats, log=log)  # issue 14 item 1: each algorithm's cost per matvec / bare Hvp
        row["per_matvec_over_hvp"] = {n: it["ratio"] for n, it in per["items"].items()}
        row["compile_s"] = {n: max(it["first_call_s"] - it["median_s"], 0.0) for n, it in per["items"].items()}
        if dim <= max_exact_dim:
            row["jax_exact_hessian"] = measure(dense_fn(operators.hvp(ctx.problem), ctx.dense_columns), 1)
        if torch_ok:
            from benchmarks.methods_torch import twin
            from torch_ref import exact as texact
            from torch_ref import pyhessian_runner

            model, x, y = twin(ctx)
            row["torch_hvp"] = measure(lambda: texact.hvp(model, x, y, ctx.options.loss, v), repeats)
            row["pyhessian_trace100"] = measure(
                lambda: pyhessian_runner.trace(model, x, y, ctx.options.loss, max_iter=100, tol=0.0), 1)
            if dim <= max_exact_dim:
                row["torch_exact_hessian"] = measure(lambda: texact.hessian(model, x, y, ctx.options.loss), 1)
        rows.append(row)
    return rows


def run_bench(options: Options, repeats: int = 5, widths=(10, 32, 64, 128, 256), max_exact_dim: int = 26000,
              out_dir="benchmarks/results") -> dict:
    from benchmarks.registry import torch_available

    if repeats < 1 or any(w < 1 for w in widths):
        raise HessianApproxError(f"--repeats {repeats} / --widths {widths} must be positive", "pass positive values")
    torch_ok = torch_available() is None
    ctx = Context(options)
    if widths and not (ctx.arch.is_mlp and len(ctx.arch.param_layers) == 2):
        log(f"bench: no width sweep for {ctx.arch.to_string()} (it sweeps the hidden width of a one-hidden-layer mlp)")
        widths = ()
    log(f"bench: {ctx.arch.describe()} ({ctx.problem.dim} parameters), {ctx.hessian_samples} samples, "
        f"{repeats} repeats after a warm-up, torch {'on' if torch_ok else 'not installed'}")
    t, notes = core_items(ctx, repeats, torch_ok)
    result = {"benchmark": "bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "devices": [str(d) for d in jax.devices()], "versions": versions(),
              "provenance": ctx.provenance(), "repeats": repeats, "timings": t, "notes": notes,
              "ratios_torch_over_jax": valid_ratios(t, notes)}
    result["targets"] = {name: {"ratio": result["ratios_torch_over_jax"].get(
        "top-10 eigenvalues, matched accuracy (Lanczos)" if "top-10" in name else name), "required": req}
        for name, (_, _, req) in TARGETS.items()}
    for name in approximations():
        result["targets"][f"approximation {name}"] = {
            "ratio": result["ratios_torch_over_jax"].get(f"approximation {name}"), "required": 1.0}
    write(result, Path(out_dir))  # the core timings are kept even if the sweep fails
    if widths:
        result["width_sweep"] = width_sweep(options, widths, repeats, max_exact_dim, torch_ok)
        write(result, Path(out_dir), csv_rows="sweep")
    return result


def _width(provenance: dict):
    """The hidden width of a one-hidden-layer mlp (the CSV's width column), else ''."""
    layers = provenance["architecture"]["layers"]
    dense = [l for l in layers if l["kind"] == "dense"]
    ok = len(provenance["architecture"]["input_shape"]) == 1 and len(dense) == 2
    return dense[0]["features"] if ok else ""


def write(result: dict, out: Path, csv_rows: str = "core") -> None:
    """bench_<stamp>.json (atomically, rewritten as results grow) and the ``csv_rows`` rows appended to bench.csv."""
    stamp = result["created"].replace(":", "").replace("-", "")
    text = json.dumps(to_jsonable(result), indent=1)
    atomic_write(out / f"bench_{stamp}.json", lambda tmp: Path(tmp).write_text(text))
    path = out / "bench.csv"
    new = not path.exists()
    p = result["provenance"]
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["created", "machine", "devices", "item", "width", "num_params", "median_s", "min_s", "max_s",
                        "repeats", "peak_rss_mb", "samples", "dtype"])

        def row(item, tm, width, dim):
            w.writerow([result["created"], result["machine"], " ".join(result["devices"]), item, width, dim,
                        f"{tm['median']:.6g}", f"{tm['min']:.6g}", f"{tm['max']:.6g}", tm["repeats"],
                        f"{tm['peak_rss_bytes'] / 2**20:.1f}", p["hessian_samples"], p["dtype"]])

        if csv_rows == "core":
            for item, tm in result["timings"].items():
                row(item, tm, _width(p), p["num_params"])
        for r in result.get("width_sweep", []) if csv_rows == "sweep" else []:
            for item, tm in r.items():
                if isinstance(tm, dict) and "median" in tm:
                    row(item, tm, r["width"], r["num_params"])


def format_bench(result: dict) -> str:
    """Timings and ratios as a table, targets marked met or missed."""
    lines = [f"{'item':34s}{'median s':>12s}{'min':>10s}{'max':>10s}{'peak MB':>10s}{'1st call':>10s}"]
    for item, tm in result["timings"].items():
        first = f"{tm['first_call']:10.4g}" if tm.get("first_call") is not None else f"{'':10s}"
        lines.append(f"{item:34s}{tm['median']:12.4g}{tm['min']:10.4g}{tm['max']:10.4g}"
                     f"{tm['peak_rss_bytes'] / 2**20:10.1f}{first}")
    lines.append("(1st call: the warm-up, compilation included; JAX's compile time is about 1st call - median)")
    lines.append("")
    lines.append(f"{'PyTorch / JAX (median ratio)':52s}{'ratio':>8s}{'target':>8s}")
    for name, r in result["ratios_torch_over_jax"].items():
        tgt = next((v["required"] for k, v in result["targets"].items() if k == name or
                    (k.startswith("top-10") and name.startswith("top-10") and "Lanczos" in name)), None)
        mark = "" if tgt is None else (f"{tgt:>7.0f}x " + ("met" if r >= tgt else "MISSED"))
        lines.append(f"{name:52s}{r:8.2f}{mark:>16s}")
    for n, v in result["notes"].items():
        lines.append(f"{n}: {v}")
    for r in result.get("width_sweep", []):
        if "per_matvec_over_hvp" in r:
            cells = ", ".join(f"{k} {v:.2f}" for k, v in r["per_matvec_over_hvp"].items())
            lines.append(f"width {r['width']} ({r['num_params']} params): per matvec / bare Hvp: {cells}")
    return "\n".join(lines)
