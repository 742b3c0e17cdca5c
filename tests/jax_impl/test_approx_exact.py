"""The exact Hessian and GGN from layer structure against jax.hessian and per-sample Jacobians (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import operators
from jax_impl.approx.exact import ggn_by_structure, hessian_by_structure
from jax_impl.errors import HessianApproxError
from tests.cases import ARCHITECTURES, LOSSES, Case

# every architecture of the registry once, the losses alternating (each loss on MLPs and CNNs)
RELU = [pytest.param(Case(a, "relu", LOSSES[i % 2], n=7), id=f"{a}-{LOSSES[i % 2]}")
        for i, a in enumerate(ARCHITECTURES)]
SMOOTH = [pytest.param(Case("mlp2", "tanh", "mse", n=7), id="mlp2-tanh-mse"),
          pytest.param(Case("cnn-max", "sigmoid", "cross_entropy", n=7), id="cnn-max-sigmoid-cross_entropy")]


def reference_hessian(prob):
    """jax.hessian of the weighted loss over the flat parameters (independent of the operators' Hvp)."""
    def loss(flat):
        p = prob.unravel(flat)
        x, y, w = (prob.batches.x.reshape(-1, *prob.batches.x.shape[2:]), prob.batches.y.reshape(-1),
                   prob.batches.w.reshape(-1))
        return jnp.sum(w * prob.ell(prob.apply(p, x), y))

    return np.asarray(jax.jit(jax.hessian(loss))(prob.flat_params))


def reference_ggn(prob):
    """Σ_n w_n J_nᵀ H_n J_n from jax.jacfwd of the outputs and jax.hessian of the per-sample loss."""
    x, y, w = (prob.batches.x.reshape(-1, *prob.batches.x.shape[2:]), prob.batches.y.reshape(-1),
               prob.batches.w.reshape(-1))
    f = lambda flat: prob.apply(prob.unravel(flat), x)  # noqa: E731
    jac = np.asarray(jax.jit(jax.jacfwd(f))(prob.flat_params))  # (N, C, d)
    logits = f(prob.flat_params)
    h = np.asarray(jax.jit(jax.vmap(jax.hessian(lambda o, t: prob.ell(o[None], t[None])[0])))(logits, y))  # (N, C, C)
    return np.einsum("n,ncd,nce,nef->df", np.asarray(w), jac, h, jac)


@pytest.mark.parametrize("c", RELU)
def test_hessian_of_piecewise_linear_networks(c, x64):
    prob = c.problem("float64", chunk_size=3)  # 7 samples in 3 chunks, the last padded
    ref = reference_hessian(prob)
    got = hessian_by_structure(prob)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())  # float64 round-off
    ggn = reference_ggn(prob)
    assert np.abs(ref - ggn).max() > 1e-3 * np.abs(ref).max()  # the residual blocks matter here


@pytest.mark.parametrize("c", RELU[1:3] + SMOOTH)
def test_ggn_of_any_activation(c, x64):
    prob = c.problem("float64", chunk_size=3)
    ref = reference_ggn(prob)
    np.testing.assert_allclose(ggn_by_structure(prob), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_float32_agrees_with_float64():
    """Production dtype: float32 within 1e-5 of the float64 matrix (relative to its largest entry;
    sums of ~10² float32 products of O(1) terms)."""
    c = Case("cnn-max", "relu", "cross_entropy", n=7)
    got = hessian_by_structure(c.problem("float32", chunk_size=4))
    assert got.dtype == np.float32
    with jax.enable_x64(True):
        ref = hessian_by_structure(c.problem("float64", chunk_size=4))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_refusals_are_one_line():
    c = Case("mlp2", "tanh", "cross_entropy", n=4)
    with pytest.raises(HessianApproxError, match="needs a piecewise-linear network, but layer 1 is tanh"):
        hessian_by_structure(c.problem("float32"))
    plain = c.problem("float32")
    plain = operators.Problem(lambda p, x: plain.apply(p, x), plain.ell, plain.params, plain.batches)
    with pytest.raises(HessianApproxError, match="cannot tell the network's layers"):
        ggn_by_structure(plain)
