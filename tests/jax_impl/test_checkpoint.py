"""Weight files: exact round trip (MLP and CNN), legacy MLP files, architecture mismatch, NaN, corrupt files."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jax_impl import checkpoint, models
from jax_impl.errors import HessianApproxError


@pytest.fixture
def saved(tmp_path):
    spec = models.mlp(6, (4, 3), 2)
    params = models.init_params(spec, jax.random.PRNGKey(0))
    path = tmp_path / "w.safetensors"
    checkpoint.save_checkpoint(path, params, spec, {"test_accuracy": 0.5})
    return spec, params, path


def test_round_trip_is_exact(saved):
    spec, params, path = saved
    got, got_spec, meta = checkpoint.load_checkpoint(path, spec)
    assert got_spec == spec and meta == {"test_accuracy": 0.5}
    for k, v in models.flatten_tree(params).items():
        np.testing.assert_array_equal(models.flatten_tree(got)[k], v)
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temp file left


def test_spec_mismatch_names_both(saved):
    _, _, path = saved
    with pytest.raises(HessianApproxError, match="6 dense4-relu-dense3-relu-dense2 .*6 dense5-relu-dense2"):
        checkpoint.load_checkpoint(path, models.mlp(6, (5,), 2))


def test_cnn_round_trip_is_exact(tmp_path):
    arch = models.parse("conv3k3-relu-maxpool2-flatten-dense2", (6, 6, 1))
    params = models.init_params(arch, jax.random.PRNGKey(0))
    checkpoint.save_checkpoint(tmp_path / "c.safetensors", params, arch)
    got, got_arch, _ = checkpoint.load_checkpoint(tmp_path / "c.safetensors")
    assert got_arch == arch and got["Conv_0"]["kernel"].shape == (3, 3, 1, 3)
    for k, v in models.flatten_tree(params).items():
        np.testing.assert_array_equal(models.flatten_tree(got)[k], v)


def test_first_version_mlp_files_still_load(saved, tmp_path):
    """Files written before the architecture description hold the old MLP spec dict."""
    _, params, path = saved
    legacy = json.dumps({"activation": "relu", "hidden": [4, 3], "input_dim": 6, "kind": "mlp", "output_dim": 2})
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"),
              metadata={"spec": legacy, "layout": "flax", "metadata": "{}"})
    got, arch, _ = checkpoint.load_checkpoint(tmp_path / "old.safetensors")
    assert arch == models.mlp(6, (4, 3), 2)
    np.testing.assert_array_equal(got["Dense_2"]["kernel"], params["Dense_2"]["kernel"])


def test_wrong_shape_inside_file(saved, tmp_path):
    spec, _, path = saved
    tensors = load_file(str(path))
    tensors["Dense_1/kernel"] = np.zeros((4, 9), np.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"spec": spec.to_json(), "layout": "flax", "metadata": "{}"})
    with pytest.raises(HessianApproxError, match="Dense_1/kernel"):
        checkpoint.load_checkpoint(bad)


def test_nan_weights_refused_on_save_and_load(saved, tmp_path):
    spec, params, path = saved
    params = jax.tree_util.tree_map(lambda a: a, params)
    params["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[0].set(np.nan)
    with pytest.raises(HessianApproxError, match="NaN or Inf"):
        checkpoint.save_checkpoint(tmp_path / "nan.safetensors", params, spec)
    assert not (tmp_path / "nan.safetensors").exists()
    tensors = load_file(str(path))
    tensors["Dense_0/bias"][0] = np.inf
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata={"spec": spec.to_json(), "metadata": "{}"})
    with pytest.raises(HessianApproxError, match="Dense_0/bias.*NaN or Inf"):
        checkpoint.load_checkpoint(tmp_path / "inf.safetensors")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(HessianApproxError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(HessianApproxError, match="not a readable safetensors"):
        checkpoint.load_checkpoint(tmp_path / "junk.safetensors")
