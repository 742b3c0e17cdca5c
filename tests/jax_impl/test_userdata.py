"""Users' own .npz data (jax_impl.userdata) and input layouts (models.as_inputs / input_layout)."""

import hashlib
import json
import os

import numpy as np
import pytest

from hessian_approx.architecture import mlp, parse
from jax_impl import data, models, userdata
from jax_impl.dataset import Dataset
from jax_impl.errors import HessianApproxError


def _save(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "; " in text
    return text


# ------------------------------------------------------------------------------- round trips

def test_labels_round_trip_without_test_split(tmp_path):
    r = np.random.default_rng(0)
    x, y = r.normal(size=(7, 5)).astype(np.float32), np.array([0, 2, 1, 4, 0, 2, 1], np.int64)
    path = _save(tmp_path, x=x, y=y)
    ds = userdata.load_npz(path)
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.y_train, y)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_test.shape == (0, 5) and ds.y_test.shape == (0,)
    assert ds.targets_kind == "labels" and ds.num_classes == 5 and ds.input_shape == (5,)
    prov = ds.provenance()
    json.dumps(prov)
    assert prov["dataset"] == "npz" and prov["test_size"] == 0 and prov["train_size"] == 7
    assert prov["targets"] == "labels" and prov["num_classes"] == 5 and prov["input_shape"] == [5]
    assert "none" in prov["test_split"] and "no test split" in ds.note
    assert "image_shape" not in prov  # 5 values are not a square image


def test_targets_round_trip_float64_images_with_test_split(tmp_path):
    r = np.random.default_rng(1)
    x, xt = r.normal(size=(6, 4, 4, 3)), r.normal(size=(2, 4, 4, 3))  # float64
    y, yt = np.eye(2)[[0, 1, 1, 0, 1, 0]], r.normal(size=(2, 2))
    ds = userdata.load_npz(_save(tmp_path, x=x, y=y, x_test=xt, y_test=yt))
    for got, want in ((ds.x_train, x), (ds.y_train, y), (ds.x_test, xt), (ds.y_test, yt)):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.float64  # never lowered
    assert ds.targets_kind == "targets" and ds.num_classes == 2
    assert ds.input_shape == (4, 4, 3) and ds.image_shape == (4, 4, 3)
    prov = ds.provenance()
    assert prov["input_dtype"] == "float64" and prov["x_dtype"] == "float64"
    assert prov["targets"] == "targets" and prov["test_size"] == 2 and prov["image_shape"] == [4, 4, 3]


