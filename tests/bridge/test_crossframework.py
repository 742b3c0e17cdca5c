"""The torch twin against the Flax network on the registry's cases: logits, loss, gradient, Hvp, dense Hessian, PyHessian.

The JAX side is plain autodiff of the Flax network (``jax.grad``, ``jax.hessian``, ``jax.jvp``
of the mean loss over the flat parameters), the torch side ``torch_ref.exact`` (autograd twice)
on the twin loaded through ``bridge.convert``; both in float64 and compared after the flat-order
mapping of ``bridge.permutation``. The registry's inputs have a zero background, so max-pool
windows hold exact ties (see test_maxpool_ties.py for how each framework routes them).

Tolerance 1e-10 (relative to max(1, largest reference entry)): both sides evaluate the same
float64 expression graph of a network with a few hundred parameters, in different summation
orders, so they agree to ~1e-15 relative; 1e-10 leaves five orders of margin and still catches
any layout error (those give O(1) differences).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from bridge import permutation  # noqa: E402
from bridge.convert import load_into_torch  # noqa: E402
from jax_impl import losses, models  # noqa: E402
from jax_impl.algorithms import as_operator, power_iteration  # noqa: E402
from tests import cases  # noqa: E402
from tests.torch_ref.conftest import one_torch_thread  # noqa: E402,F401  (autouse: one torch thread)
from torch_ref import exact  # noqa: E402
from torch_ref import models as tmodels  # noqa: E402
from torch_ref import pyhessian_runner  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout

TOL = 1e-10


def assert_close(torch_value, jax_value, what):
    """max |torch - jax| <= TOL * max(1, max |jax|); returns the measured max difference."""
    a, b = np.asarray(torch_value, np.float64), np.asarray(jax_value, np.float64)
    assert a.shape == b.shape, what
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert diff <= TOL * max(1.0, float(np.max(np.abs(b)))), f"{what}: max difference {diff:.3e}"
    return diff


def twin(c, params):
    return load_into_torch(tmodels.build_twin(c.arch, torch.float64), params, c.arch)


@functools.lru_cache(maxsize=None)
def jax_reference(c):
    """(params, x, y, flat theta0 (d,), loss(theta, x, y) -> scalar mean loss) for case c, float64."""
    params = c.params("float64")
    x, y = c.data()
    theta0, unravel = ravel_pytree(params)
    apply, ell = models.make_apply(c.arch), losses.get_loss(c.loss)

    def loss(theta, x, y):
        return jnp.mean(ell(apply(unravel(theta), x), y))

    return params, x, y, theta0, loss


def jax_quantities(c, vectors):
    """{"logits" (N, C), "loss", "gradient" (d,), "hvp" (m, d), "hessian" (d, d)} by plain JAX autodiff.

    One jitted function per case (the data are arguments, not constants); the Hessian is the
    forward-over-reverse Hvp applied to the identity's columns.
    """
    params, x, y, theta0, loss = jax_reference(c)
    apply = models.make_apply(c.arch)
    unravel = ravel_pytree(params)[1]

    @jax.jit
    def quantities(theta, V, x, y):
        grad = jax.grad(loss)
        hv = jax.vmap(lambda v: jax.jvp(lambda t: grad(t, x, y), (theta,), (v,))[1])(V)
        return apply(unravel(theta), x), loss(theta, x, y), grad(theta, x, y), hv

    V = jnp.concatenate([jnp.asarray(vectors), jnp.eye(theta0.size)])
    logits, value, g, hv = (np.asarray(a) for a in quantities(theta0, V, jnp.asarray(x), jnp.asarray(y)))
    return {"logits": logits, "loss": float(value), "gradient": g, "hvp": hv[:len(vectors)],
            "hessian": hv[len(vectors):]}


@pytest.mark.parametrize("c", cases.params())
def test_twin_matches_jax(c):
    params, x, y, theta0, _ = jax_reference(c)
    vectors = np.random.default_rng(1).normal(size=(2, theta0.size))
    ref = jax_quantities(c, vectors)
    model = twin(c, params)
    perm = permutation.jax_to_torch_permutation(c.arch)
    with torch.no_grad():
        assert_close(model(tmodels.as_inputs(model, x)).numpy(), ref["logits"], "logits")
    value, g_torch = exact.loss_and_grad(model, x, y, c.loss)
    assert_close(value, ref["loss"], "loss")
    assert_close(g_torch, permutation.to_torch_vector(ref["gradient"], perm), "gradient")
    assert_close(permutation.to_jax_vector(g_torch, perm), ref["gradient"], "gradient (JAX order)")
    for v, hv in zip(vectors, ref["hvp"]):  # double backprop in torch
        assert_close(exact.hvp(model, x, y, c.loss, permutation.to_torch_vector(v, perm)),
                     permutation.to_torch_vector(hv, perm), "Hvp")
    h_torch = exact.hessian(model, x, y, c.loss)
    assert_close(permutation.to_jax_matrix(h_torch, perm), ref["hessian"], "Hessian")
    assert_close(h_torch, permutation.to_torch_matrix(ref["hessian"], perm), "Hessian (torch order)")


@pytest.mark.parametrize("arch_name", ["cnn-avg", "cnn-same"])
def test_unpermuted_dense_after_flatten_gives_different_logits(arch_name):
    """The NHWC -> NCHW row permutation of the first Dense after a Flatten (C > 1 or several pixels) matters."""
    c = cases.case(arch_name, "tanh")
    params, x, _, _, _ = jax_reference(c)
    p = next(p for p in c.arch.param_layers if p.flat_from is not None)
    assert p.flat_from[2] > 1 or p.flat_from[0] * p.flat_from[1] > 1
    model = twin(c, params)
    with torch.no_grad():
        good = model(tmodels.as_inputs(model, x)).numpy()
        model[p.index].weight.copy_(torch.from_numpy(np.array(params[p.name]["kernel"]).T))  # plain transpose
        naive = model(tmodels.as_inputs(model, x)).numpy()
    ref = np.asarray(models.make_apply(c.arch)(params, jnp.asarray(x)))
    assert_close(good, ref, "logits")
    assert np.max(np.abs(naive - ref)) > 1e-3


@pytest.mark.parametrize("c", cases.params([cases.case("cnn-max", "tanh", "cross_entropy"),
                                            cases.case("cnn-same", "relu", "mse")]))
def test_pyhessian_on_cnn_twin_follows_jax_power_iteration(c):
    """Fed the same start vectors, PyHessian and jax_impl.algorithms.power_iteration make the same iterates.

    tol = 0 (never stops early) so both run max_iter Hvps per eigenpair whatever rounding does to
    the stopping test; the iterates are then the same float64 computation up to rounding.
    """
    params, x, y, theta0, loss = jax_reference(c)
    model = twin(c, params)
    d, k, max_iter = theta0.size, 2, 25
    starts_torch = np.random.default_rng(3).normal(size=(k, d))
    ph = pyhessian_runner.top_eigenvalues(model, x, y, c.loss, k=k, max_iter=max_iter, tol=0.0,
                                          start_vectors=starts_torch)
    x_, y_ = jnp.asarray(x), jnp.asarray(y)
    hvp = as_operator(lambda v: jax.jvp(jax.grad(lambda t: loss(t, x_, y_)), (theta0,), (v,))[1], dim=d,
                      dtype=theta0.dtype)
    v0 = jnp.asarray(permutation.to_jax_vector(starts_torch.T, c.arch).T)
    res = power_iteration(hvp, None, k=k, max_iter=max_iter, tol=0.0, v0=v0)
    assert ph["iterations"] == [max_iter] * k and list(np.asarray(res.matvecs_per_pair)) == [max_iter] * k
    assert_close(ph["eigenvalues"], res.eigenvalues, "eigenvalues")
    assert_close(permutation.to_jax_vector(ph["eigenvectors"].T, c.arch).T, res.eigenvectors, "eigenvectors")
