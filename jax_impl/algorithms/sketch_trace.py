"""Sketched trace estimators at a fixed matvec budget: Hutch++, XTrace, XNysTrace."""

from __future__ import annotations

from typing import Optional

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.algorithms.hutchinson import default_batch_size, normal_vector, rademacher_probe
from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.algorithms.results import _floats, _ints
from jax_impl.errors import HessianApproxError

# Cholesky retries of XNysTrace: the shift grows tenfold per failed try (any shift is exact).
_SHIFT_RETRIES = 12


@dataclasses.dataclass(frozen=True)
class SketchTraceResult:
    """A sketched trace estimate: the mean of exchangeable (or i.i.d.) estimates.

    Attributes:
        trace: ``()`` the estimate, ``mean(estimates)``.
        stderr: ``()`` ``std(estimates, ddof=1) / sqrt(num_probes)``; what it estimates is
            stated by the producing function (0 when every estimate is the same).
        estimates: ``(num_probes,)`` the per-probe estimates (Hutch++: sketch trace plus one
            residual Hutchinson sample; XTrace/XNysTrace: the leave-one-out estimates).
        matvecs: ``()`` int, operator applications used (<= the ``num_matvecs`` asked for).
        sketch_size: columns of the sketch (static).
        num_probes: number of entries of ``estimates`` (static).
    """

    trace: jax.Array
    stderr: jax.Array
    estimates: jax.Array
    matvecs: jax.Array
    sketch_size: int
    num_probes: int

    def to_dict(self) -> dict:
        """JSON-serializable python lists/floats/ints (non-finite floats become None)."""
        return {"trace": _floats(self.trace), "stderr": _floats(self.stderr),
                "matvecs": _ints(self.matvecs), "sketch_size": self.sketch_size,
                "num_probes": self.num_probes, "estimates": _floats(self.estimates)}


jax.tree_util.register_dataclass(
        SketchTraceResult,
        data_fields=["trace", "stderr", "estimates", "matvecs"],
        meta_fields=["sketch_size", "num_probes"],
)


def sphere_probe(key: jax.Array, index, dim: int, dtype=jnp.float32) -> jax.Array:
    """Probe ``index`` of a key on the sphere of radius ``sqrt(dim)`` (XTrace's improved vectors).

    ``g = normal(fold_in(key, index), (dim,))`` scaled to ``sqrt(dim) g / ||g||``, so that
    ``E[v v^T] = I`` and ``||v||^2 = dim`` exactly.

    Args:
      key: PRNG key.
      index: ``()`` int (may be traced).
      dim: probe length.
      dtype: floating dtype.

    Returns:
      ``(dim,)`` uniformly distributed on the sphere of radius ``sqrt(dim)``.
    """
    g = normal_vector(jax.random.fold_in(key, index), (dim,), dtype)  # = jax.random.normal, faster
    return g * (jnp.sqrt(jnp.asarray(dim, dtype)) / jnp.linalg.norm(g))


def draw_rows(probe, key: jax.Array, k: int, dim: int, dtype) -> jax.Array:
    """``(k, dim)``: row ``i`` is ``probe(key, i, dim, dtype)``, drawn once.

    Drawn in a loop (``lax.map``), whose output XLA materializes: as one vmapped expression,
    XLA fused the hash into each consumer of the probes (the batched matvecs, the transpose)
    and drew them two or three times (an optimization barrier is removed before fusion on CPU).
    """
    return jax.lax.map(lambda i: probe(key, i, dim, dtype), jnp.arange(k, dtype=jnp.int32))


def check_key(key, fn: str) -> None:
    """Nothing if ``key`` is a single PRNG key (typed, or a raw uint32 PRNGKey), else a one-line error."""
    shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
    elif dtype is not None and np.dtype(dtype) == np.uint32 and shape in ((2,), (4,)):
        return
    what = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else type(key).__name__
    raise HessianApproxError(f"{fn} got {what} as key, not a single PRNG key",
                             "pass jax.random.key(seed) or jax.random.PRNGKey(seed) "
                             "(jax.lax.map over keys for several)")


