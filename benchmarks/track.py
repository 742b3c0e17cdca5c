"""`hessian-approx track`: train with curvature tracked every few steps; a time-series record, a figure and a PyHessian cross-check."""

from __future__ import annotations

import argparse
import time

import numpy as np

from jax_impl.errors import HessianApproxError

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


def add_track_parser(sub, add_problem_flags) -> argparse.ArgumentParser:
    t = sub.add_parser("track", help="train (GD, SGD or Adam) and track sharpness, trace and GGN sharpness every few steps")
    add_problem_flags(t)
    g = t.add_argument_group("tracking")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="sgd (default; full batch = GD) or adam")
    g.add_argument("--lr", type=float, default=0.1, help="learning rate η (default 0.1)")
    g.add_argument("--momentum", type=float, default=0.0, help="sgd momentum (default 0: plain gradient descent)")
    g.add_argument("--train-samples", type=int, default=5000,
                   help="seeded training subset (default 5000, the edge-of-stability papers' size; capped at the data)")
    g.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the whole subset, full batch)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--every", type=int, default=10, help="steps between measurements (default 10)")
    g.add_argument("--curvature", default="subset", choices=["subset", "batch"],
                   help="subset (default): a fixed subset of --hessian-samples of the training subset (default all of "
                        "it); batch: the current step's mini-batch")
    g.add_argument("-k", "--k", type=int, default=1, help="top Hessian eigenvalues per measurement (default 1)")
    g.add_argument("--tol", type=float, default=1e-3,
                   help="Lanczos stops when each top-k residual <= tol·|θ|max (default 1e-3, PyHessian's)")
    g.add_argument("--max-steps", type=int, default=60, help="most Lanczos steps per eigenproblem (default 60)")
    g.add_argument("--no-warm-start", action="store_true", help="start every Lanczos run from a random vector")
    g.add_argument("--trace", default="xtrace", choices=["xtrace", "hutchinson", "none"],
                   help="trace estimator per measurement (default xtrace)")
    g.add_argument("--trace-matvecs", type=int, default=30, help="matvecs of the trace estimator (default 30)")
    g.add_argument("--no-ggn", action="store_true", help="skip λ_max of the GGN")
    g.add_argument("--crosscheck", type=int, default=0, metavar="N",
                   help="at N measured steps (first, last, evenly between) compare with PyHessian on the torch twin "
                        "and the exact eigendecomposition (default 0: off)")
    g.add_argument("--crosscheck-exact-max-dim", type=int, default=8000, metavar="D",
                   help="the cross-check's exact eigendecomposition only up to D parameters (default 8000; 0: never)")
    g.add_argument("--figure", default=None, metavar="PATH", help="figure path (default: --json with .png)")
    return t


def settings_from(args) -> dict:
    """The run's training and tracking settings, checked; the threshold line of the figure."""
    for name in ("steps", "every", "train_samples", "k", "max_steps", "trace_matvecs"):
        if getattr(args, name) < 1:
            raise HessianApproxError(f"--{name.replace('_', '-')} is {getattr(args, name)}", "pass a positive number")
    if not (args.lr > 0 and np.isfinite(args.lr)):
        raise HessianApproxError(f"--lr is {args.lr}", "pass a positive learning rate")
    if not 0 <= args.momentum < 1:
        raise HessianApproxError(f"--momentum is {args.momentum}", "pass a momentum in [0, 1)")
    if args.batch_size is not None and args.batch_size < 1:
        raise HessianApproxError(f"--batch-size is {args.batch_size}", "pass a positive number")
    if args.crosscheck < 0:
        raise HessianApproxError(f"--crosscheck is {args.crosscheck}", "pass 0 (off) or a number of checkpoints")
    if args.curvature == "batch" and args.crosscheck and args.batch_size is not None:
        raise HessianApproxError("--crosscheck with --curvature batch needs full batch (mini-batches are not kept)",
                                 "use --curvature subset, or leave out --batch-size")
    if args.curvature == "batch" and args.hessian_samples is not None:
        raise HessianApproxError("--hessian-samples was given with --curvature batch",
                                 "leave out --hessian-samples (the batch is the curvature's data) or use --curvature subset")
    if args.optimizer == "adam":
        threshold, name = (2 + 2 * ADAM_B1) / ((1 - ADAM_B1) * args.lr), "(2+2β₁)/((1-β₁)η)"
    else:
        threshold, name = 2 * (1 + args.momentum) / args.lr, "2(1+β)/η" if args.momentum else "2/η"
    return {"optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum, "steps": args.steps,
            "every": args.every, "curvature": args.curvature, "k": args.k, "tol": args.tol,
            "max_steps": args.max_steps, "warm_start": not args.no_warm_start,
            "trace": None if args.trace == "none" else args.trace, "trace_matvecs": args.trace_matvecs,
            "ggn": not args.no_ggn, "threshold": threshold, "threshold_name": name,
            "threshold_of": "preconditioned_sharpness" if args.optimizer == "adam" else "sharpness"}


