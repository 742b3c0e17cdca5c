"""Exact torch Hessians (MLP and CNN twins): the three methods agree, match finite differences, Hvps, a closed form."""

import numpy as np
import pytest
import torch

from hessian_approx.architecture import mlp
from hessian_approx.errors import HessianApproxError
from tests import cases
from torch_ref import exact, models


def perturb(m):
    with torch.no_grad():  # non-zero biases everywhere so no symmetry hides an ordering error
        for p in m.parameters():
            p.add_(0.1 * torch.sin(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) + 1.0))
    return m


def problem(hidden=(4,), activation="tanh", d=5, c=3, n=12, seed=0):
    torch.manual_seed(seed)
    m = perturb(models.build_twin(mlp(d, hidden, c, activation), torch.float64))
    r = np.random.default_rng(seed)
    return m, r.normal(size=(n, d)), r.integers(0, c, n)


def cnn_problem(arch_name="cnn-avg", activation="tanh", seed=0):
    """A registry CNN twin (torch init, perturbed) with its channels-last images (zero background) and labels."""
    c = cases.case(arch_name, activation)
    torch.manual_seed(seed)
    x, y = c.data()
    return perturb(models.build_twin(c.arch, torch.float64)), x, y


def twin_problem(kind, activation):
    return problem(hidden=(4, 3), activation=activation) if kind == "mlp" else cnn_problem(kind, activation)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind, activation", [("mlp", "tanh"), ("mlp", "relu"), ("cnn-same", "sigmoid"),
                                              ("cnn-max", "relu")])
def test_three_methods_agree(loss, kind, activation):
    m, x, y = twin_problem(kind, activation)
    hs = {meth: exact.hessian(m, x, y, loss, method=meth) for meth in exact.METHODS}
    d = models.num_params(m)
    ref = hs["func"]
    assert ref.shape == (d, d) and ref.dtype == np.float64
    scale = np.abs(ref).max()
    for meth, h in hs.items():
        assert np.abs(h - ref).max() <= 1e-12 * scale, meth
    np.testing.assert_allclose(ref, ref.T, atol=1e-13 * scale)
    np.testing.assert_array_equal(exact.hessian(m, x, y, loss), hs[exact.default_method(m)])  # the default is one of them


def test_loop_rows_batched_and_single_agree():
    m, x, y = problem()
    full = exact._hessian_loop(m, x, y, "cross_entropy", rows=1000).numpy()
    for rows in (1, 3, 7):  # one row per call, and batches with a ragged (and a 1-row) last batch
        np.testing.assert_allclose(exact._hessian_loop(m, x, y, "cross_entropy", rows=rows).numpy(),
                                   full, rtol=0, atol=1e-14)


def flat_grad(m, x, y, loss, theta):
    torch.nn.utils.vector_to_parameters(torch.as_tensor(theta), m.parameters())
    return exact.loss_and_grad(m, x, y, loss)[1]


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("kind", ["mlp", "cnn-avg"])
def test_hessian_matches_central_differences(loss, kind):
    m, x, y = problem() if kind == "mlp" else cnn_problem("cnn-avg", "tanh")
    h = exact.hessian(m, x, y, loss)
    theta0 = models.flat_params(m).numpy().copy()
    eps = 1e-5
    fd = np.empty_like(h)
    for i in range(theta0.size):
        e = np.zeros_like(theta0)
        e[i] = eps
        fd[:, i] = (flat_grad(m, x, y, loss, theta0 + e) - flat_grad(m, x, y, loss, theta0 - e)) / (2 * eps)
    torch.nn.utils.vector_to_parameters(torch.as_tensor(theta0), m.parameters())
    assert np.abs(fd - h).max() <= 1e-6 * np.abs(h).max()


def test_loss_and_grad_match_formula_and_differences():
    m, x, y = problem(activation="sigmoid")
    value, g = exact.loss_and_grad(m, x, y, "cross_entropy")
    z = m(torch.as_tensor(x)).detach().numpy()
    assert value == pytest.approx(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]), rel=1e-13)
    theta0 = models.flat_params(m).numpy().copy()
    f = exact.flat_loss_fn(m, x, y, "cross_entropy")[0]
    rng = np.random.default_rng(3)
    v = rng.normal(size=theta0.size)
    eps = 1e-6
    fd = (f(torch.as_tensor(theta0 + eps * v)) - f(torch.as_tensor(theta0 - eps * v))).item() / (2 * eps)
    assert g @ v == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("kind", ["mlp", "cnn-max"])
