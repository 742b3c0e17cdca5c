"""bridge.weights: Flax-layout safetensors files shared with jax_impl.checkpoint and the torch twin, without JAX."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from bridge.convert import flax_to_torch, load_into_torch  # noqa: E402
from bridge.weights import load_torch_twin, read_flax_file, save_from_torch  # noqa: E402
from hessian_approx.architecture import mlp, parse  # noqa: E402
from hessian_approx.errors import HessianApproxError  # noqa: E402
from jax_impl import checkpoint, models  # noqa: E402
from tests.bridge.test_convert import ARCHS, random_params  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.torch_ref.conftest import one_torch_thread  # noqa: E402,F401  (autouse: one torch thread)
from torch_ref.models import as_inputs, build_twin  # noqa: E402

CNN = ARCHS["cnn-same"]  # conv2k3same-tanh-maxpool2s1-flatten-dense3 on 5x5x1: Dense after Flatten of 4x4x2
MLP = mlp(3, (4, 3), 2, "tanh")


def tensors_of(params):
    return {f"{layer}/{leaf}": np.ascontiguousarray(v) for layer, leaves in params.items() for leaf, v in leaves.items()}


def forward_jax(arch, params, x):
    return np.asarray(models.make_apply(arch)(models.cast_params(params, jnp.asarray(x).dtype), jnp.asarray(x)))


def forward_torch(model, x):
    with torch.no_grad():
        return model(as_inputs(model, x)).numpy()


def assert_weights_are_the_files(model, arch, params):
    for key, value in flax_to_torch(params, arch).items():
        assert np.array_equal(model.state_dict()[key].numpy(), value), key


@pytest.mark.parametrize("name", ["cnn-same", "cnn-max", "mlp-12"])
def test_jax_checkpoint_loads_in_torch(tmp_path, name, x64):
    arch = ARCHS[name]
    params = random_params(arch, np.float64, seed=1)
    path = tmp_path / "w.safetensors"
    checkpoint.save_checkpoint(path, models.unflatten_tree(tensors_of(params)), arch, {"seed": 3, "note": "jax"})
    model, stored, meta = load_torch_twin(path)
    assert stored == arch and meta == {"seed": 3, "note": "jax"}
    assert all(p.dtype == torch.float64 for p in model.parameters())  # the file's dtype by default
    assert_weights_are_the_files(model, arch, params)  # bit for bit
    x = np.random.default_rng(0).normal(size=(5, *arch.input_shape))
    # float64, same network: rounding only
    np.testing.assert_allclose(forward_torch(model, x), forward_jax(arch, params, x), rtol=1e-12, atol=1e-13)


@pytest.mark.usefixtures("x64_if_float64")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_file_loads_in_jax(tmp_path, dtype):
    torch.manual_seed(0)
    model = build_twin(CNN, dtype)
    path = tmp_path / "sub" / "t.safetensors"
    save_from_torch(path, model, CNN, {"from": "torch"})
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary file left behind
    params, arch, meta = checkpoint.load_checkpoint(path, CNN)
    assert arch == CNN and meta == {"from": "torch"}
    assert np.asarray(params["Conv_0"]["kernel"]).dtype == model[0].weight.detach().numpy().dtype
    assert_weights_are_the_files(model, CNN, {k: {leaf: np.asarray(v) for leaf, v in d.items()}
                                              for k, d in params.items()})
    if dtype == torch.float64:
        x = np.random.default_rng(1).normal(size=(4, 5, 5, 1))
        np.testing.assert_allclose(forward_jax(CNN, params, x), forward_torch(model, x), rtol=1e-12, atol=1e-13)


def test_cnn_round_trip_through_torch(tmp_path):
    model = load_into_torch(build_twin(CNN, torch.float64), random_params(CNN, seed=4), CNN)
    path = tmp_path / "cnn.safetensors"
    save_from_torch(path, model, CNN.to_dict(), None)  # the dict works as well as the Architecture
    with safe_open(str(path), framework="numpy") as f:  # the format: Flax layout, architecture JSON
        assert json.loads(f.metadata()["spec"]) == CNN.to_dict() and f.metadata()["layout"] == "flax"
        assert f.get_slice("Conv_0/kernel").get_shape() == [3, 3, 1, 2]
        assert f.get_slice("Dense_0/kernel").get_shape() == [32, 3]
    again, arch, meta = load_torch_twin(path)
    assert arch == CNN and meta == {}
    for (k1, p1), (k2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2)
    save_from_torch(path, again, CNN, {"v": 2})  # overwriting is atomic and leaves only the file
    assert load_torch_twin(path)[2] == {"v": 2} and len(list(tmp_path.iterdir())) == 1


def test_legacy_mlp_file_loads(tmp_path, x64):
    """A file of the first version: its "spec" is the MLP dict, its tensors Dense_i/kernel (in, out)."""
    params = random_params(MLP, seed=2)
    legacy = {"input_dim": 3, "hidden": [4, 3], "output_dim": 2, "activation": "tanh", "kind": "mlp"}
    path = tmp_path / "old.safetensors"
    save_file(tensors_of(params), str(path), metadata={"spec": json.dumps(legacy, sort_keys=True), "layout": "flax",
                                                      "metadata": json.dumps({"epochs": 2})})
    tree, arch, meta = read_flax_file(path)
    assert arch == MLP and meta == {"epochs": 2} and set(tree) == {"Dense_0", "Dense_1", "Dense_2"}
    model, arch, _ = load_torch_twin(path, dtype="float64")
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert_weights_are_the_files(model, MLP, params)
    x = np.random.default_rng(3).normal(size=(4, 3))
    np.testing.assert_allclose(forward_torch(model, x), forward_jax(MLP, params, x), rtol=1e-12, atol=1e-13)
    # re-saved, it carries the architecture JSON
    save_from_torch(tmp_path / "new.safetensors", model, arch)
    assert read_flax_file(tmp_path / "new.safetensors")[1] == MLP


def test_dtype_choice(tmp_path):
    path = tmp_path / "w32.safetensors"
    checkpoint.save_checkpoint(path, random_params(CNN, np.float32), CNN)
    model, _, meta = load_torch_twin(path)
    assert meta == {} and all(p.dtype == torch.float32 for p in model.parameters())
    for dtype in (torch.float64, "float64", np.float64):
        model64, _, _ = load_torch_twin(path, dtype=dtype)
        for p32, p64 in zip(model.parameters(), model64.parameters()):
            assert p64.dtype == torch.float64 and torch.equal(p32.double(), p64)  # float32 -> float64 is exact
    with pytest.raises(HessianApproxError, match="dtype 'int32'"):
        load_torch_twin(path, dtype="int32")


def test_loading_does_not_import_jax(tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_checkpoint(path, random_params(CNN), CNN, {"k": 1})
    out = tmp_path / "out.safetensors"
    code = (
        "import sys, numpy as np, bridge.weights as w, torch_ref.models as tm\n"
        f"model, arch, meta = w.load_torch_twin({str(path)!r})\n"
        "model(tm.as_inputs(model, np.zeros((2, *arch.input_shape))))\n"
        f"w.save_from_torch({str(out)!r}, model, arch, meta)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'jax_impl'))\n"
        "assert not bad, bad\n"
        "assert meta == {'k': 1}\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert checkpoint.load_checkpoint(out, CNN)[2] == {"k": 1}


# ---------------------------------------------------------------- errors

def test_file_errors(tmp_path):
    with pytest.raises(HessianApproxError, match="does not exist"):
        load_torch_twin(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(HessianApproxError, match="not a readable safetensors file"):
        load_torch_twin(junk)
    tensors = tensors_of(random_params(CNN))
    for name, meta, match in [
        ("nospec", {"layout": "flax"}, "no architecture"),
        ("torch_layout", {"spec": CNN.to_json(), "layout": "torch"}, "layout 'torch', expected 'flax'"),
        ("badjson", {"spec": "{", "layout": "flax"}, "malformed JSON"),
        ("badarch", {"spec": json.dumps({"format": "x"}), "layout": "flax"}, "unusable architecture"),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(HessianApproxError, match=match) as err:
            load_torch_twin(path)
        assert "\n" not in str(err.value)


def test_file_not_matching_its_architecture_names_the_tensor(tmp_path):
    tensors = tensors_of(random_params(CNN))
    meta = {"spec": CNN.to_json(), "layout": "flax"}
    cases = {
        "oihw": ({**tensors, "Conv_0/kernel": np.ascontiguousarray(tensors["Conv_0/kernel"].transpose(3, 2, 0, 1))},
                 r"Conv_0/kernel has shape \(2, 1, 3, 3\), expected \(3, 3, 1, 2\)"),
        "missing": ({k: v for k, v in tensors.items() if not k.startswith("Dense_0")},
                    r"lack layer 'Dense_0' \(expected kernel \(32, 3\) and bias \(3,\)\)"),
        "extra": ({**tensors, "Conv_1/kernel": np.zeros((2, 2))}, r"layer 'Conv_1'"),
        "flat name": ({**tensors, "scale": np.zeros(2)}, r"tensor 'scale'"),
        "nan": ({**tensors, "Conv_0/bias": np.full(2, np.nan)}, r"Conv_0/bias .*NaN"),
    }
    for label, (t, match) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(t, str(path), metadata=meta)
        for reader in (load_torch_twin, read_flax_file):
            with pytest.raises(HessianApproxError, match=match):
                reader(path)


def test_save_errors_name_the_layer_and_leave_no_file(tmp_path):
    nn = torch.nn
    path = tmp_path / "w.safetensors"
    bad = build_twin(CNN)
    bad[1] = nn.GELU()
    with pytest.raises(HessianApproxError, match=r"torch layer 1 is an unsupported GELU"):
        save_from_torch(path, bad, CNN)
    with pytest.raises(HessianApproxError, match=r"torch layer 0 is Conv2d\(1, 3, .*expected Conv2d\(1, 2, .*Conv_0"):
        save_from_torch(path, build_twin(parse("conv3k3same-tanh-maxpool2s1-flatten-dense3", (5, 5, 1))), CNN)
    model = build_twin(CNN)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(HessianApproxError, match=r"Conv_0/kernel .*NaN or Inf"):
        save_from_torch(path, model, CNN)
    with pytest.raises(HessianApproxError, match="not JSON-serializable"):
        save_from_torch(path, build_twin(CNN), CNN, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    save_from_torch(path, build_twin(CNN), CNN, {"v": 1})  # a failed write leaves an existing file untouched
    before = path.read_bytes()
    with pytest.raises(HessianApproxError):
        save_from_torch(path, model, CNN)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
