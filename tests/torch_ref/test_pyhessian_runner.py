"""PyHessian runners against the dense torch Hessian; start-vector and probe feeding; the torch.eig layer."""

import importlib

import numpy as np
import pytest
import torch

import pyhessian.utils
from hessian_approx.architecture import mlp
from hessian_approx.errors import HessianApproxError
from tests import cases
from torch_ref import compat, exact, models
from torch_ref import pyhessian_runner as runner

PH = importlib.import_module("pyhessian.hessian")


def eig_problem():
    """6-8-3 tanh, cross-entropy, 40 samples: d = 83, top |eigenvalues| ~1.04, 0.94, 0.81, then 0.68."""
    torch.manual_seed(0)
    m = models.build_twin(mlp(6, (8,), 3, "tanh"), torch.float64)
    r = np.random.default_rng(0)
    return m, 2.0 * r.normal(size=(40, 6)), r.integers(0, 3, 40)


def density_problem():
    """4-5-3 tanh, MSE, 30 samples, d = 43, eigenvalues spread over about [-930, 2570].

    PyHessian normalizes by |w| + 1e-6, so every Lanczos vector is short by ~1e-6/beta_j and the
    nodes carry a relative error of that order; a Hessian in the hundreds keeps it ~1e-8 of the
    range. MSE rather than cross-entropy: softmax's shift invariance gives CE a repeated zero
    eigenvalue, and one Krylov sequence finds each distinct eigenvalue once, not its multiplicity.
    """
    torch.manual_seed(0)
    m = models.build_twin(mlp(4, (5,), 3, "tanh"), torch.float64)
    with torch.no_grad():
        m[0].weight.mul_(0.1)
        m[2].weight.mul_(5.0)
        m[0].bias.add_(0.1)
        m[2].bias.add_(0.2)
    r = np.random.default_rng(0)
    return m, 30.0 * r.normal(size=(30, 4)), r.integers(0, 3, 30)


def test_top_eigenvalues_match_dense_eigh():
    m, x, y = eig_problem()
    h = exact.hessian(m, x, y, "cross_entropy")
    ev = np.linalg.eigvalsh(h)
    by_mag = ev[np.argsort(-np.abs(ev))]
    # power iteration with deflation finds largest |lambda| first; the test needs them well separated
    ratios = np.abs(by_mag[1:4]) / np.abs(by_mag[:3])
    assert ratios.max() < 0.95
    res = runner.top_eigenvalues(m, x, y, "cross_entropy", k=3, max_iter=1000, tol=1e-8)
    # rtol 1e-5: PyHessian stops when consecutive Rayleigh quotients differ by < tol relatively; with
    # ratio r < 0.95 the remaining error is about tol / (1 - r^2) < 1e-7. It also normalizes by
    # |v| + 1e-6, so the vector it multiplies has norm ~1 - 1e-6 and each Rayleigh quotient is
    # biased low by ~2e-6 relatively. 1e-5 covers both with margin and still checks 5 digits.
    np.testing.assert_allclose(res["eigenvalues"], by_mag[:3], rtol=1e-5)
    assert res["eigenvalues"].shape == (3,) and res["eigenvectors"].shape == (3, h.shape[0])
    for lam, v in zip(res["eigenvalues"], res["eigenvectors"]):
        v = v / np.linalg.norm(v)
        assert np.linalg.norm(h @ v - lam * v) < 1e-3 * abs(lam)
    assert res["matvecs"] == sum(res["iterations"]) and all(1 < i <= 1000 for i in res["iterations"])
    s = res["settings"]
    assert (s["max_iter"], s["tol"], s["top_n"], s["model_mode"]) == (1000, 1e-8, 3, "eval")
    assert s["pyhessian_version"] == "0.1" and s["dtype"] == "float64"