def run_track(args) -> int:
    import jax
    import optax

    from benchmarks import record as rec
    from benchmarks.context import Context, log, progress_bar
    from benchmarks.figures_track import fig_track
    from jax_impl import data, losses, models, sharding
    from benchmarks.cli import input_paths
    from jax_impl.errors import HessianApproxError
    from jax_impl.fileio import check_output, check_writable_file, same_path
    from jax_impl.track_loop import track
    from jax_impl.tracking import TrackerConfig, adam_preconditioner

    s = settings_from(args)
    json_path = args.json or "track.json"
    figure = args.figure or str(json_path).rsplit(".", 1)[0] + ".png"
    if same_path(json_path, figure):
        raise HessianApproxError(f"--figure {figure} is the --json path", "give the figure its own path (.png)")
    for flag, path in (("--json", json_path), ("--figure", figure)):
        check_writable_file(path)
        check_output(path, flag, input_paths(args), args.force)
    from benchmarks.cli import options_from

    ctx = Context(options_from(args))
    ds, arch = ctx.dataset, ctx.arch
    n = min(args.train_samples, len(ds.x_train))
    x, y = data.hessian_subset(ds.x_train, ds.y_train, n, ctx.options.seed)
    x = models.as_inputs(arch, x).astype(np.dtype(ctx.options.dtype))
    y = np.asarray(y) if np.asarray(y).ndim == 1 else np.asarray(y, np.dtype(ctx.options.dtype))
    batch_size = n if args.batch_size is None else args.batch_size
    if batch_size > n:
        raise HessianApproxError(f"--batch-size {batch_size} exceeds the {n} training samples", "lower --batch-size")
    params = ctx.params if (ctx.options.checkpoint or ctx.options.weights) else models.cast_params(
        models.init_params(arch, jax.random.PRNGKey(ctx.options.seed)), ctx.dtype)
    hs = min(ctx.options.hessian_samples or n, n)
    subset_seed = ctx.options.seed + 1 if ctx.options.subset_seed is None else ctx.options.subset_seed
    xs, ys = data.hessian_subset(x, y, hs, subset_seed) if hs < n else (x, y)
    fixed = sharding.sharded_batches(xs, ys, min(ctx.chunk_size, hs), dtype=ctx.dtype)
    curvature = fixed if args.curvature == "subset" else "batch"
    opt = (optax.adam(args.lr, ADAM_B1, ADAM_B2, ADAM_EPS) if args.optimizer == "adam"
           else optax.sgd(args.lr, momentum=args.momentum or None))
    config = TrackerConfig(k=args.k, tol=args.tol, max_steps=args.max_steps, warm_start=s["warm_start"],
                           trace=s["trace"], trace_matvecs=args.trace_matvecs, ggn=s["ggn"],
                           preconditioned=args.optimizer == "adam")
    at = [0, *range(args.every, args.steps, args.every), args.steps]
    checks = sorted({at[round(i * (len(at) - 1) / max(args.crosscheck - 1, 1))] for i in range(args.crosscheck)})
    log(f"tracking {arch.describe()} ({arch.num_params} parameters): {args.optimizer} η={args.lr}, batch {batch_size} "
        f"of {n}, {args.steps} steps, curvature every {args.every} on "
        f"{'the current batch' if args.curvature == 'batch' else f'{hs} samples'}")
    bar = progress_bar(args.steps, "track")

    def progress(step, m):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{float(m['loss']):.3g}", sharpness=f"{float(m['sharpness']):.3g}")

    result = track(models.make_apply(arch), losses.get_loss(ctx.options.loss), params, opt, x, y,
                   steps=args.steps, every=args.every, key=ctx.key("track"), batch_size=batch_size,
                   curvature=curvature, config=config,
                   preconditioner=adam_preconditioner(ADAM_B2, ADAM_EPS) if args.optimizer == "adam" else None,
                   snapshot_steps=checks, progress=progress, log_every=1 if args.steps <= 50 * args.every else 10)
    bar.close()
    record = rec.new_record("track", track_provenance(ctx, n, batch_size, hs))
    record["settings"] = s
    record["rows"] = [{"step": int(t), **{k: v[i] for k, v in result.metrics.items()}}
                      for i, t in enumerate(result.steps)]
    record["train_loss"] = result.train_loss
    record["diverged_at"] = result.diverged_at
    record["seconds"] = result.seconds
    if result.diverged_at is not None:
        log(f"training diverged at step {result.diverged_at} (loss non-finite or 10^4 times the first); "
            f"the record stops there")
    if checks:
        from benchmarks.track_check import crosscheck_track

        record["crosscheck"] = crosscheck_track(ctx, result, fixed, xs, ys, args.tol,
                                                 args.crosscheck_exact_max_dim)
    rec.write_json(json_path, record)
    fig_track(rec.to_jsonable(record), figure)
    print(format_track(record))
    log(f"wrote {json_path} and {figure}")
    return 0


