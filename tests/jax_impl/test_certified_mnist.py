"""Certified Lanczos on the MNIST Hessian: every explicit residual <= 1e-8·|λ₁| within twice eigsh's matvecs.

The MLP 784-10-10 at a trained point would need training; the Hessian at the seeded initial
weights over 500 MNIST images is a real MNIST loss Hessian (7,960 parameters) and costs no
training. ARPACK's count is the reference (``eigsh_reference``: a counting LinearOperator).
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_impl as ha
from hessian_approx.architecture import mlp
from jax_impl import algorithms, data, models


def test_certified_lanczos_on_the_mnist_hessian(x64, mnist_path):
    ds = data.load_mnist_idx(mnist_path)
    x, y = data.hessian_subset(ds.x_train, ds.y_train, 500, seed=0)
    arch = mlp(784, (10,), 10, "relu")
    params = models.init_params(arch, jax.random.PRNGKey(0), jnp.float64)
    H = ha.hessian(arch, params, (x, y)).operator.jit()
    res = algorithms.adaptive_lanczos(H, jax.random.PRNGKey(1), k=10, tol=1e-8)
    theta1 = abs(float(res.eigenvalues[0]))
    assert bool(np.all(np.asarray(res.converged)))
    assert float(np.max(np.asarray(res.residuals))) <= 1e-8 * theta1
    ref, eigsh_matvecs = algorithms.eigsh_reference(H, 10, tol=1e-8)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), np.sort(ref)[::-1], rtol=1e-7, atol=1e-8 * theta1)
    assert int(res.matvecs) <= 2 * eigsh_matvecs, (int(res.matvecs), eigsh_matvecs)
