"""Tests of jax_impl.algorithms against numpy/scipy eigh, closed forms and PyHessian itself."""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.algorithms import (
    as_operator,
    EigResult,
    TraceResult,
    eigh_descending,
    eigvalsh_descending,
    hutchinson,
    lanczos,
    lanczos_tridiag,
    power_iteration,
    rademacher_probe,
    slq,
    spectral_density,
    trace_pyhessian,
    tridiagonal,
)
from jax_impl.algorithms.hutchinson import default_batch_size, hutchinson_diagonal, normal_vector, rademacher_vector
from jax_impl.algorithms.lanczos import default_breakdown_tol, lanczos_init_state, lanczos_step_fn
from jax_impl.errors import HessianApproxError

# float64 for this module (jax.enable_x64 per test, no global config change); the float32
# test at the end switches it off for its body, as in production.
pytestmark = pytest.mark.usefixtures("x64")


def sym_matrix(eigenvalues, seed=0):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q; returns (A, Q)."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    a = (q * lam) @ q.T
    return (a + a.T) / 2, q


def as_matvec(a):
    """The float64 Operator of the dense matrix ``a``."""
    return as_operator(jnp.asarray(a))


def decaying_spectrum(dim=300):
    """Ten well-separated outliers 10 * 0.8^i over a bulk in [-0.5, 0.5]."""
    rng = np.random.default_rng(1)
    return np.concatenate([10.0 * 0.8 ** np.arange(10), rng.uniform(-0.5, 0.5, dim - 10)])


MIXED = np.concatenate([[20.0, 15.0, 12.0], np.linspace(-8.0, 3.0, 57)])  # negative eigenvalues

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- dense


def test_eigh_descending_matches_numpy():
    lam = MIXED
    a, _ = sym_matrix(lam, seed=3)
    values, vectors = eigh_descending(jnp.asarray(a))
    np.testing.assert_allclose(values, np.sort(lam)[::-1], atol=1e-12)
    assert np.all(np.diff(np.asarray(values)) <= 0)
    np.testing.assert_allclose(a @ np.asarray(vectors), np.asarray(vectors) * np.asarray(values), atol=1e-11)
    np.testing.assert_allclose(eigvalsh_descending(jnp.asarray(a)), np.sort(lam)[::-1], atol=1e-12)


# ----------------------------------------------------------------------------- lanczos


def test_lanczos_top10_matches_eigh():
    lam = decaying_spectrum(300)
    a, q = sym_matrix(lam, seed=0)
    ref = np.linalg.eigh(a)[0][::-1][:10]
    res = lanczos(as_matvec(a), KEY, k=10)
    assert isinstance(res, EigResult)
    assert res.eigenvalues.dtype == jnp.float64 and res.eigenvectors.shape == (10, 300)
    assert int(res.matvecs) == 40  # default min(dim, max(3k, 40))
    np.testing.assert_array_less(np.abs(np.asarray(res.eigenvalues) - ref) / np.abs(ref), 1e-6)
    assert np.all(np.diff(np.asarray(res.eigenvalues)) < 0)
    y, theta = np.asarray(res.eigenvectors), np.asarray(res.eigenvalues)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-12)
    true_res = np.linalg.norm(y @ a - theta[:, None] * y, axis=1)
    assert np.all(true_res < 1e-5 * lam.max())
    assert np.all(np.asarray(res.residuals) < 1e-5 * lam.max())
    np.testing.assert_allclose(res.residuals, true_res, atol=1e-11)
    np.testing.assert_allclose(np.abs(np.sum(y * q[:, :10].T, axis=1)), 1.0, atol=1e-8)


def test_lanczos_negative_spectrum_and_from_inside():
    a, _ = sym_matrix(MIXED, seed=4)
    lam_max = MIXED.max()
    res = lanczos(as_matvec(a), KEY, k=3, num_steps=30)
    np.testing.assert_allclose(res.eigenvalues, [20.0, 15.0, 12.0], rtol=1e-8)
    assert np.all(np.asarray(res.eigenvalues) <= lam_max + 1e-12)  # from inside
    assert np.all(np.asarray(res.residuals) < 1e-6)


