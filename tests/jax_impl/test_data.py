"""Tests for jax_impl.data: IDX parsing and checksums, tfds without TensorFlow, digits, auto, subsets.

Downloads are tested in test_download.py; here the user's cache is a temporary folder and the
MNIST mirrors a closed local port, so no test reaches the internet.
"""

import gzip
import json
import os
import pathlib
import shutil
import socket
import sys
import time

import numpy as np
import pytest

from jax_impl import data
from jax_impl.errors import HessianApproxError

STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _mnist_dir():
    env = os.environ.get("HESSIAN_APPROX_DATA")
    if env:
        return pathlib.Path(env).resolve()  # tests link to these files from other folders
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def no_download(monkeypatch, tmp_path):
    """The user's cache is empty and temporary; the MNIST mirrors refuse connections at once."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HESSIAN_APPROX_MNIST_MIRRORS", f"http://127.0.0.1:{port}/")


@pytest.fixture(scope="module")
def mnist_dir():
    d = _mnist_dir()
    if not all((d / (s + ".gz")).is_file() or (d / s).is_file() for s in STEMS):
        pytest.skip(f"MNIST IDX files not found in {d} (set HESSIAN_APPROX_DATA to their folder)")
    return d


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return data.load_mnist_idx(mnist_dir)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or DNS lookup fails and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _copy_dir(src, dst, raw=False, skip=()):
    """Link (or, with raw, decompress) the four MNIST files of src into dst."""
    dst.mkdir(exist_ok=True)
    src = pathlib.Path(src).resolve()  # links must not depend on the working directory
    for s in STEMS:
        if s in skip:
            continue
        gz = src / (s + ".gz")
        if raw:
            (dst / s).write_bytes(gzip.decompress(gz.read_bytes()) if gz.is_file() else (src / s).read_bytes())
        else:
            os.symlink(gz, dst / (s + ".gz"))
    return dst


def _idx_bytes(magic, shape, payload=None):
    n = int(np.prod(shape))
    body = np.arange(n, dtype=np.uint8).tobytes() if payload is None else payload
    return magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in shape) + body


# ------------------------------------------------------------------------------------- IDX

def test_idx_real_files(mnist, mnist_dir):
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int32
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    for y in (mnist.y_train, mnist.y_test):
        assert set(np.unique(y)) == set(range(10))
    # 0.1307 / 0.3081 are MNIST's published pixel statistics, independent of this code.
    assert abs(float(mnist.x_train.mean())) < 0.01
    assert abs(float(mnist.x_train.std()) - 1.0) < 0.01
    assert np.isclose(mnist.x_train.min(), -0.1307 / 0.3081, atol=1e-5)
    assert np.isclose(mnist.x_train.max(), (1 - 0.1307) / 0.3081, atol=1e-5)
    assert mnist.name == "mnist" and mnist.source.startswith("idx:")
    assert list(mnist.y_train[:5]) == [5, 0, 4, 1, 9]  # the well-known first MNIST labels
    prov = mnist.provenance()
    json.dumps(prov)
    assert prov["train_size"] == 60000 and prov["test_size"] == 10000 and prov["input_dim"] == 784
    assert prov["image_shape"] == [28, 28, 1] and prov["num_classes"] == 10 and prov["targets"] == "labels"
    assert mnist.image_shape == (28, 28, 1) and mnist.num_classes == 10
    assert prov["normalization"]["mean"] == 0.1307 and prov["normalization"]["std"] == 0.3081


def test_idx_raw_files_match_gz(mnist, mnist_dir, tmp_path):
    raw = data.load_mnist_idx(_copy_dir(mnist_dir, tmp_path / "raw", raw=True))
    for a in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(raw, a), getattr(mnist, a))


def test_idx_flipped_byte_is_checksum_error(mnist_dir, tmp_path):
    d = _copy_dir(mnist_dir, tmp_path / "gz", skip=["train-labels-idx1-ubyte"])
    buf = bytearray((mnist_dir / "train-labels-idx1-ubyte.gz").read_bytes())
    buf[len(buf) // 2] ^= 0xFF
    (d / "train-labels-idx1-ubyte.gz").write_bytes(bytes(buf))
    with pytest.raises(HessianApproxError, match="train-labels-idx1-ubyte.gz.*checksum") as e:
        data.load_mnist_idx(d)
    assert "\n" not in str(e.value) and "--dataset digits" in str(e.value)


def test_idx_flipped_byte_in_raw_file(mnist_dir, tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    for s in STEMS:
        if "images" in s:
            os.symlink(mnist_dir / (s + ".gz"), d / (s + ".gz"))
    for s in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (d / s).write_bytes(gzip.decompress((mnist_dir / (s + ".gz")).read_bytes()))
    data.load_mnist_idx(d)  # a mix of gz and raw files is fine
    buf = bytearray((d / "t10k-labels-idx1-ubyte").read_bytes())
    buf[100] = (buf[100] + 1) % 10  # still a valid label: only the checksum can notice
    (d / "t10k-labels-idx1-ubyte").write_bytes(bytes(buf))
    with pytest.raises(HessianApproxError, match="t10k-labels-idx1-ubyte.*checksum"):
        data.load_mnist_idx(d)


def test_idx_truncated_file(mnist_dir, tmp_path):
    d = _copy_dir(mnist_dir, tmp_path / "gz", skip=["t10k-labels-idx1-ubyte"])
    full = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = d / "t10k-labels-idx1-ubyte"
    path.write_bytes(full[:-10])
    with pytest.raises(HessianApproxError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist_idx(d)
    # Past the checksum, the parser itself notices the length mismatch.
    with pytest.raises(HessianApproxError, match=r"t10k-labels-idx1-ubyte is truncated"):
        data.read_idx(str(path), 2049, verify=False)
    gz = d / "cut.gz"
    gz.write_bytes((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()[:2000])
    with pytest.raises(HessianApproxError, match="cut.gz is not valid gzip"):
        data.read_idx(str(gz), 2049, verify=False)


def test_idx_missing_file(mnist_dir, tmp_path):
    d = _copy_dir(mnist_dir, tmp_path / "gz", skip=["t10k-images-idx3-ubyte"])
    with pytest.raises(HessianApproxError, match=r"t10k-images-idx3-ubyte\(\.gz\) is missing"):
        data.load_mnist_idx(d)
    with pytest.raises(HessianApproxError, match="does not exist"):
        data.load_mnist_idx(tmp_path / "nowhere")


def test_parse_idx_fake_files(tmp_path):
    arr = data.parse_idx(_idx_bytes(2051, (2, 3, 4)), 2051, "fake")
    assert arr.shape == (2, 3, 4) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr.ravel(), np.arange(24))
    with pytest.raises(HessianApproxError, match="fake-labels has IDX magic number 2051, expected 2049"):
        data.parse_idx(_idx_bytes(2051, (2, 3, 4)), 2049, "fake-labels")
    with pytest.raises(HessianApproxError, match="longer than its header"):
        data.parse_idx(_idx_bytes(2049, (3,), b"\x01\x02\x03\x04"), 2049, "f")
    with pytest.raises(HessianApproxError, match="truncated"):
        data.parse_idx(b"\x00\x00", 2049, "f")
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(2051, (5,)))
    with pytest.raises(HessianApproxError, match=f"{path}.*magic"):
        data.read_idx(str(path), 2049, verify=False)
    with pytest.raises(HessianApproxError, match="checksum"):  # a fake file never passes
        data.read_idx(str(path), 2049)


# ------------------------------------------------------------------------------------ tfds

def test_tfds_mock_data(monkeypatch, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_tensorflow_available", lambda: True)  # the mock's build needs none
    with tfds.testing.mock_data(num_examples=6):
        ds = data.load_mnist_tfds(download=True)
        src = tfds.builder("mnist", file_format="array_record").as_data_source(split="train")
        images = np.stack([src[i]["image"] for i in range(6)])
        labels = np.array([int(src[i]["label"]) for i in range(6)])
    assert ds.source == "tfds" and ds.name == "mnist"
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (6, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    expected = (images.reshape(6, 784) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_train, labels)
    assert ds.normalization == data.MNIST_NORMALIZATION
    assert no_network == []


def test_tfds_prepared_copy_is_read_without_download(monkeypatch, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3), monkeypatch.context() as m:  # undone before the mock
        m.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        m.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                  lambda self, **kw: pytest.fail("must not download"))
        ds = data.load_mnist_tfds(download=False)
    assert ds.x_train.shape == (3, 784) and ds.source == "tfds"
    assert no_network == []


def test_tfds_not_prepared_fails_fast(tmp_path, no_network):
    pytest.importorskip("tensorflow_datasets")
    start = time.monotonic()
    with pytest.raises(HessianApproxError, match="no prepared MNIST copy"):
        data.load_mnist_tfds(data_dir=str(tmp_path), download=False)
    assert time.monotonic() - start < 10 and no_network == []


def test_tfds_download_without_tensorflow_fails_fast(monkeypatch, tmp_path, no_network):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
    start = time.monotonic()
    with pytest.raises(HessianApproxError, match="cannot build one without TensorFlow.*--data-dir"):
        data.load_mnist_tfds(data_dir=str(tmp_path), download=True)
    assert time.monotonic() - start < 10 and no_network == []


def test_tfds_missing_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(HessianApproxError, match=r"pip install 'hessian-approx\[tfds\]'"):
        data.load_mnist_tfds()
    monkeypatch.delenv("HESSIAN_APPROX_DATA", raising=False)
    ds = data.load_dataset("auto")
    assert ds.name == "digits" and "tensorflow-datasets cannot be imported" in ds.note
    assert "cannot download MNIST file" in ds.note and "connection refused" in ds.note


# --------------------------------------------------------------------------- load_dataset

def test_auto_falls_back_to_digits_offline(monkeypatch, tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("HESSIAN_APPROX_DATA", raising=False)
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))  # an empty tfds home
    monkeypatch.delenv("HESSIAN_APPROX_MNIST_MIRRORS")  # the published mirrors, unreachable here
    start = time.monotonic()
    ds = data.load_dataset("auto")
    assert time.monotonic() - start < 15
    assert ds.name == "digits" and ds.source == "sklearn"
    assert "MNIST not available" in ds.note and "no prepared MNIST copy" in ds.note
    assert "HESSIAN_APPROX_DATA" in ds.note and "digits" in ds.note and "\n" not in ds.note
    assert "cannot download MNIST file" in ds.note and "storage.googleapis.com" in ds.note
    assert ds.provenance()["dataset_note"] == ds.note
    # tfds looked offline only; the one network use is the download, host names looked up once each.
    assert [a[0] for a in no_network] == [u.split("/")[2] for u in data.download.MIRRORS["mnist"]]


def test_auto_and_mnist_use_data_dir(mnist_dir, monkeypatch):
    monkeypatch.setenv("HESSIAN_APPROX_DATA", str(mnist_dir))
    assert data.default_data_dir() == str(mnist_dir)
    ds = data.load_dataset("auto")
    assert ds.name == "mnist" and ds.source == f"idx:{os.path.abspath(mnist_dir)}"
    assert data.load_dataset("MNIST", data_dir=mnist_dir).x_test.shape == (10000, 784)
    monkeypatch.setenv("HESSIAN_APPROX_DATA", "")
    assert data.default_data_dir() is None


def test_auto_does_not_swallow_bad_data_dir(mnist_dir, tmp_path):
    d = _copy_dir(mnist_dir, tmp_path / "gz", skip=["train-labels-idx1-ubyte"])
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(HessianApproxError, match="train-labels-idx1-ubyte.gz"):
        data.load_dataset("auto", data_dir=d)


def test_unknown_dataset_name():
    with pytest.raises(HessianApproxError, match="auto, mnist, fashion-mnist, digits"):
        data.load_dataset("cifar10")
    with pytest.raises(HessianApproxError, match="unknown dataset"):
        data.load_dataset(None)


# --------------------------------------------------------------------------------- digits

def test_digits():
    from sklearn.datasets import load_digits as sk_digits

    a, b = data.load_digits(), data.load_dataset("digits", data_dir="/ignored/for/digits")
    assert a.x_train.shape == (1500, 64) and a.x_test.shape == (297, 64)
    assert a.x_train.dtype == np.float32 and a.y_test.dtype == np.int32
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    # The hard-coded constants standardize the whole set exactly.
    allx = np.concatenate([a.x_train, a.x_test]).astype(np.float64)
    assert abs(allx.mean()) < 1e-5 and abs(allx.std() - 1) < 1e-5
    sk = sk_digits()
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(a.y_train, sk.target[perm[:1500]])
    np.testing.assert_array_equal(a.y_test, sk.target[perm[1500:]])
    np.testing.assert_allclose(a.x_test[0], (sk.data[perm[1500]] / 16 - 0.30526028624095713)
                               / 0.3760492217920148, atol=1e-5)
    assert a.name == "digits" and a.source == "sklearn"
    json.dumps(a.provenance())


def test_builtin_datasets_keep_their_shape_and_classes():
    """Flat (N, D) float32 rows of square grayscale images, int32 labels, 10 classes."""
    a = data.load_digits()
    assert a.input_shape == (64,) and a.image_shape == (8, 8, 1) and a.input_dim == 64
    assert a.targets_kind == "labels" and a.num_classes == 10 and a.classes == 10
    prov = a.provenance()
    assert prov["image_shape"] == [8, 8, 1] and prov["input_dim"] == 64 and prov["input_shape"] == [64]
    assert prov["targets"] == "labels" and prov["num_classes"] == 10 and prov["input_dtype"] == "float32"
    assert "data_sha256" not in prov  # only user files carry a file checksum
    few = data.Dataset(a.x_train, np.zeros(1500, np.int32), a.x_test, a.y_test * 0, "d", "s", "n", {}, classes=10)
    assert few.num_classes == 10  # given, not max label + 1


def test_dataset_rejects_bad_arrays():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(HessianApproxError, match="int32"):
        data.Dataset(x, np.zeros(3, np.int64), x, np.zeros(3, np.int32), "t", "t", "t", {})


# ------------------------------------------------------------------------- hessian_subset

def test_hessian_subset():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.arange(100, dtype=np.int32)
    xs, ys = data.hessian_subset(x, y, 30, seed=7)
    xs2, ys2 = data.hessian_subset(x, y, 30, seed=7)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    assert len(set(ys.tolist())) == 30  # distinct rows
    np.testing.assert_array_equal(ys, np.random.default_rng(7).choice(100, 30, replace=False))
    np.testing.assert_array_equal(xs, x[ys])
    assert not np.array_equal(data.hessian_subset(x, y, 30, seed=8)[1], ys)
    assert sorted(data.hessian_subset(x, y, 100, seed=0)[1].tolist()) == list(range(100))


@pytest.mark.parametrize("k", [0, -1, 101, 2.5, True])
def test_hessian_subset_bad_sizes(k):
    x, y = np.zeros((100, 2), np.float32), np.zeros(100, np.int32)
    with pytest.raises(HessianApproxError, match="hessian-samples"):
        data.hessian_subset(x, y, k, seed=0)


def test_hessian_subset_checks_shapes_and_finiteness():
    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int32)
    with pytest.raises(HessianApproxError, match="same N"):
        data.hessian_subset(x, y[:9], 5, seed=0)
    x[:, 0] = np.nan
    with pytest.raises(HessianApproxError, match="NaN or Inf"):
        data.hessian_subset(x, y, 5, seed=0)