def check_budget(num_matvecs, fn: str, least: int, why: str, per_vector: int, dim: int, what: str) -> int:
    """``num_matvecs // per_vector`` (the number of ``what``), checked: an int ``>= least``
    (``why`` says what the least buys) with ``num_matvecs // per_vector <= dim``; else a one-line error."""
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, (int, np.integer)):
        raise HessianApproxError(f"{fn} got num_matvecs={num_matvecs!r}, not an int",
                                 "pass a Python int (a static argument under jax.jit)")
    m = int(num_matvecs)
    if m < least:
        raise HessianApproxError(f"{fn} got num_matvecs={m}, fewer than the {least} it needs ({why})",
                                 f"use num_matvecs >= {least}")
    k = m // per_vector
    if k > dim:
        raise HessianApproxError(
            f"{fn} with num_matvecs={m} wants {k} {what}, more than the dimension {dim}",
            f"use num_matvecs <= {dim * per_vector + per_vector - 1} (or materialize the operator)")
    return k


def apply_columns(op: Operator, rows: jax.Array, batch_size: Optional[int]) -> jax.Array:
    """``A X`` as ``(dim, k)`` for ``rows`` = ``X^T`` of shape ``(k, dim)``: k matvecs, vmapped in
    batches of ``batch_size`` (default :func:`~jax_impl.algorithms.hutchinson.default_batch_size`)."""
    batch_size = default_batch_size(op.dim) if batch_size is None else int(batch_size)
    return jax.lax.map(op, rows, batch_size=max(1, min(batch_size, rows.shape[0]))).T


def loo_factor(r: jax.Array) -> jax.Array:
    """The downdating factor ``S`` (k, k) of a QR factor ``r`` (k, k): columns ``R^{-T} e_i / ||R^{-T} e_i||``.

    If ``Y = Q R`` and ``Q_(i)`` is an orthonormal basis of ``Y`` without column ``i``, then
    ``Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T`` (Epperly, Tropp & Webber 2024).
    """
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    rinv_t = jax.scipy.linalg.solve_triangular(r, eye, trans=1, lower=False)  # R^{-T}
    return rinv_t / jnp.linalg.norm(rinv_t, axis=0)


def rank_deficient(r: jax.Array) -> jax.Array:
    """Whether the triangular ``r`` (k, k) is singular to working precision: ``min |r_ii| <= eps max |r_ii|``.

    Then (``A = 0``, repeated test vectors, or ``rank(A) < k`` with exact cancellation) the
    downdating factor would be infinite; ``span(Q)`` holds ``range(A)`` to working precision.
    Short of that the downdating formulas stay accurate (measured: exact to 1e-15 on
    rank-r operators with ``k > r``, where dependent columns give ``|r_ii| ~ 1e-14 max``).
    """
    d = jnp.abs(jnp.diagonal(r))
    return jnp.min(d) <= jnp.finfo(r.dtype).eps * jnp.max(d)


def mean_stderr(estimates: jax.Array):
    """``mean`` and ``std(ddof=1) / sqrt(n)`` over the last axis of ``estimates``."""
    n = estimates.shape[-1]
    stderr = jnp.std(estimates, axis=-1, ddof=1) / jnp.sqrt(jnp.asarray(n, estimates.dtype))
    return jnp.mean(estimates, axis=-1), stderr


def _result(estimates, matvecs, sketch_size) -> SketchTraceResult:
    mean, stderr = mean_stderr(estimates)
    return SketchTraceResult(trace=mean, stderr=stderr, estimates=estimates,
                             matvecs=jnp.asarray(matvecs, jnp.int32),
                             sketch_size=int(sketch_size), num_probes=int(estimates.shape[0]))


