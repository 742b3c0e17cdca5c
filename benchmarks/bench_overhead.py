"""Per-matvec cost of the matrix-free algorithms against one bare Hvp (issue 14, item 1).

For each network (the hidden widths of a one-hidden-layer MLP, as ``bench``'s width sweep, or
the network the options name, e.g. the default CNN) one process times, in interleaved rounds
so that a busy machine slows every item alike:

- the bare jitted Hvp on a fixed vector (``hvp_calls`` calls per round);
- each algorithm, jitted, at a fixed matvec count: Lanczos (40 steps), power iteration
  (fixed iterations, ``tol = 0``), Hutchinson (100 probes) and its diagonal, SLQ, block
  Lanczos, Hutch++ / XTrace / XDiag (about 100 matvecs).

``ratio = (median seconds of the algorithm / its matvecs) / median seconds of one Hvp``; the
target of issue 14 is ``<= 1.3`` everywhere. The first call of each item (compilation plus one
run) is recorded apart as ``first_call_s``.

    python -m benchmarks.bench_overhead [--widths 10,32,64,128,256] [--model cnn] [--repeats 5]

writes ``benchmarks/results/overhead/overhead_<stamp>.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

TARGET = 1.3
WIDTHS = (10, 32, 64, 128, 256)


def items(op, algorithms=None) -> dict:
    """``{name: (fn(key) -> result, nominal matvecs)}``, each ``fn`` jitted, for the Operator ``op``.

    ``algorithms`` is the module providing the algorithms (default :mod:`jax_impl.algorithms`;
    another one lets two implementations be timed side by side).
    """
    if algorithms is None:
        from jax_impl import algorithms
    a = algorithms
    k10 = min(10, op.dim)
    table = {
        "lanczos": (lambda key: a.lanczos(op, key, k=k10, num_steps=min(40, op.dim)), min(40, op.dim)),
        "power": (lambda key: a.power_iteration(op, key, k=1, max_iter=40, tol=0.0), 40),
        "power_k4": (lambda key: a.power_iteration(op, key, k=4, max_iter=10, tol=0.0), 40),
        "hutchinson": (lambda key: a.hutchinson(op, key, num_samples=100), 100),
        "hutchinson_diagonal": (lambda key: a.hutchinson_diagonal(op, key, num_samples=100), 100),
        "slq": (lambda key: a.slq(op, key, num_steps=min(50, op.dim), num_runs=2), 2 * min(50, op.dim)),
        "hutchpp": (lambda key: a.hutchpp(op, key, num_matvecs=99), 99),
        "xtrace": (lambda key: a.xtrace(op, key, num_matvecs=100), 100),
        "xdiag": (lambda key: a.xdiag(op, key, num_matvecs=100), 100),
    }
    if op.dim >= 40:
        table["block_lanczos"] = (lambda key: a.block_lanczos(op, key, k=10, block_size=10, num_blocks=4), 50)
    return {name: (jax.jit(fn), m) for name, (fn, m) in table.items()}


def _matvecs(result, nominal: int) -> int:
    """The matvec count a result reports (power iteration, block Lanczos), else ``nominal``."""
    m = getattr(result, "matvecs", None)
    return nominal if m is None else int(np.asarray(m))


def time_operator(op, repeats: int = 5, hvp_calls: int = 5, only=None, algorithms=None,
                  key: Optional[jax.Array] = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Bare Hvp and per-matvec algorithm timings on ``op``, in ``repeats`` interleaved rounds.

    Returns ``{"hvp": {"median_s", "min_s", "runs"}, "items": {name: {"matvecs", "median_s",
    "min_s", "per_matvec_s", "ratio", "first_call_s", "runs"}}}``.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    v = jax.numpy.asarray(np.random.default_rng(0).standard_normal(op.dim), op.dtype)
    fns = {n: f for n, f in items(op, algorithms).items() if only is None or n in only}
    jax.block_until_ready(op(v))  # compile the bare Hvp
    first, matvecs = {}, {}
    for name, (fn, nominal) in fns.items():
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(key))
        first[name] = time.perf_counter() - t0
        matvecs[name] = _matvecs(out, nominal)
        log(f"  {name}: compiled and ran once in {first[name]:.2f} s")
    hvp_runs, runs = [], {name: [] for name in fns}
    for _ in range(repeats):
        for _ in range(hvp_calls):
            t0 = time.perf_counter()
            jax.block_until_ready(op(v))
            hvp_runs.append(time.perf_counter() - t0)
        for name, (fn, _) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(key))
            runs[name].append(time.perf_counter() - t0)
    hvp = statistics.median(hvp_runs)
    out = {"hvp": {"median_s": hvp, "min_s": min(hvp_runs), "runs": hvp_runs}, "items": {}}
    for name, r in runs.items():
        med = statistics.median(r)
        out["items"][name] = {"matvecs": matvecs[name], "median_s": med, "min_s": min(r),
                              "per_matvec_s": med / matvecs[name], "ratio": med / matvecs[name] / hvp,
                              "first_call_s": first[name], "runs": r}
    return out


def overhead(ctx_or_problem, widths=(), repeats: int = 5, *, only=None, algorithms=None,
             log: Callable[[str], None] = lambda s: None) -> dict:
    """Per-matvec cost / bare Hvp for every network asked for, one row each.

    Args:
      ctx_or_problem: a ``benchmarks.context.Context`` or ``Options`` (with ``widths``: one
        one-hidden-layer MLP per width, built and trained as ``bench``'s width sweep does;
        without: the network the options name), or an ``operators.Problem`` (its Hessian;
        ``widths`` must be empty).
      widths: hidden widths of the sweep.
      repeats: interleaved rounds (medians over them).
      only: names of the items to time (default all of :func:`items`).
      algorithms: the algorithms module (default :mod:`jax_impl.algorithms`).

    Returns:
      ``{"rows": [{"network", "width", "num_params", "hessian_samples", **time_operator(...)}],
      "worst": {"ratio", "network", "item"}, "target": TARGET}``.
    """
    from benchmarks.context import Context, Options
    from jax_impl import operators
    from jax_impl.errors import HessianApproxError

    rows = []
    if isinstance(ctx_or_problem, operators.Problem):
        if widths:
            raise HessianApproxError("a width sweep needs Options or a Context, not a Problem",
                                     "pass widths=() with a Problem")
        op = operators.hvp(ctx_or_problem).jit()
        rows.append({"network": "problem", "width": None, "num_params": op.dim, "hessian_samples": None,
                     **time_operator(op, repeats, only=only, algorithms=algorithms, log=log)})
    else:
        ctx = ctx_or_problem if isinstance(ctx_or_problem, Context) else Context(ctx_or_problem)
        base = ctx.options
        contexts = ([(w, Context(Options(**{**base.__dict__, "hidden": (w,), "epochs": base.epochs or 1,
                                             "checkpoint": None}))) for w in widths] if widths else [(None, ctx)])
        for w, c in contexts:
            log(f"{c.arch.describe()}: {c.problem.dim} parameters, {c.hessian_samples} samples")
            rows.append({"network": c.arch.describe(), "width": w, "num_params": c.problem.dim,
                         "hessian_samples": c.hessian_samples,
                         **time_operator(c.hvp, repeats, only=only, algorithms=algorithms, log=log)})
    worst = max(((it["ratio"], r["network"], name) for r in rows for name, it in r["items"].items()),
                default=(None, None, None))
    return {"rows": rows, "worst": dict(zip(("ratio", "network", "item"), worst)), "target": TARGET}


def table(result: dict) -> str:
    """Per-matvec ratios, one line per network, one column per item."""
    names = list(dict.fromkeys(n for r in result["rows"] for n in r["items"]))
    head = f"{'network':34s} {'params':>8s} {'hvp ms':>8s} " + " ".join(f"{n[:10]:>10s}" for n in names)
    lines = [head]
    for r in result["rows"]:
        cells = " ".join(f"{r['items'][n]['ratio']:10.2f}" if n in r["items"] else f"{'':10s}" for n in names)
        lines.append(f"{r['network'][:34]:34s} {r['num_params']:8d} {r['hvp']['median_s'] * 1e3:8.2f} {cells}")
    w = result["worst"]
    if w["ratio"] is not None:
        lines.append(f"worst: {w['item']} on {w['network']}: {w['ratio']:.2f}x the bare Hvp "
                     f"(target <= {result['target']})")
    return "\n".join(lines)


@contextlib.contextmanager
def _blas_threads(limit: Optional[int]):
    """Within: at most ``limit`` BLAS threads (None: unchanged); yields the libraries and their threads."""
    try:
        import scipy.linalg  # noqa: F401  (jaxlib's LAPACK kernels are SciPy's: load them before limiting)
        import threadpoolctl

        jax.numpy.linalg.qr(jax.numpy.ones((2, 2))).R.block_until_ready()
    except ImportError:
        yield {"limit": limit, "libraries": "threadpoolctl not installed"}
        return
    with threadpoolctl.threadpool_limits(limits=limit, user_api="blas"):
        yield {"limit": limit, "libraries": [{"api": i.get("internal_api"), "threads": i.get("num_threads"),
                                              "file": os.path.basename(i.get("filepath", ""))}
                                             for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]}


def main(argv=None) -> dict:
    from benchmarks.context import Options, log
    from benchmarks.record import machine, to_jsonable, versions
    from jax_impl.fileio import atomic_write

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="mlp (default: the width sweep), cnn, or a layer string")
    p.add_argument("--widths", default=None, help="comma-separated hidden widths (mlp; default 10,32,64,128,256)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hessian-samples", type=int, default=None)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=os.environ.get("HESSIAN_APPROX_DATA"))
    p.add_argument("--epochs", type=int, default=1, help="training epochs of each network (default 1, as bench)")
    p.add_argument("--checkpoint", default=None, help="weights of the --model network (no sweep)")
    p.add_argument("--only", default=None, help="comma-separated items (default all)")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="limit the BLAS/LAPACK threads (threadpoolctl) while timing: OpenBLAS's threads "
                        "spin and thrash when other processes hold the cores")
    p.add_argument("--out", default="benchmarks/results/overhead")
    a = p.parse_args(argv)
    mlp = a.model in (None, "mlp") and a.checkpoint is None
    widths = tuple(int(w) for w in a.widths.split(",")) if a.widths else (WIDTHS if mlp else ())
    if widths and not mlp:
        p.error("--widths applies to --model mlp only")
    if a.repeats < 1:
        p.error("--repeats must be positive")
    options = Options(dataset=a.dataset, data_dir=a.data_dir, model=a.model, epochs=a.epochs,
                      hessian_samples=a.hessian_samples, checkpoint=a.checkpoint)
    load0 = os.getloadavg()
    with _blas_threads(a.blas_threads) as blas:
        result = overhead(options, widths, a.repeats, only=a.only.split(",") if a.only else None, log=log)
    record = {"benchmark": "overhead", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "devices": [str(d) for d in jax.devices()], "versions": versions(),
              "load_average": {"start": load0, "end": os.getloadavg()}, "blas": blas, "repeats": a.repeats,
              "dataset": a.dataset, "dtype": "float32", **result}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = record["created"].replace(":", "").replace("-", "")
    text = json.dumps(to_jsonable(record), indent=1)
    atomic_write(out / f"overhead_{stamp}.json", lambda tmp: Path(tmp).write_text(text))
    print(table(result))
    print(f"wrote {out / f'overhead_{stamp}.json'} (load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f})",
          file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