def test_lanczos_tridiag_interlacing_orthonormality_and_projection():
    a, _ = sym_matrix(MIXED, seed=5)
    v0 = jnp.asarray(np.random.default_rng(2).standard_normal(MIXED.size))
    basis, alphas, betas = lanczos_tridiag(as_matvec(a), v0, 25)
    v, t = np.asarray(basis), np.asarray(tridiagonal(alphas, betas))
    np.testing.assert_allclose(v @ v.T, np.eye(25), atol=1e-13)
    np.testing.assert_allclose(v @ a @ v.T, t, atol=1e-12)
    np.testing.assert_allclose(v[0], np.asarray(v0) / np.linalg.norm(v0), atol=1e-15)
    # Cauchy interlacing between the Ritz values of consecutive steps.
    for m in range(1, 25):
        small, big = np.linalg.eigvalsh(t[:m, :m]), np.linalg.eigvalsh(t[: m + 1, : m + 1])
        assert np.all(big[:-1] <= small + 1e-12) and np.all(small <= big[1:] + 1e-12)
    # Ritz values approach the extremes from inside, monotonically in the step count.
    tops = [np.linalg.eigvalsh(t[:m, :m])[-1] for m in range(1, 26)]
    bottoms = [np.linalg.eigvalsh(t[:m, :m])[0] for m in range(1, 26)]
    assert np.all(np.diff(tops) >= -1e-12) and np.all(np.diff(bottoms) <= 1e-12)
    assert tops[-1] <= MIXED.max() + 1e-12 and bottoms[-1] >= MIXED.min() - 1e-12


def test_lanczos_breakdown_restarts_with_fresh_vector():
    # Three distinct eigenvalues: the Krylov space of any v0 is 3-dimensional.
    lam = np.repeat([3.0, 1.0, -2.0], [5, 7, 8])
    a, _ = sym_matrix(lam, seed=6)
    v0 = jnp.asarray(np.random.default_rng(3).standard_normal(20))
    basis, alphas, betas = lanczos_tridiag(as_matvec(a), v0, 20, key=jax.random.PRNGKey(1))
    v, t = np.asarray(basis), np.asarray(tridiagonal(alphas, betas))
    assert np.all(np.isfinite(v))
    assert float(betas[2]) == 0.0  # breakdown recorded as a zero coupling
    np.testing.assert_allclose(v @ v.T, np.eye(20), atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(t), np.sort(lam), atol=1e-10)


def test_lanczos_segments_match_the_single_array_loop():
    # 70 steps: a basis of three segments (SEGMENT_ROWS = 24), and four distinct eigenvalues, so
    # the Krylov space breaks down every four steps, across the segment boundaries too.
    lam = np.repeat([3.0, 1.0, -2.0, 0.5], 20)
    a, _ = sym_matrix(lam, seed=7)
    op, m, key = as_matvec(a), 70, jax.random.PRNGKey(1)
    v0 = jnp.asarray(np.random.default_rng(4).standard_normal(lam.size))
    basis, alphas, betas = lanczos_tridiag(op, v0, m, key=key)
    step = lanczos_step_fn(op, key, default_breakdown_tol(lam.size, jnp.float64), m - 1)
    one_array, alphas1, betas1, _ = jax.lax.fori_loop(0, m, step, lanczos_init_state(v0, m))
    v, t = np.asarray(basis), np.asarray(tridiagonal(alphas, betas))
    np.testing.assert_allclose(v @ v.T, np.eye(m), atol=1e-12)
    np.testing.assert_allclose(v @ a @ v.T, t, atol=1e-11)
    np.testing.assert_array_equal(np.asarray(betas) == 0, np.asarray(betas1) == 0)  # the same restarts
    assert int(np.sum(np.asarray(betas)[:-1] == 0)) >= 10
    ritz = np.linalg.eigvalsh(t)
    np.testing.assert_allclose(ritz, np.linalg.eigvalsh(np.asarray(tridiagonal(alphas1, betas1))), atol=1e-10)
    ends = np.flatnonzero(np.asarray(betas)[:-1] == 0) + 1  # blocks of T closed by a breakdown
    for lo, hi in zip(np.concatenate([[0], ends[:-1]]), ends):
        block = np.linalg.eigvalsh(t[lo:hi, lo:hi])
        assert np.min(np.abs(block[:, None] - np.unique(lam)[None, :]), axis=1).max() < 1e-10
    np.testing.assert_allclose(v[:10], np.asarray(one_array)[:10], atol=1e-12)  # before rounding takes over