def hutchpp(op: Operator, key: jax.Array, num_matvecs: int, batch_size: Optional[int] = None) -> SketchTraceResult:
    """Hutch++: the trace on a sketched range plus Hutchinson on the deflated rest.

    With ``k = num_matvecs // 3`` and ``p = num_matvecs - 2k`` (``p`` is ``k``, ``k + 1`` or
    ``k + 2``, so every matvec is used): ``Q = qr(A S)`` for a Rademacher sketch ``S`` (dim, k)
    (k matvecs); ``t = tr(Q^T A Q)`` (k matvecs); Rademacher probes ``g_i`` deflated to
    ``h_i = (I - Q Q^T) g_i`` give ``estimates_i = t + h_i^T A h_i`` (p matvecs).
    Sketch column ``j`` is :func:`rademacher_probe` ``(split(key)[0], j, dim, dtype)``, probe
    ``i`` is :func:`rademacher_probe` ``(split(key)[1], i, dim, dtype)``.

    ``stderr = std(estimates, ddof=1) / sqrt(p)``: the standard error of the residual
    Hutchinson mean given the sketch. Given the sketch the estimate is unbiased for
    ``tr(A)`` (``t + tr((I - QQ^T) A (I - QQ^T)) = tr(A)``), so this also estimates the
    standard deviation of the whole estimator. Exact (``stderr = 0``) when ``k >= rank(A)``.
    Jittable with ``op``, ``num_matvecs`` and ``batch_size`` static. Several seeds:
    ``jax.lax.map`` over keys (under ``jax.vmap`` the batched LAPACK kernels of jaxlib 0.10.2
    can deadlock a CPU with few cores).

    Args:
      op: symmetric :class:`Operator` (vmappable); everything is computed in ``op.dtype``.
      key: PRNG key.
      num_matvecs: the budget, ``4 <= num_matvecs`` (``p >= 2`` for a stderr) and
        ``num_matvecs // 3 <= dim``.
      batch_size: matvecs vmapped at once (memory ``O(batch_size * dim)`` in the matvec;
        default :func:`~jax_impl.algorithms.hutchinson.default_batch_size`); the result
        does not depend on it beyond rounding.

    Returns:
      :class:`SketchTraceResult` with ``estimates`` (p,), ``matvecs = num_matvecs``,
      ``sketch_size = k``, ``num_probes = p``.

    Raises:
      HessianApproxError: a bad key, or ``num_matvecs`` outside the range above.

    References:
      Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal stochastic trace estimation",
      SOSA 2021, Algorithm 1.
    """
    op = require_operator(op, "hutchpp")
    check_key(key, "hutchpp")
    n, dtype = op.dim, op.dtype
    k = check_budget(num_matvecs, "hutchpp", 4, "a sketch column, its product and two probes", 3, n,
                     "sketch columns")
    m = int(num_matvecs)
    p = m - 2 * k
    key_sketch, key_probe = jax.random.split(key)
    sketch = draw_rows(rademacher_probe, key_sketch, k, n, dtype)  # (k, n)
    q, _ = jnp.linalg.qr(apply_columns(op, sketch, batch_size))  # (n, k)
    t = jnp.sum(q * apply_columns(op, q.T, batch_size))  # tr(Q^T A Q)
    g = draw_rows(rademacher_probe, key_probe, p, n, dtype).T  # (n, p)
    h = g - q @ (q.T @ g)
    estimates = t + jnp.sum(h * apply_columns(op, h.T, batch_size), axis=0)
    return _result(estimates, m, k)


