"""Built-in datasets: MNIST and Fashion-MNIST (IDX files, downloaded or given), tfds, sklearn's 8x8 digits.

Users' own ``.npz`` files are read by ``jax_impl.userdata``; both give a ``Dataset`` (``jax_impl.dataset``).
Downloads, mirrors and published checksums live in ``jax_impl.download``.
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

from jax_impl import download
from jax_impl.dataset import Dataset  # noqa: F401  (re-exported: data.Dataset)
from jax_impl.dataset import hessian_subset  # noqa: F401  (re-exported: data.hessian_subset)
from jax_impl.errors import HessianApproxError

DATASET_NAMES = ("auto", "mnist", "fashion-mnist", "digits")
DATA_ENV_VAR = download.DATA_ENV_VAR
_NO_MNIST_FIX = "re-download it (see the MNIST README for checksums), or use --dataset digits"

# MNIST's own published pixel statistics (after scaling to [0, 1]).
MNIST_NORMALIZATION = {
    "scale": 1 / 255, "mean": 0.1307, "std": 0.3081, "formula": "(x*scale-mean)/std",
}
# Fashion-MNIST's training-set pixel mean and std after scaling to [0, 1] as commonly quoted
# (e.g. torchvision users' Normalize((0.2860,), (0.3530,))); Zalando publishes none. Not
# recomputed here: no copy of the files was at hand when this was written.
FASHION_MNIST_NORMALIZATION = {
    "scale": 1 / 255, "mean": 0.2860, "std": 0.3530, "formula": "(x*scale-mean)/std",
}
_NORMALIZATION = {"mnist": MNIST_NORMALIZATION, "fashion-mnist": FASHION_MNIST_NORMALIZATION}
# sklearn digits (values 0..16): mean and std over all 1797x64 values of x/16, computed once
# with numpy in float64 and hard-coded so the normalization never depends on the split.
DIGITS_NORMALIZATION = {
    "scale": 1 / 16, "mean": 0.30526028624095713, "std": 0.3760492217920148,
    "formula": "(x*scale-mean)/std",
}
DIGITS_SPLIT = {"seed": 0, "train": 1500, "test": 297}

# name -> (expected magic, expected shape); the same for MNIST and Fashion-MNIST.
_MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}


def default_data_dir() -> str | None:
    """$HESSIAN_APPROX_DATA if set (and non-empty), else None."""
    return os.environ.get(DATA_ENV_VAR) or None


def _fix(name: str) -> str:
    if name == "mnist":
        return _NO_MNIST_FIX
    return f"re-download it (see the {download.LABELS[name]} README section for checksums), or use --dataset digits"


def _normalize(pixels: np.ndarray, norm: dict) -> np.ndarray:
    """(N, ...) raw values -> (N, prod(...)) float32 via (x*scale-mean)/std."""
    x = pixels.reshape(pixels.shape[0], -1).astype(np.float32)
    x *= np.float32(norm["scale"])
    x -= np.float32(norm["mean"])
    x /= np.float32(norm["std"])
    return x


def _check_labels(where: str, y: np.ndarray, fix: str = _NO_MNIST_FIX) -> np.ndarray:
    if y.size and (y.min() < 0 or y.max() > 9):
        raise HessianApproxError(f"{where} holds labels outside 0..9 (min {y.min()}, max {y.max()})", fix)
    return y.astype(np.int32)


# ---------------------------------------------------------------------------------------- IDX

def parse_idx(buf: bytes, expected_magic: int, where: str, fix: str = _NO_MNIST_FIX) -> np.ndarray:
    """Parse an uncompressed uint8 IDX buffer (no checksum check).

    Header: big-endian uint32 magic (2051 images, 2049 labels; low byte = number of
    dimensions), then one big-endian uint32 per dimension, then the uint8 data row-major.
    Returns a read-only uint8 array of the header's shape; ``where`` names the file in errors.
    """
    if len(buf) < 4:
        raise HessianApproxError(f"{where} is truncated ({len(buf)} bytes, no IDX header)", fix)
    magic = int.from_bytes(buf[:4], "big")
    if magic != expected_magic:
        raise HessianApproxError(f"{where} has IDX magic number {magic}, expected {expected_magic}", fix)
    header = 4 + 4 * (magic & 0xFF)  # low byte of the magic = number of dimensions
    if len(buf) < header:
        raise HessianApproxError(f"{where} is truncated inside its IDX header", fix)
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=magic & 0xFF, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(buf) != expected:
        kind = "truncated" if len(buf) < expected else "longer than its header says"
        raise HessianApproxError(
            f"{where} is {kind}: {len(buf)} bytes, header {shape} needs {expected}", fix
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str, expected_magic: int, verify: bool = True, dataset: str = "mnist") -> np.ndarray:
    """Read one IDX file (``.gz`` or raw), checking ``dataset``'s published checksum when ``verify``."""
    base, label, fix = os.path.basename(path), download.LABELS[dataset], _fix(dataset)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise HessianApproxError(f"cannot read {label} file {path} ({e.strerror})", fix) from None
    if verify:
        gz, raw = download.GZ_SUMS[dataset], download.RAW_SHA256[dataset]
        if base in gz:
            ok = (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest(), len(data)) == gz[base]
        elif base + ".gz" in gz and not raw:
            raise HessianApproxError(f"{label} file {path} is uncompressed, and only the gzip files have "
                                     "published checksums", f"use the four .gz files as published, or {fix}")
        else:
            ok = base in raw and hashlib.sha256(data).hexdigest() == raw[base]
        if not ok:
            raise HessianApproxError(
                f"{label} file {path} does not match its published checksum (corrupt or altered)", fix)
    if base.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise HessianApproxError(f"{label} file {path} is not valid gzip ({e})", fix) from None
    return parse_idx(data, expected_magic, path, fix)


