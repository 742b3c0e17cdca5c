"""bridge.convert: per-kind layout rules, bitwise round trips (MLP and CNN), one-line errors naming the layer."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from bridge.convert import (  # noqa: E402
    LAYOUT_RULES, architecture, check_twin, flax_to_torch, load_into_torch, state_dict_from_torch, torch_shapes,
    torch_to_flax,
)
from hessian_approx.architecture import mlp, parse  # noqa: E402
from hessian_approx.errors import HessianApproxError  # noqa: E402
from hessian_approx.layers import LAYER_KINDS  # noqa: E402
from tests import cases  # noqa: E402
from tests.torch_ref.conftest import one_torch_thread  # noqa: E402,F401  (autouse: one torch thread)
from torch_ref.models import build_twin  # noqa: E402

# the registry's architectures, plus: 11 and 12 Dense layers ("Dense_10" sorts before "Dense_2"),
# 11 convolutions, a Dense after a Flatten of a 3x2x4 image, and the default CNN on MNIST's shape
ARCHS = {name: cases.case(name, "tanh").arch for name in cases.ARCHITECTURES}
ARCHS.update({
    "mlp-11": mlp(3, (2,) * 10, 2, "sigmoid"),
    "mlp-12": mlp(2, (3, 2, 4, 3, 2, 3, 2, 3, 2, 3, 2), 4, "tanh"),
    "conv-11": parse("-".join(["conv2k1"] * 11) + "-flatten-dense2", (3, 2, 1)),
    "flatten-3x2x4": parse("conv4k1-flatten-dense3", (3, 2, 2)),
    "cnn-preset": parse("cnn", (28, 28, 1)),
})
TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


def random_params(arch, dtype=np.float64, seed=0):
    """Flax tree {name: {"bias": (out,), "kernel": Flax shape}} of numpy normals (no zero entries)."""
    r = np.random.default_rng(seed)
    return {p.name: {leaf: r.normal(size=s).astype(dtype) for leaf, s in p.shapes.items()}
            for p in arch.param_layers}


def assert_trees_identical(t1, t2):
    assert set(t1) == set(t2)
    for layer in t1:
        assert set(t1[layer]) == set(t2[layer])
        for leaf in t1[layer]:
            a, b = np.asarray(t1[layer][leaf]), np.asarray(t2[layer][leaf])
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (layer, leaf)


def test_every_parameterized_kind_has_one_layout_rule():
    probes = {"dense": ((4,), LAYER_KINDS["dense"](3)), "conv2d": ((5, 5, 2), LAYER_KINDS["conv2d"](3))}
    for kind, cls in LAYER_KINDS.items():
        shape, layer = probes.get(kind, ((4, 4, 2), None))
        layer = layer if layer is not None else cls()
        assert (kind in LAYOUT_RULES) == bool(layer.param_shapes(shape)), kind


def test_dense_after_flatten_rule_entry_by_entry():
    """Flax row (h*W + w)*C + c is torch column (c*H + h)*W + w."""
    arch = ARCHS["flatten-3x2x4"]
    p = arch.param_layers[1]
    assert p.flat_from == (3, 2, 4) and p.name == "Dense_0" and p.index == 2
    kernel = np.random.default_rng(0).normal(size=(24, 3))
    weight = LAYOUT_RULES["dense"].to_torch(p, kernel)
    assert weight.shape == (3, 24) and weight.flags.c_contiguous
    for h, w, c, o in np.ndindex(3, 2, 4, 3):
        assert weight[o, (c * 3 + h) * 2 + w] == kernel[(h * 2 + w) * 4 + c, o]
    assert np.array_equal(LAYOUT_RULES["dense"].to_flax(p, weight), kernel)


def test_conv_rule_entry_by_entry():
    arch = parse("conv3k2x3-flatten-dense2", (4, 5, 2))
    p = arch.param_layers[0]
    kernel = np.random.default_rng(1).normal(size=(2, 3, 2, 3))  # (kh, kw, in, out)
    weight = LAYOUT_RULES["conv2d"].to_torch(p, kernel)
    assert weight.shape == (3, 2, 2, 3) == torch_shapes(p)["weight"] and weight.flags.c_contiguous
    for a, b, i, o in np.ndindex(2, 3, 2, 3):
        assert weight[o, i, a, b] == kernel[a, b, i, o]
    assert np.array_equal(LAYOUT_RULES["conv2d"].to_flax(p, weight), kernel)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(ARCHS))
def test_round_trip_flax_torch_flax_is_bitwise(name, dtype):
    arch = ARCHS[name]
    params = random_params(arch, dtype)
    state = flax_to_torch(params, arch)
    assert list(state) == [f"{p.index}.{leaf}" for p in arch.param_layers for leaf in ("weight", "bias")]
    for p in arch.param_layers:
        assert state[f"{p.index}.weight"].shape == torch_shapes(p)["weight"]
        assert state[f"{p.index}.weight"].flags.c_contiguous and state[f"{p.index}.weight"].dtype == dtype
    assert_trees_identical(torch_to_flax(state, arch), params)
    assert_trees_identical(torch_to_flax(state, arch.to_dict()), params)  # the dict works too


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["mlp-12", "cnn-max", "cnn-same", "conv-11", "cnn-preset"])
def test_round_trip_torch_flax_torch_is_bitwise(name, dtype):
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = build_twin(arch, TORCH_DTYPES[dtype])
    sd = model.state_dict()
    tree = torch_to_flax(sd, arch)
    assert list(tree) == list(arch.layer_names)
    back = flax_to_torch(tree, arch)
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == dtype and np.array_equal(back[key], value.numpy()), key
    other = load_into_torch(build_twin(arch, TORCH_DTYPES[dtype]), tree, arch)  # through a fresh module
    for (k1, p1), (k2, p2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2), k1
    assert all(np.array_equal(a, b) for a, b in zip(state_dict_from_torch(other, arch).values(), back.values()))


def test_jax_leaves_frozen_dict_and_legacy_dict_accepted():
    import jax
    import jax.numpy as jnp
    from flax.core import freeze

    arch = ARCHS["cnn-same"]
    params = jax.tree_util.tree_map(jnp.asarray, random_params(arch, np.float32))
    state = flax_to_torch(params, arch)
    assert state["4.weight"].dtype == np.float32 and state["0.weight"].shape == (2, 1, 3, 3)
    assert all(np.array_equal(state[k], v) for k, v in flax_to_torch(freeze(params), arch).items())
    legacy = {"input_dim": 5, "hidden": [4], "output_dim": 3, "activation": "relu", "kind": "mlp"}
    assert architecture(legacy) == mlp(5, (4,), 3, "relu")
    p = random_params(mlp(5, (4,), 3))
    assert list(flax_to_torch(p, legacy)) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_float64_values_cast_into_a_float32_twin():
    arch = ARCHS["cnn-avg"]
    params = random_params(arch, np.float64, seed=3)
    model = load_into_torch(build_twin(arch, torch.float32), params, arch)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    np.testing.assert_array_equal(model[0].weight.detach().numpy(),
                                  params["Conv_0"]["kernel"].transpose(3, 2, 0, 1).astype(np.float32))


# ---------------------------------------------------------------- errors name the layer and the shape

CNN = parse("conv3k3-relu-maxpool2-flatten-dense3", (6, 6, 2))  # Conv_0 at 0, Dense_0 (12 -> 3) at 4


def raises(match):
    return pytest.raises(HessianApproxError, match=match)


def one_line(fn, *args):
    with pytest.raises(HessianApproxError) as err:
        fn(*args)
    assert "\n" not in str(err.value) and ";" in str(err.value)


def test_flax_tree_errors_name_the_layer():
    p = random_params(CNN)
    with raises(r"lack layer 'Dense_0' \(expected kernel \(12, 3\) and bias \(3,\)\)"):
        flax_to_torch({"Conv_0": p["Conv_0"]}, CNN)
    with raises(r"'Conv_1'.*\['Conv_0', 'Dense_0'\]"):
        flax_to_torch({**p, "Conv_1": p["Conv_0"]}, CNN)
    with raises(r"Conv_0.*'scale'.*conv2d layer has only kernel \(3, 3, 2, 3\)"):
        flax_to_torch({**p, "Conv_0": {**p["Conv_0"], "scale": np.ones(3)}}, CNN)
    with raises(r"Conv_0.*lacks 'bias' \(expected shape \(3,\)\)"):
        flax_to_torch({**p, "Conv_0": {"kernel": p["Conv_0"]["kernel"]}}, CNN)
    with raises(r"Flax Conv_0/kernel has shape \(3, 2, 3, 3\), expected \(3, 3, 2, 3\)"):
        flax_to_torch({**p, "Conv_0": {**p["Conv_0"], "kernel": p["Conv_0"]["kernel"].transpose(3, 2, 0, 1)}}, CNN)
    with raises(r"Flax Dense_0/kernel has shape \(3, 12\), expected \(12, 3\)"):
        flax_to_torch({**p, "Dense_0": {**p["Dense_0"], "kernel": p["Dense_0"]["kernel"].T}}, CNN)
    with raises("not a dict of layers"):
        flax_to_torch([1, 2], CNN)
    one_line(flax_to_torch, {"Conv_0": p["Conv_0"]}, CNN)


def test_state_dict_errors_name_the_key():
    sd = flax_to_torch(random_params(CNN), CNN)
    with raises(r"lacks '4.bias' \(layer Dense_0, expected shape \(3,\)\)"):
        torch_to_flax({k: v for k, v in sd.items() if k != "4.bias"}, CNN)
    with raises(r"holds '2.weight'.*expected keys \['0.weight', '0.bias', '4.weight', '4.bias'\]"):
        torch_to_flax({**sd, "2.weight": np.zeros((3, 3))}, CNN)
    with raises(r"torch 0.weight \(layer Conv_0\) has shape \(3, 3, 2, 3\), expected \(3, 2, 3, 3\)"):
        torch_to_flax({**sd, "0.weight": np.zeros((3, 3, 2, 3))}, CNN)  # a Flax-layout kernel
    with raises(r"torch 4.weight \(layer Dense_0\) has shape \(12, 3\), expected \(3, 12\)"):
        torch_to_flax({**sd, "4.weight": torch.zeros(12, 3)}, CNN)
    one_line(torch_to_flax, {**sd, "4.weight": torch.zeros(12, 3)}, CNN)


def test_model_structure_errors_name_the_layer():
    nn = torch.nn
    p = random_params(CNN)
    good = [nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(12, 3)]

    def seq(i, module):
        return nn.Sequential(*(good[:i] + ([module] if module is not None else []) + good[i + 1:]))

    check_twin(nn.Sequential(*good), CNN)
    with raises(r"torch layer 0 is Conv2d\(2, 3, kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(1, 1\)\); "
                r"expected Conv2d\(2, 3, kernel_size=\(3, 3\), stride=\(1, 1\)\) for Flax Conv_0 "
                r"\(weight \(3, 2, 3, 3\), bias \(3,\)\)"):
        load_into_torch(seq(0, nn.Conv2d(2, 3, 3, padding=1)), p, CNN)
    with raises(r"torch layer 1 is an unsupported GELU\(approximate='none'\); expected ReLU\(\)"):
        check_twin(seq(1, nn.GELU()), CNN)
    with raises(r"torch layer 2 is MaxPool2d\(kernel_size=2, stride=1.*expected MaxPool2d\(kernel_size=\(2, 2\), "
                r"stride=\(2, 2\)"):
        check_twin(seq(2, nn.MaxPool2d(2, 1)), CNN)
    check_twin(seq(2, nn.MaxPool2d(2)), CNN)  # the same pool written with ints
    check_twin(seq(0, nn.Conv2d(2, 3, (3, 3), stride=1, padding=0)), CNN)
    with raises(r"torch layer 2 is an unsupported AvgPool2d"):
        check_twin(seq(2, nn.AvgPool2d(2)), CNN)
    with raises(r"torch layer 4 is Linear\(in_features=12, out_features=3, bias=False\); expected "
                r"Linear\(in_features=12, out_features=3, bias=True\) for Flax Dense_0"):
        check_twin(seq(4, nn.Linear(12, 3, bias=False)), CNN)
    with raises(r"has 4 modules but 'conv3k3-relu-maxpool2-flatten-dense3' needs 5: it lacks layer 4 \(Linear"):
        check_twin(seq(4, None), CNN)
    with raises(r"extra layer 5 \(ReLU\(\)\)"):
        check_twin(nn.Sequential(*good, nn.ReLU()), CNN)
    with raises(r"not an nn.Sequential"):
        check_twin(nn.Linear(3, 3), CNN)
    one_line(check_twin, seq(1, nn.GELU()), CNN)


def test_architecture_errors():
    with raises("kind 'cnn'"):
        flax_to_torch({}, {"input_dim": 3, "hidden": [], "output_dim": 2, "kind": "cnn"})
    with raises("neither an Architecture nor its dict"):
        flax_to_torch({}, 42)
