"""The Dataset record: train and test arrays of inputs and labels or targets, with their provenance; seeded subsets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_impl.errors import HessianApproxError, check_finite

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FIX = ("expected x (N, ...) float32/float64 and y (N,) int32 labels or (N, C) float targets; "
        "build Dataset through jax_impl.data or jax_impl.userdata loaders")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs with integer labels or float targets, split into train and test (arrays compared by identity).

    x_train: (N, *input_shape) float32 or float64 (the built-in datasets: (N, D) float32, rows
    of square grayscale images flattened row-major); x_test: (M, *input_shape), same dtype
    (M may be 0: no test split).
    y_train, y_test: (N,), (M,) int32 labels in 0..num_classes-1, or (N, C), (M, C) float32 or
    float64 targets (one-hot or real-valued).
    ``note`` says in one sentence which data was used and why; ``classes`` fixes the number of
    classes of labels (None: max label + 1); ``extra_provenance`` is merged into ``provenance()``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    source: str
    note: str
    normalization: dict
    classes: int | None = None
    extra_provenance: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)) or x.ndim < 2 \
                    or x.dtype not in FLOAT_DTYPES or y.shape[:1] != x.shape[:1] or not _y_ok(y):
                raise HessianApproxError(
                    f"{self.name} {split} split has x {np.shape(x)} {getattr(x, 'dtype', type(x).__name__)} "
                    f"and y {np.shape(y)} {getattr(y, 'dtype', type(y).__name__)}", _FIX)
        if self.x_train.shape[0] == 0:
            raise HessianApproxError(f"{self.name} has no training samples", "pass data with at least one sample")
        if self.x_train.shape[1:] != self.x_test.shape[1:] or self.x_train.dtype != self.x_test.dtype:
            raise HessianApproxError(
                f"{self.name} train and test inputs differ (per sample {self.x_train.shape[1:]} "
                f"{self.x_train.dtype} vs {self.x_test.shape[1:]} {self.x_test.dtype})",
                "load both splits from the same source")
        if self.y_train.ndim != self.y_test.ndim or self.y_train.shape[1:] != self.y_test.shape[1:]:
            raise HessianApproxError(
                f"{self.name} train and test targets differ (per sample {self.y_train.shape[1:]} vs "
                f"{self.y_test.shape[1:]})", "give both splits integer labels (N,) or both (N, C) targets")
        if self.classes is not None:
            if isinstance(self.classes, bool) or not isinstance(self.classes, (int, np.integer)) \
                    or self.classes < 1:
                raise HessianApproxError(f"{self.name} number of classes is {self.classes!r}",
                                         "pass a positive integer, or None")
            if self.y_train.ndim == 2 and self.classes != self.y_train.shape[1]:
                raise HessianApproxError(
                    f"{self.name} has {self.y_train.shape[1]} target columns but {self.classes} classes were given",
                    "leave the number of classes out for (N, C) targets")
        if self.y_train.ndim == 1:
            y = np.concatenate([self.y_train, self.y_test])
            top = self.classes - 1 if self.classes is not None else None
            if y.min() < 0 or (top is not None and y.max() > top):
                raise HessianApproxError(
                    f"{self.name} labels lie in {y.min()}..{y.max()}, outside 0..{top if top is not None else 'any'}",
                    "use labels 0..num_classes-1")

    @property
    def targets_kind(self) -> str:
        """"labels" (y (N,) int32) or "targets" (y (N, C) float)."""
        return "labels" if self.y_train.ndim == 1 else "targets"

    @property
    def num_classes(self) -> int:
        """Model outputs: C for (N, C) targets; for labels the given ``classes`` (10 for the built-in
        datasets), else max label + 1 over both splits."""
        if self.y_train.ndim == 2:
            return int(self.y_train.shape[1])
        if self.classes is not None:
            return int(self.classes)
        return int(max(self.y_train.max(), self.y_test.max(initial=0))) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the inputs as stored: (D,) flat rows, (H, W, C) images, ..."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def input_dim(self) -> int:
        """Values per sample: prod(input_shape)."""
        return int(np.prod(self.input_shape))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-sample image shape (H, W, C), channels last, for building image models.

        Flat rows (D,) with D = S*S are square grayscale images flattened row-major: (S, S, 1)
        ((28, 28, 1) MNIST, (8, 8, 1) digits), so ``x.reshape(N, S, S, 1)`` restores them.
        (H, W, C) inputs are channels-last images as stored; (H, W) ones grayscale (H, W, 1).
        Anything else raises: it is not an image (use a dense-first model on ``input_shape``).
        """
        shape = self.input_shape
        if len(shape) == 1:
            side = math.isqrt(shape[0])
            if side * side == shape[0]:
                return (side, side, 1)
            raise HessianApproxError(f"{self.name} rows have {shape[0]} values, not a square grayscale image",
                                     "use a flat (dense-first) model on this data")
        if len(shape) == 2:
            return (*shape, 1)
        if len(shape) == 3:
            return shape
        raise HessianApproxError(f"{self.name} inputs have per-sample shape {shape}, not an image (H, W, C)",
                                 "use a flat (dense-first) model on this data")

    def provenance(self) -> dict:
        """JSON-serializable description for the result record."""
        prov = {
            "dataset": self.name,
            "dataset_source": self.source,
            "dataset_note": self.note,
            "normalization": dict(self.normalization),
            "train_size": int(self.x_train.shape[0]),
            "test_size": int(self.x_test.shape[0]),
            "input_dim": self.input_dim,
            "input_shape": list(self.input_shape),
            "input_dtype": str(self.x_train.dtype),
            "targets": self.targets_kind,
            "num_classes": self.num_classes,
        }
        try:
            prov["image_shape"] = list(self.image_shape)
        except HessianApproxError:
            pass  # not an image: no image_shape
        return {**prov, **self.extra_provenance}


def _y_ok(y: np.ndarray) -> bool:
    """Labels (N,) int32 or targets (N, C) float32/float64 with C >= 1."""
    if y.ndim == 1:
        return y.dtype == np.int32
    return y.ndim == 2 and y.shape[1] >= 1 and y.dtype in FLOAT_DTYPES


def hessian_subset(x, y, num_samples, seed) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded subset of (x (N, ...), y (N,) labels or (N, C) targets).

    Rows default_rng(seed).choice(N, k, replace=False); returns (x[idx] (k, ...), y[idx] (k,)
    or (k, C)) in drawn order; same seed -> same subset. Inputs (and float targets) must be finite.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise HessianApproxError(f"Hessian subset got x {x.shape} and y {y.shape}",
                                 "pass x (N, ...) and y (N,) labels or (N, C) targets with the same N")
    n = x.shape[0]
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise HessianApproxError(f"--hessian-samples must be an integer, got {num_samples!r}",
                                 f"pass an integer in 1..{n}")
    if not 1 <= num_samples <= n:
        raise HessianApproxError(f"--hessian-samples {num_samples} is outside 1..{n} (the training set size)",
                                 f"pass a value in 1..{n}")
    idx = np.random.default_rng(seed).choice(n, int(num_samples), replace=False)
    xs, ys = x[idx], y[idx]
    check_finite("inputs of the Hessian subset", xs)
    check_finite("targets of the Hessian subset", ys)
    return xs, ys