def xtrace(op: Operator, key: jax.Array, num_matvecs: int, batch_size: Optional[int] = None) -> SketchTraceResult:
    """XTrace: the exchangeable leave-one-out Hutch++ (valid for indefinite symmetric A).

    ``k = num_matvecs // 2`` test vectors ``omega_i`` (:func:`sphere_probe` ``(key, i, dim,
    dtype)``, the paper's default "improved" vectors) give ``Y = A Omega`` (k matvecs),
    ``Q R = Y`` and ``A Q`` (k matvecs); an odd budget leaves one matvec unused. Leave-one-out
    estimate ``i``, with ``Q_(i)`` a basis of ``Y`` without column ``i`` and
    ``P_i = I - Q_(i) Q_(i)^T``::

        estimates_i = tr(Q_(i)^T A Q_(i))
                      + (dim - k + 1) / ||P_i omega_i||^2 * (P_i omega_i)^T A (P_i omega_i)

    computed from the one QR with the downdating ``Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T``
    (:func:`loo_factor`) as in the paper's code; the rescaling makes ``P_i omega_i`` a
    uniform vector of the right length on the (dim - k + 1)-dimensional complement (the
    "improved" normalization), so each estimate is unbiased. The estimate is their mean.

    ``stderr = std(estimates, ddof=1) / sqrt(k)``, the paper's error estimate for XTrace
    (its ``err``); it estimates the estimator's standard deviation (the leave-one-out
    estimates are exchangeable, not independent). When ``A Omega`` is singular to working
    precision (:func:`rank_deficient`, e.g. ``A = 0``; ``range(A)`` then lies in ``span(Q)``)
    every estimate is ``tr(Q^T A Q)`` and ``stderr = 0``. Jittable with ``op``,
    ``num_matvecs`` and ``batch_size`` static. Several seeds: ``jax.lax.map`` over keys (under
    ``jax.vmap`` the batched LAPACK kernels of jaxlib 0.10.2 can deadlock a CPU with few cores).

    Args:
      op: symmetric :class:`Operator` (vmappable); everything is computed in ``op.dtype``.
      key: PRNG key.
      num_matvecs: the budget; ``2 <= num_matvecs // 2 <= dim``.
      batch_size: matvecs vmapped at once (default ``default_batch_size(dim)``).

    Returns:
      :class:`SketchTraceResult` with ``estimates`` (k,), ``matvecs = 2k``,
      ``sketch_size = num_probes = k``.

    Raises:
      HessianApproxError: a bad key, or ``num_matvecs`` outside the range above.

    References:
      Epperly, Tropp & Webber, "XTrace: Making the most of every sample in stochastic trace
      estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024, and its code
      (``xtrace.m``/``xtrace_helper.m``, github.com/eepperly/XTrace).
    """
    op = require_operator(op, "xtrace")
    check_key(key, "xtrace")
    n, dtype = op.dim, op.dtype
    k = check_budget(num_matvecs, "xtrace", 4, "two test vectors, two matvecs each", 2, n, "test vectors")
    rows = draw_rows(sphere_probe, key, k, n, dtype)
    omega = rows.T  # (n, k)
    y = apply_columns(op, rows, batch_size)
    q, r = jnp.linalg.qr(y)
    z = apply_columns(op, q.T, batch_size)
    h = q.T @ z
    tr_h = jnp.trace(h)

    def loo():
        s = loo_factor(r)
        w, t = q.T @ omega, z.T @ omega  # t = Q^T A omega (A symmetric)
        hw = h @ w
        d_sw = jnp.sum(s * w, 0)
        d_shs = jnp.sum(s * (h @ s), 0)
        residual = (-jnp.sum(t * w, 0) + jnp.sum(w * hw, 0) + d_sw * jnp.sum(s * (r - hw), 0)
                    + d_sw ** 2 * d_shs + d_sw * jnp.sum((t - h.T @ w) * s, 0))
        left_norm2 = jnp.sum(omega ** 2, 0) - jnp.sum(w ** 2, 0) + d_sw ** 2  # ||P_i omega_i||^2
        left_norm2 = jnp.where(left_norm2 > 0, left_norm2, 1)
        return tr_h - d_shs + (n - k + 1) / left_norm2 * residual

    estimates = jax.lax.cond(rank_deficient(r), lambda: jnp.full((k,), tr_h), loo)
    return _result(estimates, 2 * k, k)


def _shifted_cholesky(y, omega):
    """``(nu, Y + nu Omega, C)`` with ``C^T C = Omega^T (Y + nu Omega)`` (C upper) for the smallest
    tried shift ``nu = 10^j eps ||Y||_F / sqrt(dim)``, ``j = 0, 1, ...``, whose Cholesky is finite."""
    n, dtype = omega.shape[0], omega.dtype
    eps = jnp.finfo(dtype).eps
    nu0 = eps * jnp.linalg.norm(y) / jnp.sqrt(jnp.asarray(n, dtype))
    nu0 = jnp.where(nu0 > 0, nu0, eps)  # A Omega = 0: any positive shift is exact

    def factor(nu):
        h = omega.T @ (y + nu * omega)
        return jnp.linalg.cholesky((h + h.T) / 2).T

    def failed(c):
        return jnp.logical_not(jnp.all(jnp.isfinite(c)))

    def body(state):
        j, nu, _ = state
        return j + 1, 10 * nu, factor(10 * nu)

    _, nu, c = jax.lax.while_loop(lambda s: failed(s[2]) & (s[0] < _SHIFT_RETRIES), body,
                                  (jnp.asarray(0, jnp.int32), nu0, factor(nu0)))
    return nu, y + nu * omega, c


