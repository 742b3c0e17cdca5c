"""Speed of curvature tracking (issue 11): full-batch GD with and without the sharpness every few steps, the JAX tracker against PyTorch + PyHessian.

Four loops on the first N training images, one initialization shared by both frameworks
(Flax's seeded init copied into the torch twin), float32, cross-entropy, ``SGD(lr)`` on the
whole set:

(a) JAX training only: jitted ``lax.scan`` chunks of ``every`` GD steps, the chunks
    ``jax_impl.track_loop.track`` runs between measurements (same step function: loss mean,
    ``value_and_grad``, ``optax.sgd``; the data passed as arguments, never closed over, so XLA
    does not constant-fold them), called ``steps / every`` times, one wait at the end;
    compiled ahead of time (``jit(...).lower(...).compile()``, the compile reported apart)
    and run once untimed (an executable's first run pays one-time costs).
(b) JAX with tracking, ``track(..., every, config=TrackerConfig(), timing=True)`` as a user
    calls it: end to end, compiles included (``track`` jits afresh on every call), its
    train/measure split. ``track`` reports only totals, so the same loop is also run
    instrumented ("b, per call"): the chunks of (a) and one jitted
    ``jax_impl.tracking.measure`` with track's keys and data, compiled ahead of time and run
    once untimed, every call waited for and timed. ``--skip-track`` leaves out ``track``
    itself (its compiles take most of a tiny run): quick checks only. Its sharpness values are checked against ``track``'s.
(c) PyTorch training only: ``torch_ref.track.track_torch(every=None)``.
(d) PyTorch with PyHessian's top eigenvalue (``top_n=1``, ``maxIter=100``, ``tol=1e-3``) at
    the same steps: ``track_torch(every)``.

Per-measurement seconds are medians over the measurements after step 0 (JAX's step 0 has
no warm start; it is reported apart, as is the compile); every figure is the median over
repeats, the repeats interleaving the four loops so that load on the shared machine hits
all of them alike. torch runs one intra-op thread; XLA keeps its default pool unless
``XLA_FLAGS`` says otherwise (both recorded).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hessian_approx.architecture import PRESETS, Architecture, mlp, parse
from jax_impl import data, losses, models
from jax_impl.batches import Batches
from jax_impl.errors import HessianApproxError
from jax_impl.track_loop import track
from jax_impl.tracking import TrackerConfig, measure, tracker_init

TARGET_RATIO = 10.0  # issue 11: at least 10x less time per measurement than PyTorch + PyHessian
LOSS = "cross_entropy"
MODELS = ("mlp", "cnn")


def architecture(model: str, image_side: int) -> Architecture:
    """``mlp``: 784-10-10 ReLU (D-10-10 for other data); ``cnn``: the CNN preset on (side, side, 1)."""
    if model == "mlp":
        return mlp(image_side * image_side, (10,), 10)
    if model == "cnn":
        return parse(PRESETS["cnn"], (image_side, image_side, 1))
    raise HessianApproxError(f"model {model!r}", f"use one of {', '.join(MODELS)}")


def problem(model: str, dataset: str, samples: int, data_dir):
    """(arch, x (N, *input_shape) float32, y (N,) int32, dataset provenance) of the first ``samples`` training images."""
    ds = data.load_dataset(dataset, data_dir)
    n = min(samples, len(ds.x_train))
    side = math.isqrt(ds.x_train.shape[1])
    arch = architecture(model, side)
    x = models.as_inputs(arch, ds.x_train[:n]).astype(np.float32)
    return arch, x, np.asarray(ds.y_train[:n], np.int32), {**ds.provenance(), "train_samples": n,
                                                            "subset": f"the first {n} training images"}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class JaxLoop:
    """The chunks and the measurement of ``track`` (full batch, ``curvature="batch"``), compiled ahead of time."""

    def __init__(self, apply, ell, params, x, y, lr: float, config: TrackerConfig, key):
        self.apply, self.ell, self.config = apply, ell, config
        self.optimizer = optax.sgd(lr)
        self.x, self.y = jnp.asarray(x), jnp.asarray(y)
        self.params, self.opt_state = params, self.optimizer.init(params)
        self.state = tracker_init(config, params)
        # track's keys: key -> (data_key, measure_key); measurement t uses fold_in(measure_key, t)
        self.measure_key = jax.random.split(key)[1]
        self.compile_seconds = {"train": 0.0, "measure": 0.0}
        self.warmup_seconds = {"train": 0.0, "measure": 0.0}
        self._chunks = {}
        self._measure = None

    def _loss(self, p, x, y):
        return jnp.mean(self.ell(self.apply(p, x), y))

    def chunk(self, length: int):
        if length not in self._chunks:
            def step(carry, _):
                params, opt_state, x, y = carry
                value, grad = jax.value_and_grad(self._loss)(params, x, y)
                updates, opt_state = self.optimizer.update(grad, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state, x, y), value

            def run(params, opt_state, x, y):  # data as arguments: XLA does not constant-fold them
                (params, opt_state, *_), values = jax.lax.scan(step, (params, opt_state, x, y), None, length=length)
                return params, opt_state, values

            self._chunks[length], secs = _timed(lambda: jax.jit(run).lower(
                self.params, self.opt_state, self.x, self.y).compile())
            self.compile_seconds["train"] += secs
            # one untimed call: the first run of an executable pays one-time costs (allocation)
            _, secs = _timed(lambda: jax.block_until_ready(self._chunks[length](self.params, self.opt_state,
                                                                                self.x, self.y)))
            self.warmup_seconds["train"] += secs
        return self._chunks[length]

    def measurer(self):
        if self._measure is None:
            def measure_at(params, state, t, x, y):
                n = x.shape[0]
                batches = Batches(x[None], y[None], jnp.full((1, n), 1 / n, x.dtype))
                return measure(self.config, self.apply, self.ell, params, batches, state,
                               jax.random.fold_in(self.measure_key, t))

            self._measure, secs = _timed(lambda: jax.jit(measure_at).lower(
                self.params, self.state, jnp.asarray(0, jnp.int32), self.x, self.y).compile())
            self.compile_seconds["measure"] += secs
            _, secs = _timed(lambda: jax.block_until_ready(self._measure(self.params, self.state,
                                                                         jnp.asarray(0, jnp.int32), self.x, self.y)))
            self.warmup_seconds["measure"] += secs
        return self._measure

    def train(self, steps: int, every: int) -> dict:
        """(a): ``steps`` GD steps in chunks of ``every``, waited for once at the end."""
        lengths = [min(every, steps - s) for s in range(0, steps, every)]
        fns = [self.chunk(m) for m in lengths]
        params, opt_state, values = self.params, self.opt_state, []
        t0 = time.perf_counter()
        for fn in fns:
            params, opt_state, v = fn(params, opt_state, self.x, self.y)
            values.append(v)
        jax.block_until_ready((params, values))
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "step_seconds": seconds / steps, "compile_seconds": self.compile_seconds["train"],
                "train_loss": np.concatenate([np.asarray(v) for v in values])}

    def tracked(self, steps: int, every: int) -> dict:
        """(b, per call): track's schedule, every chunk and every measurement waited for and timed."""
        at = sorted({0, *range(every, steps, every), steps})
        for i in range(1, len(at)):
            self.chunk(at[i] - at[i - 1])
        meas = self.measurer()
        params, opt_state, state = self.params, self.opt_state, self.state
        chunk_s, measure_s, rows, values = [], [], [], []
        for i, t in enumerate(at):
            if t > 0:
                (params, opt_state, v), secs = _timed(
                    lambda: jax.block_until_ready(self._chunks[t - at[i - 1]](params, opt_state, self.x, self.y)))
                chunk_s.append(secs)
                values.append(v)
            (state, m), secs = _timed(lambda: jax.block_until_ready(
                meas(params, state, jnp.asarray(t, jnp.int32), self.x, self.y)))
            measure_s.append(secs)
            rows.append(jax.device_get(m))
        return {"steps": at, "chunk_seconds": chunk_s, "measure_seconds": measure_s,
                "train_seconds": float(np.sum(chunk_s)), "step_seconds": float(np.sum(chunk_s)) / steps,
                "sharpness": [float(r["sharpness"]) for r in rows],
                "matvecs": [int(r["lanczos_matvecs"]) for r in rows],
                "converged": [bool(r["converged"]) for r in rows],
                "compile_seconds": dict(self.compile_seconds), "warmup_seconds": dict(self.warmup_seconds),
                "train_loss": np.concatenate([np.asarray(v) for v in values])}


