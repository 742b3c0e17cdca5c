"""Certified top-k eigenpairs: explicit residuals, error bounds, adaptive Lanczos (ARPACK reference: eigsh.py).

A Ritz pair ``(theta, y)`` (``||y|| = 1``) of a symmetric ``A`` with residual
``r = A y - theta y`` certifies eigenvalues of ``A`` two ways (Parlett, "The Symmetric
Eigenvalue Problem", 1998, Thm 4.5.1 and Thm 11.7.1 (Kato-Temple); Saad, "Numerical Methods
for Large Eigenvalue Problems", 2nd ed. 2011, Thm 3.8 and Thm 3.9 (Kato-Temple)):

* residual bound: some eigenvalue ``lambda`` of ``A`` has ``|lambda - theta| <= ||r||``.
  Unconditional: it needs nothing but ``r``, which is why :func:`certify` recomputes ``r``
  explicitly with one matvec per pair instead of trusting the Lanczos estimate
  ``|beta_m s_{m,i}|`` (equal in exact arithmetic, not after rounding or with a faulty
  matvec).
* gap bound: when ``theta`` is the Rayleigh quotient of ``y`` and every eigenvalue of ``A``
  other than ``lambda`` lies at distance ``>= gap`` from ``theta``, with ``gap > ||r||``,
  then ``|lambda - theta| <= ||r||^2 / gap`` (Kato-Temple; quadratic in the residual: a
  converged pair's eigenvalue is far more accurate than its vector). ``gap`` concerns A's
  spectrum, which is unknown; it is estimated from the other Ritz pairs ``(theta_j, r_j)``
  of the same Rayleigh-Ritz projection as ``gap = min_j (|theta_j - theta| - r_j)``: each
  ``theta_j`` has an eigenvalue within ``r_j``. That bounds A's gap only if the Krylov space
  has not missed an eigenvalue near ``theta``: an eigenvector almost orthogonal to the
  start vector, or the second member of a nearly degenerate pair that single-vector
  Lanczos has not split yet (measured: eigenvalues ``1`` and ``1 + 1e-7`` under ``2.0``,
  60 steps: a pair with residual 1.6e-7 claimed 2e-12 and was 5e-8 off). A repeated
  eigenvalue seen once is harmless (Kato-Temple is about distinct eigenvalues); block
  Lanczos with a block at least the cluster size splits clusters.

Reported: ``error_bounds`` is the residual bound by default (``gap_bound=False``): a
certificate that needs no assumption. With ``gap_bound=True`` a pair gets the gap bound
when it (a) has converged (``r <= tol * scale``), (b) has another Ritz value below it (below
the lowest Ritz value lies the unresolved interior of the spectrum) and (c) has
``gap > ||r||``; every other pair keeps the residual bound. Use it for well-separated
eigenvalues, or with :func:`jax_impl.algorithms.block_lanczos.block_lanczos` for clusters.

Floating point adds ``2 sqrt(dim) eps max_j |theta_j|`` to each reported bound: an
allowance (not a rigorous analysis) for the rounding of ``A y`` (about ``eps ||A||`` per
product, with ``max_j |theta_j| <= ||A||`` standing in for ``||A||``), of the inner products
and of the reference it is compared with. The operator's own error (an autodiff
Hessian-vector product in float32) is not included: the certificate is about the operator
as computed.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.algorithms.lanczos import (
    default_breakdown_tol,
    default_num_steps,
    lanczos_init_state,
    lanczos_start,
    lanczos_step_fn,
    lanczos_tridiag,
    tridiagonal,
)
from jax_impl.algorithms.eigsh import eigsh_reference  # noqa: F401  (re-exported: its former home)
from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.algorithms.results import EigResult
from jax_impl.errors import HessianApproxError


def default_tol(dtype) -> float:
    """``max(1e-6, 1000 eps(dtype))``: 1e-6 in float64, 1.2e-4 in float32.

    Relative to the scale of :func:`certify` (about ``||A||``); float32 residuals stall near
    ``10-100 eps ||A||``, so 1e-6 there would never be met.
    """
    return max(1e-6, 1000.0 * float(jnp.finfo(dtype).eps))


def _check_k(dim: int, k) -> int:
    k = int(k)
    if not 1 <= k <= dim:
        raise HessianApproxError(f"k={k} Ritz pairs requested from a {dim}-dimensional operator",
                                 f"choose 1 <= k <= {dim}")
    return k


def explicit_residuals(op: Operator, vectors: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Rayleigh quotients and explicit residual norms of ``k`` vectors: ``k`` batched matvecs.

    Args:
      op: symmetric :class:`Operator`.
      vectors: ``(k, dim)`` nonzero rows (normalized here) of the operator's dtype.

    Returns:
      ``(rho, residuals, av_norms)``, each ``(k,)``: ``rho_i = y_i^T A y_i`` of the unit
      ``y_i``, ``||A y_i - rho_i y_i||`` and ``||A y_i||``. ``A y`` is ``jax.vmap(op)`` on
      the rows: one batched application, counted as ``k`` matvecs.
    """
    y = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    ay = jax.vmap(op)(y)
    rho = jnp.sum(y * ay, axis=1)
    res = jnp.linalg.norm(ay - rho[:, None] * y, axis=1)
    return rho, res, jnp.linalg.norm(ay, axis=1)


