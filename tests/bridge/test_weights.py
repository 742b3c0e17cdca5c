"""bridge.weights: Flax-layout safetensors files shared by jax_impl.checkpoint and the torch twin, without JAX."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_ref.models")

from safetensors.numpy import save_file  # noqa: E402

from bridge.convert import load_into_torch  # noqa: E402
from bridge.weights import load_torch_twin, read_flax_file, save_from_torch  # noqa: E402
from jax_impl import checkpoint, models  # noqa: E402
from jax_impl.errors import HessianApproxError  # noqa: E402
from tests.bridge.test_convert import SPECS, random_params  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from torch_ref.models import build_twin  # noqa: E402

SPEC = SPECS[1]  # 3-4-3-2 tanh
BIG = SPECS[3]  # 11 layers


def forward_jax(spec, params, x):
    return np.asarray(models.make_apply(spec)(models.cast_params(params, jnp.asarray(x).dtype), jnp.asarray(x)))


def forward_torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("spec", [SPEC, BIG], ids=["2-layer", "11-layer"])
def test_jax_checkpoint_loads_in_torch(tmp_path, spec):
    params = models.unflatten_tree(models.flatten_tree(random_params(spec, np.float64, seed=1)))
    path = tmp_path / "w.safetensors"
    checkpoint.save_checkpoint(path, params, spec, {"seed": 3, "note": "jax"})
    model, spec_dict, meta = load_torch_twin(path)
    assert spec_dict == spec.to_dict() and meta == {"seed": 3, "note": "jax"}
    assert all(p.dtype == torch.float64 for p in model.parameters())  # the file's dtype by default
    x = np.random.default_rng(0).normal(size=(5, spec.input_dim))
    np.testing.assert_allclose(forward_torch(model, x), forward_jax(spec, params, x), rtol=1e-12, atol=1e-14)
    # the weights are the file's, bit for bit
    for i, name in enumerate(spec.layer_names):
        assert np.array_equal(model.state_dict()[f"{2 * i}.weight"].numpy(), np.asarray(params[name]["kernel"]).T)
        assert np.array_equal(model.state_dict()[f"{2 * i}.bias"].numpy(), np.asarray(params[name]["bias"]))


def test_dtype_choice(tmp_path):
    path = tmp_path / "w32.safetensors"
    checkpoint.save_checkpoint(path, random_params(SPEC, np.float32), SPEC)
    model, _, meta = load_torch_twin(path)
    assert meta == {} and all(p.dtype == torch.float32 for p in model.parameters())
    for dtype in (torch.float64, "float64", np.float64):
        model64, _, _ = load_torch_twin(path, dtype=dtype)
        assert all(p.dtype == torch.float64 for p in model64.parameters())
        for p32, p64 in zip(model.parameters(), model64.parameters()):
            assert torch.equal(p32.double(), p64)  # float32 -> float64 is exact
    with pytest.raises(HessianApproxError, match="dtype 'int32'"):
        load_torch_twin(path, dtype="int32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_file_loads_in_jax(tmp_path, dtype):
    torch.manual_seed(0)
    model = build_twin(SPEC.to_dict(), dtype)
    path = tmp_path / "sub" / "t.safetensors"
    save_from_torch(path, model, SPEC.to_dict(), {"from": "torch"})
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary file left behind
    params, spec, meta = checkpoint.load_checkpoint(path, SPEC)
    assert spec == SPEC and meta == {"from": "torch"}
    for i, name in enumerate(SPEC.layer_names):
        w = model.state_dict()[f"{2 * i}.weight"].numpy()
        assert np.asarray(params[name]["kernel"]).dtype == w.dtype
        assert np.array_equal(np.asarray(params[name]["kernel"]), w.T)
        assert np.array_equal(np.asarray(params[name]["bias"]), model.state_dict()[f"{2 * i}.bias"].numpy())
    if dtype == torch.float64:
        x = np.random.default_rng(1).normal(size=(4, SPEC.input_dim))
        np.testing.assert_allclose(forward_jax(SPEC, params, x), forward_torch(model, x), rtol=1e-12, atol=1e-14)


def test_torch_round_trip_and_modelspec_accepted(tmp_path):
    model = load_into_torch(build_twin(BIG.to_dict(), torch.float64), random_params(BIG, seed=4), BIG)
    path = tmp_path / "big.safetensors"
    save_from_torch(path, model, BIG, None)  # a ModelSpec works as well as its dict
    again, spec_dict, meta = load_torch_twin(path)
    assert spec_dict == BIG.to_dict() and meta == {}
    for (k1, p1), (k2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2)
    # overwriting is atomic and leaves only the file
    save_from_torch(path, again, BIG.to_dict(), {"v": 2})
    assert load_torch_twin(path)[2] == {"v": 2} and len(list(tmp_path.iterdir())) == 1


def test_loading_does_not_import_jax(tmp_path):
    path = tmp_path / "w.safetensors"
    checkpoint.save_checkpoint(path, random_params(SPEC), SPEC, {"k": 1})
    out = tmp_path / "out.safetensors"
    code = (
        "import sys, bridge.weights as w\n"
        f"model, spec, meta = w.load_torch_twin({str(path)!r})\n"
        f"w.save_from_torch({str(out)!r}, model, spec, meta)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax'))\n"
        "assert not bad, bad\n"
        "assert meta == {'k': 1}\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert checkpoint.load_checkpoint(out, SPEC)[2] == {"k": 1}


# ---------------------------------------------------------------- errors

def test_file_errors(tmp_path):
    with pytest.raises(HessianApproxError, match="does not exist"):
        load_torch_twin(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(HessianApproxError, match="not a readable safetensors file"):
        load_torch_twin(junk)
    tensors = {k: np.ascontiguousarray(v) for k, v in models.flatten_tree(random_params(SPEC)).items()}
    nospec = tmp_path / "nospec.safetensors"
    save_file(tensors, str(nospec), metadata={"layout": "flax"})
    with pytest.raises(HessianApproxError, match="no model spec"):
        load_torch_twin(nospec)
    torch_layout = tmp_path / "torch_layout.safetensors"
    save_file(tensors, str(torch_layout), metadata={"spec": SPEC.to_json(), "layout": "torch"})
    with pytest.raises(HessianApproxError, match="layout 'torch', expected 'flax'"):
        load_torch_twin(torch_layout)


def test_file_not_matching_its_spec_names_the_tensor(tmp_path):
    tensors = {k: np.ascontiguousarray(v) for k, v in models.flatten_tree(random_params(SPEC)).items()}
    meta = {"spec": SPEC.to_json(), "layout": "flax"}
    cases = {
        "transposed": ({**tensors, "Dense_1/kernel": np.ascontiguousarray(tensors["Dense_1/kernel"].T)},
                       r"Dense_1/kernel has shape \(3, 4\), expected \(4, 3\)"),
        "missing": ({k: v for k, v in tensors.items() if not k.startswith("Dense_2")},
                    r"lack layer 'Dense_2' \(expected kernel \(3, 2\) and bias \(2,\)\)"),
        "extra": ({**tensors, "Dense_3/kernel": np.zeros((2, 2))}, r"layer 'Dense_3'"),
        "flat name": ({**tensors, "scale": np.zeros(2)}, r"tensor 'scale'"),
        "nan": ({**tensors, "Dense_0/bias": np.full(4, np.nan)}, r"Dense_0/bias .*NaN"),
    }
    for label, (t, match) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(t, str(path), metadata=meta)
        with pytest.raises(HessianApproxError, match=match):
            load_torch_twin(path)
        with pytest.raises(HessianApproxError, match=match):
            read_flax_file(path)


def test_save_errors_name_the_layer_and_leave_no_file(tmp_path):
    nn = torch.nn
    path = tmp_path / "w.safetensors"
    with pytest.raises(HessianApproxError, match=r"torch layer 1 is an unsupported GELU"):
        save_from_torch(path, nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 3), nn.Tanh(),
                                            nn.Linear(3, 2)), SPEC.to_dict())
    with pytest.raises(HessianApproxError, match=r"torch layer 2 is Linear\(4, 2, bias=True\).*Dense_1"):
        save_from_torch(path, build_twin({**SPEC.to_dict(), "hidden": [4, 2]}), SPEC.to_dict())
    model = build_twin(SPEC.to_dict())
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(HessianApproxError, match=r"Dense_1/kernel .*NaN or Inf"):
        save_from_torch(path, model, SPEC.to_dict())
    with pytest.raises(HessianApproxError, match="not JSON-serializable"):
        save_from_torch(path, build_twin(SPEC.to_dict()), SPEC.to_dict(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    # a failed write leaves an existing file untouched
    good = build_twin(SPEC.to_dict())
    save_from_torch(path, good, SPEC.to_dict(), {"v": 1})
    before = path.read_bytes()
    with pytest.raises(HessianApproxError):
        save_from_torch(path, model, SPEC.to_dict())
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
    assert json.loads(json.dumps(load_torch_twin(path)[1])) == SPEC.to_dict()