def _per_measurement(steps, seconds, matvecs, every) -> dict:
    """Median seconds and matvecs over the measurements after step 0, and step 0's own."""
    later = [i for i, t in enumerate(steps) if t >= every]
    return {"seconds": _median([seconds[i] for i in later]), "matvecs": _median([matvecs[i] for i in later]),
            "seconds_per_matvec": _median([seconds[i] / matvecs[i] for i in later if matvecs[i]]),
            "first_seconds": seconds[0], "first_matvecs": matvecs[0], "count": len(later)}


def _rel(a, b) -> list[float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)).tolist()


def one_repeat(arch, x, y, lr: float, steps: int, every: int, seed: int, max_iter: int, tol: float,
               end_to_end: bool = True) -> dict:
    """The four loops once, from the same initialization (see the module docstring); (b) only if ``end_to_end``."""
    import torch

    from bridge.convert import load_into_torch
    from torch_ref.models import build_twin
    from torch_ref.track import track_torch

    apply, ell = models.make_apply(arch), losses.get_loss(LOSS)
    params = models.init_params(arch, jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 1)
    config = TrackerConfig()
    out = {}

    loop = JaxLoop(apply, ell, params, x, y, lr, config, key)
    out["jax_train"] = loop.train(steps, every)                                        # (a)
    out["jax_track"] = None
    if end_to_end:
        res = track(apply, ell, params, optax.sgd(lr), x, y, steps=steps, every=every, key=key, config=config,
                    timing=True)                                                        # (b)
        out["jax_track"] = {"steps": res.steps.tolist(), "sharpness": res.metrics["sharpness"].tolist(),
                            "matvecs": res.metrics["lanczos_matvecs"].tolist(),
                            "converged": res.metrics["converged"].tolist(), "seconds": dict(res.seconds),
                            "step_seconds": res.seconds["train"] / steps, "train_loss": res.train_loss,
                            "diverged_at": res.diverged_at}
    out["jax_per_call"] = loop.tracked(steps, every)                                   # (b, per call)

    def twin():
        return load_into_torch(build_twin(arch, torch.float32), jax.device_get(params), arch)

    c = track_torch(twin(), x, y, LOSS, lr, steps, None)                                # (c)
    out["torch_train"] = {"train_seconds": c["train_seconds"], "step_seconds": c["train_seconds"] / steps,
                          "train_loss": c["train_loss"], "settings": c["settings"]}
    d = track_torch(twin(), x, y, LOSS, lr, steps, every, max_iter=max_iter, tol=tol, seed=seed)   # (d)
    out["torch_track"] = {**{k: d[k] for k in ("steps", "sharpness", "matvecs", "measure_seconds", "train_seconds",
                                               "train_loss", "settings")},
                          "step_seconds": d["train_seconds"] / steps}
    return out