def error_bounds(values: jax.Array, residuals: jax.Array, other_values: Optional[jax.Array] = None,
                 other_residuals: Optional[jax.Array] = None, eligible=True) -> Tuple[jax.Array, jax.Array]:
    """``(bounds, gaps)`` of :func:`certify` (no rounding allowance), both ``(k,)``.

    ``gap_i = min_{j != i} (|theta_j - values_i| - r_j)`` over the other given pairs and the
    ``others``; ``bound_i = r_i^2 / gap_i`` where ``eligible_i``, ``gap_i > r_i`` and some
    other Ritz value lies below ``values_i``; else ``r_i`` (see the module docstring for
    when the gap bound is valid). With no other values at all, ``gap`` is ``inf``
    (unknown) and the bound is ``r``.

    Args:
      values: ``(k,)`` Rayleigh quotients.
      residuals: ``(k,)`` their residual norms.
      other_values: ``(n,)`` other Ritz values of the same projection (may be None).
      other_residuals: ``(n,)`` their residual norms or estimates (needed with ``other_values``).
      eligible: ``(k,)`` or scalar bool (may be traced): pairs allowed the gap bound (the
        converged ones, and only when the caller asks for gap bounds).
    """
    k = values.shape[0]
    itself = jnp.eye(k, dtype=bool)
    near = jnp.where(itself, jnp.inf, jnp.abs(values[None, :] - values[:, None]) - residuals[None, :])
    gaps = jnp.min(near, axis=1)
    below = jnp.any(~itself & (values[None, :] < values[:, None]), axis=1)
    if other_values is not None and other_values.shape[0] > 0:
        far = jnp.abs(other_values[None, :] - values[:, None]) - other_residuals[None, :]
        gaps = jnp.minimum(gaps, jnp.min(far, axis=1))
        below = below | jnp.any(other_values[None, :] < values[:, None], axis=1)
    use_gap = jnp.asarray(eligible) & below & jnp.isfinite(gaps) & (gaps > residuals)
    safe = jnp.where(use_gap, gaps, 1)
    return jnp.where(use_gap, residuals ** 2 / safe, residuals), gaps


