"""Your model: weights from a plain PyTorch training script and data from an .npz, through the API and the CLI.

The reference is ``torch.func`` in float64 on the trained torch model itself (not our twin):
loss, gradient and Hessian of ``functional_call`` by autograd, eigenvalues by
``numpy.linalg.eigvalsh``. JAX reads the weights through ``bridge.external.read_weights``.
Tolerance 1e-10 relative (to the largest entry for vectors and matrices): both sides are
float64 sums of the same ~10^4 products in different orders, so they agree to ~1e-14; 1e-10
still catches any layout or permutation mistake, which gives O(1) errors.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch")
from safetensors.torch import save_file  # noqa: E402

import jax_impl as ha  # noqa: E402
from benchmarks import cli  # noqa: E402
from bridge import permutation  # noqa: E402
from bridge.external import read_weights  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-10
N, C = 40, 4


def _net(kind):
    torch.manual_seed(0)
    nn = torch.nn
    if kind == "tanh-mse":
        return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, C))
    if kind == "sigmoid-ce":
        return nn.Sequential(nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, C))
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, C))


def _data(kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, 8, 8, 1)) if kind == "cnn" else rng.standard_normal((N, 16))
    labels = rng.integers(0, C, N)
    y = np.eye(C)[labels] if kind == "tanh-mse" else labels  # MSE on one-hot targets
    return x, y


def _torch_inputs(x):
    t = torch.as_tensor(x)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t  # the user's NCHW


def _criterion(kind, y):
    if kind == "tanh-mse":
        t = torch.as_tensor(y, dtype=torch.float64)
        return lambda out: torch.nn.functional.mse_loss(out, t)
    t = torch.as_tensor(y, dtype=torch.long)
    return lambda out: torch.nn.functional.cross_entropy(out, t)


def train_in_torch(kind, tmp_path):
    """A short plain-PyTorch training script; returns (model, weights file, data file)."""
    model = _net(kind)
    x, y = _data(kind)
    xt = _torch_inputs(x).float()
    crit = _criterion(kind, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(30):
        opt.zero_grad()
        crit(model(xt).double()).backward()
        opt.step()
    weights = tmp_path / ("model.safetensors" if kind == "sigmoid-ce" else "model.pt")
    if weights.suffix == ".pt":
        torch.save(model.state_dict(), weights)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return model, weights, tmp_path / "data.npz"


def torch_reference(model, kind):
    """float64 loss, gradient (d,), Hessian (d, d) in torch's flat order by torch.func."""
    model = model.double()
    x, y = _data(kind)
    xt, crit = _torch_inputs(x), _criterion(kind, y)
    named = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        params, start = {}, 0
        for name, shape, size in named:
            params[name] = theta[start:start + size].reshape(shape)
            start += size
        return crit(torch.func.functional_call(model, params, (xt,)))

    return float(f(theta0)), torch.func.grad(f)(theta0).numpy(), torch.func.hessian(f)(theta0).numpy()


ARCH = {"tanh-mse": None, "sigmoid-ce": None, "cnn": "conv3k3-relu-maxpool2-flatten-dense4"}
ACTIVATION = {"tanh-mse": "tanh", "sigmoid-ce": "sigmoid", "cnn": None}
LOSS = {"tanh-mse": "mse", "sigmoid-ce": "cross_entropy", "cnn": "cross_entropy"}


@pytest.mark.parametrize("kind", ["tanh-mse", "sigmoid-ce", "cnn"])
def test_library_api_on_torch_trained_weights(x64, tmp_path, kind):
    model, weights, _ = train_in_torch(kind, tmp_path)
    loss, grad, hess = torch_reference(model, kind)
    x, y = _data(kind)
    params, arch, info = read_weights(weights, arch=ARCH[kind], input_shape=x.shape[1:], activation=ACTIVATION[kind])
    assert info["architecture_source"] == ("given" if ARCH[kind] else "inferred from tensor shapes")
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)  # float32 file -> float64
    H = ha.hessian(arch, params, (x, y), loss=LOSS[kind])
    assert float(H.loss()) == pytest.approx(loss, rel=TOL)
    np.testing.assert_allclose(permutation.to_torch_vector(np.asarray(H.gradient()), arch), grad,
                               rtol=0, atol=TOL * np.abs(grad).max())
    dense = permutation.to_torch_matrix(H.dense(), arch)
    np.testing.assert_allclose(dense, hess, rtol=0, atol=TOL * np.abs(hess).max())
    exact = np.sort(np.linalg.eigvalsh(hess))[::-1]
    top = H.eigenvalues(k=10, num_steps=min(H.dim, 120))
    np.testing.assert_allclose(top.eigenvalues, exact[:10], rtol=0, atol=TOL * abs(exact[0]) * 10)
    assert H.trace(method="exact") == pytest.approx(np.trace(hess), rel=TOL, abs=TOL * np.abs(hess).max())


@pytest.mark.parametrize("kind", ["tanh-mse", "cnn"])
def test_command_line_with_weights_and_data(x64, tmp_path, kind):
    model, weights, data = train_in_torch(kind, tmp_path)
    loss, grad, hess = torch_reference(model, kind)
    out = tmp_path / "eigs.json"
    argv = ["eigs", "--weights", str(weights), "--data", str(data), "--loss", LOSS[kind], "--dtype", "float64",
            "--methods", "exact,lanczos", "--lanczos-steps", "100", "--json", str(out)]
    argv += ["--arch", ARCH[kind]] if ARCH[kind] else ["--activation", ACTIVATION[kind]]
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    exact = np.sort(np.linalg.eigvalsh(hess))[::-1]
    assert record["point"]["loss"] == pytest.approx(loss, rel=TOL)
    assert record["point"]["gradient_norm"] == pytest.approx(np.linalg.norm(grad), rel=TOL)
    np.testing.assert_allclose(record["results"]["exact"]["eigenvalues"], exact[:10], rtol=0,
                               atol=TOL * abs(exact[0]))
    np.testing.assert_allclose(record["results"]["lanczos"]["eigenvalues"], exact[:10], rtol=0,
                               atol=TOL * abs(exact[0]) * 10)
    assert record["results"]["exact"]["trace"] == pytest.approx(np.trace(hess), rel=TOL)
    prov = record["provenance"]
    assert prov["data_file"] == str(data.resolve()) and len(prov["data_sha256"]) == 64
    assert prov["weights"]["weights_file"] == str(weights) and prov["num_params"] == grad.size


def _error_line(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # progress lines come first on stderr
    assert err.startswith("error: ") and "; " in err
    return err


def test_command_line_refuses_a_conv_file_without_arch(tmp_path, capsys):
    _, weights, data = train_in_torch("cnn", tmp_path)
    err = _error_line(capsys, ["eigs", "--weights", str(weights), "--data", str(data)])
    assert "convolutions" in err and "--arch" in err


def test_command_line_refuses_an_npz_without_y(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 16)))
    err = _error_line(capsys, ["eigs", "--data", str(tmp_path / "bad.npz")])
    assert "'y'" in err


def test_command_line_refuses_targets_of_the_wrong_width(tmp_path, capsys):
    _, weights, _ = train_in_torch("tanh-mse", tmp_path)  # 4 outputs
    np.savez(tmp_path / "wide.npz", x=np.zeros((6, 16)), y=np.ones((6, 5)))
    err = _error_line(capsys, ["eigs", "--weights", str(weights), "--data", str(tmp_path / "wide.npz"),
                               "--activation", "tanh", "--loss", "mse"])
    assert "4 outputs" in err and "5 target columns" in err
