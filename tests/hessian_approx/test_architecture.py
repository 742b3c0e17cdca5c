"""The framework-free architecture description: shapes, names, forms, legacy specs, errors, no framework import."""

import json
import subprocess
import sys

import pytest

from hessian_approx.architecture import PRESETS, Architecture, mlp, parse
from hessian_approx.errors import HessianApproxError
from hessian_approx.layers import Activation, Conv2d, Dense, Flatten, MaxPool2d


def test_default_cnn_shapes_and_size():
    arch = parse("cnn", (28, 28, 1))
    assert arch.to_string() == PRESETS["cnn"]
    # 28 -conv5-> 24 -pool2-> 12 -conv5-> 8 -pool2-> 4; 4*4*16 = 256 features into dense10
    assert arch.shapes[-3:] == ((4, 4, 16), (256,), (10,))
    assert arch.layer_names == ("Conv_0", "Conv_1", "Dense_0")
    assert arch.num_params == (25 * 8 + 8) + (25 * 8 * 16 + 16) + (256 * 10 + 10) == 5994
    dense = arch.param_layers[-1]
    assert dense.index == 7 and dense.flat_from == (4, 4, 16)
    assert arch.param_shapes()["Conv_1/kernel"] == (5, 5, 8, 16)


def test_study_mlp_and_legacy_spec_are_one_architecture():
    legacy = {"input_dim": 784, "hidden": [10], "output_dim": 10, "activation": "relu", "kind": "mlp"}
    arch = Architecture.from_dict(legacy)
    assert arch == mlp() == parse("mlp", (28, 28, 1))  # a dense-first net on images takes them flattened
    assert arch.num_params == 7960 and arch.is_mlp
    assert [p.index for p in arch.param_layers] == [0, 2]  # torch keys 0.weight, 2.weight as before


@pytest.mark.parametrize("text,shape", [
    ("conv4k3s2p1-tanh-avgpool2s1-flatten-dense3", (9, 9, 2)),
    ("conv2k3x5same-sigmoid-maxpool3x2s1x2-flatten-dense4-relu-dense2", (7, 9, 3)),
    ("dense7-sigmoid-dense7-tanh-dense2", (5,)),
])
def test_string_dict_and_json_round_trip(text, shape):
    arch = parse(text, shape)
    assert arch.to_string() == text
    assert parse(arch.to_string(), shape) == arch
    assert Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert Architecture.from_json(arch.to_json()) == arch


def test_same_padding_follows_xla_rule():
    conv = Conv2d(4, (3, 3), (2, 2), "SAME")
    # XLA SAME: out = ceil(9/2) = 5, total pad = (5-1)*2 + 3 - 9 = 2 -> 1 each side
    assert conv.pads((9, 9, 1)) == (1, 1) and conv.out_shape((9, 9, 1)) == (5, 5, 4)


@pytest.mark.parametrize("text,shape,match", [
    ("conv8k4same-flatten-dense10", (28, 28, 1), "unevenly"),
    ("flatten-conv3k3-dense2", (6, 6, 1), "image input"),
    ("conv2k3-dense2", (6, 6, 1), "put flatten before"),
    ("conv8k30-flatten-dense10", (28, 28, 1), "30-wide window"),
    ("conv8k5-relu", (28, 28, 1), "no dense layer"),
    ("dense4-relu", (5,), "does not end in a dense"),
    ("conv8k5-gelu-flatten-dense2", (8, 8, 1), "'gelu' is not understood"),
    ("", (5,), "empty"),
])
def test_bad_architectures_get_one_line_errors(text, shape, match):
    with pytest.raises(HessianApproxError, match=match) as err:
        parse(text, shape)
    assert "\n" not in str(err.value) and "; " in str(err.value)


def test_bad_layer_fields_and_dicts():
    with pytest.raises(HessianApproxError, match="conv padding 'FULL'"):
        Conv2d(3, 3, 1, "FULL")
    with pytest.raises(HessianApproxError, match="activation 'gelu'"):
        Activation("gelu")
    with pytest.raises(HessianApproxError, match="not in the"):
        Architecture.from_dict({"layers": []})
    with pytest.raises(HessianApproxError, match="no known kind"):
        Architecture.from_dict({"input_shape": [3], "layers": [{"kind": "lstm"}]})
    with pytest.raises(HessianApproxError, match="neither"):
        Architecture((3, 3), (Dense(2),))
    arch = Architecture((6, 6, 1), (MaxPool2d(2), Flatten(), Dense(2)))
    assert arch.shapes[1] == (3, 3, 1)


def test_importing_the_description_imports_no_framework():
    code = ("import sys, hessian_approx.architecture, hessian_approx.fileio; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