def certify(op: Operator, vectors: jax.Array, *, other_values: Optional[jax.Array] = None,
            other_residuals: Optional[jax.Array] = None, tol: Optional[float] = None,
            gap_bound: bool = False, matvecs=0) -> EigResult:
    """Certify ``k`` approximate eigenvectors of any origin (Lanczos, power iteration, PyHessian).

    Recomputes, with ``k`` batched matvecs, each pair's Rayleigh quotient ``rho_i``, explicit
    residual ``r_i = ||A y_i - rho_i y_i||`` and error bound (module docstring):
    ``error_bounds_i = r_i + 2 sqrt(dim) eps scale``, or with ``gap_bound``
    ``r_i^2 / gap_i + 2 sqrt(dim) eps scale`` for the converged pairs where the gap bound
    applies (:func:`error_bounds`). ``converged_i = r_i <= tol * scale`` with
    ``scale = max(|rho|, |other_values|)``, the largest-magnitude Ritz value: ``|theta_1|``
    whenever the top eigenvalue is also the largest in magnitude (a network Hessian's top
    outlier), and never below ``|theta_1|``, so an operator whose top eigenvalue is near 0
    (a negative definite one) still has a reachable criterion. Pairs are returned as given
    (not reordered). Jittable (``op`` static).

    Args:
      op: symmetric :class:`Operator`.
      vectors: ``(k, dim)`` approximate eigenvectors, rows, of the operator's dtype.
      other_values: ``(n,)`` other Ritz values of the same subspace (e.g. the rest of the
        tridiagonal's spectrum) that define the gaps; optional.
      other_residuals: ``(n,)`` their residual norms or Lanczos estimates.
      tol: relative tolerance of ``converged``; default :func:`default_tol`.
      gap_bound: report the gap bound where it applies (module docstring). Gaps mean
        something only when ``vectors`` and ``other_values`` are the Ritz pairs of one
        Rayleigh-Ritz projection (as in :func:`certified_lanczos`); vectors from power
        iteration know nothing of the rest of the spectrum. Off (default),
        ``error_bounds`` is ``r`` plus rounding, the unconditional bound.
      matvecs: operator applications spent before; ``k`` is added.

    Returns:
      :class:`EigResult` with ``eigenvalues`` ``rho`` ``(k,)``, ``eigenvectors`` the unit
      rows ``(k, dim)``, ``residuals`` ``r`` ``(k,)`` (explicit), ``error_bounds`` ``(k,)``,
      ``converged`` ``(k,)`` bool, ``matvecs = matvecs + k``.

    References:
      Parlett, "The Symmetric Eigenvalue Problem", 1998, Thm 4.5.1, Thm 11.7.1;
      Saad, "Numerical Methods for Large Eigenvalue Problems", 2nd ed., 2011, sec. 3.2.
    """
    op = require_operator(op, "certify")
    vectors = jnp.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != op.dim or vectors.dtype != op.dtype:
        raise HessianApproxError(
            f"vectors of shape {vectors.shape} and dtype {vectors.dtype} for a {op.dim}-dimensional "
            f"{op.dtype.name} operator", f"pass (k, {op.dim}) {op.dtype.name} rows")
    tol = default_tol(op.dtype) if tol is None else tol
    if other_values is not None:
        other_values = jnp.asarray(other_values, op.dtype)
        if other_residuals is None:
            raise HessianApproxError("other_values given without other_residuals",
                                     "pass their residual norms or Lanczos estimates too")
        other_residuals = jnp.asarray(other_residuals, op.dtype)
    return _certify_jit(op, False, vectors, jnp.asarray(bool(gap_bound)), other_values, other_residuals,
                        jnp.asarray(tol, op.dtype), jnp.asarray(matvecs, jnp.int32))


def _certify_core(op, descending, vectors, gap_bound, other_values, other_residuals, tol, matvecs):
    y = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    rho, res, _ = explicit_residuals(op, y)
    scale = jnp.max(jnp.abs(rho))
    if other_values is not None and other_values.shape[0] > 0:
        scale = jnp.maximum(scale, jnp.max(jnp.abs(other_values)))
    converged = res <= tol * scale
    bounds, _ = error_bounds(rho, res, other_values, other_residuals, converged & gap_bound)
    bounds = bounds + 2.0 * float(op.dim) ** 0.5 * float(jnp.finfo(op.dtype).eps) * scale
    out = EigResult(
        eigenvalues=rho,
        eigenvectors=y,
        residuals=res,
        matvecs=jnp.asarray(matvecs, jnp.int32) + vectors.shape[0],
        converged=converged,
        error_bounds=bounds,
    )
    return out.sorted() if descending else out


# Module-level jit keyed on the Operator's identity (static): eager calls compile once per shape.
_certify_jit = jax.jit(_certify_core, static_argnums=(0, 1))


