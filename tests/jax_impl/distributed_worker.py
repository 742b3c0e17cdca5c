"""One process of the multi-process test (tests/jax_impl/test_distributed.py), or its single-process reference.

    python -m tests.jax_impl.distributed_worker OUT_DIR [--cases mlp,cnn-max] [--timings]
        [--coordinator-address 127.0.0.1:PORT --num-processes 2 --process-id I]

With a coordinator, the process joins the run (``jax_impl.distributed.initialize``), keeps its
share of each case's data (``SHARES``; ``process_share`` for other process counts) and places
it on the global mesh (``process_batches``). Without one, it is the single-process reference
on the whole data (``operators.make_batches``, the plain path, one device). Either way it
computes, in float64, the Hvp of a fixed vector, Lanczos top-10, Hutchinson (fixed key, 20
probes) and DiagGGN through ``distributed.call`` (all in one program; with ``--timings`` each
by itself, twice, and the GGN-vp too) and writes ``OUT_DIR/<case>-<process>.npz`` (process
``0``, ``1``, ... or ``ref``), ``OUT_DIR/times-<process>.json`` (seconds; with ``--timings``
[first call, compilation included; second call]) and last ``OUT_DIR/done-<process>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl import algorithms, approx, distributed, losses, models, operators
from tests.cases import case

SAMPLES = 37
# Uneven shares (two processes): 27 samples fill 3 chunks of 10 per process, the last padded;
# 10 samples fill 1 and get 2 zero-weight chunks. Few chunks: a matvec sums each chunk across
# processes (one all-reduce per chunk), the test's largest cost after compilation.
SHARES = (27, 10)
CHUNK_SIZE = 20  # over all processes: 10 per process, 5 per device
HUTCHINSON_PROBES = 20
CASES = {"mlp": ("mlp", "tanh", "cross_entropy"), "cnn-max": ("cnn-max", "relu", "mse")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--cases", default="mlp")
    p.add_argument("--coordinator-address", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--initialization-timeout", type=int, default=30)
    p.add_argument("--timings", action="store_true", help="time each operation (and the GGN-vp) by itself")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    multi = args.coordinator_address is not None
    if multi:  # first, before any other JAX call
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               initialization_timeout=args.initialization_timeout)
    times = {"initialize": time.perf_counter() - t_start}
    jax.config.update("jax_enable_x64", True)

    out = Path(args.out)
    me = jax.process_index() if multi else "ref"
    times.update({"process_count": jax.process_count(), "devices": len(jax.devices()),
                  "local_devices": len(jax.local_devices())})
    for name in args.cases.split(","):
        t_case = time.perf_counter()
        c = case(*CASES[name], n=SAMPLES)
        x, y = c.data()
        if multi:
            if jax.process_count() == len(SHARES):
                lo = sum(SHARES[:jax.process_index()])
                xs, ys = x[lo:lo + SHARES[jax.process_index()]], y[lo:lo + SHARES[jax.process_index()]]
            else:
                xs, ys = distributed.process_share(x, y)
            batches = distributed.process_batches(xs, ys, CHUNK_SIZE, dtype=jnp.float64)
        else:
            batches = operators.make_batches(x, y, CHUNK_SIZE, dtype=jnp.float64)
        problem = operators.Problem(models.make_apply(c.arch), losses.get_loss(c.loss), params(c.arch), batches)
        times[f"{name}/setup"] = time.perf_counter() - t_case
        v = jnp.asarray(np.random.default_rng(1).normal(size=problem.dim))
        ops = {"hvp": (hvp, v), "lanczos": (lanczos_top10, jax.random.PRNGKey(1)),
               "hutchinson": (hutchinson, jax.random.PRNGKey(2)), "diag_ggn": (diag_ggn,)}
        if args.timings:  # each operation by itself, twice: compilation included, then not
            ops["ggn_vp"] = (ggn_vp, v)
            results = {}
            for op, (fn, *a) in ops.items():
                t0 = time.perf_counter()
                r = jax.block_until_ready(distributed.call(fn, problem, *a))
                t1 = time.perf_counter()
                jax.block_until_ready(distributed.call(fn, problem, *a))
                times[f"{name}/{op}"] = [t1 - t0, time.perf_counter() - t1]
                results.update({f"{op}/{k}": np.asarray(val) for k, val in r.items()})
        else:  # all in one program: one compilation
            t0 = time.perf_counter()
            r = jax.block_until_ready(distributed.call(everything, problem, v, jax.random.PRNGKey(1),
                                                       jax.random.PRNGKey(2)))
            times[name] = time.perf_counter() - t0
            results = {k: np.asarray(val) for k, val in r.items()}
        results["local_samples"] = np.asarray(len(ys) if multi else len(y))
        results["shards"] = np.asarray(len(batches.w.sharding.device_set))
        results["chunks"] = np.asarray(batches.w.shape[0])
        np.savez(out / f"{name}-{me}.npz", **results)
    times["total"] = time.perf_counter() - t_start
    (out / f"times-{me}.json").write_text(json.dumps(times))
    (out / f"done-{me}").write_text("")
    return 0


def params(arch):
    """Seeded float64 parameters from numpy (Flax's initialization of a CNN compiles for seconds)."""
    r = np.random.default_rng(0)
    flat = {}
    for name, shape in sorted(models.param_shapes(arch).items()):
        scale = 0.1 if name.endswith("bias") else 1 / np.sqrt(np.prod(shape[:-1]))
        flat[name] = jnp.asarray(scale * r.normal(size=shape), jnp.float64)
    return models.unflatten_tree(flat)


# One function object each, so distributed.call compiles each once (a static argument of its jit).
def hvp(problem, v):
    return {"value": operators.hvp(problem)(v)}


def ggn_vp(problem, v):
    return {"value": operators.ggn_vp(problem)(v)}


def lanczos_top10(problem, key):
    r = algorithms.lanczos(operators.hvp(problem), key, k=10)
    return {"eigenvalues": r.eigenvalues}


def hutchinson(problem, key):
    r = algorithms.hutchinson(operators.hvp(problem), key, num_samples=HUTCHINSON_PROBES)
    return {"trace": r.trace, "estimates": r.estimates}


def diag_ggn(problem):
    return {"diag": approx.diag_ggn(problem).diag}


def everything(problem, v, lanczos_key, hutchinson_key):
    out = {}
    for op, r in (("hvp", hvp(problem, v)), ("lanczos", lanczos_top10(problem, lanczos_key)),
                  ("hutchinson", hutchinson(problem, hutchinson_key)), ("diag_ggn", diag_ggn(problem))):
        out.update({f"{op}/{k}": val for k, val in r.items()})
    return out


if __name__ == "__main__":
    sys.exit(main())