def _find_idx(data_dir: str, stem: str, dataset: str = "mnist") -> str:
    """The path of ``stem`` or ``stem.gz`` in data_dir (gzip preferred)."""
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise HessianApproxError(
        f"{download.LABELS[dataset]} file {stem}(.gz) is missing from {data_dir}",
        "put the four IDX files there (gzipped or raw), point --data-dir"
        f"{'/HESSIAN_APPROX_DATA' if dataset == 'mnist' else ''} at the folder that holds them, "
        "or use --dataset digits",
    )


def _has_idx_files(data_dir: str) -> bool:
    """Whether data_dir holds each of the four IDX files (gzipped or raw); nothing is read."""
    return all(os.path.isfile(os.path.join(data_dir, s + ".gz")) or os.path.isfile(os.path.join(data_dir, s))
               for s in _MNIST_FILES)


def load_idx_dir(data_dir, dataset: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST (``dataset``) from its four IDX files in ``data_dir`` (each ``.gz`` or raw).

    Files are checked against the published checksums, parsed with np.frombuffer and
    normalized as (x/255 - mean)/std with the dataset's published statistics; nothing is cached.
    Returns x_train (60000, 784), x_test (10000, 784) float32 and int32 labels.
    """
    label, fix, norm = download.LABELS[dataset], _fix(dataset), _NORMALIZATION[dataset]
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise HessianApproxError(
            f"{label} data directory {data_dir} {'is a file, not a folder' if os.path.exists(data_dir) else 'does not exist'}",
            "point --data-dir at the folder with the IDX files, or use --dataset digits" if dataset != "mnist"
            else "point --data-dir/HESSIAN_APPROX_DATA at the folder with the IDX files, or use --dataset digits",
        )
    arrays = {}
    for stem, (magic, shape) in _MNIST_FILES.items():
        path = _find_idx(data_dir, stem, dataset)
        arr = read_idx(path, magic, dataset=dataset)
        if arr.shape != shape:
            raise HessianApproxError(f"{label} file {path} has shape {arr.shape}, expected {shape}", fix)
        arrays[stem] = arr
    n_train = len(arrays["train-images-idx3-ubyte"])
    n_test = len(arrays["t10k-images-idx3-ubyte"])
    urls = download.sources(data_dir)
    bases = sorted({urls[f].rsplit("/", 1)[0] + "/" for f in download.GZ_SUMS[dataset] if f in urls})
    origin = f", downloaded from {' and '.join(bases)}" if bases else ""
    return Dataset(
        x_train=_normalize(arrays["train-images-idx3-ubyte"], norm),
        y_train=_check_labels("train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"], fix),
        x_test=_normalize(arrays["t10k-images-idx3-ubyte"], norm),
        y_test=_check_labels("t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"], fix),
        name=dataset,
        source=f"idx:{data_dir}",
        note=f"{label} ({n_train} train / {n_test} test) from checksum-verified IDX files in {data_dir}{origin}.",
        normalization=dict(norm),
        classes=10,
    )


def load_mnist_idx(data_dir) -> Dataset:
    """MNIST from the four original IDX files in ``data_dir``: ``load_idx_dir(data_dir, "mnist")``."""
    return load_idx_dir(data_dir, "mnist")


def load_downloaded(dataset: str = "mnist", folder=None, timeout: float = download.TIMEOUT, mirrors=None) -> Dataset:
    """MNIST or Fashion-MNIST from ``folder`` (default ``download.cache_dir``), downloading the
    files it lacks first (``download.fetch``: published mirrors, checksums, atomic writes)."""
    folder = download.cache_dir(dataset) if folder is None else folder
    download.fetch(dataset, folder, mirrors=mirrors, timeout=timeout)
    return load_idx_dir(folder, dataset)


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
    """Load by name: "mnist", "fashion-mnist", "digits", or "auto" (MNIST if it can be had, else digits).

    ``data_dir`` holds the dataset's four IDX files: read as they are, never downloaded into, and
    their errors are raised. Without it, MNIST comes from $HESSIAN_APPROX_DATA when that folder
    holds the files; else it is downloaded (``download.fetch``) into $HESSIAN_APPROX_DATA or the
    user's cache (``download.cache_dir``), or read from there if already verified. Fashion-MNIST
    likewise, always in the user's cache. "mnist" and "fashion-mnist" raise when the download
    fails; so does "auto" when $HESSIAN_APPROX_DATA names a folder. Otherwise "auto" tries the
    cache, a prepared tensorflow-datasets copy, then a download with a short timeout
    (``download.AUTO_TIMEOUT``), and else gives digits with a note saying why.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in DATASET_NAMES:
        raise HessianApproxError(f"unknown dataset {name!r}", f"use one of: {', '.join(DATASET_NAMES)}")
    if key == "digits":
        return load_digits()
    dataset = "mnist" if key == "auto" else key
    if data_dir is not None:
        return load_idx_dir(data_dir, dataset)
    env = default_data_dir() if dataset == "mnist" else None
    if env is not None and _has_idx_files(env):
        return load_idx_dir(env, dataset)
    if key != "auto" or env is not None:  # a folder was named: its errors are raised
        return load_downloaded(dataset, timeout=download.TIMEOUT if key != "auto" else download.AUTO_TIMEOUT)
    folder = download.cache_dir("mnist")
    if download.is_complete("mnist", folder):
        return load_idx_dir(folder, "mnist")
    why = []
    for attempt in (lambda: load_mnist_tfds(download=False),
                    lambda: load_downloaded("mnist", folder, timeout=download.AUTO_TIMEOUT)):
        try:
            return attempt()
        except HessianApproxError as e:
            why.append(e.problem)
    note = (
        f"MNIST not available (no --data-dir/{DATA_ENV_VAR}, {'; '.join(why)}); "
        "using scikit-learn's 8x8 digits (1500 train / 297 test, split by a seed-0 permutation)."
    )
    return dataclasses.replace(load_digits(), note=note)
