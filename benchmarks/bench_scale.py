"""Scale benchmark (issue 12, item 1): cost of the Hvp, Lanczos top-10 and Hutchinson against N, streamed and in memory, and the spread over batches.

``cost``: one fresh process per (N, placement), so each has its own peak memory. It loads the
dataset and weights, then measures, with a 5 ms psutil sampler of its resident memory: the Hvp
(first call = compilation + one pass, then the median of ``--repeats`` passes), Lanczos top-10
(40 matvecs) and Hutchinson (``--hutchinson-samples`` probes), each jitted whole and compiled ahead
of time: the compilation and one run are timed apart (a run at 60,000 CNN samples takes minutes).
``rss_base_mb`` is the process after loading data and weights; ``rss_peak_mb`` the peak from
there to the end (building the Hessian data included); ``growth_mb`` their difference.

``spread``: λ_max (Lanczos) and the trace (Hutchinson) on the full training set (streamed), then
on disjoint batches of each ``--batch-sizes`` (``benchmarks.spread``), against the full value.

    python -m benchmarks.bench_scale cost --model mlp --sizes 1000,10000,60000 --checkpoint CK --data-dir D
    python -m benchmarks.bench_scale spread --model mlp --batch-sizes 128,1024,4096 --checkpoint CK --data-dir D

Each writes ``benchmarks/results/scale/<kind>_<model>_<stamp>.json`` atomically and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("benchmarks/results/scale")


def _context(cfg: dict):
    from benchmarks.context import Context, Options

    return Context(Options(dataset="mnist", data_dir=cfg["data_dir"], checkpoint=cfg["checkpoint"],
                           hessian_samples=cfg["n"], stream=cfg.get("stream", "auto"),
                           hutchinson_samples=cfg.get("hutchinson_samples", 100), seed=cfg.get("seed", 0),
                           chunk_size=cfg.get("chunk_size")))


def child(cfg: dict) -> dict:
    """One (N, placement): times and resident memory of the methods in ``cfg["methods"]``."""
    import jax
    import psutil

    from benchmarks.timing import PeakRSS
    from jax_impl import algorithms

    proc = psutil.Process()
    ctx = _context(cfg)
    _ = ctx.dataset, ctx.params
    base = proc.memory_info().rss
    out = {"n": cfg["n"], "streamed": None, "rss_base_mb": base / 2**20}
    with PeakRSS(interval=0.005) as mem:
        t0 = time.perf_counter()
        hvp = ctx.hvp
        out["streamed"] = ctx.streamed
        v = jax.random.normal(jax.random.PRNGKey(0), (hvp.dim,), hvp.dtype)
        jax.block_until_ready(hvp(v))
        out["hvp_first_s"] = time.perf_counter() - t0
        runs = []
        for _ in range(cfg.get("repeats", 3)):
            t0 = time.perf_counter()
            jax.block_until_ready(hvp(v))
            runs.append(time.perf_counter() - t0)
        out["hvp_s"], out["hvp_runs_s"] = statistics.median(runs), runs
        key = ctx.key("bench_scale")
        probes = cfg.get("hutchinson_samples", 100)
        jobs = {"lanczos": (lambda k: algorithms.lanczos(hvp, k, k=10, num_steps=40).eigenvalues[0], "lambda_max"),
                "hutchinson": (lambda k: algorithms.hutchinson(hvp, k, num_samples=probes).trace, "trace")}
        for name in cfg["methods"]:
            what = jobs[name][1]
            t0 = time.perf_counter()
            fn = jax.jit(jobs[name][0]).lower(key).compile()  # ahead of time: the run below is timed alone
            out[f"{name}_compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out[what] = float(jax.block_until_ready(fn(key)))
            out[f"{name}_s"] = time.perf_counter() - t0
        if "hutchinson" in cfg["methods"]:
            out["hutchinson_probes"] = probes
    out["rss_peak_mb"] = (base + mem.peak) / 2**20
    out["growth_mb"] = mem.peak / 2**20
    out["chunk_size"], out["num_params"] = ctx.chunk_size, ctx.problem.dim
    return out


def run_cost(a) -> dict:
    rows = []
    for n in a.sizes:
        for placement in a.placements:
            cfg = {"n": n, "stream": {"streamed": "on", "memory": "off"}[placement], "data_dir": a.data_dir,
                   "checkpoint": a.checkpoint, "methods": a.methods, "hutchinson_samples": a.hutchinson_samples,
                   "repeats": a.repeats, "chunk_size": a.chunk_size}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "child", json.dumps(cfg)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode:
                raise SystemExit(f"child {cfg} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["placement"] = placement
            rows.append(row)
            print(_row_text(row), flush=True)
    return {"rows": rows}


def _row_text(r: dict) -> str:
    parts = [f"N={r['n']:>6} {r['placement']:<8} chunk {r['chunk_size']:>5}", f"hvp {r['hvp_s'] * 1e3:8.1f} ms (first {r['hvp_first_s']:.2f} s)"]
    if "lanczos_s" in r:
        parts.append(f"lanczos-10 {r['lanczos_s']:7.2f} s (compile {r['lanczos_compile_s']:.1f}; λ_max {r['lambda_max']:.4g})")
    if "hutchinson_s" in r:
        parts.append(f"hutchinson-{r['hutchinson_probes']} {r['hutchinson_s']:7.2f} s "
                     f"(compile {r['hutchinson_compile_s']:.1f}; trace {r['trace']:.4g})")
    parts.append(f"rss base {r['rss_base_mb']:.0f} MB, peak {r['rss_peak_mb']:.0f} MB (+{r['growth_mb']:.0f})")
    return " | ".join(parts)


def run_spread_bench(a) -> dict:
    from benchmarks import record as rec
    from benchmarks.methods import run_methods
    from benchmarks.spread import format_spread, plan_spread, run_spread

    names = ["lanczos", "hutchinson"]
    ctx = _context({"n": "all", "data_dir": a.data_dir, "checkpoint": a.checkpoint,
                    "hutchinson_samples": a.hutchinson_samples})
    record = {"results": {}}
    t0 = time.perf_counter()
    if a.full:
        run_methods(ctx, names, record)
    full_s = time.perf_counter() - t0
    out = {"full": {n: {k: record["results"][n].get(k) for k in ("eigenvalues", "trace", "stderr", "seconds")}
                    for n in record["results"]}, "full_seconds": full_s, "streamed_full": ctx.streamed, "spreads": []}
    for b in a.batch_sizes:
        t0 = time.perf_counter()
        plan = plan_spread(len(ctx.dataset.x_train), b, a.num_batches, ctx.subset_seed)
        s = run_spread(ctx, names, plan, record)
        s["seconds"] = time.perf_counter() - t0
        out["spreads"].append(s)
        print(format_spread(s), flush=True)
    out["provenance"] = rec.to_jsonable({"machine": rec.machine(), "versions": rec.versions()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_scale", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True)
    ints = lambda t: [int(s) for s in t.split(",") if s]
    for name in ("cost", "spread"):
        q = sub.add_parser(name)
        q.add_argument("--model", default="mlp", help="label of the checkpoint's network (mlp, cnn) for the file name")
        q.add_argument("--checkpoint", required=True)
        q.add_argument("--data-dir", default=os.environ.get("HESSIAN_APPROX_DATA"))
        q.add_argument("--hutchinson-samples", type=int, default=100)
        q.add_argument("--out", default=str(OUT))
    c = sub.choices["cost"]
    c.add_argument("--sizes", type=ints, default=[1000, 10000, 60000])
    c.add_argument("--placements", type=lambda t: t.split(","), default=["streamed", "memory"])
    c.add_argument("--methods", type=lambda t: [m for m in t.split(",") if m], default=["lanczos", "hutchinson"],
                   help="besides the Hvp: lanczos, hutchinson (comma-separated; empty for the Hvp only)")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--chunk-size", type=int, default=None, help="samples per chunk (default: the model's rule)")
    s = sub.choices["spread"]
    s.add_argument("--batch-sizes", type=ints, default=[128, 1024, 4096])
    s.add_argument("--num-batches", type=int, default=None)
    s.add_argument("--no-full", dest="full", action="store_false", help="skip the full-data values")
    ch = sub.add_parser("child")
    ch.add_argument("cfg")
    a = p.parse_args(argv)
    if a.kind == "child":
        print(json.dumps(child(json.loads(a.cfg))))
        return 0
    from benchmarks import record as rec

    t0 = time.perf_counter()
    result = run_cost(a) if a.kind == "cost" else run_spread_bench(a)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = {"kind": a.kind, "model": a.model, "checkpoint": a.checkpoint, "argv": sys.argv[1:],
              "seconds": time.perf_counter() - t0, "machine": rec.machine(), **result}
    path = Path(a.out) / f"{a.kind}_{a.model}_{stamp}.json"
    rec.write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
