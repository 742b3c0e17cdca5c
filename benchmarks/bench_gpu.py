"""GPU benchmark of issue 12's targets (exact Hessian and spectrum, full-data CNN Hvp, Lanczos vs PyHessian); its CLI also writes run_gpu.sh's summary (benchmarks.gpu_summary)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.gpu_summary import new_stamp, summary, target_lines, write_json  # noqa: F401 (re-exported)
from hessian_approx.errors import HessianApproxError

FULL = 60_000  # MNIST's training set: the targets are stated for all of it
GPU_FLOATS = 2**28  # floats of per-sample work one chunk may hold on a GPU (1 GiB in float32)
SMOKE_CNN = "conv8k3-relu-maxpool2-conv16k3-relu-flatten-dense10"  # a CNN that fits the 8x8 digits
LANCZOS_STEPS = (20, 25, 30, 40, 60, 80, 120)  # tried in order until all ten are within 1e-3 of exact
PYHESSIAN_TOLS = (1e-3, 1e-4, 1e-5, 1e-6)  # likewise PyHessian's tol, with max_iter 1000
TARGETS = {  # key -> (what, "seconds" (below the bound) or "ratio" (at least the bound), bound): issue 12, item 3
    "mlp_exact_and_eigenvalues": ("exact Hessian + all eigenvalues, default MLP, 60,000 samples", "seconds", 10.0),
    "cnn_hvp": ("full-dataset Hvp, default CNN, 60,000 samples", "seconds", 0.050),
    "lanczos_vs_pyhessian": ("Lanczos top-10 vs PyHessian on the same card, matched accuracy", "ratio", 20.0),
}


def log(msg: str) -> None:  # progress on stderr: stdout holds the tables
    print(msg, file=sys.stderr, flush=True)


def per_sample_floats(arch) -> int:
    """Floats of one sample's forward pass: every layer's output, plus a convolution's unfolded patches."""
    total = 0
    for layer, shape_in, shape_out in zip(arch.layers, arch.shapes[:-1], arch.shapes[1:]):
        total += math.prod(shape_out)
        if layer.kind == "conv2d":
            total += math.prod(shape_out[:-1]) * math.prod(layer.kernel) * shape_in[-1]
    return total


