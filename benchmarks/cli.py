"""The `hessian-approx` command line: parse flags, pick methods from the table, print and save the record."""

from __future__ import annotations

import argparse
import os
import sys

from jax_impl.errors import HessianApproxError

# Each computing command is a query on the method table (benchmarks.table: light, no JAX import).
HELP = {
    "eigs": "top-k Hessian eigenvalues: exact, Lanczos (plain and certified), power iteration",
    "trace": "Hessian trace: exact, Hutchinson, Hutch++, XTrace; XNysTrace on the GGN",
    "density": "spectral density by SLQ next to the exact eigenvalues",
    "diag": "Hessian diagonal: exact (DiagH rules), Hutchinson, XDiag, BackPACK's DiagHessian",
    "approx": "structured approximations (JAX and BackPACK) next to the exact Hessian and GGN",
    "crosscheck": "JAX against PyTorch on the same weights: loss, gradient, Hvps, Hessian, PyHessian",
}


def default_methods(command: str) -> list[str]:
    """The methods a command runs by default: the table's entries that name it."""
    from benchmarks.table import names

    return names(command=command)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <problem>; see hessian-approx <command> --help`` (status 2)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _seed(text: str) -> int:
    from benchmarks.context import SEED_MAX

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer seed from 0 to {SEED_MAX}, got {text!r}")
    return value


def _tol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite tolerance >= 0, got {text!r}")
    return value