def test_lanczos_ritz_vectors_from_the_segments():
    a, _ = sym_matrix(decaying_spectrum(), seed=8)
    res = lanczos(as_matvec(a), KEY, k=5, num_steps=60)  # 61 rows: three segments
    y = np.asarray(res.eigenvectors)
    np.testing.assert_allclose(y @ y.T, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y @ a - np.asarray(res.eigenvalues)[:, None] * y, axis=1),
                               res.residuals, atol=1e-10)


@pytest.mark.parametrize("x64_on", [False, True])
def test_probes_are_the_jax_random_draws_bit_for_bit(x64_on):
    with jax.enable_x64(x64_on):
        dt = jnp.float64 if x64_on else jnp.float32
        # Each pair inside one jitted program, as the algorithms draw them (eagerly, every jnp call
        # compiled a program of its own per shape: 10 s a parametrization on 2 cores)
        pairs = jax.jit(lambda key, n: (
            (rademacher_vector(key, n, dt), jax.random.rademacher(key, (n,), dt)),
            (normal_vector(key, (n,), jnp.float32), jax.random.normal(key, (n,), jnp.float32)),
            (normal_vector(key, (3, n), dt), jax.random.normal(key, (3, n), dt))), static_argnums=1)
        for key in (jax.random.PRNGKey(3), jax.random.key(5), jax.random.key(2, impl="rbg")):  # rbg: fallback
            for n in (1, 1001):
                for ours, theirs in pairs(key, n):
                    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
        rows = jax.jit(jax.vmap(lambda r: normal_vector(KEY, (3, 999), dt, row=r)))(jnp.arange(3))
        assert jnp.array_equal(rows, jax.random.normal(KEY, (3, 999), dt))
        probes = jax.jit(jax.vmap(lambda i: rademacher_probe(KEY, i, 999)))(jnp.arange(5))
        loop = [jax.random.rademacher(jax.random.fold_in(KEY, i), (999,), jnp.float32) for i in range(5)]
        assert jnp.array_equal(probes, jnp.stack(loop))


def test_default_batch_size_is_a_power_of_two_that_shrinks_with_the_dimension():
    sizes = [default_batch_size(d) for d in (1, 5994, 7960, 50890, 101770, 203530, 10**7)]
    assert sizes == [32, 32, 32, 16, 8, 4, 4]


# ----------------------------------------------------------------------------- power iteration