def summarize(reps: list[dict], steps: int, every: int) -> dict:
    """Per-repeat figures and their medians over repeats."""
    per = []
    for r in reps:
        a, b, bc, c, d = r["jax_train"], r["jax_track"], r["jax_per_call"], r["torch_train"], r["torch_track"]
        jm = _per_measurement(bc["steps"], bc["measure_seconds"], bc["matvecs"], every)
        tm = _per_measurement(d["steps"], d["measure_seconds"], d["matvecs"], every)
        ref = b or bc  # track's own values; the instrumented loop's (the same values) when (b) was skipped
        common = sorted(set(ref["steps"]) & set(d["steps"]))
        sj = [ref["sharpness"][ref["steps"].index(t)] for t in common]
        st = [d["sharpness"][d["steps"].index(t)] for t in common]
        n = min(len(ref["train_loss"]), len(d["train_loss"]))
        per.append({
            "jax_step_seconds": a["step_seconds"],
            "jax_tracked_step_seconds": bc["step_seconds"],
            "jax_track_step_seconds_incl_compile": b and b["step_seconds"],
            "torch_step_seconds": c["step_seconds"],
            "torch_tracked_step_seconds": d["step_seconds"],
            "jax_overhead": (bc["train_seconds"] + sum(bc["measure_seconds"])) / a["seconds"],
            "jax_overhead_end_to_end": b and b["seconds"]["total"] / (a["seconds"] + a["compile_seconds"]),
            "torch_overhead": (d["train_seconds"] + sum(d["measure_seconds"])) / c["train_seconds"],
            "jax_measure_seconds": jm["seconds"], "jax_first_measure_seconds": jm["first_seconds"],
            "jax_measure_compile_seconds": bc["compile_seconds"]["measure"],
            "jax_train_compile_seconds": a["compile_seconds"],
            "jax_track_measure_seconds_incl_compile": b and b["seconds"]["measure"],
            "torch_measure_seconds": tm["seconds"], "torch_first_measure_seconds": tm["first_seconds"],
            "ratio_torch_over_jax_per_measurement": tm["seconds"] / jm["seconds"],
            "jax_matvecs": jm["matvecs"], "jax_first_matvecs": jm["first_matvecs"],
            "torch_matvecs": tm["matvecs"], "torch_first_matvecs": tm["first_matvecs"],
            "jax_seconds_per_matvec": jm["seconds_per_matvec"], "torch_seconds_per_matvec": tm["seconds_per_matvec"],
            "ratio_torch_over_jax_per_matvec": tm["seconds_per_matvec"] / jm["seconds_per_matvec"],
            "sharpness_steps": common, "sharpness_jax": sj, "sharpness_torch": st,
            "sharpness_rel_diff": _rel(st, sj),
            "per_call_vs_track_sharpness_max_rel_diff": b and max(_rel(bc["sharpness"], b["sharpness"])),
            "per_call_vs_track_matvecs_equal": b and bc["matvecs"] == b["matvecs"],
            "train_loss_rel_diff_max": max(_rel(d["train_loss"][:n], ref["train_loss"][:n])),
            "train_loss_rel_diff_first10_max": max(_rel(d["train_loss"][:min(n, 10)], ref["train_loss"][:min(n, 10)])),
        })
    scalar = [k for k, v in per[0].items() if not isinstance(v, list)]
    med = {k: (all(p[k] for p in per) if isinstance(per[0][k], bool) else _median([p[k] for p in per]))
           for k in scalar}
    rel = np.asarray([p["sharpness_rel_diff"] for p in per])
    med["sharpness_steps"] = per[0]["sharpness_steps"]
    med["sharpness_jax"] = np.median([p["sharpness_jax"] for p in per], axis=0).tolist()
    med["sharpness_torch"] = np.median([p["sharpness_torch"] for p in per], axis=0).tolist()
    med["sharpness_rel_diff"] = np.median(rel, axis=0).tolist()
    med["sharpness_rel_diff_median"] = float(np.median(rel))
    med["sharpness_rel_diff_max"] = float(np.max(rel))
    med["target_ratio"] = TARGET_RATIO
    med["meets_target"] = bool(med["ratio_torch_over_jax_per_measurement"] >= TARGET_RATIO)
    return {"per_repeat": per, "median": med}


