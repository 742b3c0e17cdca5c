"""The problem a command works on: options -> dataset, model, weights, Hessian subset, operators."""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from hessian_approx.architecture import PRESETS, Architecture, mlp, parse
from benchmarks import curvature_data
from benchmarks.options import SEED_MAX, Options, check_seed  # noqa: F401  (re-exported: context.Options)
from jax_impl import checkpoint, data, losses, models, operators, streaming, train
from jax_impl.errors import HessianApproxError, check_finite
from jax_impl.materialize import dense


def log(msg: str) -> None:
    """Progress messages go to stderr, so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr (silent when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


# Default Hessian subset sizes. The study's 1,000 for MLPs; convolutional networks cost ~40x more
# per sample (the default CNN: 320k multiply-adds per forward pass against 8k), so their default
# keeps `reproduce --model cnn` (three dense 5994x5994 matrices) within 10 minutes on 2 cores.
DEFAULT_SAMPLES = {"mlp": 1000, "cnn": 100}


def chunk_sizes(arch: Architecture, samples: int | None = None) -> tuple[int, int]:
    """(samples per chunk, dense columns per vmapped call) that keep the working set near the caches.

    A vmapped Hvp holds about columns x samples x A floats of tangents, A the per-sample
    activation size (sum over layer outputs). Rules: samples x A <= 2^18 floats and
    columns x samples x A <= 2^22, columns a power of two. Measured (2 cores, quiet machine,
    float32): the default CNN (A = 12,938, 100 samples) builds its dense Hessian in 54 s with
    (20, 16), 69 s with (20, 32), 92 s with (50, 16), 219 s with (100, 256); the MLP
    (A = 30, 1000 samples) in 2.34 s with (1000, 128) and 2.82 s with (1000, 256).
    """
    act = sum(int(np.prod(s)) for s in arch.shapes[1:])
    samples = samples or int(min(1000, max(8, 2**18 // act)))
    budget = max(8, min(256, 2**22 // (samples * act)))
    return samples, 1 << (budget.bit_length() - 1)


def data_shape(dataset: data.Dataset) -> tuple[int, ...]:
    """The per-sample shape a model is built on: (H, W, C) for image data, else the stored shape."""
    return tuple(dataset.image_shape) if "image_shape" in dataset.provenance() else tuple(dataset.input_shape)


def architecture_from_flags(model: str | None, hidden, activation: str | None, image_shape,
                            num_classes: int) -> Architecture:
    """The network the flags describe, on data of per-sample ``image_shape`` ((H, W, C) or (D,)).

    ``mlp`` (the default) is Dense(h)-act-...-Dense(C) on the flattened inputs with --hidden
    widths; ``cnn`` and layer strings are parsed as written. --activation replaces every
    activation of a preset or string.
    """
    name = (model or "mlp").strip()
    if name.lower() == "mlp":
        return mlp(int(np.prod(image_shape)), tuple(hidden or (10,)), num_classes, activation or "relu")
    if hidden is not None:
        raise HessianApproxError(f"--hidden applies to --model mlp, not {name!r}",
                                 "write the widths into the layer string, e.g. dense32-relu-dense10")
    text = PRESETS.get(name.lower(), name)
    if activation:
        text = "-".join(activation if w in ("relu", "tanh", "sigmoid") else w for w in text.split("-"))
    arch = parse(text, image_shape)
    if arch.num_classes != num_classes:
        raise HessianApproxError(f"model {name!r} ends in {arch.num_classes} outputs but the data have "
                                 f"{num_classes} classes", f"end the layer string with dense{num_classes}")
    return arch


# what a Context on other rows (``for_rows``) keeps: the data, the model and the weights
_SHARED = ("options", "dtype", "train_info", "dataset", "arch", "_weights", "_checkpoint", "params")


class Context:
    """Lazily built, cached pieces of one run (dataset, weights, operators, dense Hessian).

    Methods in the method table take a Context and read what they need; what is
    expensive (training, the dense Hessian and its eigendecomposition) is built once.
    """

    def __init__(self, options: Options):
        self.options = options
        if options.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        self.dtype = jnp.float64 if options.dtype == "float64" else jnp.float32
        self.train_info: dict = {}

    @property
    def subset_seed(self) -> int:
        """Seed of the Hessian subset: --subset-seed, else --seed."""
        o = self.options
        return o.seed if o.subset_seed is None else o.subset_seed

    @property
    def probe_seed(self) -> int:
        """Seed of every random probe and start vector: --probe-seed, else --seed."""
        o = self.options
        return o.seed if o.probe_seed is None else o.probe_seed

    def key(self, name: str) -> jax.Array:
        """A PRNG key for ``name``, derived from the probe seed (each method its own stream)."""
        return jax.random.fold_in(jax.random.PRNGKey(self.probe_seed), zlib.crc32(name.encode()) % (2**31))

    @functools.cached_property
    def dataset(self) -> data.Dataset:
        if self.options.data:
            from jax_impl.userdata import load_npz

            ds = load_npz(self.options.data)
        else:
            ds = data.load_dataset(self.options.dataset, self.options.data_dir)
        log(f"data: {ds.note}")
        return ds

    @functools.cached_property
    def arch(self) -> Architecture:
        """The network: --model (preset or layer string) with --hidden/--activation, or the checkpoint's."""
        o = self.options
        if o.weights:
            if o.hidden is not None:
                raise HessianApproxError("--hidden does not apply to --weights",
                                         "pass the architecture with --arch (e.g. dense32-tanh-dense10) or none")
            arch = self._weights[1]
        elif o.checkpoint and o.model is None and o.hidden is None and o.activation is None:
            arch = self._checkpoint[1]
        else:
            arch = architecture_from_flags(o.model, o.hidden, o.activation, data_shape(self.dataset),
                                           self.dataset.num_classes)
        if arch.num_classes != self.dataset.num_classes:
            raise HessianApproxError(
                f"the model has {arch.num_classes} outputs but the data have {self.dataset.num_classes} "
                f"{'classes' if self.dataset.targets_kind == 'labels' else 'target columns'}",
                "pass weights, --arch and --data that belong together")
        return arch

    @functools.cached_property
    def _weights(self):
        """(params, arch, info) of --weights, the architecture from --arch/--model, the file or the shapes."""
        from bridge.external import read_weights

        o = self.options
        text = None if o.model is None else PRESETS.get(o.model.strip().lower(), o.model)
        if text is not None and o.activation:
            text = "-".join(o.activation if w in ("relu", "tanh", "sigmoid") else w for w in text.split("-"))
        return read_weights(o.weights, arch=text, input_shape=data_shape(self.dataset), activation=o.activation)

    @property
    def chunk_size(self) -> int:
        """Samples per chunk of the curvature averages: --chunk-size, else ``chunk_sizes(arch)[0]``."""
        return self.options.chunk_size or chunk_sizes(self.arch)[0]

    @property
    def dense_columns(self) -> int:
        """Columns per vmapped call when a dense matrix is built: ``chunk_sizes(arch, chunk_size)[1]``."""
        return chunk_sizes(self.arch, self.chunk_size)[1]

    @property
    def hessian_samples(self) -> int:
        """--hessian-samples ("all": the training set), else DEFAULT_SAMPLES for an mlp or any other network."""
        if self.options.hessian_samples == "all":
            return len(self.dataset.x_train)
        if self.options.hessian_samples is not None:
            return self.options.hessian_samples
        return min(DEFAULT_SAMPLES["mlp" if self.arch.is_mlp else "cnn"], len(self.dataset.x_train))

    @functools.cached_property
    def subset_rows(self) -> np.ndarray:
        """Rows (n,) of the training set the curvature averages over: the seeded Hessian subset
        (``data.hessian_subset``'s rows), or a batch's rows (``for_rows``)."""
        return streaming.subset_rows(len(self.dataset.x_train), self.hessian_samples, self.subset_seed)

    @property
    def streamed(self) -> bool:
        """Whether the curvature data stream from host memory (--stream; auto: subsets above 64 MiB)."""
        return curvature_data.use_stream(self.options.stream, len(self.subset_rows), curvature_data.sample_bytes(self),
                                         jax.process_count())

    def for_rows(self, rows) -> "Context":
        """This run (data, model, weights, options) with the curvature averaged over ``rows`` (n,) instead."""
        _ = self.params  # loaded or trained once, shared
        other = copy.copy(self)
        other.__dict__ = {k: v for k, v in self.__dict__.items() if k in _SHARED}
        other.options = dataclasses.replace(self.options, hessian_samples=len(rows))
        other.__dict__["subset_rows"] = curvature_data.check_rows(len(self.dataset.x_train), rows)
        return other

    @functools.cached_property
    def _checkpoint(self):
        return checkpoint.load_checkpoint(self.options.checkpoint)

    @functools.cached_property
    def params(self):
        o = self.options
        if o.weights:
            params, _, info = self._weights
            self.train_info = dict(info)
            log(f"weights: read {o.weights} ({info['weights_format']}, architecture {info['architecture_source']})")
            params = models.unflatten_tree(params)
        elif o.checkpoint:
            params, stored, meta = self._checkpoint
            if stored != self.arch:
                raise HessianApproxError(
                    f"checkpoint {o.checkpoint} holds {stored.describe()} but --model asks for {self.arch.describe()}",
                    "leave out --model/--hidden/--activation (the file's architecture is used) or pass another --checkpoint")
            self.train_info = {"checkpoint": str(o.checkpoint), **meta}
            log(f"weights: loaded {o.checkpoint}")
        else:
            params, self.train_info = self.train()
        return models.cast_params(params, self.dtype)

    def train(self):
        """Train the network from --seed; returns (params, info with accuracies)."""
        o = self.options
        epochs = o.epochs or (5 if len(self.dataset.x_train) >= 10000 else 100)
        cfg = train.TrainConfig(epochs=epochs, seed=o.seed, loss=o.loss)
        log(f"training {self.arch.describe()} on {self.dataset.name} for {epochs} epochs (seed {o.seed})")
        bar = progress_bar(epochs, "train")
        t0 = time.perf_counter()
        params, hist = train.train(self.arch, self.dataset.x_train, self.dataset.y_train, cfg,
                                   progress=lambda e, l: (bar.update(1), bar.set_postfix(loss=f"{l:.3f}")))
        bar.close()
        apply = models.make_apply(self.arch)
        ds = self.dataset
        info = {"trained": True, "epochs": epochs, "final_loss": hist["loss"][-1], "train_seconds": time.perf_counter() - t0}
        if ds.targets_kind == "labels":
            info["train_accuracy"] = train.accuracy(apply, params, ds.x_train, ds.y_train)
            if len(ds.x_test):
                info["test_accuracy"] = train.accuracy(apply, params, ds.x_test, ds.y_test)
        log("trained: " + (", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in info.items() if "accuracy" in k)
                           or f"final loss {info['final_loss']:.4g}"))
        return params, info

    @functools.cached_property
    def subset(self):
        """The Hessian subset's rows copied (x (n, *input_shape), y (n,)); streamed runs never make it."""
        rows = self.subset_rows
        x, y = self.dataset.x_train[rows], self.dataset.y_train[rows]
        check_finite("inputs of the Hessian subset", x)
        check_finite("targets of the Hessian subset", y)
        return models.as_inputs(self.arch, x), y

    @functools.cached_property
    def problem(self) -> operators.Problem:
        batches = curvature_data.problem_batches(self)
        for name, value in models.flatten_tree(self.params).items():
            check_finite(f"the weights {name}", value)
        return operators.Problem(models.make_apply(self.arch), losses.get_loss(self.options.loss),
                                 self.params, batches)

    @functools.cached_property
    def hvp(self) -> operators.Operator:
        """The Hessian Operator with a jitted matvec."""
        return operators.hvp(self.problem).jit()

    @functools.cached_property
    def ggn_vp(self) -> operators.Operator:
        """The GGN Operator with a jitted matvec."""
        return operators.ggn_vp(self.problem).jit()

    def dense(self, op, what: str) -> tuple[np.ndarray, float]:
        """(matrix, seconds) for the Operator ``op``, with a progress bar."""
        dim = op.dim
        bar = progress_bar(dim, what)
        done = [0]

        def step(n):
            bar.update(n - done[0])
            done[0] = n

        t0 = time.perf_counter()
        m = dense(op, chunk_size=self.dense_columns, progress=step)
        bar.close()
        return m, time.perf_counter() - t0

    def exact_route(self, which: str) -> str:
        """"structure" (``approx.exact``: per-layer contractions) or "hvp" (d matvecs) for the dense
        ``which`` ("hessian" or "ggn"): --exact-route, where "auto" takes structure where it applies
        to a Dense-only network. (Conv nets keep the Hvps under auto: on the default CNN the
        structure route's first call took 304 s here, most of it compiling the convolutions'
        residual Jacobians, against about a minute by Hvps.)"""
        from jax_impl.approx.exact import unsupported

        route = self.options.exact_route
        if route == "hvp":
            return "hvp"
        why = unsupported(self.problem, self.arch, hessian=which == "hessian")
        if why is None and (route == "structure" or self.arch.is_mlp):
            return "structure"
        if route == "structure":
            raise HessianApproxError(f"--exact-route structure cannot build the {which}: {why}",
                                     "use --exact-route hvp (or auto)")
        return "hvp"

    def _exact(self, which: str) -> tuple[np.ndarray, float]:
        from jax_impl.approx.exact import ggn_by_structure, hessian_by_structure

        if self.exact_route(which) == "hvp":
            op = operators.hvp(self.problem) if which == "hessian" else operators.ggn_vp(self.problem)
            return self.dense(op, f"{'Hessian' if which == 'hessian' else 'GGN'} columns")
        log(f"exact {which} by layer structure ({self.arch.num_params} parameters)")
        build = hessian_by_structure if which == "hessian" else ggn_by_structure
        t0 = time.perf_counter()
        m = build(self.problem, self.arch)
        return m, time.perf_counter() - t0

    @functools.cached_property
    def hessian(self) -> tuple[np.ndarray, float]:
        """(dense Hessian, seconds): by layer structure where the network allows, else by Hvps."""
        return self._exact("hessian")

    @functools.cached_property
    def ggn(self) -> tuple[np.ndarray, float]:
        """(dense GGN, seconds): by layer structure where the network allows, else by GGN-vps."""
        return self._exact("ggn")

    def point(self) -> dict:
        """The loss and gradient norm at the weights, over the Hessian subset (the record's "point").

        Raises HessianApproxError when either is NaN or Inf: no curvature can be finite there.
        """
        if "_point" not in self.__dict__:
            g = np.asarray(operators.gradient(self.problem))
            point = {"loss": float(operators.loss(self.problem)), "gradient_norm": float(np.linalg.norm(g))}
            for what, value in point.items():
                if not np.isfinite(value):
                    raise HessianApproxError(f"the {what.replace('_', ' ')} at these weights is {value}",
                                             self.overflow_hint())
            self._point = point
        return self._point

    def overflow_hint(self) -> str:
        """The fix for a non-finite loss or curvature, naming the weights' scale (one line)."""
        big = max(float(np.max(np.abs(np.asarray(v)), initial=0.0)) for v in models.flatten_tree(self.params).values())
        return (f"the largest |weight| is {big:.3g} and the curvature overflows {self.options.dtype} at this scale: "
                "check the checkpoint (a diverged run, wrong units) or use --dtype float64")

    def provenance(self) -> dict:
        from benchmarks.record import machine, versions

        o = self.options
        ds = self.dataset
        _ = self.params  # fills self.train_info
        return {**ds.provenance(), "input_layout": models.input_layout(self.arch, ds.x_train[:1]),
                "hessian_samples": len(self.subset_rows), "streamed": self.streamed, "subset_seed": self.subset_seed,
                "probe_seed": self.probe_seed,
                "model": self.arch.describe(), "architecture": self.arch.to_dict(),
                "num_params": self.arch.num_params, "loss": o.loss, "dtype": o.dtype, "seed": o.seed,
                "kfac_approx": o.kfac_approx, "exact_route": o.exact_route, "chunk_size": self.chunk_size, "dense_columns": self.dense_columns, "devices": [str(d) for d in jax.devices()],
                "machine": machine(), "versions": versions(), "weights": self.train_info}
