"""Curvature operators against closed forms, finite differences, jax.hessian and known identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_impl import losses, models, operators
from jax_impl.errors import HessianApproxError
from jax_impl.materialize import dense
from tests.helpers import tiny_problem

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout

# float64 throughout: autodiff and the closed forms agree to ~1e-15 relative;
# 1e-10 leaves room for summation order over samples and chunks.
RTOL = 1e-10


def rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b)))


def linear_closed_form(problem, x, loss):
    """H = (1/N) Σ_n kron(φ_n φ_nᵀ, M_n), φ_n = [1, x_n], flat order [bias (C), kernel (D, C)]."""
    p = jax.tree_util.tree_map(np.asarray, problem.params)["Dense_0"]
    logits = x @ p["kernel"] + p["bias"]
    m = np.asarray(losses.output_hessian(loss, jnp.asarray(logits)))
    phi = np.concatenate([np.ones((len(x), 1)), x], axis=1)
    return np.mean([np.kron(np.outer(f, f), mn) for f, mn in zip(phi, m)], axis=0)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_hessian_of_linear_model_matches_closed_form(loss):
    spec, prob, x, _ = tiny_problem(hidden=(), loss=loss, n=9, d=4, c=3)
    # the flat order really is [bias, kernel] (ravel_pytree sorts keys)
    assert list(prob.params["Dense_0"]) == ["bias", "kernel"]
    h = dense(operators.hvp(prob))
    assert rel(h, linear_closed_form(prob, x, loss)) < RTOL
    # for a linear model the GGN is the Hessian
    assert rel(dense(operators.ggn_vp(prob)), h) < RTOL


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_hessian_matches_finite_differences(activation):
    _, prob, _, _ = tiny_problem(hidden=(4,), activation=activation)
    grad = jax.jit(lambda f: operators.gradient(operators.Problem(prob.apply, prob.ell, prob.unravel(f), prob.batches)))
    flat = prob.flat_params
    eps = 1e-5
    cols = [(grad(flat + eps * e) - grad(flat - eps * e)) / (2 * eps) for e in np.eye(prob.dim)]
    h_fd = np.stack(cols, axis=1)
    h = dense(operators.hvp(prob))
    # central differences: truncation O(eps^2 |g'''|) ~ 1e-10, rounding ~ 1e-16/eps ~ 1e-11
    assert rel(h, h_fd) < 1e-7


def test_hessian_matches_jax_hessian_and_is_symmetric():
    _, prob, x, y = tiny_problem(hidden=(3, 4), n=10)
    full = lambda f: jnp.mean(prob.ell(prob.apply(prob.unravel(f), jnp.asarray(x)), jnp.asarray(y)))
    h_ref = jax.jit(jax.hessian(full))(prob.flat_params)  # jitted: one compilation, not eager op-by-op
    h = dense(operators.hvp(prob), chunk_size=7)
    assert rel(h, h_ref) < RTOL
    assert rel(h, h.T) < RTOL


def test_remainder_chunk_gives_exact_mean():
    _, whole, x, y = tiny_problem(n=23, chunk_size=1000)
    _, chunked, _, _ = tiny_problem(n=23, chunk_size=5)
    assert chunked.batches.x.shape == (5, 5, 5)  # 23 samples -> 5 chunks of 5, 2 padded
    v = jnp.asarray(np.random.default_rng(1).normal(size=whole.dim))
    assert abs(float(operators.loss(chunked)) - float(operators.loss(whole))) < 1e-14
    for op in (operators.hvp, operators.ggn_vp, operators.empirical_fisher_vp):
        assert rel(op(chunked)(v), op(whole)(v)) < RTOL


def layer_blocks(prob):
    """Index ranges of each layer's parameters in the flat order."""
    flat, _ = ravel_pytree(prob.params)
    sizes = {k: sum(a.size for a in v.values()) for k, v in prob.params.items()}
    start, out = 0, {}
    for k in sorted(sizes):
        out[k] = slice(start, start + sizes[k])
        start += sizes[k]
    assert start == flat.size
    return out


def test_relu_identities_diag_blocks_equal_ggn_cross_blocks_differ():
    _, prob, _, _ = tiny_problem(hidden=(6, 5), activation="relu", n=30)
    h = dense(operators.hvp(prob))
    g = dense(operators.ggn_vp(prob))
    blocks = list(layer_blocks(prob).values())
    for b in blocks:
        assert rel(h[b, b], g[b, b]) < RTOL
    np.testing.assert_allclose(np.diag(h), np.diag(g), rtol=0, atol=RTOL * np.abs(h).max())
    assert rel(h[blocks[0], blocks[1]], g[blocks[0], blocks[1]]) > 1e-3