def test_provenance_checksum_is_the_files_sha256(tmp_path):
    path = _save(tmp_path, x=np.ones((3, 2), np.float32), y=np.array([0, 1, 1]), notes=np.arange(2))
    prov = userdata.load_npz(path).provenance()
    assert prov["data_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["data_file"] == os.path.abspath(path) and prov["ignored_arrays"] == ["notes"]


def test_integer_valued_float_labels_float16_inputs_and_num_classes(tmp_path):
    path = _save(tmp_path, x=np.ones((3, 2), np.float16), y=np.array([0.0, 2.0, 1.0]))
    ds = userdata.load_npz(path, num_classes=10)
    assert ds.y_train.dtype == np.int32 and list(ds.y_train) == [0, 2, 1] and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.provenance()["x_dtype"] == "float16"  # widened, recorded


def test_grayscale_hw_images_and_flat_square_rows(tmp_path):
    y = np.array([0, 1])
    assert userdata.load_npz(_save(tmp_path, "a.npz", x=np.zeros((2, 3, 5)), y=y)).image_shape == (3, 5, 1)
    assert userdata.load_npz(_save(tmp_path, "b.npz", x=np.zeros((2, 16)), y=y)).image_shape == (4, 4, 1)


# --------------------------------------------------------------------------------- errors

F32 = np.zeros((3, 2), np.float32)
LAB = np.array([0, 1, 2])
BAD_FILES = {
    "missing x": (dict(X=F32, y=LAB), r"no array 'x' \(found: X, y\).*np.savez\(path, x=..., y=...\)"),
    "missing y": (dict(x=F32), r"no array 'y' \(found: x\).*np.savez"),
    "missing both": (dict(a=F32), r"no array 'x' and no 'y' \(found: a\)"),
    "object array": (dict(x=np.array([1, "a"], dtype=object), y=LAB[:2]), r"'x'.*Python objects.*dtype=np.float32"),
    "different N": (dict(x=F32, y=LAB[:2]), r"3 samples in x but 2 in y.*same number of rows"),
    "empty": (dict(x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64)), "no samples.*at least one"),
    "nan x": (dict(x=np.array([[0, np.nan]] * 3, np.float32), y=LAB), r"'x'.*3 NaN or Inf.*clean"),
    "inf targets": (dict(x=F32, y=np.array([[0.0], [np.inf], [1.0]])), r"'y'.*1 NaN or Inf"),
    "nan labels": (dict(x=F32, y=np.array([0.0, np.nan, 1.0])), r"'y'.*NaN or Inf"),
    "uint8 pixels": (dict(x=np.zeros((3, 4), np.uint8), y=LAB), r"uint8 values, not floats.*/ 255\)\.astype"),
    "bool x": (dict(x=np.zeros((3, 4), bool), y=LAB), r"bool values, not floats.*x=x.astype\(np.float32\)"),
    "string x": (dict(x=np.array([["a", "b"]] * 3), y=LAB), r"dtype <U1, not floating.*float32 or float64"),
    "complex x": (dict(x=np.zeros((3, 2), np.complex64), y=LAB), r"complex64, not floating"),
    "1-d x": (dict(x=np.zeros(3, np.float32), y=LAB), r"no per-sample axis.*x\[:, None\]"),
    "zero-width x": (dict(x=np.zeros((3, 0), np.float32), y=LAB), "samples of no values"),
    "negative labels": (dict(x=F32, y=np.array([0, -1, 2])), r"negative labels \(min -1\).*0..K-1"),
    "fractional labels": (dict(x=F32, y=np.array([0.0, 0.5, 1.0])), r"non-integer labels \(e.g. 0.5\).*\(N, C\)"),
    "integer targets": (dict(x=F32, y=np.eye(3, dtype=np.int64)), r"int64 \(N, C\) targets.*argmax\(1\)"),
    "3-d y": (dict(x=F32, y=np.zeros((3, 1, 1))), r"neither labels \(N,\) nor targets \(N, C\)"),
    "x_test without y_test": (dict(x=F32, y=LAB, x_test=F32), "has x_test but no y_test.*or neither"),
    "y_test without x_test": (dict(x=F32, y=LAB, y_test=LAB), "has y_test but no x_test"),
    "x_test shape": (dict(x=F32, y=LAB, x_test=np.zeros((3, 3), np.float32), y_test=LAB),
                     r"x_test \(3,\) float32 per sample but x \(2,\) float32.*shape and dtype of x"),
    "x_test dtype": (dict(x=F32, y=LAB, x_test=np.zeros((3, 2)), y_test=LAB), "x_test.*float64.*dtype of x"),
    "y_test kind": (dict(x=F32, y=LAB, x_test=F32, y_test=np.zeros((3, 2))), "y_test.*same kind as y"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_one_line_errors(tmp_path, case):
    arrays, match = BAD_FILES[case]
    with pytest.raises(HessianApproxError, match=match) as e:
        userdata.load_npz(_save(tmp_path, **arrays))
    _one_line(e)


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(HessianApproxError, match=r"nowhere.npz does not exist.*np.savez") as e:
        userdata.load_npz(tmp_path / "nowhere.npz")
    _one_line(e)
    with pytest.raises(HessianApproxError, match="is a directory"):
        userdata.load_npz(tmp_path)
    (tmp_path / "t.npz").write_text("x,y\n1,2\n")
    with pytest.raises(HessianApproxError, match=r"not an .npz \(zip\) archive.*np.savez") as e:
        userdata.load_npz(tmp_path / "t.npz")
    _one_line(e)
    np.save(tmp_path / "a.npy", F32)
    with pytest.raises(HessianApproxError, match=r"a single .npy array.*np.savez"):
        userdata.load_npz(tmp_path / "a.npy")
    good = _save(tmp_path, x=F32, y=LAB).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[:40] + good[-200:])  # keeps the zip directory, loses data
    with pytest.raises(HessianApproxError, match=r"cut.npz") as e:
        userdata.load_npz(tmp_path / "cut.npz")
    _one_line(e)


def test_num_classes_is_checked(tmp_path):
    path = _save(tmp_path, x=F32, y=LAB)
    with pytest.raises(HessianApproxError, match="label 2 but 2 classes.*at least 3"):
        userdata.load_npz(path, num_classes=2)
    with pytest.raises(HessianApproxError, match="not a positive integer"):
        userdata.load_npz(path, num_classes=0)
    with pytest.raises(HessianApproxError, match="2 target columns but 3 classes"):
        userdata.load_npz(_save(tmp_path, "t.npz", x=F32, y=np.zeros((3, 2))), num_classes=3)


# ------------------------------------------------------------------------- Dataset record

def test_dataset_is_reexported_and_takes_targets():
    assert data.Dataset is Dataset
    x = np.zeros((3, 2, 2, 3), np.float64)
    ds = Dataset(x, np.zeros((3, 4), np.float32), x[:0], np.zeros((0, 4), np.float32), "t", "t", "t", {})
    assert ds.num_classes == 4 and ds.targets_kind == "targets" and ds.image_shape == (2, 2, 3)
    with pytest.raises(HessianApproxError, match="labels .* or both"):
        Dataset(x, np.zeros((3, 4), np.float32), x, np.zeros(3, np.int32), "t", "t", "t", {})
    with pytest.raises(HessianApproxError, match="outside 0..1"):
        Dataset(x, np.array([0, 1, 2], np.int32), x[:0], np.zeros(0, np.int32), "t", "t", "t", {}, classes=2)
    with pytest.raises(HessianApproxError, match="no training samples"):
        Dataset(x[:0], np.zeros(0, np.int32), x[:0], np.zeros(0, np.int32), "t", "t", "t", {})
    with pytest.raises(HessianApproxError, match="not an image"):
        Dataset(x[:, None], np.zeros(3, np.int32), x[:0, None], np.zeros(0, np.int32), "t", "t", "t", {}).image_shape


def test_hessian_subset_takes_targets(tmp_path):
    x, y = np.arange(20.0).reshape(10, 2), np.arange(30.0).reshape(10, 3)
    xs, ys = data.hessian_subset(x, y, 4, seed=3)
    idx = np.random.default_rng(3).choice(10, 4, replace=False)
    np.testing.assert_array_equal(xs, x[idx])
    np.testing.assert_array_equal(ys, y[idx])
    y[idx[0], 1] = np.nan
    with pytest.raises(HessianApproxError, match="targets of the Hessian subset"):
        data.hessian_subset(x, y, 4, seed=3)


# ------------------------------------------------------------------------------- layouts

def test_nchw_images_are_transposed_not_reshaped():
    arch = parse("conv2k3-relu-flatten-dense2", (5, 4, 3))
    nhwc = np.random.default_rng(0).normal(size=(2, 5, 4, 3))
    nchw = np.transpose(nhwc, (0, 3, 1, 2))
    assert models.input_layout(arch, nchw) == "NCHW->NHWC"
    got = models.as_inputs(arch, nchw)
    np.testing.assert_array_equal(got, np.transpose(nchw, (0, 2, 3, 1)))
    np.testing.assert_array_equal(got, nhwc)
    assert not np.array_equal(nchw.reshape(2, 5, 4, 3), nhwc)  # what the old reshape gave
    assert models.input_layout(arch, nhwc) == "as given" and models.as_inputs(arch, nhwc) is nhwc
    flat = nhwc.reshape(2, -1)
    assert models.input_layout(arch, flat) == "flattened"
    np.testing.assert_array_equal(models.as_inputs(arch, flat), nhwc)


def test_ambiguous_or_foreign_layouts_are_refused():
    arch = parse("conv2k2-flatten-dense2", (5, 3, 3))  # NCHW (3, 5, 3) also reads as NHWC 3x5, 3 channels
    x = np.zeros((2, 3, 5, 3))
    with pytest.raises(HessianApproxError, match=r"ambiguous.*NHWC.*transpose\(0, 2, 3, 1\)") as e:
        models.as_inputs(arch, x)
    _one_line(e)
    np.testing.assert_array_equal(models.as_inputs(arch, x.transpose(0, 2, 3, 1).reshape(2, -1)),
                                  x.transpose(0, 2, 3, 1))
    same_size = parse("conv2k2-flatten-dense2", (4, 5, 3))
    with pytest.raises(HessianApproxError, match=r"\(5, 4, 3\) per sample do not fit .* \(4, 5, 3\)"):
        models.as_inputs(same_size, np.zeros((2, 5, 4, 3)))  # used to be reshaped silently
    cube = parse("conv2k2-flatten-dense2", (3, 3, 3))
    assert models.input_layout(cube, np.zeros((2, 3, 3, 3))) == "as given"  # read as NHWC


def test_one_channel_and_flat_models():
    arch = parse("conv2k2-flatten-dense2", (4, 5, 1))
    x = np.random.default_rng(0).normal(size=(3, 1, 4, 5))
    assert models.input_layout(arch, x) == "NCHW->NHWC"
    np.testing.assert_array_equal(models.as_inputs(arch, x), np.transpose(x, (0, 2, 3, 1)))
    assert models.input_layout(arch, x[:, 0]) == "NHW->NHWC"
    np.testing.assert_array_equal(models.as_inputs(arch, x[:, 0]), x[:, 0, :, :, None])
    dense = mlp(60, (4,), 2)
    images = np.random.default_rng(1).normal(size=(3, 4, 5, 3))
    assert models.input_layout(dense, images) == "flattened"
    np.testing.assert_array_equal(models.as_inputs(dense, images), images.reshape(3, 60))


def test_npz_images_feed_a_cnn(tmp_path):
    """load_npz -> image_shape -> architecture -> Hessian subset -> as_inputs -> forward pass."""
    import jax

    r = np.random.default_rng(2)
    nhwc = r.normal(size=(8, 6, 6, 2)).astype(np.float32)
    ds = userdata.load_npz(_save(tmp_path, x=nhwc, y=r.integers(0, 3, 8)))
    assert ds.input_shape == (6, 6, 2) and ds.image_shape == (6, 6, 2)
    arch = parse("conv3k3-relu-flatten-dense3", ds.image_shape)
    xs, ys = data.hessian_subset(ds.x_train, ds.y_train, 4, seed=0)
    x = models.as_inputs(arch, xs)
    idx = np.random.default_rng(0).choice(8, 4, replace=False)
    np.testing.assert_array_equal(x, nhwc[idx])
    params = models.init_params(arch, jax.random.PRNGKey(0))
    assert models.make_apply(arch)(params, x).shape == (4, ds.num_classes)


def test_npz_images_channels_first_are_refused_with_the_transpose(tmp_path):
    """An (N, C, H, W) file would build a CNN on the wrong axes; the error gives the transpose."""
    x = np.zeros((8, 2, 6, 6), np.float32)
    with pytest.raises(HessianApproxError, match=r"channels-first.*transpose\(0, 2, 3, 1\)") as err:
        userdata.load_npz(_save(tmp_path, x=x, y=np.zeros(8, int)))
    assert "\n" not in str(err.value)