def test_start_vectors_are_fed_and_reproducible():
    m, x, y = eig_problem()
    d = models.num_params(m)
    h = exact.hessian(m, x, y, "cross_entropy")
    v0 = np.random.default_rng(5).normal(size=(1, d))
    # one iteration: the eigenvalue is the Rayleigh quotient of the fed vector, the eigenvector H v0 normalized
    one = runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=1, start_vectors=v0)
    u = v0[0] / np.linalg.norm(v0[0])
    assert one["eigenvalues"][0] == pytest.approx(u @ h @ u, rel=1e-5)
    np.testing.assert_allclose(one["eigenvectors"][0], h @ u / np.linalg.norm(h @ u), atol=1e-5)
    assert one["matvecs"] == 1 and one["iterations"] == [1]
    starts = np.random.default_rng(6).normal(size=(2, d))
    a = runner.top_eigenvalues(m, x, y, "cross_entropy", k=2, max_iter=50, tol=1e-6, start_vectors=starts, seed=1)
    b = runner.top_eigenvalues(m, x, y, "cross_entropy", k=2, max_iter=50, tol=1e-6, start_vectors=starts, seed=2)
    np.testing.assert_array_equal(a["eigenvalues"], b["eigenvalues"])
    np.testing.assert_array_equal(a["eigenvectors"], b["eigenvectors"])
    assert a["iterations"] == b["iterations"] and a["settings"]["start"] == "start_vectors"


def test_seeded_draws_and_rng_isolation():
    m, x, y = eig_problem()
    state = torch.get_rng_state()
    a = runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=3, seed=0)
    b = runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=3, seed=0)
    c = runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a["eigenvectors"], b["eigenvectors"])
    assert not np.array_equal(a["eigenvectors"], c["eigenvectors"])


def test_matvecs_equal_iterations():
    m, x, y = eig_problem()
    # tol = 0 never stops early (the test is "< tol"), so each eigenvalue takes exactly max_iter Hvps
    res = runner.top_eigenvalues(m, x, y, "cross_entropy", k=2, max_iter=7, tol=0.0)
    assert res["matvecs"] == 14 and res["iterations"] == [7, 7]


def test_trace_with_probes_equals_dense_quadratic_forms():
    m, x, y = eig_problem()
    h = exact.hessian(m, x, y, "cross_entropy")
    probes = np.random.default_rng(2).choice([-1.0, 1.0], size=(6, h.shape[0]))
    res = runner.trace(m, x, y, "cross_entropy", max_iter=6, tol=0.0, probes=probes)
    quad = np.einsum("md,de,me->m", probes, h, probes)
    np.testing.assert_allclose(res["estimates"], quad, rtol=1e-10)
    assert res["trace"] == pytest.approx(quad.mean(), rel=1e-10)
    assert res["matvecs"] == 6 and res["settings"]["model_mode"] == "eval"


def test_cnn_twin_trace_and_one_power_step_on_images():
    """On a CNN twin with channels-last images: probes' quadratic forms and one fed power step are exact."""
    c = cases.case("cnn-same", "tanh", "cross_entropy")
    torch.manual_seed(0)
    m = models.build_twin(c.arch, torch.float64)
    x, y = c.data()
    h = exact.hessian(m, x, y, "cross_entropy")
    r = np.random.default_rng(2)
    probes = r.choice([-1.0, 1.0], size=(3, h.shape[0]))
    res = runner.trace(m, x, y, "cross_entropy", max_iter=3, tol=0.0, probes=probes)
    # float64 Hvps and a dense Hessian of the same graph: agreement to rounding
    np.testing.assert_allclose(res["estimates"], np.einsum("md,de,me->m", probes, h, probes), rtol=1e-10)
    v0 = r.normal(size=(1, h.shape[0]))
    one = runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=1, start_vectors=v0)
    normalize = lambda v: v / (np.linalg.norm(v) + 1e-6)  # PyHessian's, applied at the start and in the loop
    u = normalize(normalize(v0[0]))
    assert one["eigenvalues"][0] == pytest.approx(u @ h @ u, rel=1e-10)


def test_trace_seeded_runs_and_early_stop():
    m, x, y = eig_problem()
    a = runner.trace(m, x, y, "cross_entropy", max_iter=20, seed=3)
    b = runner.trace(m, x, y, "cross_entropy", max_iter=20, seed=3)
    assert a["estimates"] == b["estimates"] and a["matvecs"] == len(a["estimates"]) <= 20


def test_density_nodes_are_the_spectrum_and_torch_is_restored():
    m, x, y = density_problem()
    h = exact.hessian(m, x, y, "mse")
    ev = np.linalg.eigvalsh(h)
    d = h.shape[0]
    assert np.diff(ev).min() > 1e-3  # distinct eigenvalues: Lanczos can find all of them
    assert not compat.torch_has_working_eig()
    stub = torch.eig
    res = runner.density(m, x, y, "mse", iters=d, n_v=1)
    assert torch.eig is stub and not compat.torch_has_working_eig()
    assert res["nodes"].shape == (1, d) and res["weights"].shape == (1, d)
    assert np.abs(np.sort(res["nodes"][0]) - ev).max() <= 1e-6 * (ev[-1] - ev[0])
    assert res["weights"].sum() == pytest.approx(1.0, abs=1e-12) and (res["weights"] >= 0).all()
    assert res["matvecs"] == d