def test_tanh_diag_blocks_differ_from_ggn():
    # the ReLU identity must not hold by accident of the implementation
    _, prob, _, _ = tiny_problem(hidden=(6,), activation="tanh", n=30)
    h = dense(operators.hvp(prob))
    g = dense(operators.ggn_vp(prob))
    b = layer_blocks(prob)["Dense_0"]
    assert rel(h[b, b], g[b, b]) > 1e-3


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_is_psd_and_matches_explicit_jacobian(loss):
    _, prob, x, y = tiny_problem(hidden=(5,), activation="relu", loss=loss, n=15)
    g = dense(operators.ggn_vp(prob))
    f = jax.jit(lambda fl: prob.apply(prob.unravel(fl), jnp.asarray(x)))  # jitted: eager dispatch cost more
    jac = np.asarray(jax.jit(jax.jacobian(f))(prob.flat_params))  # (N, C, d)
    m = np.asarray(losses.output_hessian(loss, f(prob.flat_params)))
    g_ref = np.einsum("ncd,nce,nef->df", jac, m, jac) / len(x)
    assert rel(g, g_ref) < RTOL
    assert np.linalg.eigvalsh(g).min() > -1e-12 * np.abs(g).max()


def test_empirical_fisher_matches_per_sample_gradients():
    _, prob, x, y = tiny_problem(hidden=(4,), n=11)
    per = jax.jit(jax.vmap(jax.grad(lambda fl, xi, yi: prob.ell(prob.apply(prob.unravel(fl), xi[None]), yi[None])[0]),
                           in_axes=(None, 0, 0)))(prob.flat_params, jnp.asarray(x), jnp.asarray(y))
    ref = np.asarray(per).T @ np.asarray(per) / len(x)
    assert rel(dense(operators.empirical_fisher_vp(prob)), ref) < RTOL


def test_mc_fisher_converges_to_ggn():
    _, prob, _, _ = tiny_problem(hidden=(4,), n=8)
    v = jnp.asarray(np.random.default_rng(2).normal(size=prob.dim))
    g = np.asarray(operators.ggn_vp(prob)(v))
    one = lambda key: operators.fisher_mc_vp(prob, key, mc_samples=50)(v)
    draws = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(0), 40)))
    mean = draws.mean(0)
    se = draws.std(0, ddof=1) / np.sqrt(len(draws))
    # each entry's mean over 2000 label draws within 5 standard errors of the GGN product
    assert np.all(np.abs(mean - g) <= 5 * se + 1e-12)


def test_make_batches_rejects_bad_data():
    with pytest.raises(HessianApproxError, match="do not match"):
        operators.make_batches(np.zeros((4, 3)), np.zeros(5))
    with pytest.raises(HessianApproxError, match="NaN or Inf"):
        operators.make_batches(np.full((4, 3), np.nan), np.zeros(4))


# ---- every architecture of the shared registry (MLP and CNN) -------------------------------
from tests import cases  # noqa: E402

@pytest.mark.parametrize("c", cases.params())
def test_chunked_dense_hessian_equals_jax_hessian(c):
    """Chunked jvp-of-grad columns (3 samples a chunk, zero-weight padding) against jax.hessian of the mean loss."""
    prob = c.problem(chunk_size=4, n=7)
    x, y = c.data(7)
    full = lambda f: jnp.mean(prob.ell(prob.apply(prob.unravel(f), jnp.asarray(x)), jnp.asarray(y)))
    h_ref = np.asarray(jax.jit(jax.hessian(full))(prob.flat_params))  # jitted: eager dispatch cost 5-15 s a CNN
    h = dense(operators.hvp(prob), chunk_size=32)
    assert rel(h, h_ref) < RTOL
    assert rel(h, h.T) < 1e-13


@pytest.mark.parametrize("c", cases.params([cases.case("cnn-max", "relu", loss) for loss in cases.LOSSES]))
def test_piecewise_linear_cnn_has_equal_hessian_and_ggn_diagonals(c):
    """ReLU and max-pool are piecewise linear: each layer's diagonal block of H equals the GGN's."""
    prob = c.problem()
    h = dense(operators.hvp(prob))
    g = dense(operators.ggn_vp(prob))
    assert rel(np.diag(h), np.diag(g)) < RTOL
    assert rel(h, g) > 1e-3  # the cross-layer blocks differ: the test can tell the two apart
