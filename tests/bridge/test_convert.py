"""bridge.convert: Flax tree <-> torch state_dict, bitwise round trips, equal forward passes, one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bridge.convert import check_twin, flax_to_torch, layer_dims, load_into_torch, torch_to_flax  # noqa: E402
from jax_impl import models  # noqa: E402
from jax_impl.errors import HessianApproxError  # noqa: E402

# (input, hidden, output, activation); 11 and 12 layers put "Dense_10" before "Dense_2" in sorted order
SPECS = [
    models.ModelSpec(input_dim=5, hidden=(4,), output_dim=3, activation="relu"),
    models.ModelSpec(input_dim=3, hidden=(4, 3), output_dim=2, activation="tanh"),
    models.ModelSpec(input_dim=4, hidden=(), output_dim=3, activation="relu"),
    models.ModelSpec(input_dim=3, hidden=(2,) * 10, output_dim=2, activation="sigmoid"),
    models.ModelSpec(input_dim=2, hidden=(3, 2, 4, 3, 2, 3, 2, 3, 2, 3, 2), output_dim=4, activation="tanh"),
]
IDS = [s.describe().replace(" ", "_") for s in SPECS]
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def random_params(spec, dtype=np.float64, seed=0):
    """Flax tree {"Dense_i": {"bias": (out,), "kernel": (in, out)}} of numpy normals (no zero biases)."""
    r = np.random.default_rng(seed)
    return {name: {"bias": r.normal(size=(b,)).astype(dtype), "kernel": (r.normal(size=(a, b)) / np.sqrt(a)).astype(dtype)}
            for name, a, b in layer_dims(spec)}


def twin(spec, dtype=torch.float64):
    """The torch twin: torch_ref.models.build_twin when present, else the equivalent Sequential."""
    try:
        from torch_ref.models import build_twin
    except ImportError:
        act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[spec.activation]
        layers = []
        for i, (_, a, b) in enumerate(layer_dims(spec)):
            layers += ([act()] if i else []) + [torch.nn.Linear(a, b, dtype=dtype)]
        return torch.nn.Sequential(*layers)
    return build_twin(spec.to_dict(), dtype)


def assert_trees_identical(t1, t2):
    assert set(t1) == set(t2)
    for layer in t1:
        assert set(t1[layer]) == set(t2[layer])
        for leaf in t1[layer]:
            a, b = np.asarray(t1[layer][leaf]), np.asarray(t2[layer][leaf])
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (layer, leaf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_round_trip_flax_torch_flax_is_bitwise(spec, dtype):
    params = random_params(spec, dtype)
    state = flax_to_torch(params, spec)
    assert list(state) == [k for i in range(len(spec.layer_names)) for k in (f"{2 * i}.weight", f"{2 * i}.bias")]
    for i, (name, a, b) in enumerate(layer_dims(spec)):
        assert state[f"{2 * i}.weight"].shape == (b, a) and state[f"{2 * i}.weight"].flags.c_contiguous
        assert np.array_equal(state[f"{2 * i}.weight"], params[name]["kernel"].T)
    assert_trees_identical(torch_to_flax(state, spec), params)
    assert_trees_identical(torch_to_flax(state, spec.to_dict()), params)  # the spec's dict works too


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_round_trip_torch_flax_torch_is_bitwise(spec, dtype):
    torch.manual_seed(0)
    model = twin(spec, TORCH_DTYPES[dtype])
    sd = model.state_dict()
    tree = torch_to_flax(sd, spec)
    assert list(tree) == list(spec.layer_names)
    back = flax_to_torch(tree, spec)
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == dtype and np.array_equal(back[key], value.numpy()), key
    # and through a fresh module
    other = twin(spec, TORCH_DTYPES[dtype])
    load_into_torch(other, tree, spec)
    for (k1, p1), (k2, p2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2), k1


def test_jax_leaves_and_frozen_dict_accepted():
    spec = SPECS[1]
    params = models.init_params(spec, jax.random.PRNGKey(0), jnp.float32)
    state = flax_to_torch(params, spec)
    assert state["2.weight"].dtype == np.float32
    from flax.core import freeze

    assert all(np.array_equal(state[k], v) for k, v in flax_to_torch(freeze(params), spec).items())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_equal_float64(spec):
    params = random_params(spec, np.float64, seed=1)
    x = np.random.default_rng(2).normal(size=(7, spec.input_dim))
    logits_jax = np.asarray(models.make_apply(spec)(models.cast_params(params, jnp.float64), jnp.asarray(x)))
    model = load_into_torch(twin(spec, torch.float64), params, spec)
    with torch.no_grad():
        logits_torch = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits_torch, logits_jax, rtol=1e-12, atol=1e-14)


def test_forward_equal_float32_and_cast_on_load():
    spec = SPECS[0]
    params = random_params(spec, np.float64, seed=3)
    x = np.random.default_rng(4).normal(size=(6, spec.input_dim)).astype(np.float32)
    model = load_into_torch(twin(spec, torch.float32), params, spec)  # float64 values cast into float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    p32 = models.cast_params(params, jnp.float32)
    ref = np.asarray(models.make_apply(spec)(p32, jnp.asarray(x)))
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- errors name the layer and the shape

SPEC = models.ModelSpec(input_dim=5, hidden=(4,), output_dim=3, activation="relu")


def raises(match):
    return pytest.raises(HessianApproxError, match=match)


def test_flax_tree_errors_name_the_layer():
    p = random_params(SPEC)
    bad = dict(p)
    del bad["Dense_1"]
    with raises(r"lack layer 'Dense_1' \(expected kernel \(4, 3\) and bias \(3,\)\)"):
        flax_to_torch(bad, SPEC)
    with raises(r"'Dense_2'"):
        flax_to_torch({**p, "Dense_2": p["Dense_1"]}, SPEC)
    with raises(r"Dense_0.*'scale'"):
        flax_to_torch({**p, "Dense_0": {**p["Dense_0"], "scale": np.ones(4)}}, SPEC)
    with raises(r"Dense_0.*lacks 'bias' \(expected shape \(4,\)\)"):
        flax_to_torch({**p, "Dense_0": {"kernel": p["Dense_0"]["kernel"]}}, SPEC)
    with raises(r"Flax Dense_1/kernel has shape \(3, 4\), expected \(4, 3\)"):
        flax_to_torch({**p, "Dense_1": {**p["Dense_1"], "kernel": p["Dense_1"]["kernel"].T}}, SPEC)
    with raises(r"Flax Dense_0/bias has shape \(5,\), expected \(4,\)"):
        flax_to_torch({**p, "Dense_0": {**p["Dense_0"], "bias": np.zeros(5)}}, SPEC)
    # every message is one line
    try:
        flax_to_torch(bad, SPEC)
    except HessianApproxError as err:
        assert "\n" not in str(err)


def test_state_dict_errors_name_the_key():
    sd = flax_to_torch(random_params(SPEC), SPEC)
    with raises(r"lacks '2.bias' \(layer Dense_1, expected shape \(3,\)\)"):
        torch_to_flax({k: v for k, v in sd.items() if k != "2.bias"}, SPEC)
    with raises(r"'4.weight'"):
        torch_to_flax({**sd, "4.weight": np.zeros((3, 3))}, SPEC)
    with raises(r"'1.running_mean'"):
        torch_to_flax({**sd, "1.running_mean": np.zeros(4)}, SPEC)
    with raises(r"torch 0.weight \(layer Dense_0\) has shape \(4, 5, 3, 3\), expected \(4, 5\)"):
        torch_to_flax({**sd, "0.weight": np.zeros((4, 5, 3, 3))}, SPEC)  # a Conv2d's weight
    with raises(r"torch 2.weight \(layer Dense_1\) has shape \(4, 3\), expected \(3, 4\)"):
        torch_to_flax({**sd, "2.weight": torch.zeros(4, 3)}, SPEC)


def test_model_structure_errors_name_the_layer():
    nn = torch.nn
    p = random_params(SPEC)
    with raises(r"torch layer 0 is an unsupported Conv2d; expected Linear\(5, 4\) \(Flax Dense_0\)"):
        load_into_torch(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Linear(4, 3)), p, SPEC)
    with raises(r"torch layer 1 is an unsupported GELU; expected ReLU"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3)), p, SPEC)
    with raises(r"torch layer 1 is an unsupported Tanh; expected ReLU"):
        check_twin(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), SPEC)
    with raises(r"torch layer 2 is Linear\(4, 2, bias=True\); expected Linear\(4, 3, bias=True\) for Flax Dense_1 "
                r"\(weight \(3, 4\), bias \(3,\)\)"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), p, SPEC)
    with raises(r"torch layer 2 is Linear\(4, 3, bias=False\)"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)), p, SPEC)
    with raises(r"lacks layer 2 \(Linear\(4, 3\) for Flax Dense_1\)"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4), nn.ReLU()), p, SPEC)
    with raises(r"lacks layer 1 \(ReLU before Flax Dense_1\)"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4)), p, SPEC)
    with raises(r"torch layer 4 .*beyond the spec's 2 Dense layers"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3)), p, SPEC)
    with raises(r"extra layer 3 \(ReLU\)"):
        load_into_torch(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU()), p, SPEC)
    with raises(r"MLP.*not an nn.Sequential"):
        check_twin(models.build(SPEC), SPEC)  # not even a torch module


def test_spec_errors():
    with raises("kind 'cnn'"):
        layer_dims({"input_dim": 3, "hidden": [], "output_dim": 2, "kind": "cnn"})
    with raises("lacks output_dim"):
        layer_dims({"input_dim": 3})
    with raises("neither a ModelSpec nor a dict"):
        layer_dims(42)
