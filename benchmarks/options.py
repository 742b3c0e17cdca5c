"""The options of a run: every command-line flag as one field of a frozen record, checked on construction."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_impl.errors import HessianApproxError

STREAM_CHOICES = ("auto", "on", "off")  # --stream: Hessian data streamed from host memory


def check_samples(value) -> None:
    """Refuse a --hessian-samples that is neither None, "all" nor a positive integer (one line)."""
    if value is None or value == "all":
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise HessianApproxError(f"--hessian-samples is {value}",
                                 "pass a positive number of samples, or all for the whole training set")


def check_stream(value: str) -> None:
    if value not in STREAM_CHOICES:
        raise HessianApproxError(f"--stream {value!r} is not known", f"use one of {', '.join(STREAM_CHOICES)}")


SEED_MAX = 2**32 - 1  # PRNG keys hold 32-bit seeds: 2**32 would give seed 0's key in float32 mode


def check_seed(flag: str, seed) -> None:
    """Refuse a seed that is not an integer in 0..2**32-1 (None passes: "use --seed")."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise HessianApproxError(f"{flag} is {seed}", f"pass an integer seed from 0 to {SEED_MAX}")


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that defines a run; every command-line flag maps to one field."""

    dataset: str = "auto"
    data_dir: str | None = None
    data: str | None = None  # a user .npz (x, y[, x_test, y_test]) instead of a built-in dataset
    weights: str | None = None  # external weights: torch state_dict or Flax file (bridge.external)
    model: str | None = None  # None: "mlp", or the --checkpoint's architecture
    hidden: tuple[int, ...] | None = None  # None: (10,) (mlp only)
    activation: str | None = None  # None: as the architecture says (relu for the presets)
    loss: str = "cross_entropy"
    hessian_samples: int | str | None = None  # None: DEFAULT_SAMPLES["mlp" or "cnn"]; "all": the training set
    stream: str = "auto"  # Hessian data streamed from host memory: auto (large subsets), on or off
    seed: int = 0  # training; also the subset and the probes unless their own seeds are given
    subset_seed: int | None = None  # None: seed
    probe_seed: int | None = None  # None: seed
    dtype: str = "float32"
    checkpoint: str | None = None
    chunk_size: int | None = None  # None: chunk_sizes(arch)
    epochs: int | None = None  # None: 5 for 10,000 samples or more (MNIST), else 100 (digits)
    k: int = 10
    power_max_iter: int = 100
    power_tol: float = 1e-3
    lanczos_steps: int | None = None
    hutchinson_samples: int = 100
    slq_steps: int = 100
    slq_runs: int = 1
    mc_samples: int = 1
    pyhessian_trace_tol: float = 1e-3
    kfac_approx: str = "backpack"
    tol: float | None = None  # lanczos-certified: residual tolerance relative to |θ₁| (None: from the dtype)
    exact_route: str = "auto"  # dense Hessian/GGN: auto, structure (per-layer contractions) or hvp (d matvecs)
    block_size: int = 10  # block-lanczos
    blocks: str = "per-layer"  # blocks: per-layer, per-leaf, or comma-separated layer names / paths

    def __post_init__(self):
        if self.dtype not in ("float32", "float64"):
            raise HessianApproxError(f"dtype {self.dtype!r} is not supported", "use --dtype float32 or float64")
        check_samples(self.hessian_samples)
        check_stream(self.stream)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise HessianApproxError(f"--chunk-size is {self.chunk_size}", "pass a positive number")
        for name in ("k", "hutchinson_samples",
                     "slq_steps", "slq_runs", "power_max_iter", "mc_samples"):
            if getattr(self, name) < 1:
                raise HessianApproxError(f"--{name.replace('_', '-')} is {getattr(self, name)}",
                                         "pass a positive number")
        if self.kfac_approx not in ("backpack", "expand", "reduce"):
            raise HessianApproxError(f"--kfac-approx {self.kfac_approx!r} is not known",
                                     "use backpack, expand or reduce")
        if self.tol is not None and not 0 < self.tol < 1:
            raise HessianApproxError(f"--tol is {self.tol}", "pass a relative tolerance in (0, 1), e.g. 1e-6")
        if self.exact_route not in ("auto", "structure", "hvp"):
            raise HessianApproxError(f"--exact-route {self.exact_route!r} is not known", "use auto, structure or hvp")
        if self.block_size < 1:
            raise HessianApproxError(f"--block-size is {self.block_size}", "pass a positive number")
        for name in ("seed", "subset_seed", "probe_seed"):
            check_seed(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("power_tol", "pyhessian_trace_tol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise HessianApproxError(f"--{name.replace('_', '-')} is {value}", "pass a finite tolerance >= 0, e.g. 1e-3")
        if self.epochs is not None and self.epochs < 1:
            raise HessianApproxError(f"--epochs is {self.epochs}", "pass a positive number")
        if self.weights and self.checkpoint:
            raise HessianApproxError("both --weights and --checkpoint were given",
                                     "pass one: --checkpoint for hessian-approx files, --weights for any other")
        if self.data and (self.dataset != "auto" or self.data_dir):
            raise HessianApproxError("--data was given with --dataset or --data-dir",
                                     "pass --data FILE.npz alone (or a built-in --dataset)")
