"""Built-in datasets: MNIST from IDX files or tensorflow-datasets, sklearn's 8x8 digits; a seeded Hessian subset.

Users' own ``.npz`` files are read by ``jax_impl.userdata``; both give a ``Dataset`` (``jax_impl.dataset``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import os
import zlib

import numpy as np

from jax_impl.dataset import Dataset  # noqa: F401  (re-exported: data.Dataset)
from jax_impl.errors import HessianApproxError, check_finite

DATASET_NAMES = ("auto", "mnist", "digits")
DATA_ENV_VAR = "HESSIAN_APPROX_DATA"
_NO_MNIST_FIX = "re-download it (see the MNIST README for checksums), or use --dataset digits"

# MNIST's own published pixel statistics (after scaling to [0, 1]).
MNIST_NORMALIZATION = {
    "scale": 1 / 255, "mean": 0.1307, "std": 0.3081, "formula": "(x*scale-mean)/std",
}
# sklearn digits (values 0..16): mean and std over all 1797x64 values of x/16, computed once
# with numpy in float64 and hard-coded so the normalization never depends on the split.
DIGITS_NORMALIZATION = {
    "scale": 1 / 16, "mean": 0.30526028624095713, "std": 0.3760492217920148,
    "formula": "(x*scale-mean)/std",
}
DIGITS_SPLIT = {"seed": 0, "train": 1500, "test": 297}

# name -> (expected magic, expected shape)
_MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}
# Published checksums of the original gzip files: (MD5 from the MNIST distribution, SHA-256).
_GZ_SUMS = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                  "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                  "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
# SHA-256 of the decompressed (raw) files. Derived once by decompressing the gzip files above
# after verifying them against both published checksums (`gunzip -c F.gz | sha256sum`).
_RAW_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def default_data_dir() -> str | None:
    """$HESSIAN_APPROX_DATA if set (and non-empty), else None."""
    return os.environ.get(DATA_ENV_VAR) or None


def _normalize(pixels: np.ndarray, norm: dict) -> np.ndarray:
    """(N, ...) raw values -> (N, prod(...)) float32 via (x*scale-mean)/std."""
    x = pixels.reshape(pixels.shape[0], -1).astype(np.float32)
    x *= np.float32(norm["scale"])
    x -= np.float32(norm["mean"])
    x /= np.float32(norm["std"])
    return x


def _check_labels(where: str, y: np.ndarray) -> np.ndarray:
    if y.size and (y.min() < 0 or y.max() > 9):
        raise HessianApproxError(f"{where} holds labels outside 0..9 (min {y.min()}, max {y.max()})", _NO_MNIST_FIX)
    return y.astype(np.int32)


# ---------------------------------------------------------------------------------------- IDX

def parse_idx(buf: bytes, expected_magic: int, where: str) -> np.ndarray:
    """Parse an uncompressed uint8 IDX buffer (no checksum check).

    Header: big-endian uint32 magic (2051 images, 2049 labels; low byte = number of
    dimensions), then one big-endian uint32 per dimension, then the uint8 data row-major.
    Returns a read-only uint8 array of the header's shape; ``where`` names the file in errors.
    """
    if len(buf) < 4:
        raise HessianApproxError(f"{where} is truncated ({len(buf)} bytes, no IDX header)", _NO_MNIST_FIX)
    magic = int.from_bytes(buf[:4], "big")
    if magic != expected_magic:
        raise HessianApproxError(f"{where} has IDX magic number {magic}, expected {expected_magic}", _NO_MNIST_FIX)
    header = 4 + 4 * (magic & 0xFF)  # low byte of the magic = number of dimensions
    if len(buf) < header:
        raise HessianApproxError(f"{where} is truncated inside its IDX header", _NO_MNIST_FIX)
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=magic & 0xFF, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(buf) != expected:
        kind = "truncated" if len(buf) < expected else "longer than its header says"
        raise HessianApproxError(
            f"{where} is {kind}: {len(buf)} bytes, header {shape} needs {expected}", _NO_MNIST_FIX
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str, expected_magic: int, verify: bool = True) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw), checking its published checksum when ``verify``."""
    base = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HessianApproxError(f"cannot read MNIST file {path} ({e.strerror})", _NO_MNIST_FIX) from None
    if verify:
        if base in _GZ_SUMS:
            ok = (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()) == _GZ_SUMS[base]
        else:
            ok = base in _RAW_SHA256 and hashlib.sha256(data).hexdigest() == _RAW_SHA256[base]
        if not ok:
            raise HessianApproxError(
                f"MNIST file {path} does not match its published checksum (corrupt or altered)", _NO_MNIST_FIX)
    if base.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise HessianApproxError(f"MNIST file {path} is not valid gzip ({e})", _NO_MNIST_FIX) from None
    return parse_idx(data, expected_magic, path)