def track_provenance(ctx, n: int, batch_size: int, hs: int) -> dict:
    import jax

    from benchmarks.record import machine, versions
    from jax_impl import models

    o, ds = ctx.options, ctx.dataset
    weights = ({"init": f"seeded initialization (seed {o.seed})"} if not (o.checkpoint or o.weights)
               else {"file": o.checkpoint or o.weights})
    return {**ds.provenance(), "input_layout": models.input_layout(ctx.arch, ds.x_train[:1]),
            "train_samples": n, "batch_size": batch_size, "hessian_samples": hs, "model": ctx.arch.describe(),
            "architecture": ctx.arch.to_dict(), "num_params": ctx.arch.num_params, "loss": o.loss,
            "dtype": o.dtype, "seed": o.seed, "probe_seed": ctx.probe_seed, "chunk_size": ctx.chunk_size,
            "devices": [str(d) for d in jax.devices()], "machine": machine(), "versions": versions(),
            "weights": weights}


def format_track(record: dict) -> str:
    """A short table: every ~10th measured row and the cross-check."""
    rows = record["rows"]
    s = record["settings"]
    cols = ["step", "loss", "sharpness", "ggn_sharpness", "trace", "preconditioned_sharpness", "lanczos_matvecs"]
    cols = [c for c in cols if c in rows[0]]
    lines = [f"threshold {s['threshold_name']} = {s['threshold']:.4g}",
             "  ".join(f"{c:>12}" for c in cols)]
    stride = max(1, len(rows) // 10)
    for r in rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else []):
        lines.append("  ".join(f"{float(r[c]):>12.5g}" if r[c] is not None else f"{'-':>12}" for c in cols))
    for c in record.get("crosscheck", []):
        ex = f", exact {c['exact']:.6g}" if c.get("exact") is not None else ""
        lines.append(f"step {c['step']}: tracked {c['tracked']:.6g}, PyHessian {c['pyhessian']:.6g} "
                     f"(rel. diff {c['rel_diff_pyhessian']:.1e}; at its default tol {c['pyhessian_default']:.6g}){ex}")
    return "\n".join(lines)