def _samples(text: str) -> int | str:
    """--hessian-samples: an integer (checked later against the data), or all."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or all, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like '10' or '32,32', got {text!r}") from None


def add_problem_flags(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    from jax_impl.data import DATASET_NAMES  # numpy only: keeps --help fast

    g = p.add_argument_group("problem")
    g.add_argument("--dataset", default="auto", choices=list(DATASET_NAMES),
                   help="mnist/fashion-mnist: from --data-dir, else the cache, else downloaded (checksums verified); "
                        "auto: MNIST if at hand or downloadable in 5 s, else 8x8 digits (says why)")
    g.add_argument("--data-dir", default=None,
                   help="folder with the four IDX files of --dataset (gz, or raw for MNIST); read, never written")
    g.add_argument("--data", default=None, metavar="FILE.npz",
                   help="your own data: arrays x (N, ...) and y (N,) labels or (N, C) targets "
                        "[, x_test, y_test]; images channels last (see README)")
    g.add_argument("--model", "--arch", dest="model", default=None, metavar="MODEL",
                   help="mlp (default), cnn, or a layer string such as "
                        "conv8k5-relu-maxpool2-conv16k5-relu-maxpool2-flatten-dense10 (see README); "
                        "with --checkpoint: the file's; with --weights: the file's architecture, "
                        "else inferred from the tensor shapes where they determine it")
    g.add_argument("--hidden", type=_ints, default=None, help="hidden widths of --model mlp, e.g. 10 or 32,32 (default 10)")
    g.add_argument("--activation", default=None, choices=["relu", "tanh", "sigmoid"],
                   help="replaces every activation of the model (default: relu, or as the layer string says)")
    g.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    g.add_argument("--checkpoint", default=None, help="weights from `hessian-approx train`; default: train now")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="your own weights: a PyTorch nn.Sequential state_dict (.pt or safetensors) or a Flax "
                        "parameter file (msgpack or safetensors) of a supported architecture (see README)")
    g.add_argument("--epochs", type=int, default=None,
                   help="training epochs when no --checkpoint (default 5 for MNIST-sized data, 100 for digits)")
    g.add_argument("--hessian-samples", type=_samples, default=None,
                   help="size of the seeded Hessian subset, or all for the whole training set "
                        "(default 1000 for an mlp, 100 for convolutional models)")
    g.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="stream the Hessian data from host memory one chunk at a time (device memory then "
                        "holds one chunk, whatever the number of samples); auto: subsets above 64 MiB")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seed for training, and for the subset and the probes unless given below (default 0)")
    g.add_argument("--subset-seed", type=_seed, default=None, help="seed of the Hessian subset (default --seed)")
    g.add_argument("--probe-seed", type=_seed, default=None,
                   help="seed of every random probe and start vector (default --seed): vary it to redraw the "
                        "probes on the same subset")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--chunk-size", type=int, default=None,
                   help="samples per chunk of the curvature averages (default: from the model's activation size, "
                        "1000 for the mlp, 20 for the cnn)")
    if json_flag:
        g.add_argument("--json", default=None, metavar="PATH", help="write the result record here (atomically)")
    g.add_argument("--force", action="store_true",
                   help="replace an existing output that hessian-approx did not write (never one of the inputs)")
    from jax_impl.distributed import add_arguments  # no JAX import: --help stays fast

    add_arguments(p)  # --coordinator-address, --num-processes, --process-id, --distributed


def add_method_flags(p: argparse.ArgumentParser, default_methods) -> None:
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=",".join(default_methods),
                   help=f"comma-separated methods from the table (default {','.join(default_methods)})")
    g.add_argument("-k", "--k", type=int, default=10, help="number of top eigenvalues (default 10)")
    g.add_argument("--power-max-iter", type=int, default=100, help="PyHessian's maxIter (default 100)")
    g.add_argument("--power-tol", type=_tol, default=1e-3, help="PyHessian's tol (default 1e-3)")
    g.add_argument("--lanczos-steps", type=int, default=None, help="Lanczos iterations (default: from k)")
    g.add_argument("--hutchinson-samples", type=int, default=100,
                   help="matvecs of every stochastic trace and diagonal estimator, so they compare at equal cost "
                        "(Hutchinson's probes; default 100)")
    g.add_argument("--slq-steps", type=int, default=100, help="Lanczos steps per SLQ run (default 100)")
    g.add_argument("--slq-runs", type=int, default=1, help="SLQ runs (PyHessian's n_v, default 1)")
    g.add_argument("--mc-samples", type=int, default=1, help="Monte-Carlo samples for diag-ggn-mc and kfac (default 1)")
    g.add_argument("--kfac-approx", default="backpack", choices=["backpack", "expand", "reduce"],
                   help="convention of the conv Kronecker factors of kfac, kflr, kfra (default backpack: "
                        "BackPACK 1.7.1's; expand/reduce: Eschenhagen et al. 2023; see README)")
    g.add_argument("--tol", type=float, default=None,
                   help="lanczos-certified: stop when every top-k explicit residual <= tol·|θ₁| "
                        "(default max(1e-6, 1000 eps): 1e-6 in float64, 1.2e-4 in float32)")
    g.add_argument("--exact-route", default="auto", choices=["auto", "structure", "hvp"],
                   help="how exact/ggn build the dense matrix: structure (per-layer contractions; Dense/Conv "
                        "networks, ReLU for the Hessian), hvp (d matvecs, any network); auto: structure where it applies")
    g.add_argument("--block-size", type=int, default=10, help="block-lanczos: vectors per block (default 10)")
    g.add_argument("--blocks", default="per-layer",
                   help="blocks: per-layer (default), per-leaf, or layer names/paths such as Dense_0,Conv_1/kernel")
    g.add_argument("--pyhessian-trace-tol", type=_tol, default=1e-3,
                   help="PyHessian trace's tol (default 1e-3; 0 uses all --hutchinson-samples probes)")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="hessian-approx", description=(
        "Curvature of neural-network losses in JAX, cross-checked against BackPACK and PyHessian."))
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the network and write a safetensors checkpoint")
    add_problem_flags(t, json_flag=False)
    t.add_argument("--out", required=True, help="checkpoint path to write (.safetensors)")
    from benchmarks.table import approximations

    for name, helptext in HELP.items():
        q = add_and_return(sub, name, helptext)
        add_method_flags(q, default_methods(name))
        add_spread_flags(q)
        if name == "approx":
            q.add_argument("--method", default=None, choices=[*approximations(), "all"],
                           help="one approximation (with BackPACK's counterpart, exact and GGN) or all")
    r = add_and_return(sub, "reproduce", json_flag=False, helptext="the study end to end: results.json, report.md and figures in --out")
    add_method_flags(r, [])
    r.add_argument("--out", default="out/reproduce", help="output directory (default out/reproduce)")
    r.add_argument("--sweep-samples", type=int, default=1000, help="largest probe count of the Hutchinson sweep")
    r.add_argument("--sweep-seeds", type=int, default=10, help="independent seeds of the Hutchinson sweep")
    r.add_argument("--trace-study-matvecs", type=int, default=None,
                   help="largest matvec budget of the trace-estimator study (default 384 for an mlp, 96 otherwise; 0 skips)")
    r.add_argument("--trace-study-seeds", type=int, default=20, help="seeds of the trace-estimator study (default 20)")
    from benchmarks.track import add_track_parser

    add_track_parser(sub, add_problem_flags)
    b = add_and_return(sub, "bench", json_flag=False, helptext="side-by-side timings JAX vs PyTorch, ratios against targets, width sweep")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per item after a warm-up (default 5)")
    b.add_argument("--widths", type=_ints, default=(10, 32, 64, 128, 256), help="hidden widths of the sweep")
    b.add_argument("--max-exact-dim", type=int, default=26000, help="largest model for the exact Hessian in the sweep")
    b.add_argument("--out", default="benchmarks/results", help="where bench_<time>.json and bench.csv go")
    return p


def add_spread_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("spread over batches")
    g.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="also compute every method on independent batches of B training samples and report "
                        "the mean, std, min and max of λ_max and the trace over them")
    g.add_argument("--num-batches", type=int, default=None,
                   help="how many disjoint batches --batch-size draws (default: 10, or fewer if the data run out)")


def add_and_return(sub, name, helptext, json_flag: bool = True):
    q = sub.add_parser(name, help=helptext)
    add_problem_flags(q, json_flag)
    return q


def options_from(args):
    from benchmarks.context import Options

    fields = Options.__dataclass_fields__
    return Options(**{k: v for k, v in vars(args).items() if k in fields})


def run(args) -> int:
    from jax_impl import distributed

    if distributed.initialize_from_args(args):  # first: before JAX is imported
        if args.command in ("train", "reproduce", "bench", "track"):
            raise HessianApproxError(f"{args.command} runs on one process",
                                     "run it without --coordinator-address/--num-processes/--process-id/--distributed")
        if not distributed.is_main_process():  # every process computes; process 0 prints and writes
            args.json, sys.stdout = None, open(os.devnull, "w")
    from benchmarks import record as rec
    from benchmarks.context import Context, log
    from benchmarks.methods import preflight, run_methods
    from benchmarks.registry import resolve
    from jax_impl.checkpoint import save_checkpoint

    from jax_impl.fileio import check_output, check_output_dir, check_writable_dir, check_writable_file

    if args.command == "track":
        from benchmarks.track import run_track

        if args.hessian_samples == "all" and args.curvature != "batch":
            args.hessian_samples = None  # track's default subset is the whole training set

        return run_track(args)
    ctx = Context(options_from(args))
    # refuse unwritable outputs, and outputs that would replace an input or a foreign file, before any work
    inputs = input_paths(args)
    if getattr(args, "json", None):
        check_writable_file(args.json)
        check_output(args.json, "--json", inputs, args.force)
    if args.command == "train":
        check_writable_file(args.out)
        check_output(args.out, "--out", inputs, args.force)
    elif args.command in ("reproduce", "bench"):
        check_writable_dir(args.out)
        if args.command == "reproduce":
            check_output_dir(args.out, "--out", inputs, args.force)
    if args.command == "train":
        params = ctx.params
        save_checkpoint(args.out, params, ctx.arch, {**ctx.train_info, **ctx.dataset.provenance()})
        log(f"wrote {args.out}")
        acc = ", ".join(f"{k.replace('_', ' ')} {ctx.train_info[k]:.4f}" for k in ("train_accuracy", "test_accuracy")
                        if k in ctx.train_info)
        print(f"{ctx.arch.describe()}: {acc or 'weights copied from ' + str(ctx.options.checkpoint)} -> {args.out}")
        return 0
    if args.command == "bench":
        from benchmarks.bench import format_bench, run_bench

        result = run_bench(ctx.options, args.repeats, args.widths, args.max_exact_dim, args.out)
        print(format_bench(result))
        return 0
    if args.command == "reproduce":
        from benchmarks.reproduce import reproduce

        record = reproduce(ctx, args.out, args.sweep_samples, args.sweep_seeds, args.trace_study_matvecs,
                           args.trace_study_seeds)
        print(rec.format_table(record))
        from benchmarks.report import report_markdown

        print("\n".join(l for l in report_markdown(rec.to_jsonable(record)).splitlines()
                         if l.startswith("- ") and ("held" in l or "checked" in l)))
        log(f"wrote {args.out}/results.json, report.md and the figures")
        return 0
    requested = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not requested and not getattr(args, "method", None):
        raise HessianApproxError(f"--methods {args.methods!r} names no method",
                                 f"name at least one, e.g. --methods {','.join(default_methods(args.command))}")
    if getattr(args, "method", None):
        from benchmarks.table import approximations, counterpart

        chosen = approximations() if args.method == "all" else (args.method,)
        requested = ["exact", "ggn", *chosen, *(counterpart(m) for m in chosen)]
    names, _ = resolve(requested)
    _ = ctx.subset_rows  # a bad --hessian-samples fails here, before any training
    spread = None
    if getattr(args, "batch_size", None) is not None or getattr(args, "num_batches", None) is not None:
        from benchmarks.spread import format_spread, plan_spread, run_spread

        spread = plan_spread(len(ctx.dataset.x_train), args.batch_size, args.num_batches, ctx.subset_seed)
    preflight(ctx, names)
    record = rec.new_record(args.command, ctx.provenance())
    record["point"] = ctx.point()
    run_methods(ctx, names, record)
    record["comparisons"] = rec.compare_to_reference(record, "exact", ctx.options.k)
    print(rec.format_table(record))
    if args.command == "crosscheck":
        from benchmarks.crosscheck import crosscheck, format_crosscheck

        record["crosscheck"] = crosscheck(ctx)
        print(format_crosscheck(record["crosscheck"]))
    if spread is not None:
        record["spread"] = run_spread(ctx, names, spread, record)
        print(format_spread(record["spread"]))
    if args.json:
        rec.write_json(args.json, record)
        log(f"wrote {args.json}")
    return 0


def input_paths(args) -> dict:
    """The files and folders a run reads, by flag (an output must never replace one of them)."""
    from jax_impl.data import default_data_dir

    data_dir = getattr(args, "data_dir", None) or (default_data_dir() if not getattr(args, "data", None) else None)
    return {flag: value for flag, value in (("--checkpoint", getattr(args, "checkpoint", None)),
                                           ("--weights", getattr(args, "weights", None)),
                                           ("--data", getattr(args, "data", None)),
                                           ("--data-dir", data_dir)) if value}


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, docker stop), handled like Ctrl-C: outputs are written whole or not at all."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal

    try:
        args = parser().parse_args(argv)
    except SystemExit as done:  # --help, or a one-line usage error (Parser.error)
        return done.code if isinstance(done.code, int) else 2
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return run(args)
    except HessianApproxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"error: {what}; {_left_as_it_was(args)}", file=sys.stderr)
        code = 143 if isinstance(err, Terminated) else 130
        lapack = sys.modules.get("jax_impl.algorithms.lapack")
        if lapack is not None and lapack.native_call_running():  # OpenBLAS would wait for it at exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _left_as_it_was(args) -> str:
    """What an interrupted run left: every output is written atomically (a folder as a whole)."""
    if args.command == "reproduce":
        return f"{args.out} was left as it was (the unfinished run's files were removed)"
    outs = [p for p in (getattr(args, "json", None), args.out if args.command == "train" else None,
                        getattr(args, "figure", None)) if p]
    return ("no output was written or replaced" if not outs else
            f"{' and '.join(map(str, outs))} {'was' if len(outs) == 1 else 'were'} not written or replaced")


if __name__ == "__main__":
    sys.exit(main())
