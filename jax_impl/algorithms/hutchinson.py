"""Hutchinson trace estimation with Rademacher probes, including PyHessian's stopping rule."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.algorithms.results import DiagonalResult, TraceResult
from jax_impl.errors import HessianApproxError



def default_batch_size(dim: int) -> int:
    """Matvecs per vmapped batch when none is given: ``2^20 / dim`` rounded down to a power of
    two, within ``[4, 32]`` (32 up to dim 2^15, 4 above dim 2^17).

    A batch shares the forward pass, but a large one holds large batched intermediates. Per
    probe cost / one Hvp on the 784-w-10 MLP (1,000 MNIST samples, 2-core CPU) at batch 4 and
    32: w=10 (dim 7,960) 0.26 and 0.17; w=64 0.59 and 0.65; w=128 0.89 and 0.96; w=256
    (dim 203,530) 0.84 and 1.02; the default CNN (dim 5,994, 100 samples) 0.50 and 0.83.
    """
    return int(min(32, max(4, 1 << max(0, (2**20 // max(1, int(dim))).bit_length() - 1))))


# --- random vectors: jax.random's Threefry draws, bit for bit, in one fused loop ----------
# On CPU, jax lowers its Threefry hash as a 5-iteration rolled loop that copies its state each
# iteration, so a probe of 203,530 entries took 2.9 ms, about a fifth of an Hvp; the same hash
# unrolled here fuses into one loop (0.6 ms). Keys jax.random would not hash with partitionable
# Threefry (another PRNG implementation, the legacy bit layout) fall back to jax.random.

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (20 rounds) as ``jax.random`` computes it, unrolled (uint32 arrays)."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for j in range(5):
        for r in _ROTATIONS[j % 2]:
            x1 = x1 + x2
            x2 = x1 ^ (jax.lax.shift_left(x2, np.uint32(r)) | jax.lax.shift_right_logical(x2, np.uint32(32 - r)))
        x1 = x1 + ks[(j + 1) % 3]
        x2 = x2 + ks[(j + 2) % 3] + np.uint32(j + 1)
    return x1, x2


def _threefry_words(key, n: int, offset=0, total=None):
    """``(hi, lo)`` uint32 Threefry outputs of counters ``offset .. offset + n - 1`` of ``key``, as
    ``jax.random`` draws an array of ``total`` entries (row-major; default ``n``; ``offset`` may be
    traced); None where ``jax.random`` would draw otherwise."""
    dtype = getattr(key, "dtype", None)
    if dtype is None or not jax.config.jax_threefry_partitionable or (total or n) >= 2**32:
        return None
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        key = jax.random.key_data(key)
    elif np.dtype(dtype) != np.uint32 or key.shape != (2,) or jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    counters = jax.lax.iota(np.uint32, n) + jnp.asarray(offset).astype(np.uint32)
    return _threefry2x32(key[0], key[1], jnp.zeros((), np.uint32), counters)


def _bits(words, width: int):
    """``jax.random.bits`` of ``width`` (32 or 64) from :func:`_threefry_words`."""
    hi, lo = words
    if width == 32:
        return hi ^ lo
    return (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)


def rademacher_vector(key: jax.Array, dim: int, dtype=jnp.float32) -> jax.Array:
    """``jax.random.rademacher(key, (dim,), dtype)``, bit for bit (see the note above).

    Args:
      key: PRNG key.
      dim: length.
      dtype: floating dtype of the +-1 entries.
    """
    words = _threefry_words(key, int(dim))
    if words is None:
        return jax.random.rademacher(key, (dim,), dtype=dtype)
    # bernoulli(p=0.5) draws uniforms of 0.5's dtype (float64 under 64-bit JAX): u < 1/2 iff the top bit is 0
    top = words[0] if jax.config.jax_enable_x64 else words[0] ^ words[1]
    return jnp.where(top < np.uint32(2**31), 1, -1).astype(dtype)


def normal_vector(key: jax.Array, shape, dtype=jnp.float32, row=None) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, bit for bit (see the note above), or one row of it.

    Args:
      key: PRNG key.
      shape: ``(dim,)`` or ``(rows, dim)``.
      dtype: float32 or float64 (other dtypes go through ``jax.random``).
      row: with a ``(rows, dim)`` shape, only row ``row`` (an int, may be traced), ``(dim,)``,
        at the cost of one row.
    """
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    n = shape[-1] if row is not None else int(np.prod(shape))
    offset = 0 if row is None else row * shape[-1]
    words = (_threefry_words(key, n, offset, int(np.prod(shape))) if dtype in (np.float32, np.float64)
             else None)
    if words is None:
        out = jax.random.normal(key, shape, dtype)
        return out if row is None else out[row]
    nbits, nmant = 8 * dtype.itemsize, int(jnp.finfo(dtype).nmant)
    uint = np.uint32 if nbits == 32 else np.uint64
    bits = jax.lax.shift_right_logical(_bits(words, nbits), uint(nbits - nmant))
    floats = jax.lax.bitcast_convert_type(bits | np.array(1.0, dtype).view(uint), dtype) - jnp.asarray(1.0, dtype)
    lo = jnp.asarray(np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype)), dtype)
    u = jax.lax.max(lo, floats * (jnp.asarray(1.0, dtype) - lo) + lo)  # uniform on [lo, 1), as jax.random
    out = jax.lax.mul(jnp.asarray(np.sqrt(2), dtype), jax.lax.erf_inv(u))
    return out if row is not None else out.reshape(shape)


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
    return rademacher_vector(jax.random.fold_in(key, index), dim, dtype)


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
    batch_size: Optional[int] = None,
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
      batch_size: probes per vmapped batch, ``>= 1`` (default :func:`default_batch_size`).

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
    num_samples = int(num_samples)
    batch_size = default_batch_size(op.dim) if batch_size is None else int(batch_size)
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


