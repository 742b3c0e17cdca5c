"""Users' own data: an ``.npz`` file with arrays ``x`` and ``y`` (optionally ``x_test``, ``y_test``).

``x`` (N, ...) holds float inputs of any per-sample shape (images channels last, (N, H, W, C));
``y`` either integer class labels (N,) or float targets (N, C) (one-hot or real-valued).
Values are used as stored: nothing is normalized or cast to a lower precision.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from jax_impl.dataset import Dataset
from jax_impl.errors import HessianApproxError

ARRAYS = ("x", "y", "x_test", "y_test")
SAVE_FIX = "save with np.savez(path, x=..., y=...) (optionally x_test=..., y_test=...)"
NORMALIZATION = {"formula": "none: values used as stored"}


def load_npz(path, num_classes: int | None = None) -> Dataset:
    """A Dataset from an ``.npz`` file (read with ``allow_pickle=False``).

    Args:
      path: the file, holding ``x`` (N, ...) float32/float64 (float16 is widened to float32)
        and ``y``: labels (N,) of integers (or integer-valued floats) >= 0, or float targets
        (N, C); optionally ``x_test`` (M, ...) and ``y_test`` of the same kinds. Other arrays
        are ignored (and listed in the provenance).
      num_classes: for labels, the number of classes (default: max label + 1).
    Returns:
      Dataset named "npz" with y as int32 labels or float targets; without a test split
      x_test (0, ...) and y_test (0,) or (0, C). Its provenance adds data_file (absolute),
      data_sha256 (of the file's bytes), the stored dtypes and whether a test split was given.
    Raises:
      HessianApproxError (one line: the problem and the fix) for a missing or unreadable file,
      missing or object arrays, mismatched sample counts, no samples, NaN/Inf, integer or
      non-numeric inputs, negative or fractional labels, ``x_test`` without ``y_test``.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise HessianApproxError(f"data file {path} does not exist", f"pass an existing .npz file; {SAVE_FIX}")
    if os.path.isdir(path):
        raise HessianApproxError(f"data file {path} is a directory", f"pass an .npz file; {SAVE_FIX}")
    digest = _sha256(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            what = "a single .npy array" if f.read(6) == b"\x93NUMPY" else "not an .npz (zip) archive"
        raise HessianApproxError(f"data file {path} is {what}", SAVE_FIX)
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            missing = [name for name in ("x", "y") if name not in found]
            if missing:
                raise HessianApproxError(
                    f"data file {path} has no array {' and no '.join(map(repr, missing))} "
                    f"(found: {', '.join(found) or 'none'})", SAVE_FIX)
            stored = {name: _read(npz, name, path) for name in ARRAYS if name in found}
    except HessianApproxError:
        raise
    except Exception as e:  # a damaged archive: zipfile.BadZipFile, OSError, ...
        raise HessianApproxError(f"data file {path} cannot be read ({_first_line(e)})", SAVE_FIX) from None
    if ("x_test" in stored) != ("y_test" in stored):
        have, lack = ("x_test", "y_test") if "x_test" in stored else ("y_test", "x_test")
        raise HessianApproxError(f"data file {path} has {have} but no {lack}",
                                 "save both x_test and y_test, or neither (no test split)")

    x = _inputs(stored["x"], "x", path)
    y = _targets(stored["y"], "y", path)
    _same_n(x, y, "x", "y", path)
    if x.shape[0] == 0:
        raise HessianApproxError(f"data file {path} holds no samples (x {x.shape})", "save at least one sample")
    has_test = "x_test" in stored
    if has_test:
        x_test = _inputs(stored["x_test"], "x_test", path)
        y_test = _targets(stored["y_test"], "y_test", path)
        _same_n(x_test, y_test, "x_test", "y_test", path)
        if x_test.shape[1:] != x.shape[1:] or x_test.dtype != x.dtype:
            raise HessianApproxError(
                f"data file {path} has x_test {x_test.shape[1:]} {x_test.dtype} per sample but x "
                f"{x.shape[1:]} {x.dtype}", "save x_test with the shape and dtype of x")
        if y_test.ndim != y.ndim or y_test.shape[1:] != y.shape[1:]:
            raise HessianApproxError(
                f"data file {path} has y_test {y_test.shape[1:] or 'labels'} per sample but y "
                f"{y.shape[1:] or 'labels'}", "save y_test of the same kind as y (labels (N,) or targets (N, C))")
    else:
        x_test = np.zeros((0, *x.shape[1:]), x.dtype)
        y_test = np.zeros((0, *y.shape[1:]), y.dtype)
    if y.ndim == 1:
        top = int(max(y.max(), y_test.max(initial=0)))
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
                raise HessianApproxError(f"number of classes {num_classes!r} is not a positive integer",
                                         "pass a positive integer, or leave it out (max label + 1)")
            if top >= num_classes:
                raise HessianApproxError(f"data file {path} has label {top} but {num_classes} classes were given",
                                         f"pass at least {top + 1} classes, or leave the number out")
        what = f"{int(num_classes or top + 1)} classes"
    else:
        if num_classes is not None and num_classes != y.shape[1]:
            raise HessianApproxError(f"data file {path} has {y.shape[1]} target columns but {num_classes} "
                                     "classes were given", "leave the number of classes out for (N, C) targets")
        what = f"{y.shape[1]} float targets per sample"
    ignored = sorted(set(found) - set(ARRAYS))
    note = (f"user data {path} (sha256 {digest[:12]}): {len(x)} train / {len(x_test)} test samples"
            f"{'' if has_test else ' (no test split in the file)'}, inputs {x.shape[1:]} {x.dtype} used as "
            f"stored, {what}.")
    return Dataset(
        x_train=x, y_train=y, x_test=x_test, y_test=y_test,
        name="npz",
        source=f"npz:{path}",
        note=note,
        normalization=dict(NORMALIZATION),
        classes=int(num_classes) if num_classes is not None and y.ndim == 1 else None,
        extra_provenance={
            "data_file": path,
            "data_sha256": digest,
            "x_dtype": str(stored["x"].dtype),
            "y_dtype": str(stored["y"].dtype),
            "test_split": (f"{len(x_test)} test samples from x_test/y_test" if has_test
                           else "none: the file has no x_test/y_test"),
            "ignored_arrays": ignored,
        },
    )


# ----------------------------------------------------------------------------------- checks

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise HessianApproxError(f"cannot read data file {path} ({e.strerror})",
                                 "check the path and its permissions") from None
    return h.hexdigest()


def _read(npz, name: str, path: str) -> np.ndarray:
    try:
        return np.asarray(npz[name])
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise HessianApproxError(
                f"array {name!r} in {path} holds Python objects (a pickled object array)",
                f"save numeric arrays, e.g. np.savez(path, {name}=np.asarray({name}, dtype=np.float32), ...)") from None
        raise HessianApproxError(f"array {name!r} in {path} cannot be read ({_first_line(e)})", SAVE_FIX) from None


def _inputs(a: np.ndarray, name: str, path: str) -> np.ndarray:
    """x as float32/float64 (N, ...), checked; float16 widened to float32."""
    where = f"array {name!r} in {path}"
    if a.dtype.kind in "iub":
        raise HessianApproxError(
            f"{where} holds {a.dtype} values, not floats (inputs are never rescaled silently)",
            f"scale them to float, e.g. {name}=({name} / 255).astype(np.float32) for 8-bit pixels"
            if a.dtype == np.uint8 else f"convert them to float, e.g. {name}={name}.astype(np.float32)")
    if a.dtype.kind != "f":
        raise HessianApproxError(f"{where} has dtype {a.dtype}, not floating-point numbers",
                                 f"save {name} as float32 or float64")
    if a.dtype.itemsize > 8:
        raise HessianApproxError(f"{where} has dtype {a.dtype}, wider than float64",
                                 f"save {name}.astype(np.float64)")
    if a.ndim < 2:
        raise HessianApproxError(f"{where} has shape {a.shape}: no per-sample axis",
                                 f"save {name} as (N, ...), e.g. {name}[:, None] for one value per sample")
    if 0 in a.shape[1:]:
        raise HessianApproxError(f"{where} has shape {a.shape}: samples of no values",
                                 f"save {name} as (N, ...) with at least one value per sample")
    if a.ndim == 4 and a.shape[1] <= 4 < min(a.shape[2], a.shape[3]):
        raise HessianApproxError(
            f"{where} has shape {a.shape}, which looks channels-first (N, C, H, W), torch's layout",
            f"save images channels last: {name}={name}.transpose(0, 2, 3, 1) (N, H, W, C)")
    _check_finite(a, where)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _targets(a: np.ndarray, name: str, path: str) -> np.ndarray:
    """y as int32 labels (N,) or float32/float64 targets (N, C), checked."""
    where = f"array {name!r} in {path}"
    labels_fix = "save integer labels >= 0 as (N,), or float targets as (N, C)"
    if a.dtype.kind not in "iubf":
        raise HessianApproxError(f"{where} has dtype {a.dtype}, not numbers", labels_fix)
    if a.ndim == 2:
        if a.dtype.kind != "f":
            raise HessianApproxError(f"{where} holds {a.dtype} (N, C) targets, not floats",
                                     f"save {name}.astype(np.float32) as targets, or {name}.argmax(1) "
                                     "as integer labels (N,)")
        if a.dtype.itemsize > 8:
            raise HessianApproxError(f"{where} has dtype {a.dtype}, wider than float64",
                                     f"save {name}.astype(np.float64)")
        if a.shape[1] == 0:
            raise HessianApproxError(f"{where} has shape {a.shape}: targets of no values",
                                     f"save {name} as (N, C) with C >= 1")
        _check_finite(a, where)
        return a.astype(np.float32) if a.dtype == np.float16 else a
    if a.ndim != 1:
        raise HessianApproxError(f"{where} has shape {a.shape}, neither labels (N,) nor targets (N, C)",
                                 labels_fix)
    if a.dtype.kind == "f":
        _check_finite(a, where)
        if not np.all(a == np.round(a)):
            bad = a[a != np.round(a)][0]
            raise HessianApproxError(f"{where} holds non-integer labels (e.g. {bad})",
                                     f"save integer labels (N,), or float targets as (N, C) ({name}[:, None] "
                                     "for one regression output)")
    if a.size and a.min() < 0:
        raise HessianApproxError(f"{where} holds negative labels (min {a.min()})",
                                 "number the classes 0..K-1")
    if a.size and a.max() > np.iinfo(np.int32).max:
        raise HessianApproxError(f"{where} holds label {a.max()}, beyond int32", "number the classes 0..K-1")
    return a.astype(np.int32)


def _same_n(x: np.ndarray, y: np.ndarray, xn: str, yn: str, path: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise HessianApproxError(f"data file {path} has {x.shape[0]} samples in {xn} but {y.shape[0]} in {yn}",
                                 f"save {xn} and {yn} with the same number of rows")


def _check_finite(a: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise HessianApproxError(f"{where} holds {bad} NaN or Inf value(s)", "clean the data before saving it")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