def test_density_shapes_and_probe_feeding():
    m, x, y = density_problem()
    d = models.num_params(m)
    probes = np.random.default_rng(4).choice([-1.0, 1.0], size=(2, d))
    a = runner.density(m, x, y, "mse", iters=5, n_v=2, probes=probes)
    b = runner.density(m, x, y, "mse", iters=5, n_v=2, probes=probes, seed=9)
    assert a["nodes"].shape == (2, 5) and a["matvecs"] == 10
    np.testing.assert_array_equal(a["nodes"], b["nodes"])
    np.testing.assert_allclose(a["weights"].sum(axis=1), 1.0, atol=1e-12)


def test_runner_restores_global_state():
    m, x, y = eig_problem()
    m.train()
    grad = [torch.full_like(p, 7.0) for p in m.parameters()]
    for p, g in zip(m.parameters(), grad):
        p.grad = g
    assert torch.get_default_dtype() == torch.float32
    runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=2)
    runner.trace(m, x, y, "cross_entropy", max_iter=2)
    assert torch.get_default_dtype() == torch.float32
    assert m.training
    assert all(p.grad is g for p, g in zip(m.parameters(), grad))
    assert PH.hessian_vector_product is pyhessian.utils.hessian_vector_product and PH.torch is torch


def test_float32_model():
    m, x, y = eig_problem()
    ref = runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, max_iter=200, tol=1e-6)
    res = runner.top_eigenvalues(m.float(), x.astype(np.float32), y, "cross_entropy", k=1, max_iter=200, tol=1e-6)
    assert res["eigenvectors"].dtype == np.float32 and res["settings"]["dtype"] == "float32"
    assert res["eigenvalues"][0] == pytest.approx(ref["eigenvalues"][0], rel=1e-4)


def test_compat_symmetric_eig():
    r = np.random.default_rng(0)
    off = r.normal(size=5)
    a = np.diag(r.normal(size=6)) + np.diag(off, 1) + np.diag(off, -1)
    t = torch.as_tensor(a)
    with compat.torch_eig():
        values, vectors = torch.eig(t, eigenvectors=True)
    assert values.shape == (6, 2) and torch.all(values[:, 1] == 0)
    np.testing.assert_allclose(values[:, 0].numpy(), np.linalg.eigvalsh(a), atol=1e-13)
    v = vectors.numpy()
    np.testing.assert_allclose(a @ v, v * values[:, 0].numpy(), atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(6), atol=1e-13)
    assert compat.symmetric_eig(t).eigenvectors.numel() == 0
    with pytest.raises(HessianApproxError, match="non-symmetric"):
        compat.symmetric_eig(torch.triu(t))
    with pytest.raises(KeyError):  # restored even when the block raises
        with compat.torch_eig():
            raise KeyError
    with pytest.raises(RuntimeError, match="removed"):
        torch.eig(t, eigenvectors=True)


def test_errors():
    m, x, y = eig_problem()
    d = models.num_params(m)
    with pytest.raises(HessianApproxError, match="start vectors have shape"):
        runner.top_eigenvalues(m, x, y, "cross_entropy", k=1, start_vectors=np.ones((1, 5)))
    with pytest.raises(HessianApproxError, match="2 start vectors for k=3"):
        runner.top_eigenvalues(m, x, y, "cross_entropy", k=3, start_vectors=np.ones((2, d)))
    with pytest.raises(HessianApproxError, match="k=0"):
        runner.top_eigenvalues(m, x, y, "cross_entropy", k=0)
    with pytest.raises(HessianApproxError, match="3 probes for max_iter=5"):
        runner.trace(m, x, y, "cross_entropy", max_iter=5, probes=np.ones((3, d)))
    with pytest.raises(HessianApproxError, match=r"\+1 and -1"):
        runner.trace(m, x, y, "cross_entropy", max_iter=1, probes=np.zeros((1, d)))
    with pytest.raises(HessianApproxError, match=f"iters={d + 1}"):
        runner.density(m, x, y, "cross_entropy", iters=d + 1)
    with pytest.raises(HessianApproxError, match="hinge"):
        runner.trace(m, x, y, "hinge")
    with pytest.raises(HessianApproxError, match="float16"):
        runner.trace(m.half(), x, y, "cross_entropy")
    assert PH.torch is torch