def hutchinson_diagonal(op: Operator, key: jax.Array, num_samples: int = 100,
                        batch_size: Optional[int] = None) -> DiagonalResult:
    """Hutchinson's diagonal estimate ``diag(A) ~ mean_i v_i * (A v_i)`` with Rademacher ``v_i``.

    Probe ``i`` is :func:`rademacher_probe` ``(key, i, op.dim, op.dtype)`` (the probes of
    :func:`hutchinson`, so ``sum(diagonal)`` equals its trace estimate for the same key).
    Entry ``j`` of each product is unbiased with variance ``sum_{k != j} A_jk^2``. Probes go
    through ``jax.vmap(op)`` in batches of ``batch_size`` and are accumulated in probe order
    (Welford), so the result does not depend on ``batch_size`` beyond the matvec's rounding.

    Args:
      op: symmetric :class:`Operator` (vmappable).
      key: PRNG key.
      num_samples: probes = matvecs, ``>= 1``.
      batch_size: probes per vmapped batch, ``>= 1`` (memory ``O(batch_size * dim)``; default
        :func:`default_batch_size`).
    Returns:
      :class:`DiagonalResult` with ``diagonal`` and ``stderr`` (``std(ddof=1)/sqrt(n)``
      per entry, NaN for one probe) of shape ``(dim,)``.

    References:
      Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", 2007.
    """
    op = require_operator(op, "hutchinson_diagonal")
    num_samples = int(num_samples)
    batch_size = default_batch_size(op.dim) if batch_size is None else int(batch_size)
    if num_samples < 1:
        raise HessianApproxError(f"num_samples={num_samples} is below 1", "use num_samples >= 1")
    if batch_size < 1:
        raise HessianApproxError(f"batch_size={batch_size} is below 1", "use batch_size >= 1")

    def product(i):
        v = rademacher_probe(key, i, op.dim, op.dtype)
        return v * op(v)

    def welford(carry, x):  # over probes, per entry
        n, mean, m2 = carry
        n = n + 1
        delta = x - mean
        mean = mean + delta / n
        return (n, mean, m2 + delta * (x - mean)), None

    def batch(carry, idx):
        return jax.lax.scan(welford, carry, jax.vmap(product)(idx))[0], None

    b = min(batch_size, num_samples)
    full = num_samples // b
    zero = op.zeros()
    carry = (jnp.zeros((), op.dtype), zero, zero)
    carry, _ = jax.lax.scan(batch, carry, jnp.arange(full * b, dtype=jnp.int32).reshape(full, b))
    if full * b < num_samples:
        carry, _ = batch(carry, jnp.arange(full * b, num_samples, dtype=jnp.int32))
    n, mean, m2 = carry
    stderr = jnp.sqrt(m2 / (n - 1) / n)
    return DiagonalResult(diagonal=mean, stderr=stderr, matvecs=jnp.asarray(num_samples, jnp.int32))
