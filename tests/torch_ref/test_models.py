"""The torch twin against a numpy forward pass, criteria against numpy formulas, flat order, errors."""

import numpy as np
import pytest
import torch
from torch import nn

from jax_impl.errors import HessianApproxError
from torch_ref import models


def spec(hidden=(4,), activation="tanh", d=5, c=3):
    return {"input_dim": d, "hidden": list(hidden), "output_dim": c, "activation": activation, "kind": "mlp"}


NP_ACT = {"relu": lambda a: np.maximum(a, 0.0), "tanh": np.tanh, "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a))}


def numpy_forward(state, x, n_layers, activation):
    h = x
    for i in range(n_layers):
        w, b = state[f"{2 * i}.weight"], state[f"{2 * i}.bias"]
        h = h @ w.T + b
        if i < n_layers - 1:
            h = NP_ACT[activation](h)
    return h


def test_structure_and_state_dict_keys():
    m = models.build_twin(spec(hidden=(4, 3), activation="relu"), torch.float64)
    assert [type(l) for l in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert list(m.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert m[0].weight.shape == (4, 5) and m[4].weight.shape == (3, 3)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert models.num_params(m) == 5 * 4 + 4 + 4 * 3 + 3 + 3 * 3 + 3
    linear = models.build_twin(spec(hidden=()), torch.float32)
    assert len(linear) == 1 and isinstance(linear[0], nn.Linear)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_forward_matches_numpy(activation, rng):
    torch.manual_seed(1)
    m = models.build_twin(spec(hidden=(6, 4), activation=activation), torch.float64)
    x = rng.normal(size=(7, 5))
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    out = m(torch.as_tensor(x)).detach().numpy()
    np.testing.assert_allclose(out, numpy_forward(state, x, 3, activation), rtol=1e-13, atol=1e-14)


def test_cross_entropy_matches_numpy(rng):
    z = rng.normal(size=(6, 4))
    y = rng.integers(0, 4, 6)
    t = models.targets(y, "cross_entropy", 4, torch.float64)
    assert t.dtype == torch.int64 and t.shape == (6,)
    value = models.criterion("cross_entropy")(torch.as_tensor(z), t).item()
    logsumexp = np.log(np.exp(z).sum(axis=1))
    expected = np.mean(logsumexp - z[np.arange(6), y])
    assert value == pytest.approx(expected, rel=1e-13)


def test_mse_matches_numpy_mean_over_all_entries(rng):
    z = rng.normal(size=(6, 4))
    y = rng.integers(0, 4, 6)
    t = models.targets(y, "mse", 4, torch.float64)
    onehot = np.eye(4)[y]
    np.testing.assert_array_equal(t.numpy(), onehot)
    value = models.criterion("mse")(torch.as_tensor(z), t).item()
    assert value == pytest.approx(((z - onehot) ** 2).sum() / (6 * 4), rel=1e-13)


def test_flat_params_torch_order():
    torch.manual_seed(0)
    m = models.build_twin(spec(hidden=(4,)), torch.float64)
    s = {k: v.numpy() for k, v in m.state_dict().items()}
    expected = np.concatenate([s["0.weight"].reshape(-1), s["0.bias"], s["2.weight"].reshape(-1), s["2.bias"]])
    flat = models.flat_params(m)
    assert flat.ndim == 1 and not flat.requires_grad
    np.testing.assert_array_equal(flat.numpy(), expected)
    # row-major: entry (o, i) of the first weight sits at o * in + i
    assert flat[1 * 5 + 2].item() == s["0.weight"][1, 2]


@pytest.mark.parametrize(
    "bad, word",
    [
        (spec(activation="gelu"), "gelu"),
        ({**spec(), "kind": "cnn"}, "cnn"),
        ({"hidden": [3], "activation": "tanh"}, "input_dim"),
        (spec(hidden=(0,)), "positive"),
        ({**spec(), "hidden": ["x"]}, "integer"),
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