def chunk_for(n: int, per_sample: int, budget: int = GPU_FLOATS) -> int:
    """Samples per chunk: as few equal chunks of ``n`` as keep chunk x per_sample <= budget (at least 1)."""
    return -(-n // -(-n // max(1, budget // per_sample)))


def gpu_columns(arch, chunk: int, budget: int = GPU_FLOATS) -> int:
    """Columns per vmapped call of a dense build on a GPU: a power of two, 8..1024, columns x chunk x floats <= budget."""
    fit = max(8, min(1024, budget // (chunk * per_sample_floats(arch))))
    return 1 << (fit.bit_length() - 1)


def structure_floats(arch) -> int:
    """Per-sample floats of ``approx.exact``'s block products: a layer's parameters x max(outputs, classes)."""
    layers = arch.param_layers
    return (max(sum(math.prod(s) for s in p.shapes.values()) for p in layers)
            * max(arch.num_classes, *(p.out_shape[-1] for p in layers)))


def timed(fn, repeats: int, first: float | None = None) -> dict:
    """``measure(fn, repeats)`` after a timed first call (compilation included; ``first`` if timed elsewhere):
    adds first_call_s and compile_s, the first call minus the median (an estimate of the compilation)."""
    from benchmarks.timing import measure

    first = measure(fn, 1, warmup=0)["median"] if first is None else first
    out = measure(fn, repeats, warmup=0)
    return {**out, "first_call_s": first, "compile_s": max(0.0, first - out["median"])}


def device_memory() -> dict:
    """The first device's peak and limit bytes, where the backend gives them (the CPU does not)."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return {k: int(v) for k, v in (stats or {}).items() if k in ("peak_bytes_in_use", "bytes_limit")}


def mlp_items(ctx, repeats: int, gpu: bool, steps=LANCZOS_STEPS) -> dict:
    """Exact Hessian (Hvp and layer-structure routes), all eigenvalues, both end to end; Hvp; Lanczos top-10 matched."""
    import jax

    from benchmarks.bench import matched_accuracy
    from jax_impl import algorithms, operators, sharding
    from jax_impl.approx.exact import hessian_by_structure, unsupported
    from jax_impl.materialize import dense_fn

    prob, arch, t, notes = ctx.problem, ctx.arch, {}, {}
    cols = gpu_columns(arch, ctx.chunk_size) if gpu else ctx.dense_columns
    notes["chunk_size"], notes["dense_columns"] = ctx.chunk_size, cols
    log(f"mlp: exact Hessian by {prob.dim} Hvp columns ({cols} per call), {ctx.hessian_samples} samples")
    routes = {"hvp": dense_fn(operators.hvp(prob), cols)}
    t["exact_hessian_hvp_route"] = timed(routes["hvp"], repeats)
    h = routes["hvp"]()
    why = unsupported(prob, arch, hessian=True)
    if why is None:
        chunk = chunk_for(ctx.hessian_samples, structure_floats(arch)) if gpu else ctx.chunk_size
        x, y = ctx.subset
        sp = operators.Problem(prob.apply, prob.ell, prob.params, sharding.sharded_batches(x, y, chunk, dtype=ctx.dtype))
        log(f"mlp: exact Hessian by layer structure (chunks of {chunk})")
        routes["structure"] = lambda: hessian_by_structure(sp, arch)
        t["exact_hessian_structure_route"] = timed(routes["structure"], repeats)
        notes["structure_route"] = {"chunk_size": chunk, "max_abs_entry": float(np.max(np.abs(h))),
                                    "max_abs_diff_vs_hvp_route": float(np.max(np.abs(routes["structure"]() - h)))}
    else:
        notes["structure_route"] = {"not_run": why}
    log("mlp: all eigenvalues")
    t["eigvalsh"] = timed(lambda: algorithms.eigvalsh_descending(h), repeats)
    exact = np.asarray(algorithms.eigvalsh_descending(h), np.float64)
    del h
    best = notes["exact_and_eigenvalues_route"] = min(routes, key=lambda r: t[f"exact_hessian_{r}_route"]["median"])
    log(f"mlp: exact Hessian ({best} route) + all eigenvalues, end to end")
    t["exact_and_eigenvalues"] = timed(lambda: algorithms.eigvalsh_descending(routes[best]()), repeats)
    notes["exact_top10"], notes["exact_trace"] = exact[:10].tolist(), float(np.sum(exact))
    hvp, key = ctx.hvp, jax.random.PRNGKey(ctx.probe_seed)
    v = jax.device_put(np.random.default_rng(0).standard_normal(prob.dim).astype(ctx.dtype))
    t["hvp"] = timed(lambda: hvp(v), max(repeats, 20))
    log("mlp: Lanczos top-10, steps raised until all ten are within 1e-3 relative of exact")
    lan, first = {}, {}

    def run(s):
        lan[s] = jax.jit(lambda kk: algorithms.lanczos(hvp, kk, k=10, num_steps=s))
        t0 = time.perf_counter()
        eigs = np.asarray(lan[s](key).eigenvalues)
        first[s] = time.perf_counter() - t0
        return eigs, s

    m = notes["lanczos_top10_matched"] = matched_accuracy(run, [s for s in steps if s <= prob.dim] or [prob.dim], exact)
    t["lanczos_top10_matched"] = timed(lambda: lan[m["setting"]](key), repeats, first=first[m["setting"]])
    notes["device_memory"] = device_memory()
    return {"timings": t, "notes": notes, "exact": exact}


def cnn_items(ctx, repeats: int) -> dict:
    """The full-dataset Hvp of the CNN (jitted; its compilation timed apart)."""
    import jax

    log(f"cnn: Hvp on {ctx.hessian_samples} samples in chunks of {ctx.chunk_size}, {ctx.problem.dim} parameters")
    v = jax.device_put(np.random.default_rng(0).standard_normal(ctx.problem.dim).astype(ctx.dtype))
    hvp = ctx.hvp
    return {"timings": {"hvp": timed(lambda: hvp(v), max(repeats, 20))},
            "notes": {"chunk_size": ctx.chunk_size, "device_memory": device_memory()}}


def torch_device(gpu: bool) -> tuple[str | None, str]:
    """(the device PyHessian runs on, or None; a note): CUDA on a GPU run, the CPU on a CPU run."""
    from benchmarks.registry import torch_available

    why = torch_available()
    if why is not None:
        return None, f"torch/PyHessian not available ({why})"
    import torch

    if torch.cuda.is_available():
        return "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
    if gpu:
        return None, f"torch CUDA not available (torch {torch.__version__})"
    return "cpu", f"no GPU: PyHessian on the CPU (torch {torch.__version__}), the code path only, no target"


def pyhessian_top(model, xt, t, crit, k: int, tol: float, max_iter: int, seed: int, device: str):
    """PyHessian 0.1's top-``k`` (power iteration with deflation) on ``device``: (eigenvalues (k,), Hvps).

    Clears ``.grad`` before and after: PyHessian's constructor accumulates its create_graph
    gradient there, so a second run would otherwise see twice the gradient (twice the Hessian).
    """
    import importlib

    import torch

    ph = importlib.import_module("pyhessian.hessian")  # the module: the package re-exports the class
    count, original, dtype = [0], ph.hessian_vector_product, torch.get_default_dtype()

    def counted(*args):
        count[0] += 1
        return original(*args)

    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    torch.set_default_dtype(next(model.parameters()).dtype)  # PyHessian draws its vectors in the default dtype
    ph.hessian_vector_product = counted
    try:
        values, _ = ph.hessian(model, crit, data=(xt, t), cuda=device == "cuda").eigenvalues(
            maxIter=max_iter, tol=tol, top_n=k)
    finally:
        ph.hessian_vector_product = original
        torch.set_default_dtype(dtype)
        for p in model.parameters():
            p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    return np.asarray(values, np.float64), count[0]


def pyhessian_items(ctx, exact, repeats: int, device: str) -> dict:
    """PyHessian top-10 at matched accuracy on ``device``, with the JAX run's weights and data (at most 3 repeats)."""
    import copy

    from benchmarks.bench import matched_accuracy
    from benchmarks.methods_torch import twin
    from torch_ref.exact import prepare

    model, x, y = twin(ctx)
    xt, tt, crit = prepare(model, x, y, ctx.options.loss)
    model, xt, tt = copy.deepcopy(model).to(device), xt.to(device), tt.to(device)
    log(f"PyHessian top-10 on {device}, tol tightened until all ten are within 1e-3 relative of exact")
    first = {}

    def run(tol):
        t0 = time.perf_counter()
        out = pyhessian_top(model, xt, tt, crit, 10, tol, 1000, ctx.probe_seed, device)
        first[tol] = time.perf_counter() - t0
        return out

    m = {**matched_accuracy(run, PYHESSIAN_TOLS, exact), "max_iter": 1000, "device": device}
    fn = lambda: pyhessian_top(model, xt, tt, crit, 10, m["setting"], 1000, ctx.probe_seed, device)
    return {"timings": {"pyhessian_top10_matched": timed(fn, min(repeats, 3), first=first[m["setting"]])},
            "notes": {"pyhessian_top10_matched": m}}


def judge(result: dict) -> dict:
    """Each target: value, bound, met (None where it does not apply or was not measured, saying why)."""
    cfg, backend = result["config"], result["backend"]
    why = [w for w, bad in [(f"backend is {backend}, not gpu", backend != "gpu"),
                            (f"MLP on {cfg['samples']} samples, not {FULL}", cfg["samples"] != FULL),
                            (f"CNN on {cfg['cnn_samples']} samples, not {FULL}", cfg["cnn_samples"] != FULL),
                            ("not the default models", (cfg["mlp"], cfg["cnn"]) != ("mlp", "cnn"))] if bad]
    mlp, cnn = result["items"].get("mlp", {}), result["items"].get("cnn", {})
    t, notes = mlp.get("timings", {}), mlp.get("notes", {})
    values = {"mlp_exact_and_eigenvalues": t.get("exact_and_eigenvalues", {}).get("median"),
              "cnn_hvp": cnn.get("timings", {}).get("hvp", {}).get("median"), "lanczos_vs_pyhessian": None}
    ratio_why = list(why)
    if "pyhessian_top10_matched" not in t:
        ratio_why.append(result["torch"])
    elif not (notes["lanczos_top10_matched"]["matched"] and notes["pyhessian_top10_matched"]["matched"]):
        ratio_why.append("accuracy not matched")
    else:
        values["lanczos_vs_pyhessian"] = t["pyhessian_top10_matched"]["median"] / t["lanczos_top10_matched"]["median"]
        if notes["pyhessian_top10_matched"]["device"] != "cuda":
            ratio_why.append("PyHessian did not run on the GPU")
    out = {}
    for key, (what, kind, bound) in TARGETS.items():
        v, w = values[key], ratio_why if key == "lanczos_vs_pyhessian" else why
        out[key] = {"what": what, "kind": kind, "bound": bound, "value": v, "not_applicable": "; ".join(w) or None,
                    "met": None if v is None or w else bool(v < bound if kind == "seconds" else v >= bound)}
    return out


def samples_arg(text: str):
    """--samples, --cnn-samples: a positive integer or "all"."""
    n = int(text) if text.isdigit() else 0
    if text != "all" and n < 1:
        raise HessianApproxError(f"--samples/--cnn-samples is {text!r}", "pass a positive integer or all")
    return text if text == "all" else n


def run(out="benchmarks/results/gpu", stamp=None, data_dir=None, dataset="auto", samples=FULL, cnn_samples=None,
        mlp="mlp", cnn="cnn", dtype="float32", epochs=None, repeats=5, use_torch=True, steps=LANCZOS_STEPS,
        precision="float32", checkpoints=None) -> Path:
    """Run the benchmark into <out>/bench_gpu_<stamp>.json (atomically, rewritten after each part); returns its path.

    ``checkpoints``: {"mlp": file, "cnn": file} weight files to use instead of training (either may be missing).

    ``precision``: JAX's matmul precision for float32 while it runs ("default": XLA's, TF32 on recent NVIDIA
    GPUs, about 1e-3 relative, too coarse for an exact Hessian; torch's matmuls are full float32 by default).
    """
    import contextlib

    import jax

    from benchmarks.context import Context, Options, architecture_from_flags, data_shape
    from benchmarks.record import machine, to_jsonable, versions
    from jax_impl import data

    if repeats < 1:
        raise HessianApproxError(f"--repeats is {repeats}", "pass a positive number")
    if precision not in ("default", "tensorfloat32", "float32"):
        raise HessianApproxError(f"--matmul-precision {precision!r} is not known", "use float32, tensorfloat32 or default")
    out = Path(out)
    stamp = stamp or new_stamp(out)
    path = out / f"bench_gpu_{stamp}.json"
    if path.exists():
        raise HessianApproxError(f"{path} exists already", "pass another --stamp (a folder never mixes two runs)")
    gpu = jax.default_backend() == "gpu"
    log(f"bench_gpu: backend {jax.default_backend()}, devices {jax.devices()}"
        + ("" if gpu else " (no GPU: the GPU targets do not apply)"))
    ds = data.load_dataset(dataset, data_dir)
    sizes = {}
    for flag, n in (("--samples", samples), ("--cnn-samples", samples if cnn_samples is None else cnn_samples)):
        sizes[flag] = len(ds.x_train) if n == "all" else n
        if sizes[flag] > len(ds.x_train):
            raise HessianApproxError(f"{flag} {n} exceeds the {len(ds.x_train)} training samples of {ds.name}",
                                     "pass --data-dir with MNIST's IDX files, or a smaller number (or all)")
    torch_dev, torch_note = torch_device(gpu) if use_torch else (None, "not run (--no-torch)")
    result = {"benchmark": "bench_gpu", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stamp": stamp,
              "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
              "device_kind": jax.devices()[0].device_kind, "machine": machine(), "versions": versions(),
              "torch": torch_note, "items": {},
              "config": {"samples": sizes["--samples"], "cnn_samples": sizes["--cnn-samples"], "mlp": mlp, "cnn": cnn,
                         "dtype": dtype, "epochs": epochs, "repeats": repeats, "dataset": ds.name,
                         "gpu_floats": GPU_FLOATS, "matmul_precision": precision, "checkpoints": checkpoints}}

    # the data held in device memory (60,000 MNIST images are 188 MB), where Options can stream them from the host
    resident = {"stream": "off"} if "stream" in Options.__dataclass_fields__ else {}

    def context(model, n, which):
        arch = architecture_from_flags(model, None, None, data_shape(ds), ds.num_classes)
        ctx = Context(Options(data_dir=data_dir, dataset=dataset, model=model, hessian_samples=n, dtype=dtype,
                              epochs=epochs, chunk_size=chunk_for(n, per_sample_floats(arch)) if gpu else None,
                              checkpoint=(checkpoints or {}).get(which), **resident))
        ctx.__dict__["dataset"] = ds  # the one loaded above (Context.dataset is a cached property)
        return ctx

    def save(name, ctx, part):
        result["items"][name] = {**part, "provenance": ctx.provenance()}
        result["targets"] = judge(result)
        write_json(path, to_jsonable(result))
        log(f"wrote {path}")

    with contextlib.nullcontext() if precision == "default" else jax.default_matmul_precision(precision):
        ctx = context(mlp, sizes["--samples"], "mlp")
        part = mlp_items(ctx, repeats, gpu, steps)
        exact = part.pop("exact")
        save("mlp", ctx, part)
        cctx = context(cnn, sizes["--cnn-samples"], "cnn")
        save("cnn", cctx, cnn_items(cctx, repeats))
    if torch_dev is not None:
        ph = pyhessian_items(ctx, np.asarray(exact), repeats, torch_dev)
        for k in ("timings", "notes"):
            part[k].update(ph[k])
        save("mlp", ctx, part)
    return path


def format_bench(result: dict) -> str:
    lines = [f"{'item':42s}{'median s':>11s}{'min':>10s}{'first call':>11s}{'compile':>9s}"]
    lines += [f"{name + ' ' + k:42s}{tm['median']:11.4g}{tm['min']:10.4g}{tm['first_call_s']:11.4g}{tm['compile_s']:9.3g}"
              for name, item in result["items"].items() for k, tm in item["timings"].items()]
    return "\n".join(lines + [""] + target_lines(result.get("targets")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the benchmark (--smoke: a CPU-sized run on scikit-learn's digits)")
    for flag, kw in {"--out": dict(default="benchmarks/results/gpu"), "--stamp": {}, "--data-dir": {}, "--dataset": {},
                     "--samples": {}, "--cnn-samples": {}, "--mlp": dict(default="mlp"), "--cnn": {},
                     "--dtype": dict(default="float32"), "--epochs": dict(type=int), "--repeats": dict(type=int),
                     "--matmul-precision": dict(default="float32"), "--mlp-checkpoint": {}, "--cnn-checkpoint": {},
                     "--no-torch": dict(action="store_true"), "--smoke": dict(action="store_true")}.items():
        r.add_argument(flag, **kw)
    s = sub.add_parser("summary", help="run_gpu.sh's record of one run, and its table")
    for flag in ("--steps", "--out", "--stamp", "--mode"):
        s.add_argument(flag, required=True)
    a = p.parse_args(argv)
    try:
        if a.command == "summary":
            summary(a.steps, a.out, a.stamp, a.mode)
            return 0
        smoke = a.smoke
        path = run(out=a.out, stamp=a.stamp, data_dir=a.data_dir, dataset=a.dataset or ("digits" if smoke else "auto"),
                   samples=samples_arg(a.samples or ("all" if smoke else str(FULL))),
                   cnn_samples=None if a.cnn_samples is None else samples_arg(a.cnn_samples), mlp=a.mlp,
                   cnn=a.cnn or (SMOKE_CNN if smoke else "cnn"), dtype=a.dtype,
                   epochs=a.epochs if a.epochs is not None else (1 if smoke else None),
                   repeats=a.repeats if a.repeats is not None else (2 if smoke else 5), use_torch=not a.no_torch,
                   precision=a.matmul_precision, checkpoints={"mlp": a.mlp_checkpoint, "cnn": a.cnn_checkpoint})
        print(format_bench(json.loads(path.read_text())))
    except HessianApproxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