def xnystrace(op: Operator, key: jax.Array, num_matvecs: int, batch_size: Optional[int] = None) -> SketchTraceResult:
    """XNysTrace: the exchangeable leave-one-out Nystrom trace estimator, for PSD operators.

    ``k = num_matvecs`` test vectors ``omega_i`` (:func:`sphere_probe` ``(key, i, dim, dtype)``)
    give ``Y = A Omega`` (k matvecs, the whole cost). Leave-one-out estimate ``i``, with
    ``A_(i) = Y_(i) (Omega_(i)^T Y_(i))^+ Y_(i)^T`` the Nystrom approximation from the other
    vectors and ``P_i`` the projector onto the complement of their span::

        estimates_i = tr(A_(i)) + (dim - k + 1) / ||P_i omega_i||^2 * omega_i^T (A - A_(i)) omega_i

    (``A - A_(i)`` vanishes on the other vectors, so this is the improved Hutchinson term on
    the complement). Computed as in the paper's code: the Nystrom approximation of the
    shifted ``A + nu I`` (``Y + nu Omega``, ``nu = eps ||Y||_F / sqrt(dim)``) from one QR and
    one Cholesky, rank-one downdates for the leave-one-out terms, and ``nu dim`` subtracted
    (exact for any shift; if the Cholesky fails in finite precision the shift is raised
    tenfold, up to 12 times); ``||P_i omega_i||^2 = 1 / [(Omega^T Omega)^{-1}]_ii`` from the QR
    of ``Omega``.

    ``stderr = std(estimates, ddof=1) / sqrt(k)``, the paper's error estimate (as for XTrace).
    Jittable with ``op``, ``num_matvecs`` and ``batch_size`` static. Several seeds:
    ``jax.lax.map`` over keys (under ``jax.vmap`` the batched LAPACK kernels of jaxlib 0.10.2
    can deadlock a CPU with few cores).

    Args:
      op: positive semidefinite :class:`Operator` (``op.psd``: the GGN, the Fisher).
      key: PRNG key.
      num_matvecs: the budget = test vectors, ``2 <= num_matvecs <= dim``.
      batch_size: matvecs vmapped at once (default ``default_batch_size(dim)``).

    Returns:
      :class:`SketchTraceResult` with ``estimates`` (k,), ``matvecs = k``,
      ``sketch_size = num_probes = k``.

    Raises:
      HessianApproxError: ``op`` not marked PSD, a bad key, or ``num_matvecs`` outside the
        range above.

    References:
      Epperly, Tropp & Webber, "XTrace: Making the most of every sample in stochastic trace
      estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024, and ``xnystrace_helper.m``;
      the shifted Nystrom: Tropp, Yurtsever, Udell & Cevher, "Fixed-rank approximation of a
      positive-semidefinite matrix from streaming data", NeurIPS 2017.
    """
    op = require_operator(op, "xnystrace")
    if not op.psd:
        raise HessianApproxError(
            f"xnystrace needs a positive semidefinite operator, and {op.name!r} is not marked psd "
            "(a Hessian is indefinite)",
            "use xtrace, or the GGN/Fisher (as_operator(..., psd=True) for a matrix known to be PSD)")
    check_key(key, "xnystrace")
    n, dtype = op.dim, op.dtype
    k = check_budget(num_matvecs, "xnystrace", 2, "two test vectors", 1, n, "test vectors")
    rows = draw_rows(sphere_probe, key, k, n, dtype)
    omega = rows.T  # (n, k)
    y = apply_columns(op, rows, batch_size)
    nu, y_nu, c = _shifted_cholesky(y, omega)
    q, r = jnp.linalg.qr(y_nu)
    b = jax.scipy.linalg.solve_triangular(c, r.T, trans=1, lower=False).T  # R C^{-1}: A_nu ~ Q B B^T Q^T
    c_inv = jax.scipy.linalg.solve_triangular(c, jnp.eye(k, dtype=dtype), lower=False)
    s = b @ (c_inv.T / jnp.linalg.norm(c_inv, axis=1))  # column i: Q^T z_i, A_nu,(i) = A_nu^ - z_i z_i^T
    d_sw = jnp.sum(s * (q.T @ omega), 0)  # z_i^T omega_i
    _, r_omega = jnp.linalg.qr(omega)
    rinv_t = jax.scipy.linalg.solve_triangular(r_omega, jnp.eye(k, dtype=dtype), trans=1, lower=False)
    scale = (n - k + 1) * jnp.sum(rinv_t ** 2, 0)  # (dim - k + 1) / ||P_i omega_i||^2
    estimates = jnp.sum(b ** 2) - jnp.sum(s ** 2, 0) + scale * d_sw ** 2 - nu * n
    return _result(estimates, k, k)
