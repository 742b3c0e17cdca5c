"""Hutchinson trace estimation with Rademacher probes, including PyHessian's stopping rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.algorithms.results import DiagonalResult, TraceResult
from jax_impl.errors import HessianApproxError


def rademacher_probe(key: jax.Array, index, dim: int, dtype=jnp.float32) -> jax.Array:
    """Probe number ``index`` of a key: ``rademacher(fold_in(key, index), (dim,))``.

    Every estimator here draws its ``i``-th probe this way, so a test or a
    reference implementation can regenerate exactly the probes used.

    Args:
      key: PRNG key.
      index: ``()`` int (may be traced).
      dim: probe length.
      dtype: floating dtype of the +-1 entries.

    Returns:
      ``(dim,)`` entries +-1 with probability 1/2 each.
    """
    return jax.random.rademacher(jax.random.fold_in(key, index), (dim,), dtype=dtype)


def _running_stats(estimates: jax.Array):
    """Welford running mean and standard error ``std(ddof=1)/sqrt(n)`` of ``(n,)`` values."""

    def step(carry, x):
        n, mean, m2 = carry
        n = n + 1
        delta = x - mean
        mean = mean + delta / n
        m2 = m2 + delta * (x - mean)
        stderr = jnp.sqrt(m2 / (n - 1) / n)  # n = 1: 0/0 = NaN
        return (n, mean, m2), (mean, stderr)

    zero = jnp.zeros((), estimates.dtype)
    _, (mean, stderr) = jax.lax.scan(step, (zero, zero, zero), estimates)
    return mean, stderr


def hutchinson(
    op: Operator,
    key: jax.Array,
    num_samples: int = 100,
    batch_size: int = 32,
) -> TraceResult:
    """Hutchinson's estimate ``tr(A) ~ mean_i v_i^T A v_i`` with Rademacher ``v_i``.

    Probe ``i`` is :func:`rademacher_probe` ``(key, i, op.dim, op.dtype)``. Probes are
    generated and pushed through ``jax.vmap(op)`` in batches of
    ``batch_size`` (``lax.map``; a remainder batch is handled separately), so
    memory is ``O(batch_size * dim)`` and the estimates do not depend on
    ``batch_size``. Each estimate is unbiased with variance
    ``2 (||A||_F^2 - sum_i A_ii^2)``.

    Args:
      op: symmetric :class:`Operator` (vmappable); probes take its dtype.
      key: PRNG key.
      num_samples: number of probes = matvecs, ``>= 1``.
      batch_size: probes per vmapped batch, ``>= 1``.

    Returns:
      :class:`TraceResult` with ``estimates`` ``(num_samples,)``,
      ``running_mean`` and ``running_stderr`` ``(num_samples,)``
      (``std(ddof=1)/sqrt(n)``; NaN at ``n = 1``), ``trace`` and ``stderr``
      (their last entries) and ``matvecs = num_samples``.

    Raises:
      HessianApproxError: ``num_samples < 1`` or ``batch_size < 1``.

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix
      for Laplacian smoothing splines", 1990; Avron & Toledo, JACM 2011.
    """
    op = require_operator(op, "hutchinson")
    dim, dtype = op.dim, op.dtype
    num_samples, batch_size = int(num_samples), int(batch_size)
    if num_samples < 1:
        raise HessianApproxError(f"num_samples={num_samples} is below 1", "use num_samples >= 1")
    if batch_size < 1:
        raise HessianApproxError(f"batch_size={batch_size} is below 1", "use batch_size >= 1")

    def estimate(i):
        v = rademacher_probe(key, i, dim, dtype)
        return jnp.vdot(v, op(v))

    estimates = jax.lax.map(
        estimate, jnp.arange(num_samples, dtype=jnp.int32), batch_size=min(batch_size, num_samples)
    )
    mean, stderr = _running_stats(estimates)
    return TraceResult(
        trace=mean[-1],
        stderr=stderr[-1],
        estimates=estimates,
        running_mean=mean,
        running_stderr=stderr,
        matvecs=jnp.asarray(num_samples, jnp.int32),
    )


def trace_pyhessian(
    op: Operator,
    key: jax.Array,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> TraceResult:
    """PyHessian's ``trace(maxIter=max_iter, tol=tol)``: Hutchinson with its stopping rule.

    With ``trace = 0`` initially, for ``i = 0, ..., max_iter - 1``: draw probe
    ``v_i`` (:func:`rademacher_probe` ``(key, i, op.dim, op.dtype)``, the same probes as
    :func:`hutchinson`), append ``v_i^T A v_i``, let ``m`` be the mean so far;
    stop if ``|m - trace| / (trace + 1e-6) < tol``, else ``trace = m``.

    The rule is reproduced verbatim, quirks included: the denominator has no
    absolute value, so once the running mean is negative the ratio is
    negative and the loop stops at the next probe; and at ``i = 0`` it compares
    against 0, so it never stops there unless ``|v_0^T A v_0| < 1e-6 tol``. Like
    PyHessian's caller, the returned ``trace`` is the mean of all estimates
    used (including the last one). Implemented with ``lax.while_loop``;
    jittable with ``op`` and ``max_iter`` static.

    Args:
      op: symmetric :class:`Operator`; probes take its dtype.
      key: PRNG key.
      max_iter: most probes (PyHessian's ``maxIter``), ``>= 1``.
      tol: relative tolerance between consecutive running means.

    Returns:
      :class:`TraceResult` whose arrays have length ``max_iter``; the first
      ``matvecs`` entries are the estimates used (PyHessian's returned list
      ``trace_vhv``) and their running mean / standard error, the rest NaN.
      ``trace``/``stderr`` summarize the used estimates.

    Raises:
      HessianApproxError: ``max_iter < 1``.

    References:
      Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian",
      2020, ``hessian.trace``.
    """
    op = require_operator(op, "trace_pyhessian")
    dim, dtype = op.dim, op.dtype
    max_iter = int(max_iter)
    if max_iter < 1:
        raise HessianApproxError(f"max_iter={max_iter} is below 1", "use max_iter >= 1")
    tol = jnp.asarray(tol, dtype)
    nan = jnp.asarray(jnp.nan, dtype)

    def cond(state):
        i, _, _, _, done = state
        return (i < max_iter) & jnp.logical_not(done)

    def body(state):
        i, estimates, total, trace, _ = state
        v = rademacher_probe(key, i, dim, dtype)
        est = jnp.vdot(v, op(v))
        estimates = estimates.at[i].set(est)
        total = total + est
        mean = total / (i + 1).astype(dtype)
        done = jnp.abs(mean - trace) / (trace + 1e-6) < tol
        return i + 1, estimates, total, mean, done

    init = (
        jnp.asarray(0, jnp.int32),
        jnp.full((max_iter,), nan),
        jnp.zeros((), dtype),
        jnp.zeros((), dtype),
        jnp.asarray(False),
    )
    count, estimates, _, _, _ = jax.lax.while_loop(cond, body, init)
    used = jnp.arange(max_iter) < count
    mean, stderr = _running_stats(jnp.where(used, estimates, 0))
    mean = jnp.where(used, mean, nan)
    stderr = jnp.where(used, stderr, nan)
    return TraceResult(
        trace=mean[count - 1],
        stderr=stderr[count - 1],
        estimates=estimates,
        running_mean=mean,
        running_stderr=stderr,
        matvecs=count,
    )


def hutchinson_diagonal(op: Operator, key: jax.Array, num_samples: int = 100) -> DiagonalResult:
    """Hutchinson's diagonal estimate ``diag(A) ~ mean_i v_i * (A v_i)`` with Rademacher ``v_i``.

    Probe ``i`` is :func:`rademacher_probe` ``(key, i, op.dim, op.dtype)`` (the probes of
    :func:`hutchinson`, so ``sum(diagonal)`` equals its trace estimate for the same key).
    Entry ``j`` of each product is unbiased with variance ``sum_{k != j} A_jk^2``.

    Args:
      op: symmetric :class:`Operator` (vmappable).
      key: PRNG key.
      num_samples: probes = matvecs, ``>= 1`` (one at a time: memory ``O(dim)``).
    Returns:
      :class:`DiagonalResult` with ``diagonal`` and ``stderr`` (``std(ddof=1)/sqrt(n)``
      per entry, NaN for one probe) of shape ``(dim,)``.

    References:
      Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", 2007.
    """
    op = require_operator(op, "hutchinson_diagonal")
    num_samples = int(num_samples)
    if num_samples < 1:
        raise HessianApproxError(f"num_samples={num_samples} is below 1", "use num_samples >= 1")

    def product(i):
        v = rademacher_probe(key, i, op.dim, op.dtype)
        return v * op(v)

    def step(carry, i):  # Welford over probes, per entry
        n, mean, m2 = carry
        x = product(i)
        n = n + 1
        delta = x - mean
        mean = mean + delta / n
        return (n, mean, m2 + delta * (x - mean)), None

    zero = op.zeros()
    (n, mean, m2), _ = jax.lax.scan(step, (jnp.zeros((), op.dtype), zero, zero),
                                    jnp.arange(num_samples, dtype=jnp.int32))
    stderr = jnp.sqrt(m2 / (n - 1) / n)
    return DiagonalResult(diagonal=mean, stderr=stderr, matvecs=jnp.asarray(num_samples, jnp.int32))
