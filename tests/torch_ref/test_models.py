"""The torch twin against a numpy forward pass (MLP and CNN), inputs and their strides, criteria, flat order, errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hessian_approx.architecture import mlp, parse
from hessian_approx.errors import HessianApproxError
from hessian_approx.layers import LAYER_KINDS
from tests import cases
from tests.conftest import REPO
from tests.torch_ref.reference import forward
from torch_ref import models

# one case per (architecture, activation): the loss does not enter the forward pass
FORWARD_CASES = [c for c in cases.CASES_ALL if c.loss == "mse"]


def perturbed_twin(arch, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = models.build_twin(arch, dtype)
    with torch.no_grad():  # non-zero biases everywhere
        for p in m.parameters():
            p.add_(0.1 * torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 1.0))
    return m


def state(m):
    return {k: v.numpy() for k, v in m.state_dict().items()}


def test_every_layer_kind_has_a_torch_module():
    assert set(models.TORCH_LAYERS) == set(LAYER_KINDS)


def test_mlp_preset_structure_and_legacy_dict():
    arch = parse("mlp", (784,))
    m = models.build_twin(arch, torch.float64)
    assert [type(l) for l in m] == [nn.Linear, nn.ReLU, nn.Linear]
    assert list(m.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert m[0].weight.shape == (10, 784) and all(p.dtype == torch.float64 for p in m.parameters())
    legacy = {"input_dim": 784, "hidden": [10], "output_dim": 10, "activation": "relu", "kind": "mlp"}
    for form in (legacy, arch.to_dict()):
        twin = models.build_twin(form)
        assert twin.arch == arch and [repr(a) for a in twin] == [repr(b) for b in m.float()]
    assert len(models.build_twin(mlp(4, (), 3))) == 1


def test_cnn_preset_structure():
    arch = parse("cnn", (28, 28, 1))
    m = models.build_twin(arch)
    assert [type(l) for l in m] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d,
                                    nn.Flatten, nn.Linear]
    sd = m.state_dict()
    assert list(sd) == [f"{p.index}.{leaf}" for p in arch.param_layers for leaf in ("weight", "bias")]
    assert list(sd) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    assert sd["0.weight"].shape == (8, 1, 5, 5) and sd["3.weight"].shape == (16, 8, 5, 5)
    assert sd["7.weight"].shape == (10, 16 * 4 * 4)
    assert models.num_params(m) == arch.num_params and models.num_classes(m) == 10
    assert (m[2].kernel_size, m[2].stride) == ((2, 2), (2, 2))


def test_padding_and_strides_are_explicit():
    m = models.build_twin(parse("conv2k3same-relu-conv3k3s2p1-maxpool2s1-avgpool2-flatten-dense3", (9, 9, 2)))
    assert (m[0].padding, m[0].stride) == ((1, 1), (1, 1))
    assert (m[2].padding, m[2].stride, m[2].in_channels) == ((1, 1), (2, 2), 2)
    assert (m[3].kernel_size, m[3].stride) == ((2, 2), (1, 1)) and (m[4].kernel_size, m[4].stride) == ((2, 2), (2, 2))
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 2))
    assert m(models.as_inputs(m, x)).shape == (2, 3)


@pytest.mark.parametrize("c", cases.params(FORWARD_CASES))
def test_forward_matches_numpy(c):
    m = perturbed_twin(c.arch)
    x, _ = c.data()
    xt = models.as_inputs(m, x)
    ref = forward(c.arch, state(m), x if x.ndim == 2 else x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = m(xt).numpy()
    # float64, a handful of sums of O(1) terms each: agreement to rounding (1e-13 relative)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("channels", [1, 2])
def test_as_inputs_gives_standard_nchw_strides(channels):
    arch = parse("conv2k3-tanh-flatten-dense3", (5, 4, channels))
    m = models.build_twin(arch, torch.float64)
    x = np.random.default_rng(1).normal(size=(3, 5, 4, channels))
    standard = (channels * 20, 20, 4, 1)
    for given in (x, torch.from_numpy(x), x.astype(np.float32), x.reshape(3, -1)):  # flat rows reshaped too
        xt = models.as_inputs(m, given)
        assert xt.shape == (3, channels, 5, 4) and xt.dtype == torch.float64 and xt.stride() == standard
        expected = np.asarray(given, np.float64).reshape(x.shape).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(xt.numpy(), expected)
    # what the naive conversion gives with one channel (the reason for models.nchw)
    if channels == 1:
        assert torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().stride() != standard


def test_as_inputs_flat_and_images_for_an_mlp():
    m = models.build_twin(mlp(12, (4,), 3), torch.float64)
    x = np.random.default_rng(2).normal(size=(5, 2, 2, 3))
    flat = models.as_inputs(m, x.reshape(5, 12))
    assert flat.shape == (5, 12) and flat.dtype == torch.float64
    np.testing.assert_array_equal(models.as_inputs(m, x).numpy(), x.reshape(5, 12))  # channels last
    with pytest.raises(HessianApproxError, match=r"shape \(13,\) per sample do not fit the model's input \(12,\)"):
        models.as_inputs(m, np.zeros((5, 13)))
    plain = nn.Sequential(nn.Linear(12, 3))  # no Architecture attached: (N, D) as is
    assert models.as_inputs(plain, x.reshape(5, 12)).dtype == torch.float32


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backpack_diag_hessian_on_one_channel_tanh_conv():
    """BackPACK's DiagHessian with tanh after a conv on 1-channel images works on as_inputs' tensor.

    (With ``permute(0, 3, 1, 2).contiguous()`` instead, BackPACK 1.7 raises "view size is not
    compatible with input tensor's size and stride" here.)
    """
    backpack = pytest.importorskip("backpack", reason="the torch extra (BackPACK) is not installed")
    from backpack.extensions import DiagHessian

    c = cases.case("cnn-avg", "tanh", "cross_entropy")  # 8x8x1 images
    m = backpack.extend(perturbed_twin(c.arch, torch.float32))
    x, y = c.data()
    loss = backpack.extend(models.criterion("cross_entropy"))(m(models.as_inputs(m, x)), torch.as_tensor(y))
    with backpack.backpack(DiagHessian()):
        loss.backward()
    assert all(p.diag_h.shape == p.shape for p in m.parameters())


def test_cross_entropy_matches_numpy(rng):
    z = rng.normal(size=(6, 4))
    y = rng.integers(0, 4, 6)
    t = models.targets(y, "cross_entropy", 4, torch.float64)
    assert t.dtype == torch.int64 and t.shape == (6,)
    value = models.criterion("cross_entropy")(torch.as_tensor(z), t).item()
    assert value == pytest.approx(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(6), y]), rel=1e-13)


def test_mse_matches_numpy_mean_over_all_entries(rng):
    z = rng.normal(size=(6, 4))
    y = rng.integers(0, 4, 6)
    t = models.targets(y, "mse", 4, torch.float64)
    onehot = np.eye(4)[y]
    np.testing.assert_array_equal(t.numpy(), onehot)
    value = models.criterion("mse")(torch.as_tensor(z), t).item()
    assert value == pytest.approx(((z - onehot) ** 2).sum() / (6 * 4), rel=1e-13)


def test_flat_params_torch_order():
    m = perturbed_twin(cases.case("cnn-max").arch)
    s = state(m)
    expected = np.concatenate([s[k].reshape(-1) for k in s])
    flat = models.flat_params(m)
    assert flat.ndim == 1 and not flat.requires_grad and list(s) == ["0.weight", "0.bias", "3.weight", "3.bias",
                                                                      "6.weight", "6.bias"]
    np.testing.assert_array_equal(flat.numpy(), expected)
    # row-major OIHW: entry (o, i, a, b) of the first weight (3, 2, 3, 3) sits at ((o * 2 + i) * 3 + a) * 3 + b
    assert flat[((1 * 2 + 1) * 3 + 2) * 3 + 0].item() == s["0.weight"][1, 1, 2, 0]


def test_num_classes():
    assert models.num_classes(models.build_twin(parse("cnn", (28, 28, 1)))) == 10
    assert models.num_classes(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) == 2
    assert models.spec_output_dim is models.num_classes
    with pytest.raises(HessianApproxError, match="no Linear"):
        models.num_classes(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"input_dim": 5, "hidden": [4], "output_dim": 3, "activation": "gelu", "kind": "mlp"}, "gelu"),
        ({"input_dim": 5, "hidden": [4], "output_dim": 3, "kind": "cnn"}, "cnn"),
        ({"input_dim": 5, "hidden": ["x"], "output_dim": 3}, "integer"),
        ({"hidden": [3], "activation": "tanh"}, "format"),
        ("dense10", "neither an Architecture nor its dict"),
    ],
)
def test_build_errors(bad, word):
    with pytest.raises(HessianApproxError, match=word) as err:
        models.build_twin(bad)
    assert "\n" not in str(err.value) and ";" in str(err.value)


def test_loss_and_label_errors():
    with pytest.raises(HessianApproxError, match="hinge"):
        models.criterion("hinge")
    with pytest.raises(HessianApproxError, match="hinge"):
        models.targets(np.array([0, 1]), "hinge", 3)
    with pytest.raises(HessianApproxError, match="3 classes"):
        models.targets(np.array([0, 3]), "mse", 3)


def test_torch_ref_does_not_import_jax():
    code = (
        "import sys\n"
        "import torch_ref.models, torch_ref.exact, torch_ref.compat, torch_ref.pyhessian_runner, torch_ref.backpack_runner\n"
        "from hessian_approx.architecture import parse\n"
        "m = torch_ref.models.build_twin(parse('cnn', (28, 28, 1)))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'jax_impl'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