def certified_lanczos(op: Operator, key: Optional[jax.Array], k: int = 10, num_steps: Optional[int] = None,
                      v0: Optional[jax.Array] = None, *, tol: Optional[float] = None,
                      gap_bound: bool = False) -> EigResult:
    """Top-``k`` Ritz pairs of one Lanczos run, each with an explicit residual and an error bound.

    The same run as :func:`jax_impl.algorithms.lanczos` (``num_steps`` steps with full
    reorthogonalization, start vector from ``key`` or ``v0``), then :func:`certify` on the
    ``k`` largest Ritz vectors with the other ``num_steps - k`` Ritz values and their
    estimates ``|beta_m s_{m,j}|`` as the neighbours that define the gaps. ``eigenvalues``
    are the Rayleigh quotients recomputed from the explicit matvecs (they agree with the
    Ritz values to rounding), descending.

    Args:
      op: symmetric :class:`Operator`.
      key: PRNG key (see :func:`jax_impl.algorithms.lanczos`).
      k: number of pairs, ``1 <= k <= num_steps``.
      num_steps: Lanczos steps, default :func:`default_num_steps` ``min(dim, max(3 k, 40))``.
      v0: optional ``(dim,)`` start vector.
      tol: relative tolerance of ``converged`` (``r_i <= tol * max_j |theta_j|``), default
        :func:`default_tol`.
      gap_bound: report as ``error_bounds`` the gap bound ``r^2 / gap`` for the converged
        pairs where it applies, the other Ritz values defining the gaps (valid unless
        Lanczos missed an eigenvalue near the pair: module docstring); default False: the
        residual bound ``r`` (both plus rounding).

    Returns:
      :class:`EigResult`: ``eigenvalues`` ``(k,)`` descending, ``eigenvectors`` ``(k, dim)``,
      ``residuals`` ``(k,)`` explicit ``||A y - theta y||``, ``error_bounds`` ``(k,)``,
      ``converged`` ``(k,)``, ``matvecs = num_steps + k``. Jittable with ``op``, ``k``,
      ``num_steps`` static.

    References:
      Golub & Van Loan, "Matrix Computations", 4th ed., sec. 10.1; Parlett 1998, ch. 11, 13;
      Saad 2011, sec. 3.2 and 6.6.
    """
    op = require_operator(op, "certified_lanczos")
    dim = op.dim
    k = _check_k(dim, k)
    num_steps = default_num_steps(dim, k) if num_steps is None else int(num_steps)
    if not k <= num_steps <= dim:
        raise HessianApproxError(f"num_steps={num_steps} for k={k} and a {dim}-dimensional operator",
                                 f"use {k} <= num_steps <= {dim}")
    v0, restart_key = lanczos_start(op, key, v0)
    restart_key = jax.random.PRNGKey(0) if restart_key is None else restart_key
    tol = default_tol(op.dtype) if tol is None else tol
    return _certified_lanczos_jit(op, k, num_steps, jnp.asarray(bool(gap_bound)), v0, restart_key,
                                  jnp.asarray(tol, op.dtype))


def _certified_lanczos_core(op, k, num_steps, gap_bound, v0, restart_key, tol):
    basis, alphas, betas = lanczos_tridiag(op, v0, num_steps, key=restart_key)
    theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))  # ascending
    estimates = jnp.abs(betas[-1] * s[-1, :])
    top = s[:, num_steps - k:][:, ::-1]
    return _certify_core(op, True, top.T @ basis, gap_bound, theta[: num_steps - k],
                         estimates[: num_steps - k], tol, num_steps)


# Module-level jit keyed on the Operator's identity: repeated eager calls on one operator
# compile once (a fresh fori_loop body per call would recompile every time).
_certified_lanczos_jit = jax.jit(_certified_lanczos_core, static_argnums=(0, 1, 2))


def _adaptive_chunk(op, last_step, state, lo, hi, key, breakdown_tol):
    step = lanczos_step_fn(op, key, breakdown_tol, last_step)
    return jax.lax.fori_loop(lo, hi, step, state)


_adaptive_chunk_jit = jax.jit(_adaptive_chunk, static_argnums=(0, 1))
_ritz_vectors_jit = jax.jit(lambda basis, s: s.T @ basis)


