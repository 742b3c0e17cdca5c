"""Jittable Lanczos that stops when the top-k Ritz pairs meet a residual tolerance (for warm-started repeats).

:func:`jax_impl.algorithms.certified.adaptive_lanczos` decides on the host when to stop, so
it synchronizes once per chunk and cannot run inside ``jax.jit``. Tracking curvature along
training needs the opposite: one eigenproblem every few optimizer steps, each close to the
last (the top eigenvector moves little between measurements), solved inside the jitted
training loop without a host round trip. :func:`lanczos_tol` does that with a
``lax.while_loop``: after every step it diagonalizes the (padded) tridiagonal matrix and
stops when the Ritz residual estimates of the top ``k`` pairs fall below ``tol`` times the
largest Ritz value in magnitude. Started from the previous top Ritz vector it needs few steps
(the warm start of the edge-of-stability literature: Cohen et al. 2021 re-run Lanczos each
time; here the last answer seeds the next).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_impl.algorithms.lanczos import (default_breakdown_tol, lanczos_init_state, lanczos_start,
                                         lanczos_step_fn)
from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.algorithms.results import EigResult
from jax_impl.errors import HessianApproxError


def padded_ritz(alphas: jax.Array, betas: jax.Array, m: jax.Array):
    """Ritz values and vectors of the leading ``m x m`` block of a preallocated tridiagonal.

    The rows after ``m`` are replaced by a decoupled diagonal strictly below every eigenvalue
    of the leading block (Gershgorin: below ``-(max|alpha| + 2 max|beta|)``), so one
    fixed-shape ``eigh`` serves every ``m`` and the top ``m`` eigenpairs are the block's.

    Args:
      alphas: ``(M,)`` diagonal (entries from ``m`` on are ignored).
      betas: ``(M,)`` off-diagonal ``betas[:m-1]``; ``betas[m-1]`` is the residual norm.
      m: ``()`` int, the steps taken, ``1 <= m <= M``.

    Returns:
      ``(theta, s)``: ``theta`` ``(M,)`` ascending (the block's values last), ``s`` ``(M, M)``
      eigenvectors in columns, rows from ``m`` on zeroed for the block's vectors.
    """
    big_m = alphas.shape[0]
    idx = jnp.arange(big_m)
    inside = idx < m
    a = jnp.where(inside, alphas, 0)
    b = jnp.where(idx < m - 1, betas, 0)
    lo = -(jnp.max(jnp.abs(a)) + 2 * jnp.max(jnp.abs(b)) + 1)
    t = jnp.diag(jnp.where(inside, a, lo)) + jnp.diag(b[:-1], 1) + jnp.diag(b[:-1], -1)
    theta, s = jnp.linalg.eigh(t)
    return theta, jnp.where(inside[:, None], s, 0)


def lanczos_tol(op: Operator, key: Optional[jax.Array], k: int = 1, tol: float = 1e-3,
                max_steps: Optional[int] = None, min_steps: Optional[int] = None,
                v0: Optional[jax.Array] = None) -> EigResult:
    """Top-``k`` Ritz pairs from Lanczos steps taken until their residuals meet ``tol``; jittable.

    Step ``m`` (full reorthogonalization, as :func:`jax_impl.algorithms.lanczos.lanczos`) is
    followed by an ``eigh`` of the ``max_steps``-square padded tridiagonal
    (:func:`padded_ritz`, ``O(max_steps^3)`` flops, small next to a network's matvec); the loop
    stops once ``m >= min_steps`` and every top-``k`` residual estimate
    ``|beta_m s_{m,i}|`` is ``<= tol * max_j |theta_j|``, or at ``max_steps``. The estimate
    equals ``||A y_i - theta_i y_i||`` in exact arithmetic under full reorthogonalization, so
    some eigenvalue lies within ``tol * |theta|_max`` of each returned value (a residual
    bound: it does not prove that no larger eigenvalue was missed, which a start vector
    orthogonal to the top eigenvector would cause; a warm start from a previous top vector
    mixed with a random one guards against it).

    Args:
      op: symmetric :class:`Operator`.
      key: PRNG key: start ``normal(split(key)[0])`` unless ``v0`` is given, and breakdown
        restarts; may be None with ``v0``.
      k: number of pairs, ``1 <= k <= max_steps``.
      tol: relative residual tolerance, ``> 0``.
      max_steps: most steps (matvecs), default ``min(dim, max(10 k, 50))``.
      min_steps: fewest steps before stopping, default ``k`` (a warm start from an exact
        eigenvector stops after one step when ``k = 1``).
      v0: optional ``(dim,)`` start vector (e.g. the previous top Ritz vector).

    Returns:
      :class:`EigResult`: ``eigenvalues`` ``(k,)`` descending, ``eigenvectors`` ``(k, dim)``,
      ``residuals`` ``(k,)`` the estimates, ``matvecs`` ``()`` int32 the steps taken (traced),
      ``converged`` ``(k,)`` whether each met ``tol``.

    References:
      Parlett, "The Symmetric Eigenvalue Problem", 1998, ch. 13; Saad, "Numerical Methods
      for Large Eigenvalue Problems", 2nd ed. 2011, sec. 6.6 (residual estimates).
    """
    op = require_operator(op, "lanczos_tol")
    dim, k = op.dim, int(k)
    max_steps = min(dim, max(10 * k, 50)) if max_steps is None else int(max_steps)
    min_steps = k if min_steps is None else int(min_steps)
    if not 1 <= k <= max_steps <= dim:
        raise HessianApproxError(f"k={k}, max_steps={max_steps} for a {dim}-dimensional operator",
                                 f"use 1 <= k <= max_steps <= {dim}")
    if not k <= min_steps <= max_steps:
        raise HessianApproxError(f"min_steps={min_steps} for k={k} and max_steps={max_steps}",
                                 f"use {k} <= min_steps <= {max_steps}")
    if not float(tol) > 0:
        raise HessianApproxError(f"tol={tol}", "pass a positive relative tolerance such as 1e-3")
    v0, restart_key = lanczos_start(op, key, v0)
    restart_key = jax.random.PRNGKey(0) if restart_key is None else restart_key
    step = lanczos_step_fn(op, restart_key, default_breakdown_tol(dim, op.dtype), last_step=max_steps - 1)
    top = jnp.arange(max_steps - 1, max_steps - 1 - k, -1)

    def estimates(state, m):
        _, alphas, betas, _ = state
        theta, s = padded_ritz(alphas, betas, m)
        res = jnp.abs(betas[m - 1] * s[m - 1, top])
        scale = jnp.maximum(jnp.abs(theta[-1]), jnp.abs(theta[max_steps - m]))  # max |theta_j| of the block
        ok = res <= tol * scale
        return theta, s, res, ok

    def cond(carry):
        m, _, done = carry
        return (m < max_steps) & ~done

    def body(carry):
        m, state, _ = carry
        state = step(m, state)
        m = m + 1
        done = (m >= min_steps) & jnp.all(estimates(state, m)[3])
        return m, state, done

    carry = (jnp.asarray(0, jnp.int32), lanczos_init_state(v0, max_steps), jnp.asarray(False))
    m, state, _ = jax.lax.while_loop(cond, body, carry)
    theta, s, res, ok = estimates(state, m)
    vectors = s[:, top].T @ state[0][:max_steps]
    return EigResult(eigenvalues=theta[top], eigenvectors=vectors, residuals=res, matvecs=m, converged=ok)