def test_power_iteration_top_k_within_tolerance():
    lam = np.concatenate([[10.0, 5.0, 2.5], np.linspace(-1.0, 1.0, 47)])
    a, q = sym_matrix(lam, seed=7)
    for tol, bound in ((1e-3, 1e-2), (1e-10, 1e-5)):
        res = power_iteration(as_matvec(a), KEY, k=3, max_iter=2000, tol=tol)
        assert bool(np.all(res.converged))
        np.testing.assert_allclose(res.eigenvalues, lam[:3], rtol=bound)
        assert int(res.matvecs) == int(np.sum(res.matvecs_per_pair))
    # tol=1e-10: eigenvectors aligned with the truth, only PyHessian's 1e-6 normalization bias left.
    overlap = np.abs(np.sum(np.asarray(res.eigenvectors) * q[:, :3].T, axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-5)
    # PyHessian finds the largest |lambda| first: here the negative one.
    a2, _ = sym_matrix([1.0, 0.5, -4.0, 0.1], seed=8)
    res2 = power_iteration(as_matvec(a2), KEY, k=2, max_iter=500, tol=1e-9)
    np.testing.assert_allclose(res2.eigenvalues, [-4.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(res2.sorted().eigenvalues, [1.0, -4.0], rtol=1e-5)


class _Quadratic:
    """Builds a torch module whose loss 0.5 w^T A w has Hessian A (torch imported lazily)."""

    @staticmethod
    def make(a):
        import torch

        class Quadratic(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("a", torch.tensor(a, dtype=torch.float64))
                self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, len(a), dtype=torch.float64))

            def forward(self, x):
                return 0.5 * self.w @ (self.a @ self.w) + 0.0 * x.sum()

        return Quadratic()


def _pyhessian(a, monkeypatch):
    """A pyhessian.hessian on the quadratic model, plus a per-start-vector hvp counter."""
    torch = pytest.importorskip("torch")
    module = importlib.import_module("pyhessian.hessian")
    data = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    hess = module.hessian(_Quadratic.make(a), lambda out, target: out, data=data, cuda=False)
    calls = {"draws": 0, "hvp": []}
    original = module.hessian_vector_product

    def counting_hvp(grads, params, v):
        calls["hvp"].append(calls["draws"])
        return original(grads, params, v)

    monkeypatch.setattr(module, "hessian_vector_product", counting_hvp)
    return torch, hess, calls


@pytest.mark.filterwarnings("ignore:Using backward")
@pytest.mark.parametrize("max_iter,tol", [(100, 1e-3), (7, 1e-6), (300, 1e-9)])
def test_power_iteration_matches_pyhessian_iterates(monkeypatch, max_iter, tol):
    dim, k = 12, 3
    lam = np.array([6.0, 4.5, 4.0, 2.0] + list(np.linspace(0.1, 1.5, dim - 4)))
    a, _ = sym_matrix(lam, seed=9)
    v0 = np.random.default_rng(10).standard_normal((k, dim))
    torch, hess, calls = _pyhessian(a, monkeypatch)

    def fake_randn(*size, **kwargs):
        out = torch.tensor(v0[calls["draws"]], dtype=torch.float64)
        calls["draws"] += 1
        return out

    monkeypatch.setattr(torch, "randn", fake_randn)
    ref_values, ref_vectors = hess.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    ref_vectors = np.stack([vec[0].detach().numpy() for vec in ref_vectors])
    ref_counts = np.bincount(np.asarray(calls["hvp"]) - 1, minlength=k)

    res = power_iteration(as_matvec(a), None, k=k, max_iter=max_iter, tol=tol, v0=jnp.asarray(v0))
    assert res.eigenvalues.dtype == jnp.float64
    np.testing.assert_allclose(res.eigenvalues, ref_values, rtol=1e-10)
    np.testing.assert_allclose(res.eigenvectors, ref_vectors, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(res.matvecs_per_pair, ref_counts)
    assert int(res.matvecs) == len(calls["hvp"])
    assert bool(np.all(res.converged)) == bool(np.all(ref_counts < max_iter))


# ----------------------------------------------------------------------------- hutchinson


def test_hutchinson_within_three_standard_errors():
    a, _ = sym_matrix(MIXED, seed=11)
    exact = float(np.trace(a))
    estimate = jax.jit(lambda key: hutchinson(as_matvec(a), key, num_samples=200))
    for seed in range(5):
        res = estimate(jax.random.PRNGKey(seed))
        assert isinstance(res, TraceResult) and int(res.matvecs) == 200
        assert abs(float(res.trace) - exact) < 3 * float(res.stderr)


def test_hutchinson_running_arrays_probes_and_batching():
    a, _ = sym_matrix(MIXED, seed=12)
    dim, n = MIXED.size, 50
    res = hutchinson(as_matvec(a), KEY, num_samples=n, batch_size=7)
    est = np.asarray(res.estimates)
    probes = np.stack([np.asarray(rademacher_probe(KEY, i, dim, jnp.float64)) for i in range(n)])
    np.testing.assert_allclose(est, np.einsum("ij,jk,ik->i", probes, a, probes), rtol=1e-12)
    counts = np.arange(1, n + 1)
    np.testing.assert_allclose(res.running_mean, np.cumsum(est) / counts, rtol=1e-12)
    ref_se = [np.std(est[:c], ddof=1) / math.sqrt(c) for c in counts[1:]]
    np.testing.assert_allclose(np.asarray(res.running_stderr)[1:], ref_se, rtol=1e-10)
    assert np.isnan(res.running_stderr[0])
    assert float(res.trace) == float(res.running_mean[-1]) and float(res.stderr) == float(res.running_stderr[-1])
    other = hutchinson(as_matvec(a), KEY, num_samples=n, batch_size=64)
    np.testing.assert_allclose(other.estimates, est, rtol=1e-12)
    record = json.loads(json.dumps(res.to_dict()))
    assert record["matvecs"] == n and record["running_stderr"][0] is None


def test_hutchinson_diagonal_batches_and_matches_the_trace_estimate():
    a, _ = sym_matrix(MIXED, seed=13)
    runs = [hutchinson_diagonal(as_matvec(a), KEY, num_samples=30, batch_size=b) for b in (1, 7, None)]
    for r in runs[1:]:
        np.testing.assert_allclose(r.diagonal, runs[0].diagonal, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(r.stderr, runs[0].stderr, rtol=1e-10)
    trace = hutchinson(as_matvec(a), KEY, num_samples=30)
    np.testing.assert_allclose(float(np.sum(runs[0].diagonal)), float(trace.trace), rtol=1e-10)


def _numpy_pyhessian_trace(estimates, max_iter, tol):
    """PyHessian's trace() loop, on precomputed per-probe estimates."""
    used, trace = [], 0.0
    for i in range(max_iter):
        used.append(estimates[i])
        if abs(np.mean(used) - trace) / (trace + 1e-6) < tol:
            return used
        trace = np.mean(used)
    return used


@pytest.mark.filterwarnings("ignore:Using backward")
@pytest.mark.parametrize("spectrum,tol", [("spd", 1e-2), ("spd", 1e-3), ("mixed", 1e-3)])
def test_trace_pyhessian_matches_pyhessian(monkeypatch, spectrum, tol):
    lam = np.linspace(0.5, 3.0, 30) if spectrum == "spd" else np.linspace(-5.0, 1.0, 30)
    a, _ = sym_matrix(lam, seed=13)
    max_iter = 100
    probes = np.stack([np.asarray(rademacher_probe(KEY, i, 30, jnp.float64)) for i in range(max_iter)])
    torch, hess, calls = _pyhessian(a, monkeypatch)

    def fake_randint_like(p, high=2, device=None):
        out = torch.tensor(probes[calls["draws"]], dtype=torch.float64)
        calls["draws"] += 1
        return out

    monkeypatch.setattr(torch, "randint_like", fake_randint_like)
    ref = hess.trace(maxIter=max_iter, tol=tol)

    res = trace_pyhessian(as_matvec(a), KEY, max_iter=max_iter, tol=tol)
    count = int(res.matvecs)
    assert count == len(ref)
    np.testing.assert_allclose(np.asarray(res.estimates)[:count], ref, rtol=1e-12)
    assert np.all(np.isnan(np.asarray(res.estimates)[count:]))
    np.testing.assert_allclose(float(res.trace), np.mean(ref), rtol=1e-12)
    est_all = np.einsum("ij,jk,ik->i", probes, a, probes)
    assert len(_numpy_pyhessian_trace(est_all, max_iter, tol)) == count
    if spectrum == "mixed":
        assert count == 2  # negative running mean: PyHessian's ratio is negative and it stops
    record = json.loads(json.dumps(res.to_dict()))
    assert len(record["estimates"]) == count


# ----------------------------------------------------------------------------- slq and density


def test_slq_full_steps_reproduces_spectrum_and_weights():
    dim = 40
    lam = np.linspace(-2.0, 6.0, dim) + np.random.default_rng(14).uniform(0, 0.05, dim)
    a, q = sym_matrix(lam, seed=15)
    nodes, weights = slq(as_matvec(a), KEY, num_steps=dim, num_runs=3)
    assert nodes.shape == weights.shape == (3, dim)
    order = np.argsort(lam)
    for r in range(3):
        np.testing.assert_allclose(nodes[r], lam[order], atol=1e-10)
        v = np.asarray(rademacher_probe(jax.random.split(KEY)[0], r, dim, jnp.float64))
        exact_weights = (q.T @ v) ** 2 / dim
        np.testing.assert_allclose(weights[r], exact_weights[order], atol=1e-10)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, atol=1e-12)


def test_spectral_density_integrates_to_one_and_peaks_at_clusters():
    rng = np.random.default_rng(16)
    centers = (-2.0, 1.0, 5.0)
    lam = np.concatenate([c + rng.uniform(-0.01, 0.01, 20) for c in centers])
    a, _ = sym_matrix(lam, seed=17)
    nodes, weights = slq(as_matvec(a), KEY, num_steps=30, num_runs=2)
    density, grid = spectral_density(nodes, weights)
    density, grid = np.asarray(density), np.asarray(grid)
    dx = grid[1] - grid[0]
    assert density.shape == grid.shape == (10000,)
    np.testing.assert_allclose(density.sum() * dx, 1.0, rtol=1e-12)
    for c in centers:
        near = np.abs(grid - c) < 0.1
        assert 0.2 < density[near].sum() * dx < 0.5
    for gap in (-0.5, 3.0):
        assert density[np.argmin(np.abs(grid - gap))] < 1e-6 * density.max()


def _density_generate_reference(eigenvalues, weights, num_bins, sigma_squared, overhead):
    """PyHessian's density_plot.density_generate, written out from the published formula."""
    eigenvalues, weights = np.array(eigenvalues), np.array(weights)
    lambda_max = np.mean(np.max(eigenvalues, axis=1)) + overhead
    lambda_min = np.mean(np.min(eigenvalues, axis=1)) - overhead
    grids = np.linspace(lambda_min, lambda_max, num=num_bins)
    sigma = sigma_squared * max(1, lambda_max - lambda_min)  # passed as gaussian's sigma_squared
    out = np.zeros((eigenvalues.shape[0], num_bins))
    for i in range(eigenvalues.shape[0]):
        for j in range(num_bins):
            g = np.exp(-((grids[j] - eigenvalues[i, :]) ** 2) / (2.0 * sigma)) / np.sqrt(2 * np.pi * sigma)
            out[i, j] = np.sum(g * weights[i, :])
    density = np.mean(out, axis=0)
    return density / (np.sum(density) * (grids[1] - grids[0])), grids


@pytest.mark.parametrize("sigma_squared,spread", [(1e-2, 0.5), (1e-3, 3.0)])
def test_spectral_density_matches_pyhessian_formula(sigma_squared, spread):
    rng = np.random.default_rng(18)
    nodes = np.sort(rng.uniform(-spread, spread, (2, 5)), axis=1)
    weights = rng.dirichlet(np.ones(5), size=2)
    density, grid = spectral_density(jnp.asarray(nodes), jnp.asarray(weights), num_bins=300,
                                     sigma_squared=sigma_squared, overhead=0.05)
    ref_density, ref_grid = _density_generate_reference(nodes, weights, 300, sigma_squared, 0.05)
    np.testing.assert_allclose(grid, ref_grid, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(density, ref_density, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- errors


_mv = as_operator(lambda v: 2.0 * v, dim=5)


@pytest.mark.parametrize(
    "call",
    [
        lambda: lanczos(_mv, KEY, k=6),
        lambda: lanczos(_mv, KEY, k=2, num_steps=6),
        lambda: lanczos(_mv, KEY, k=3, num_steps=2),
        lambda: lanczos(_mv, KEY, k=0),
        lambda: lanczos(_mv, KEY, k=2, v0=jnp.ones(4)),
        lambda: lanczos_tridiag(_mv, jnp.ones(5), 6),
        lambda: power_iteration(_mv, KEY, k=6),
        lambda: power_iteration(_mv, KEY, k=2, max_iter=0),
        lambda: power_iteration(_mv, KEY, k=2, v0=jnp.ones((3, 5))),
        lambda: hutchinson(_mv, KEY, num_samples=0),
        lambda: hutchinson(_mv, KEY, batch_size=0),
        lambda: trace_pyhessian(_mv, KEY, max_iter=0),
        lambda: slq(_mv, KEY, num_steps=6),
        lambda: slq(_mv, KEY, num_steps=3, num_runs=0),
        lambda: spectral_density(jnp.ones((2, 3)), jnp.ones((2, 4))),
        lambda: spectral_density(jnp.ones((2, 3)), jnp.ones((2, 3)), num_bins=1),
        lambda: eigh_descending(jnp.ones((2, 3))),
    ],
)
def test_bad_arguments_raise_one_line_errors(call):
    with pytest.raises(HessianApproxError) as info:
        call()
    assert "\n" not in str(info.value) and "; " in str(info.value)


# ----------------------------------------------------------------------------- jit and pytrees


def test_every_public_function_jits_to_the_same_answer():
    dim = 30
    a, _ = sym_matrix(np.linspace(-1.0, 4.0, dim), seed=19)
    mv = as_matvec(a)
    f64 = jnp.float64
    cases = [
        (power_iteration, dict(k=2, max_iter=50, tol=1e-4), ("op", "k", "max_iter")),
        (lanczos, dict(k=3, num_steps=12), ("op", "k", "num_steps")),
        (hutchinson, dict(num_samples=20, batch_size=8), ("op", "num_samples", "batch_size")),
        (trace_pyhessian, dict(max_iter=20), ("op", "max_iter")),
        (slq, dict(num_steps=10, num_runs=2), ("op", "num_steps", "num_runs")),
    ]
    for fn, kwargs, static in cases:
        eager = fn(mv, KEY, **kwargs)
        jitted = jax.jit(fn, static_argnames=static)(op=mv, key=KEY, **kwargs)
        assert type(jitted) is type(eager)
        for x, y in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True)
    v0 = jnp.ones(dim, f64)
    eager = lanczos_tridiag(mv, v0, 10)
    jitted = jax.jit(lanczos_tridiag, static_argnums=(0, 2))(mv, v0, 10)
    for x, y in zip(eager, jitted):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    nodes, weights = slq(mv, KEY, num_steps=10)
    for x, y in zip(spectral_density(nodes, weights, num_bins=100),
                    jax.jit(spectral_density, static_argnames="num_bins")(nodes, weights, num_bins=100)):
        np.testing.assert_allclose(x, y, rtol=1e-9)
    for x, y in zip(eigh_descending(jnp.asarray(a)), jax.jit(eigh_descending)(jnp.asarray(a))):
        np.testing.assert_allclose(np.abs(x), np.abs(y), rtol=1e-9, atol=1e-12)


def test_eager_calls_compile_the_matvec_once_with_its_arrays_as_arguments():
    """A call outside any trace runs a program compiled once per operator; the closed-over matrix is an
    argument of it, not a constant (a 30x30 matrix would show in the program's constants)."""
    a, _ = sym_matrix(np.linspace(-1.0, 4.0, 30), seed=21)
    traced = []
    mat = jnp.asarray(a)

    def matvec(v):
        traced.append(1)  # runs once per trace
        return mat @ v

    op = as_operator(matvec, dim=30, dtype=jnp.float64)
    vs = [jnp.asarray(np.random.default_rng(i).normal(size=30)) for i in range(3)]
    for v in vs:
        np.testing.assert_allclose(op(v), a @ np.asarray(v), rtol=1e-13)  # against numpy
    assert len(traced) == 1  # one trace, then the compiled program: not one per call
    call = op._compiled
    hlo = call.jitted.lower(vs[0], *call.consts).as_text()
    assert [c.shape for c in call.consts] == [(30, 30)] and 'dense<"0x' not in hlo  # an argument, not a constant
    traced.clear()
    jax.jit(op)(vs[0])  # under a trace the plain matvec runs, inlined in the caller's program
    assert len(traced) == 1


def test_float32_default_and_result_records():
    with jax.enable_x64(False):  # float32 as in production: 64-bit JAX off (the module turns it on)
        a, _ = sym_matrix(np.linspace(0.0, 5.0, 20), seed=20)
        mv = as_operator(jnp.asarray(a, jnp.float32))
        res = lanczos(mv, KEY, k=2)
        assert res.eigenvalues.dtype == jnp.float32
        np.testing.assert_allclose(res.eigenvalues, [5.0, np.linspace(0.0, 5.0, 20)[-2]], rtol=1e-4)
        power = power_iteration(mv, KEY, k=2, max_iter=30)
        assert power.eigenvectors.dtype == jnp.float32
        record = json.loads(json.dumps(power.to_dict(include_eigenvectors=True)))
        assert set(record) >= {"eigenvalues", "residuals", "matvecs", "matvecs_per_pair", "converged", "eigenvectors"}
        assert record["matvecs"] == sum(record["matvecs_per_pair"]) and len(record["eigenvectors"]) == 2
        assert hutchinson(mv, KEY, num_samples=4).trace.dtype == jnp.float32