def run_bench(model: str = "mlp", dataset: str = "mnist", data_dir=None, samples: int = 5000, lr: float = 0.1,
              steps: int = 200, every: int = 10, repeats: int = 3, seed: int = 0, max_iter: int = 100,
              tol: float = 1e-3, end_to_end: bool = True, log=print) -> dict:
    """The benchmark record (not yet written): provenance, every repeat's raw figures, the summary."""
    import torch

    from benchmarks.record import machine, new_record, versions

    if steps < 1 or every < 1 or repeats < 1 or samples < 1 or not lr > 0:
        raise HessianApproxError(f"steps={steps}, every={every}, repeats={repeats}, samples={samples}, lr={lr}",
                                 "pass positive numbers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's and XLA's thread pools compete on a small machine
    try:
        arch, x, y, dsprov = problem(model, dataset, samples, data_dir)
        load_before = os.getloadavg()
        reps = []
        for r in range(repeats):
            log(f"repeat {r + 1}/{repeats}: {arch.describe()} ({arch.num_params} parameters), {len(x)} samples, "
                f"{steps} steps, measure every {every}")
            reps.append(one_repeat(arch, x, y, lr, steps, every, seed, max_iter, tol, end_to_end))
        load_after = os.getloadavg()
    finally:
        torch.set_num_threads(threads)
    command = (f"python -m benchmarks.track_bench --model {model} --dataset {dataset} --samples {samples} --lr {lr} "
               f"--steps {steps} --every {every} --repeats {repeats} --seed {seed}" + ("" if end_to_end else " --skip-track"))
    rec = new_record(command, {
        **dsprov, "model": model, "architecture": arch.to_dict(), "describe": arch.describe(),
        "num_params": arch.num_params, "loss": LOSS, "dtype": "float32", "lr": lr, "steps": steps, "every": every,
        "repeats": repeats, "seed": seed, "init": f"jax_impl.models.init_params(PRNGKey({seed})), copied into the twin",
        "tracker_config": {k: getattr(TrackerConfig(), k) for k in ("k", "tol", "max_steps", "min_steps",
                                                                      "warm_start", "mix")},
        "pyhessian": {"top_n": 1, "maxIter": max_iter, "tol": tol},
        "torch_threads": 1, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "machine": machine(), "versions": versions(),
        "loops": {"a": "JaxLoop.train: AOT-compiled lax.scan chunks of `every` GD steps, one wait at the end",
                  "b": "jax_impl.track_loop.track(every, TrackerConfig(), timing=True), compiles included",
                  "b_per_call": "JaxLoop.tracked: track's chunks and jax_impl.tracking.measure, AOT-compiled, "
                                "each call timed",
                  "c": "torch_ref.track.track_torch(every=None)",
                  "d": "torch_ref.track.track_torch(every): PyHessian eigenvalues(top_n=1) via pyhessian_runner"}})
    rec["results"] = {"repeats": reps, **summarize(reps, steps, every)}
    return rec


def format_summary(rec: dict) -> str:
    m, p = rec["results"]["median"], rec["provenance"]

    def f(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    lines = [f"{p['describe']} ({p['num_params']} params), {p['train_samples']} samples, {p['steps']} steps, "
             f"every {p['every']}, medians of {p['repeats']} repeat(s); load {p['loadavg_before'][0]:.1f} -> "
             f"{p['loadavg_after'][0]:.1f}",
             f"{'':34}{'JAX':>12}{'PyTorch':>12}{'torch/JAX':>11}",
             f"{'s / train step (no tracking)':34}{f(m['jax_step_seconds']):>12}{f(m['torch_step_seconds']):>12}"
             f"{f(m['torch_step_seconds'] / m['jax_step_seconds']):>11}",
             f"{'s / train step (tracked run)':34}{f(m['jax_tracked_step_seconds']):>12}"
             f"{f(m['torch_tracked_step_seconds']):>12}",
             f"{'overhead tracked / untracked':34}{f(m['jax_overhead']):>12}{f(m['torch_overhead']):>12}",
             f"{'s / measurement (after step 0)':34}{f(m['jax_measure_seconds']):>12}"
             f"{f(m['torch_measure_seconds']):>12}{f(m['ratio_torch_over_jax_per_measurement']):>11}",
             f"{'matvecs / measurement':34}{f(m['jax_matvecs']):>12}{f(m['torch_matvecs']):>12}",
             f"{'s / matvec':34}{f(m['jax_seconds_per_matvec']):>12}{f(m['torch_seconds_per_matvec']):>12}"
             f"{f(m['ratio_torch_over_jax_per_matvec']):>11}",
             f"{'step 0: s, matvecs':34}{f(m['jax_first_measure_seconds']) + ', ' + f(m['jax_first_matvecs']):>12}"
             f"{f(m['torch_first_measure_seconds']) + ', ' + f(m['torch_first_matvecs']):>12}",
             f"JAX compile: measure {f(m['jax_measure_compile_seconds'])} s, train chunk "
             f"{f(m['jax_train_compile_seconds'])} s; track() end to end overhead {f(m['jax_overhead_end_to_end'])}",
             f"target: torch/JAX per measurement >= {TARGET_RATIO:g}: "
             f"{'met' if m['meets_target'] else 'NOT met'} ({f(m['ratio_torch_over_jax_per_measurement'])})",
             f"sharpness rel. diff PyHessian vs tracker: median {f(m['sharpness_rel_diff_median'], '.1e')}, "
             f"max {f(m['sharpness_rel_diff_max'], '.1e')}; train loss max rel. diff {f(m['train_loss_rel_diff_max'], '.1e')}"]
    for t, a, b, r in list(zip(m["sharpness_steps"], m["sharpness_jax"], m["sharpness_torch"],
                               m["sharpness_rel_diff"]))[:: max(1, len(m["sharpness_steps"]) // 8)]:
        lines.append(f"  step {t:>5}: JAX {a:10.5g}  PyHessian {b:10.5g}  rel. diff {r:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.track_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=MODELS)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "digits"])
    p.add_argument("--data-dir", default=None, help="MNIST IDX directory (default: $HESSIAN_APPROX_DATA or ../shared/data/mnist)")
    p.add_argument("--samples", type=int, default=5000, help="the first N training images (default 5000)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=100, help="PyHessian maxIter (default 100)")
    p.add_argument("--tol", type=float, default=1e-3, help="PyHessian tol (default 1e-3)")
    p.add_argument("--skip-track", action="store_true",
                   help="leave out loop (b) end to end (track() itself): only its instrumented copy (quick checks)")
    p.add_argument("--out", default="benchmarks/results/track/",
                   help="directory (the file is named track_bench_<model>_<n>_<time>.json) or a .json path")
    args = p.parse_args(argv)
    from benchmarks.record import write_json

    data_dir = args.data_dir
    if data_dir is None and args.dataset == "mnist" and data.default_data_dir() is None:
        data_dir = str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist")
    try:
        rec = run_bench(args.model, args.dataset, data_dir, args.samples, args.lr, args.steps, args.every,
                        args.repeats, args.seed, args.max_iter, args.tol, not args.skip_track,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    except HessianApproxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix != ".json":
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = out / f"track_bench_{args.model}_{rec['provenance']['train_samples']}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rec)
    print(format_summary(rec))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