def test_hvp_equals_dense_product(kind):
    m, x, y = twin_problem(kind, "tanh")
    h = exact.hessian(m, x, y, "mse")
    v = np.random.default_rng(1).normal(size=h.shape[0])
    np.testing.assert_allclose(exact.hvp(m, x, y, "mse", v), h @ v, rtol=1e-12, atol=1e-13 * np.abs(h @ v).max())


def test_linear_model_cross_entropy_closed_form():
    """No hidden layer: z = W x + b, H = mean_n kron(diag(p) - p p^T, psi psi^T) with psi = [x; 1].

    kron(A, psi psi^T) indexes (class c, input j) as c * (D+1) + j with j = D the bias, i.e.
    "row c of [W | b]". Torch's flat order is W (C, D) row-major, then b: (c, j < D) -> c*D + j and
    (c, D) -> C*D + c. ``perm[torch_index] = kron_index`` maps one to the other.
    """
    m, x, y = problem(hidden=(), d=4, c=3, n=9)
    n, dd = x.shape
    c = 3
    z = m(torch.as_tensor(x)).detach().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    psi = np.hstack([x, np.ones((n, 1))])
    kron = np.mean([np.kron(np.diag(p[i]) - np.outer(p[i], p[i]), np.outer(psi[i], psi[i])) for i in range(n)],
                   axis=0)
    perm = np.empty(c * (dd + 1), dtype=int)
    for cls in range(c):
        for j in range(dd):
            perm[cls * dd + j] = cls * (dd + 1) + j
        perm[c * dd + cls] = cls * (dd + 1) + dd
    expected = kron[np.ix_(perm, perm)]
    h = exact.hessian(m, x, y, "cross_entropy")
    np.testing.assert_allclose(h, expected, rtol=0, atol=1e-14 * np.abs(expected).max())
    # spot check one entry by hand: d^2 L / dW[1,2] db[0] = mean_n A_n[1,0] x_n[2]
    a10 = np.mean(-p[:, 1] * p[:, 0] * x[:, 2])
    assert h[1 * dd + 2, c * dd + 0] == pytest.approx(a10, rel=1e-12)


def test_float32_model_gives_float32_hessian():
    m, x, y = problem()
    m = m.float()
    h = exact.hessian(m, x.astype(np.float32), y, "cross_entropy")
    assert h.dtype == np.float32
    m64, _, _ = problem()
    np.testing.assert_allclose(h, exact.hessian(m64, x, y, "cross_entropy"), atol=1e-5)


def test_time_hessian_methods_tiny():
    m, x, y = problem()
    times = exact.time_hessian_methods(m, x, y, "cross_entropy", repeats=1)
    assert set(times) == set(exact.METHODS) and all(t > 0 for t in times.values())
    assert exact.DEFAULT_METHOD in exact.METHODS


def test_memory_check(monkeypatch):
    m, x, y = problem()
    d = models.num_params(m)
    monkeypatch.setattr(exact, "available_memory_bytes", lambda: 1000)
    with pytest.raises(HessianApproxError, match=f"needs {d * d * 8} bytes.*1000 bytes") as err:
        exact.hessian(m, x, y, "cross_entropy")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(exact, "available_memory_bytes", lambda: 2 * d * d * 8)
    exact.hessian(m, x, y, "cross_entropy")


def test_available_memory_is_positive():
    assert exact.available_memory_bytes() > 0


def test_errors():
    m, x, y = problem()
    with pytest.raises(HessianApproxError, match="'bfgs'"):
        exact.hessian(m, x, y, "cross_entropy", method="bfgs")
    with pytest.raises(HessianApproxError, match="shape"):
        exact.hvp(m, x, y, "cross_entropy", np.ones(3))
    with pytest.raises(HessianApproxError, match="12 inputs but 11 labels"):
        exact.loss_and_grad(m, x, y[:11], "cross_entropy")
    with pytest.raises(HessianApproxError, match="hinge"):
        exact.loss_and_grad(m, x, y, "hinge")