def adaptive_lanczos(op: Operator, key: Optional[jax.Array], k: int = 10, tol: Optional[float] = None,
                     max_steps: Optional[int] = None, step_increment: Optional[int] = None,
                     min_steps: Optional[int] = None, v0: Optional[jax.Array] = None, *,
                     gap_bound: bool = False, callback: Optional[Callable[[int, np.ndarray], None]] = None
                     ) -> EigResult:
    """Lanczos that grows its Krylov space until the top ``k`` pairs are certified to ``tol``.

    Restart-free growth with full reorthogonalization: the basis is preallocated for
    ``max_steps`` vectors; a jitted chunk runs ``step_increment`` more Lanczos steps
    (:func:`jax_impl.algorithms.lanczos.lanczos_step_fn`, one compilation for all chunks),
    then the host diagonalizes the ``m x m`` tridiagonal (float64, ``O(m^2)``) and reads the
    residual estimates ``|beta_m s_{m,i}|`` of the top ``k``. When all of them are
    ``<= tol * max_j |theta_j|``, the ``k`` Ritz vectors are certified with ``k`` explicit
    batched matvecs (:func:`certify`); the run stops when every explicit residual passes too,
    else grows on (each such check costs ``k`` more matvecs; after the ``f``-th failed one the
    next waits ``step_increment * 2^f`` steps, so a ``tol`` below the rounding floor of the
    explicit residual, about ``10-100 eps ||A||``, costs ``O(k log max_steps)`` extra
    matvecs, not ``k`` per chunk). At ``max_steps`` it stops with
    the pairs it has, ``converged`` False where unmet. The Python loop over jitted chunks
    synchronizes once per chunk (the stopping test is on the host); the function as a whole
    is not jittable.

    Cost: ``m`` matvecs for the ``m`` steps taken plus ``k`` per explicit check (usually one);
    each step reorthogonalizes against the whole preallocated basis, ``O(max_steps dim)``,
    and the basis takes ``(max_steps + 1) dim`` memory.

    Args:
      op: symmetric :class:`Operator`.
      key: PRNG key (see :func:`jax_impl.algorithms.lanczos`).
      k: number of pairs.
      tol: relative residual tolerance (``r_i <= tol * max_j |theta_j|``; ``|theta_1|`` when
        the top eigenvalue is the largest in magnitude); default :func:`default_tol`.
      max_steps: most Lanczos steps, default ``min(dim, max(10 k, 100))``.
      step_increment: steps per chunk between checks, default ``max(5, k // 2)``.
      min_steps: steps before the first check, default ``min(max_steps, 2 k)``.
      v0: optional ``(dim,)`` start vector.
      gap_bound: as in :func:`certified_lanczos`.
      callback: optional ``callback(m, estimates)`` after each chunk, ``estimates`` the top-k
        residual estimates (for tracing convergence).

    Returns:
      :class:`EigResult` as :func:`certified_lanczos`, ``matvecs`` the applications actually
      used (steps plus explicit checks).

    References:
      Parlett 1998, ch. 13 (Lanczos with full reorthogonalization, error bounds);
      Saad 2011, sec. 6.6 (convergence of Lanczos, stopping on residual estimates).
    """
    op = require_operator(op, "adaptive_lanczos")
    dim = op.dim
    k = _check_k(dim, k)
    max_steps = min(dim, max(10 * k, 100)) if max_steps is None else int(max_steps)
    if not k <= max_steps <= dim:
        raise HessianApproxError(f"max_steps={max_steps} for k={k} and a {dim}-dimensional operator",
                                 f"use {k} <= max_steps <= {dim}")
    step_increment = max(5, k // 2) if step_increment is None else int(step_increment)
    min_steps = min(max_steps, 2 * k) if min_steps is None else min(max_steps, int(min_steps))
    if step_increment < 1 or min_steps < k:
        raise HessianApproxError(f"step_increment={step_increment}, min_steps={min_steps} for k={k}",
                                 f"use step_increment >= 1 and min_steps >= {k}")
    tol = default_tol(op.dtype) if tol is None else float(tol)
    v0, restart_key = lanczos_start(op, key, v0)
    restart_key = jax.random.PRNGKey(0) if restart_key is None else restart_key
    breakdown_tol = default_breakdown_tol(dim, op.dtype)

    state = lanczos_init_state(v0, max_steps)
    m, extra, fails, next_check = 0, 0, 0, 0
    while True:
        hi = min_steps if m == 0 else min(max_steps, m + step_increment)
        state = _adaptive_chunk_jit(op, max_steps - 1, state, m, hi, restart_key, breakdown_tol)
        m = hi
        alphas = np.asarray(state[1][:m], np.float64)
        betas = np.asarray(state[2][:m], np.float64)
        theta, s = np.linalg.eigh(np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1))
        est = np.abs(betas[-1] * s[-1, :])
        scale = np.max(np.abs(theta))
        if callback is not None:
            callback(m, est[::-1][:k])
        if (np.all(est[m - k:] <= tol * scale) and m >= next_check) or m == max_steps:
            s_pad = np.zeros((max_steps + 1, k))
            s_pad[:m] = s[:, m - k:][:, ::-1]
            y = _ritz_vectors_jit(state[0], jnp.asarray(s_pad, op.dtype))
            res = _certify_jit(op, True, y, jnp.asarray(bool(gap_bound)), jnp.asarray(theta[: m - k], op.dtype),
                               jnp.asarray(est[: m - k], op.dtype), jnp.asarray(tol, op.dtype),
                               jnp.asarray(m + extra, jnp.int32))
            if bool(np.all(np.asarray(res.converged))) or m == max_steps:
                return res
            extra += k
            fails += 1  # estimates passed, explicit residuals did not: back off before re-checking
            next_check = m + step_increment * 2 ** fails