def _find_idx(data_dir: str, stem: str) -> str:
    """The path of ``stem`` or ``stem.gz`` in data_dir (gzip preferred)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise HessianApproxError(
        f"MNIST file {stem}(.gz) is missing from {data_dir}",
        "put the four IDX files there (gzipped or raw), point --data-dir/HESSIAN_APPROX_DATA "
        "at the folder that holds them, or use --dataset digits",
    )


def load_mnist_idx(data_dir) -> Dataset:
    """MNIST from the four original IDX files in ``data_dir`` (each ``.gz`` or raw).

    Files are checked against the published checksums, parsed with np.frombuffer and
    normalized as (x/255 - 0.1307)/0.3081; nothing is cached on disk.
    Returns x_train (60000, 784), x_test (10000, 784) float32 and int32 labels.
    """
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise HessianApproxError(
            f"MNIST data directory {data_dir} does not exist",
            "point --data-dir/HESSIAN_APPROX_DATA at the folder with the IDX files, or use --dataset digits",
        )
    arrays = {}
    for stem, (magic, shape) in _MNIST_FILES.items():
        path = _find_idx(data_dir, stem)
        arr = read_idx(path, magic)
        if arr.shape != shape:
            raise HessianApproxError(f"MNIST file {path} has shape {arr.shape}, expected {shape}", _NO_MNIST_FIX)
        arrays[stem] = arr
    n_train = len(arrays["train-images-idx3-ubyte"])
    n_test = len(arrays["t10k-images-idx3-ubyte"])
    return Dataset(
        x_train=_normalize(arrays["train-images-idx3-ubyte"], MNIST_NORMALIZATION),
        y_train=_check_labels("train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"]),
        x_test=_normalize(arrays["t10k-images-idx3-ubyte"], MNIST_NORMALIZATION),
        y_test=_check_labels("t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"]),
        name="mnist",
        source=f"idx:{data_dir}",
        note=f"MNIST ({n_train} train / {n_test} test) from checksum-verified IDX files in {data_dir}.",
        normalization=dict(MNIST_NORMALIZATION),
        classes=10,
    )


# --------------------------------------------------------------------------------------- tfds

_TFDS_FIX = "pip install 'hessian-approx[tfds]', or pass --data-dir with the MNIST IDX files, or use --dataset digits"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (optional dependency)
    except Exception as e:  # ImportError, or a broken install (e.g. missing importlib_resources)
        raise HessianApproxError(f"tensorflow-datasets cannot be imported ({_first_line(e)})", _TFDS_FIX) from None
    return tfds


def _tensorflow_available() -> bool:
    """Whether TensorFlow is installed (found without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def _quiet_absl():
    """Silence tfds' absl warnings (e.g. 'has no dataset_info.json') for the duration."""
    logger, level = logging.getLogger("absl"), logging.getLogger("absl").level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _tfds_split_arrays(source, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A tfds random-access data source -> (N, 28, 28) uint8 images, (N,) labels."""
    n = len(source)
    if n == 0:
        raise HessianApproxError(f"tensorflow-datasets MNIST {split} split is empty", _TFDS_FIX)
    images = np.empty((n, 28, 28), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    for i in range(n):  # tfds stores one PNG per example: decoding is per example anyway
        ex = source[i]
        images[i] = np.asarray(ex["image"]).reshape(28, 28)
        labels[i] = int(ex["label"])
    return images, labels


def load_mnist_tfds(data_dir=None, download=False) -> Dataset:
    """MNIST through tensorflow-datasets, without TensorFlow (random-access data source).

    With ``download=False`` the network is never touched: if tfds has no prepared copy under
    ``data_dir`` (default: $TFDS_DATA_DIR or ~/tensorflow_datasets) this raises at once.
    With ``download=True`` tfds downloads and prepares it in the array_record format (its MNIST
    build needs TensorFlow; without it this raises at once instead of downloading).
    """
    tfds = _import_tfds()
    try:
        with _quiet_absl():
            builder = tfds.builder("mnist", data_dir=data_dir, file_format="array_record")
            prepared = builder.is_prepared()
    except Exception as e:
        raise HessianApproxError(f"tensorflow-datasets cannot open MNIST ({_first_line(e)})", _TFDS_FIX) from None
    where = builder.data_dir
    if not prepared and not download:
        raise HessianApproxError(
            f"tensorflow-datasets has no prepared MNIST copy in {where}",
            "use --dataset mnist to download it, pass --data-dir with the IDX files, or use --dataset digits",
        )
    if not prepared and not _tensorflow_available():  # tfds' MNIST build reads with tf.io.gfile
        raise HessianApproxError(
            f"tensorflow-datasets has no prepared MNIST copy in {where} and cannot build one without TensorFlow",
            "pass --data-dir with the four MNIST IDX files, pip install tensorflow, or use --dataset digits",
        )
    try:
        if not prepared:
            builder.download_and_prepare(file_format="array_record")
        train_src, test_src = builder.as_data_source(split=["train", "test"])
        (xi, yi), (xt, yt) = _tfds_split_arrays(train_src, "train"), _tfds_split_arrays(test_src, "test")
    except HessianApproxError:
        raise
    except ImportError as e:  # decoding PNGs without TensorFlow needs pillow or opencv
        raise HessianApproxError(
            f"tensorflow-datasets cannot decode MNIST images ({_first_line(e)})",
            "pip install pillow (part of hessian-approx[tfds]), or pass --data-dir with the IDX files",
        ) from None
    except Exception as e:
        raise HessianApproxError(
            f"tensorflow-datasets could not {'download or ' if download else ''}read MNIST in {where} "
            f"({_first_line(e)})",
            "prepare it in array_record format (tfds build mnist --file_format=array_record), "
            "pass --data-dir with the IDX files, or use --dataset digits",
        ) from None
    return Dataset(
        x_train=_normalize(xi, MNIST_NORMALIZATION),
        y_train=_check_labels(f"tfds MNIST train split in {where}", yi),
        x_test=_normalize(xt, MNIST_NORMALIZATION),
        y_test=_check_labels(f"tfds MNIST test split in {where}", yt),
        name="mnist",
        source="tfds",
        note=f"MNIST ({len(yi)} train / {len(yt)} test) from tensorflow-datasets in {where}.",
        normalization=dict(MNIST_NORMALIZATION),
        classes=10,
    )


# ------------------------------------------------------------------------------------- digits

def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (offline): x (1500, 64) train, (297, 64) test.

    Split: np.random.default_rng(0).permutation(1797), first 1500 train, rest test.
    Normalization: (x/16 - mean)/std with fixed constants computed over all digits.
    """
    try:
        from sklearn import datasets as skdatasets  # noqa: PLC0415
    except Exception as e:
        raise HessianApproxError(f"scikit-learn cannot be imported ({_first_line(e)})",
                                 "pip install scikit-learn, or pass --data-dir with the MNIST IDX files") from None
    bunch = skdatasets.load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target)
    total = DIGITS_SPLIT["train"] + DIGITS_SPLIT["test"]
    if x.shape != (total, 64):
        raise HessianApproxError(
            f"scikit-learn's digits have shape {x.shape}, expected ({total}, 64)",
            "reinstall scikit-learn, or pass --data-dir with the MNIST IDX files",
        )
    perm = np.random.default_rng(DIGITS_SPLIT["seed"]).permutation(total)
    tr, te = perm[: DIGITS_SPLIT["train"]], perm[DIGITS_SPLIT["train"]:]
    norm = DIGITS_NORMALIZATION
    xn = ((x * norm["scale"] - norm["mean"]) / norm["std"]).astype(np.float32)
    return Dataset(
        x_train=xn[tr], y_train=_check_labels("sklearn digits", y[tr]),
        x_test=xn[te], y_test=_check_labels("sklearn digits", y[te]),
        name="digits",
        source="sklearn",
        note="scikit-learn's bundled 8x8 digits (1500 train / 297 test, split by a seed-0 permutation), "
             "as requested.",
        normalization=dict(norm),
        classes=10,
    )


# ----------------------------------------------------------------------------------- dispatch

def load_dataset(name="auto", data_dir=None) -> Dataset:
    """Load by name: "mnist", "digits", or "auto" (MNIST if available offline, else digits).

    ``data_dir`` (default: $HESSIAN_APPROX_DATA) holds the MNIST IDX files. For "auto", errors
    in files under an explicit data_dir are raised, never swallowed; without one, tfds is used
    only if it already has a prepared copy (no network), and otherwise digits with a note why.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in DATASET_NAMES:
        raise HessianApproxError(f"unknown dataset {name!r}", f"use one of: {', '.join(DATASET_NAMES)}")
    if data_dir is None:
        data_dir = default_data_dir()
    if key == "digits":
        return load_digits()
    if data_dir is not None:
        return load_mnist_idx(data_dir)
    if key == "mnist":
        return load_mnist_tfds(download=True)
    # auto, no data dir: a prepared tfds copy, or digits.
    try:
        return load_mnist_tfds(download=False)
    except HessianApproxError as e:
        why = e.problem
    digits = load_digits()
    note = (
        f"MNIST not available (no --data-dir/{DATA_ENV_VAR}, and {why}); "
        "using scikit-learn's 8x8 digits (1500 train / 297 test, split by a seed-0 permutation)."
    )
    return dataclasses.replace(digits, note=note)


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
