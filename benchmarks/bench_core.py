"""Issue-2 timings on the study's network: exact Hessian, eigendecomposition, Lanczos top-10, Hutchinson.

Run: ``python -m benchmarks.bench_core [--repeats 5] [--out benchmarks/results]``.
Medians of ``repeats`` runs after one warm-up (compilation excluded); results
appended to ``core.csv`` and written to ``core_<timestamp>.json``.
"""

from __future__ import annotations

import argparse
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
from jax_impl import algorithms, operators
from jax_impl.materialize import dense


def exact_hessian_jax_hessian(problem):
    """The whole Hessian by jax.hessian (forward-over-reverse over all d directions at once)."""
    flat = problem.flat_params
    return jax.hessian(lambda f: operators.loss(operators.Problem(problem.apply, problem.ell,
                                                                   problem.unravel(f), problem.batches)))(flat)


def run(options: Options, repeats: int) -> dict:
    ctx = Context(options)
    prob, dim = ctx.problem, ctx.problem.dim
    hvp = ctx.hvp
    key = jax.random.PRNGKey(options.seed)
    rows = {}
    log(f"benchmarking {ctx.spec.describe()} ({dim} parameters), {options.hessian_samples} samples, "
        f"{options.dtype}, {repeats} repeats after a warm-up")
    rows["hvp"] = measure(lambda: hvp(jnp.ones(dim, ctx.dtype)), repeats=max(repeats, 20))
    rows["exact_hessian_chunked_vmap"] = measure(lambda: dense(operators.hvp(prob), dim, ctx.dtype), repeats)
    jh = jax.jit(lambda: exact_hessian_jax_hessian(prob))
    rows["exact_hessian_jax_hessian"] = measure(jh, repeats)
    h = jnp.asarray(dense(operators.hvp(prob), dim, ctx.dtype))
    eigvalsh = jax.jit(algorithms.eigvalsh_descending)
    eigh = jax.jit(algorithms.eigh_descending)
    rows["eigvalsh_all"] = measure(lambda: eigvalsh(h), repeats)
    rows["eigh_all_with_vectors"] = measure(lambda: eigh(h), repeats)
    lan = jax.jit(lambda k: algorithms.lanczos(hvp, dim, k, k=10))
    rows["lanczos_top10"] = measure(lambda: lan(key), repeats)
    hut = jax.jit(lambda k: algorithms.hutchinson(hvp, dim, k, num_samples=100))
    rows["hutchinson_100"] = measure(lambda: hut(key), repeats)
    evals = np.asarray(eigvalsh(h))
    lres = lan(key)
    hres = hut(key)
    return {
        "benchmark": "core", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "versions": versions(), "provenance": ctx.provenance(),
        "timings": rows,
        "values": {"exact_top10": evals[:10], "exact_trace": float(np.trace(np.asarray(h))),
                   "lanczos_top10": lres.eigenvalues, "lanczos_max_rel_err": float(np.max(
                       np.abs(np.asarray(lres.eigenvalues) - evals[:10]) / np.abs(evals[:10]))),
                   "hutchinson_trace": float(hres.trace), "hutchinson_stderr": float(hres.stderr)},
    }


def append_csv(path: Path, result: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["created", "machine", "benchmark", "item", "median_s", "min_s", "max_s", "repeats",
                        "peak_rss_mb", "model", "samples", "dtype"])
        p = result["provenance"]
        for item, t in result["timings"].items():
            w.writerow([result["created"], result["machine"], result["benchmark"], item, f"{t['median']:.6g}",
                        f"{t['min']:.6g}", f"{t['max']:.6g}", t["repeats"], f"{t['peak_rss_bytes'] / 2**20:.1f}",
                        p["model"], p["hessian_samples"], p["dtype"]])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dataset", default="auto")
    ap.add_argument("--hessian-samples", type=int, default=1000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    result = run(Options(dataset=a.dataset, hessian_samples=a.hessian_samples, dtype=a.dtype), a.repeats)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = result["created"].replace(":", "").replace("-", "")
    (out / f"core_{stamp}.json").write_text(json.dumps(to_jsonable(result), indent=1))
    append_csv(out / "core.csv", result)
    for item, t in result["timings"].items():
        print(f"{item:28s} median {t['median']:.4g} s  (min {t['min']:.4g}, max {t['max']:.4g}, n={t['repeats']})")
    v = result["values"]
    print("exact top-10:", np.round(v["exact_top10"], 4).tolist(), "trace", round(v["exact_trace"], 4))
    print("lanczos max rel err", v["lanczos_max_rel_err"], "hutchinson", v["hutchinson_trace"], "+-", v["hutchinson_stderr"])


if __name__ == "__main__":
    main()
