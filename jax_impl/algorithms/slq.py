"""Stochastic Lanczos quadrature (SLQ): spectral density nodes and weights, PyHessian conventions."""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from jax_impl.algorithms.hutchinson import rademacher_probe
from jax_impl.algorithms.lanczos import lanczos_tridiag, tridiagonal
from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.errors import HessianApproxError


def slq(
    op: Operator,
    key: jax.Array,
    num_steps: int = 100,
    num_runs: int = 1,
) -> Tuple[jax.Array, jax.Array]:
    """Gauss quadrature nodes and weights of the spectral density, per run.

    Follows PyHessian's ``density(iter=num_steps, n_v=num_runs)``: for each run
    a Rademacher start vector (normalized), ``num_steps`` Lanczos steps with
    full reorthogonalization (:func:`lanczos_tridiag`), then the eigenpairs
    ``T = S diag(theta) S^T`` of the tridiagonal matrix give nodes ``theta``
    and weights ``S[0, :]**2``. Each run's weights sum to 1 and
    ``sum_j w_j f(theta_j)`` estimates ``tr f(A) / dim``.

    Differences from PyHessian that vanish in exact arithmetic: the start
    vector is normalized exactly (PyHessian divides by ``||v|| + 1e-6``), the
    reorthogonalization is full Gram-Schmidt, repeated where the first pass
    cancels (PyHessian: once), a breakdown is detected with a relative threshold
    (PyHessian: ``beta == 0`` exactly), and the nodes are in ascending order
    (PyHessian: ``torch.eig`` order, unsorted; ``torch.eig`` no longer exists in
    current PyTorch).

    The start vector of run ``r`` is :func:`rademacher_probe`
    ``(jax.random.split(key)[0], r, op.dim, op.dtype)``; breakdown restarts use keys
    from ``jax.random.split(key)[1]``. Runs are sequential (``lax.map``).
    Jittable with ``op``, ``num_steps`` and ``num_runs`` static.

    Args:
      op: symmetric :class:`Operator`; its dtype is the computation's.
      key: PRNG key.
      num_steps: Lanczos steps per run (PyHessian's ``iter``), ``<= dim``.
      num_runs: independent runs (PyHessian's ``n_v``).

    Returns:
      ``(nodes, weights)``, each ``(num_runs, num_steps)``; nodes ascending
      within a run.

    Raises:
      HessianApproxError: ``num_steps`` not in ``[1, dim]`` or ``num_runs < 1``.

    References:
      Golub & Meurant, "Matrices, Moments and Quadrature with Applications",
      2010; Ghorbani, Krishnan, Xiao, ICML 2019; Yao et al., PyHessian, 2020.
    """
    op = require_operator(op, "slq")
    dim, dtype, num_steps, num_runs = op.dim, op.dtype, int(num_steps), int(num_runs)
    if not 1 <= num_steps <= dim:
        raise HessianApproxError(
            f"num_steps={num_steps} Lanczos steps for a {dim}-dimensional operator",
            f"choose 1 <= num_steps <= {dim}",
        )
    if num_runs < 1:
        raise HessianApproxError(f"num_runs={num_runs} is below 1", "use num_runs >= 1")
    probe_key, restart_key = jax.random.split(key)

    def one_run(r):
        v0 = rademacher_probe(probe_key, r, dim, dtype)
        _, alphas, betas = lanczos_tridiag(
            op, v0, num_steps, key=jax.random.fold_in(restart_key, r)
        )
        theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))
        return theta, s[0, :] ** 2

    return jax.lax.map(one_run, jnp.arange(num_runs, dtype=jnp.int32))


def spectral_density(
    nodes: jax.Array,
    weights: jax.Array,
    num_bins: int = 10000,
    sigma_squared: float = 1e-5,
    overhead: float = 0.01,
) -> Tuple[jax.Array, jax.Array]:
    """Gaussian-smoothed spectral density from SLQ nodes and weights.

    PyHessian's example ``density_plot.density_generate`` (vectorized): the grid
    is ``linspace(lo, hi, num_bins)`` with ``hi = mean_r max_j nodes[r, j] +
    overhead`` and ``lo = mean_r min_j nodes[r, j] - overhead``; each run's
    density is ``sum_j weights[r, j] N(x; nodes[r, j], s)``, a Gaussian of
    **variance** ``s = sigma_squared * max(1, hi - lo)`` (PyHessian computes
    ``sigma = sigma_squared * max(1, hi - lo)`` and passes it as the
    ``sigma_squared`` argument of ``gaussian``); the runs are averaged and the
    result rescaled so that ``sum(density) * (grid[1] - grid[0]) == 1``.

    Runs are processed one at a time (``lax.map``), so memory is
    ``O(num_steps * num_bins)``. Jittable with ``num_bins`` static.

    Args:
      nodes: ``(num_runs, num_steps)`` (or ``(num_steps,)`` for one run).
      weights: same shape as ``nodes``.
      num_bins: grid size, ``>= 2``.
      sigma_squared: relative Gaussian variance.
      overhead: margin added on both sides of the node range.

    Returns:
      ``(density, grid)``, each ``(num_bins,)``.

    Raises:
      HessianApproxError: mismatched shapes or ``num_bins < 2``.

    References:
      https://github.com/amirgholami/PyHessian/blob/master/density_plot.py
    """
    nodes, weights = jnp.asarray(nodes), jnp.asarray(weights)
    if nodes.ndim == 1:
        nodes, weights = nodes[None], weights[None]
    if nodes.ndim != 2 or nodes.shape != weights.shape:
        raise HessianApproxError(
            f"nodes {nodes.shape} and weights {weights.shape} are not matching (num_runs, num_steps) arrays",
            "pass the two arrays returned by slq",
        )
    num_bins = int(num_bins)
    if num_bins < 2:
        raise HessianApproxError(f"num_bins={num_bins} is below 2", "use num_bins >= 2")
    dtype = jnp.result_type(nodes.dtype, weights.dtype, jnp.float32)
    nodes, weights = nodes.astype(dtype), weights.astype(dtype)
    hi = jnp.mean(jnp.max(nodes, axis=1)) + overhead
    lo = jnp.mean(jnp.min(nodes, axis=1)) - overhead
    grid = jnp.linspace(lo, hi, num_bins, dtype=dtype)
    var = sigma_squared * jnp.maximum(1.0, hi - lo)

    def one_run(args):
        x, w = args
        g = jnp.exp(-((grid[None, :] - x[:, None]) ** 2) / (2.0 * var)) / jnp.sqrt(2 * jnp.pi * var)
        return w @ g

    density = jnp.mean(jax.lax.map(one_run, (nodes, weights)), axis=0)
    density = density / (jnp.sum(density) * (grid[1] - grid[0]))
    return density, grid
