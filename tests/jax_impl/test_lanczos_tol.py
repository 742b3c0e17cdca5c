"""Jittable Lanczos to a residual tolerance (jax_impl.algorithms.lanczos_tol), against dense eigh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.algorithms.lanczos_tol import lanczos_tol, padded_ritz
from jax_impl.algorithms.operator import as_operator
from jax_impl.errors import HessianApproxError


def spectrum_matrix(d=120, top=(10.0, 8.0, 7.5), seed=0):
    """A = Q diag(top, uniform(-1, 1)) Qᵀ in float64 (numpy), eigenvalues known."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    ev = np.concatenate([top, rng.uniform(-1, 1, d - len(top))])
    return (q * ev) @ q.T, np.sort(ev)[::-1], q[:, : len(top)]


def test_padded_ritz_equals_eigh_of_the_leading_block():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=12), np.abs(rng.normal(size=12))
    m = 7
    theta, s = padded_ritz(jnp.asarray(a), jnp.asarray(b), jnp.asarray(m))
    t = np.diag(a[:m]) + np.diag(b[: m - 1], 1) + np.diag(b[: m - 1], -1)
    w, v = np.linalg.eigh(t)
    np.testing.assert_allclose(np.asarray(theta)[-m:], w, rtol=1e-5, atol=1e-5)
    # the block's eigenvectors live in its rows only; same vectors up to sign
    blk = np.asarray(s)[:, -m:]
    assert np.all(blk[m:] == 0)
    np.testing.assert_allclose(np.abs(np.sum(blk[:m] * v, axis=0)), 1, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_values_within_tol_of_dense_eigh(k):
    a, ev, _ = spectrum_matrix()
    op = as_operator(jnp.asarray(a, jnp.float32))
    tol = 1e-4
    r = lanczos_tol(op, jax.random.PRNGKey(0), k=k, tol=tol)
    assert bool(np.all(r.converged))
    # residual bound: an eigenvalue within tol * |theta|max; the top ones are the ones found
    # (gaps 2 and 0.5 are far above the bound), plus float32 rounding of A v (~1e-6 |A|)
    np.testing.assert_allclose(np.asarray(r.eigenvalues), ev[:k], atol=tol * 10 + 1e-5)
    assert int(r.matvecs) < 60


def test_same_inside_jit():
    a, _, _ = spectrum_matrix()
    op = as_operator(jnp.asarray(a, jnp.float32))
    key = jax.random.PRNGKey(3)
    eager = lanczos_tol(op, key, k=2, tol=1e-4)
    jitted = jax.jit(lambda kk: lanczos_tol(op, kk, k=2, tol=1e-4))(key)
    assert int(eager.matvecs) == int(jitted.matvecs)
    np.testing.assert_allclose(np.asarray(eager.eigenvalues), np.asarray(jitted.eigenvalues), rtol=1e-5)


def test_warm_start_needs_fewer_matvecs_than_cold():
    """A slightly perturbed matrix (as between two measurements of training): starting from the
    previous top Ritz vector reaches the same tolerance in fewer matvecs than a random start."""
    a, ev, _ = spectrum_matrix(top=(10.0, 9.0, 8.5))
    rng = np.random.default_rng(2)
    e = rng.normal(size=a.shape)
    b = a + 0.01 * (e + e.T) / 2
    op_a, op_b = as_operator(jnp.asarray(a, jnp.float32)), as_operator(jnp.asarray(b, jnp.float32))
    tol = 1e-4
    prev = lanczos_tol(op_a, jax.random.PRNGKey(0), k=1, tol=tol)
    run_b = jax.jit(lambda v0: lanczos_tol(op_b, jax.random.PRNGKey(1), k=1, tol=tol, v0=v0))  # one compilation
    cold = [int(run_b(jax.random.normal(jax.random.PRNGKey(s), (op_b.dim,))).matvecs) for s in range(5)]
    warm_v0 = prev.eigenvectors[0] + 0.1 * jax.random.normal(jax.random.PRNGKey(9), (op_b.dim,)) / np.sqrt(op_b.dim)
    warm = run_b(warm_v0)
    assert bool(warm.converged[0])
    assert int(warm.matvecs) < min(cold), (int(warm.matvecs), cold)
    np.testing.assert_allclose(float(warm.eigenvalues[0]), np.linalg.eigvalsh(b)[-1], atol=tol * 10 + 1e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(k=0), "k=0"), (dict(k=5, max_steps=3), "max_steps=3"), (dict(min_steps=100, max_steps=50), "min_steps=100"),
    (dict(tol=0.0), "tol=0.0"), (dict(tol=float("nan")), "tol=nan"),
])
def test_bad_arguments_are_one_line_errors(kwargs, words):
    op = as_operator(jnp.eye(60, dtype=jnp.float32))
    with pytest.raises(HessianApproxError, match=words.replace("(", r"\(")):
        lanczos_tol(op, jax.random.PRNGKey(0), **kwargs)
