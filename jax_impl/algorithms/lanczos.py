"""Lanczos tridiagonalization with full reorthogonalization, and top-k Ritz pairs from it.

Certified (explicit residuals, error bounds) and adaptive Lanczos build on the pieces here:
see :mod:`jax_impl.algorithms.certified`; block Lanczos is in :mod:`jax_impl.algorithms.block_lanczos`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from jax_impl.algorithms.hutchinson import normal_vector
from jax_impl.algorithms.operator import Operator, check_start, require_operator
from jax_impl.algorithms.results import EigResult
from jax_impl.errors import HessianApproxError


def _project_out(w: jax.Array, segments) -> jax.Array:
    """One classical Gram-Schmidt pass: ``w - sum_j S_j^T (S_j w)``, every coefficient from ``w``."""
    coefs = [seg @ w for seg in segments]
    for seg, c in zip(segments, coefs):
        w = w - seg.T @ c
    return w


def _reorthogonalize(w: jax.Array, basis) -> jax.Array:
    """Classical Gram-Schmidt against all rows of ``basis``, a second pass only when needed.

    A second pass runs when the first removed more than half of ``w``'s squared norm
    (``||w'||^2 < ||w||^2 / 2``, the Daniel-Gragg-Kaufman-Stewart criterion): only then can
    cancellation have left ``w'`` less than orthogonal to working precision ("twice is
    enough", Parlett 1998, sec. 6.9). In a Lanczos step the three-term recurrence has
    already removed the large components, so the first pass removes rounding-sized ones and
    the second, which would read the whole basis twice more, is skipped: it changes the
    result by rounding only. Rows that are still zero contribute nothing, so a preallocated
    basis works.

    Args:
      w: ``(dim,)``.
      basis: ``(m, dim)`` orthonormal (or zero) rows, or a sequence of such row blocks.

    References:
      Daniel, Gragg, Kaufman & Stewart, Math. Comp. 30 (1976); Giraud, Langou & Rozloznik,
      "The loss of orthogonality in the Gram-Schmidt orthogonalization process", 2005.
    """
    segments = [basis] if hasattr(basis, "shape") else list(basis)
    once = _project_out(w, segments)
    return jax.lax.cond(2 * jnp.vdot(once, once) < jnp.vdot(w, w),
                        lambda: _project_out(once, segments), lambda: once)


# The basis in segments. In one (m + 1, dim) array every step reads all m + 1 rows twice
# (B w, then B^T c) while most are still zero, and XLA's CPU matrix-vector product slows
# sharply once the basis outgrows the caches (2-core Xeon, dim 203,530, one Gram-Schmidt
# pass and a cheap operator: 4.3 ms a step at 41 rows, 26.9 ms at 101). In segments of
# about SEGMENT_ROWS rows a step reads only the segments that hold rows so far: 3.5 ms
# (41 rows) and 7.5 ms (101); at dim 7,960, 0.17 -> 0.08 ms.
SEGMENT_ROWS = 24
_MAX_SEGMENTS = 16


def _lanczos_segments(op: Operator, v0: jax.Array, num_steps: int, key: jax.Array, breakdown_tol):
    """The loop of :func:`lanczos_tridiag` on a segmented basis: ``(segments, alphas, betas)``.

    ``segments``: ``g`` arrays ``(b, dim)``, rows ``j b .. (j + 1) b - 1`` of the basis (rows
    from ``num_steps`` on are zero or the scratch vector after the last step).
    """
    dim, dtype = op.dim, op.dtype
    rows = num_steps + 1
    b = min(rows, max(SEGMENT_ROWS, -(-rows // _MAX_SEGMENTS)))
    segs = [jnp.zeros((b, dim), dtype) for _ in range(-(-rows // b))]
    segs[0] = segs[0].at[0].set(v0 / jnp.linalg.norm(v0))
    branches = [lambda segs, w, n=n: _reorthogonalize(w, segs[:n]) for n in range(1, len(segs) + 1)]

    def step(i, state):
        segs, v, v_prev, alphas, betas, scale = state
        alpha, beta, v_next, scale = _advance(op, key, breakdown_tol, num_steps - 1, i, v, v_prev, betas, scale,
                                              lambda w: jax.lax.switch(i // b, branches, segs, w))
        t, r = (i + 1) // b, (i + 1) % b  # write row i + 1: its segment gets it, the others keep row r
        segs = tuple(jax.lax.dynamic_update_slice_in_dim(seg, jnp.where(j == t, v_next, seg[r])[None], r, 0)
                     for j, seg in enumerate(segs))
        return segs, v_next, v, alphas.at[i].set(alpha), betas.at[i].set(beta), scale

    zeros = jnp.zeros(num_steps, dtype)
    init = (tuple(segs), segs[0][0], jnp.zeros((dim,), dtype), zeros, zeros, jnp.asarray(0, dtype))
    segs, _, _, alphas, betas, _ = jax.lax.fori_loop(0, num_steps, step, init)
    return segs, alphas, betas


def _advance(op, key, breakdown_tol, last_step, i, v, v_prev, betas, scale, reorth):
    """Step ``i`` from ``v = v_i``, ``v_prev = v_{i-1}``: ``(alpha_i, beta_i, v_{i+1}, scale)``.

    ``reorth`` orthogonalizes a vector against the basis so far; ``beta_i`` is 0 at a
    breakdown, where ``v_{i+1}`` is ``normal(fold_in(key, i))`` orthogonalized.
    """
    dtype = op.dtype
    beta_prev = jnp.where(i > 0, betas[i - 1], 0).astype(dtype)
    av = op(v)
    alpha = jnp.vdot(v, av)
    w = reorth(av - alpha * v - beta_prev * v_prev)
    beta = jnp.linalg.norm(w)
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    broke = (beta <= breakdown_tol * scale) & (i < last_step)

    def fresh():
        r = reorth(normal_vector(jax.random.fold_in(key, i), (op.dim,), dtype))
        return r / jnp.linalg.norm(r)

    v_next = jax.lax.cond(broke, fresh, lambda: w / jnp.where(beta > 0, beta, 1).astype(dtype))
    return alpha, jnp.where(broke, 0, beta).astype(dtype), v_next, scale


def lanczos_tridiag(
    op: Operator,
    v0: jax.Array,
    num_steps: int,
    *,
    key: Optional[jax.Array] = None,
    breakdown_tol: Optional[float] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """``num_steps`` Lanczos steps with full reorthogonalization.

    Builds an orthonormal basis ``V`` (rows) of the Krylov space of ``v0`` and the
    symmetric tridiagonal ``T = V A V^T`` with diagonal ``alphas`` and
    off-diagonal ``betas[:-1]``, so that in exact arithmetic
    ``A V^T = V^T T + betas[-1] * v_{m+1} e_m^T``.

    Step ``j``: ``w = A v_j - alpha_j v_j - beta_{j-1} v_{j-1}`` with
    ``alpha_j = <v_j, A v_j>``; then ``w`` is orthogonalized against every basis
    vector by classical Gram-Schmidt (twice when the first pass removed more than half its
    squared norm, :func:`_reorthogonalize`); ``beta_j = ||w||`` and
    ``v_{j+1} = w / beta_j``. On breakdown (``beta_j <= breakdown_tol * s``,
    ``s`` the running largest ``|alpha|``/``beta``, i.e. the Krylov space is
    invariant) the recurrence continues from a fresh normal vector
    orthogonalized against the basis, and ``beta_j`` is recorded as 0 (``T``
    becomes block diagonal, still ``V A V^T``). The last step never restarts.

    Cost: ``num_steps`` matvecs, ``O(num_steps^2 dim)`` flops and
    ``O(num_steps dim)`` memory for the basis, held in segments of about
    :data:`SEGMENT_ROWS` rows so that step ``j`` reads only the segments holding
    ``v_1..v_j``. Jittable with ``matvec`` and ``num_steps`` static.

    Args:
      op: symmetric :class:`Operator` of dimension ``dim``.
      v0: ``(dim,)`` nonzero start vector of the operator's dtype (normalized here, exactly).
      num_steps: ``m``, the number of matvecs, ``1 <= m <= dim``.
      key: PRNG key for breakdown restarts; default ``jax.random.PRNGKey(0)``.
      breakdown_tol: relative breakdown threshold; default
        ``10 * sqrt(dim) * eps(dtype)`` (an exactly invariant Krylov space
        leaves ``beta`` at roughly ``10-60 eps * ||A||`` after
        reorthogonalization for ``dim`` 20 to 2000). A breakdown missed by a
        too small threshold is harmless: the noise ``w`` is reorthogonalized, so
        it acts as a restart with a coupling of order ``eps * ||A||``.

    Returns:
      ``(basis, alphas, betas)``: ``basis`` ``(m, dim)`` orthonormal rows
      ``v_1..v_m``; ``alphas`` ``(m,)`` the diagonal of ``T``; ``betas`` ``(m,)``
      where ``betas[j]`` couples ``v_j`` and ``v_{j+1}`` (0 at a breakdown) for
      ``j < m - 1`` and ``betas[m-1]`` is the norm of the final residual
      (used for Ritz residuals).

    Raises:
      HessianApproxError: ``num_steps`` not in ``[1, dim]`` or ``v0`` not a (dim,) vector of
        the operator's dtype.

    References:
      Lanczos, 1950; Golub & Van Loan, "Matrix Computations", 4th ed., sec. 10.1;
      Parlett, "The Symmetric Eigenvalue Problem", 1998 (reorthogonalization).
    """
    op = require_operator(op, "lanczos_tridiag")
    dim = op.dim
    v0 = check_start(op, v0, (dim,))
    num_steps = int(num_steps)
    if not 1 <= num_steps <= dim:
        raise HessianApproxError(
            f"num_steps={num_steps} Lanczos steps for a {dim}-dimensional operator",
            f"choose 1 <= num_steps <= {dim}",
        )
    key = jax.random.PRNGKey(0) if key is None else key
    if breakdown_tol is None:
        breakdown_tol = default_breakdown_tol(dim, v0.dtype)
    segs, alphas, betas = _lanczos_segments(op, v0, num_steps, key, breakdown_tol)
    return jnp.concatenate(segs)[:num_steps], alphas, betas


def default_breakdown_tol(dim: int, dtype) -> float:
    """``10 * sqrt(dim) * eps(dtype)``: the relative breakdown threshold of :func:`lanczos_tridiag`."""
    return 10.0 * float(dim) ** 0.5 * float(jnp.finfo(dtype).eps)


def lanczos_init_state(v0: jax.Array, max_steps: int) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The loop state ``(basis, alphas, betas, scale)`` before step 0 of :func:`lanczos_step_fn`.

    Args:
      v0: ``(dim,)`` nonzero start vector (normalized here).
      max_steps: ``m``, the most steps the state will hold.

    Returns:
      ``basis`` ``(m + 1, dim)`` with row 0 ``v0 / ||v0||`` and zero rows after it (row ``m``
      is scratch for the next vector after the last step); ``alphas``, ``betas`` ``(m,)``
      zeros; ``scale`` ``()`` 0, the running largest ``|alpha|``/``beta``.
    """
    dtype, dim = v0.dtype, v0.shape[0]
    basis = jnp.zeros((max_steps + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    return basis, jnp.zeros(max_steps, dtype), jnp.zeros(max_steps, dtype), jnp.asarray(0, dtype)


def lanczos_step_fn(op: Operator, key: jax.Array, breakdown_tol, last_step):
    """A step ``step(i, state) -> state`` of :func:`lanczos_tridiag` on one preallocated basis array.

    The same arithmetic as :func:`lanczos_tridiag` (which holds its basis in segments), for
    loops run in chunks; each step reorthogonalizes against the whole ``(max_steps + 1,
    dim)`` array, zero rows included. Step ``i`` reads ``basis[i]`` (and ``basis[i - 1]``),
    writes ``alphas[i]``, ``betas[i]`` and ``basis[i + 1]``; rows after ``i + 1`` stay zero,
    so the loop can stop after any step and be resumed later (``lax.fori_loop(lo, hi, step,
    state)`` with traced bounds), which is how
    :func:`jax_impl.algorithms.certified.adaptive_lanczos` grows the Krylov space without
    recompiling. A breakdown at ``i < last_step`` restarts from a fresh vector
    ``normal(fold_in(key, i))`` orthogonalized against the basis.

    Args:
      op: the symmetric :class:`Operator`.
      key: PRNG key of breakdown restarts.
      breakdown_tol: relative breakdown threshold (see :func:`lanczos_tridiag`).
      last_step: index of the last step the state can hold (``max_steps - 1``); it never restarts.
    """
    def step(i, state):
        basis, alphas, betas, scale = state  # basis[-1] is 0 or unused at i == 0; row max_steps is scratch
        alpha, beta, v_next, scale = _advance(op, key, breakdown_tol, last_step, i, basis[i], basis[i - 1], betas,
                                              scale, lambda w: _reorthogonalize(w, basis))
        return basis.at[i + 1].set(v_next), alphas.at[i].set(alpha), betas.at[i].set(beta), scale

    return step


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """Dense ``(m, m)`` symmetric tridiagonal matrix from ``lanczos_tridiag`` output.

    Args:
      alphas: ``(m,)`` diagonal.
      betas: ``(m,)`` as returned by :func:`lanczos_tridiag`; ``betas[:-1]`` is
        the off-diagonal, ``betas[-1]`` (the residual norm) is ignored.
    """
    off = betas[:-1]
    return jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)


def default_num_steps(dim: int, k: int) -> int:
    """``min(dim, max(3 k, 40))``: the default Krylov dimension of :func:`lanczos`."""
    return min(int(dim), max(3 * int(k), 40))


def lanczos_start(op: Operator, key: Optional[jax.Array],
                  v0: Optional[jax.Array]) -> Tuple[jax.Array, Optional[jax.Array]]:
    """``(v0, restart_key)`` as :func:`lanczos` draws them.

    The start vector is ``normal(split(key)[0], (dim,))`` unless ``v0`` is given (then checked:
    ``(dim,)`` of the operator's dtype); ``restart_key = split(key)[1]`` seeds breakdown
    restarts, None when ``key`` is None (``lanczos_tridiag`` then uses ``PRNGKey(0)``).
    """
    restart_key = None
    if v0 is None:
        if key is None:
            raise HessianApproxError("neither key nor v0 given", "pass a PRNG key or a start vector v0")
        start_key, restart_key = jax.random.split(key)
        v0 = normal_vector(start_key, (op.dim,), op.dtype)
    else:
        v0 = check_start(op, v0, (op.dim,))
        if key is not None:
            restart_key = jax.random.split(key)[1]
    return v0, restart_key


def lanczos(
    op: Operator,
    key: Optional[jax.Array],
    k: int = 10,
    num_steps: Optional[int] = None,
    v0: Optional[jax.Array] = None,
) -> EigResult:
    """Top-``k`` (largest algebraic) Ritz pairs from one unrestarted Lanczos run.

    Runs :func:`lanczos_tridiag` for ``m = num_steps`` steps, diagonalizes
    ``T = S diag(theta) S^T`` and returns the ``k`` largest Ritz values
    ``theta`` with Ritz vectors ``y_i = V^T s_i``. Ritz values lie inside the
    spectrum (``theta_max <= lambda_max``) and, by Cauchy interlacing, grow
    towards the extreme eigenvalues as ``m`` increases; extreme, well-separated
    eigenvalues converge first.

    Default ``num_steps = min(dim, max(3 k, 40))``: without restarts the Krylov
    space must be a few times larger than ``k`` for the ``k``-th Ritz value to
    converge (ARPACK's default subspace for a restarted run is already
    ``max(2 k + 1, 20)``); 40 steps resolve the well-separated outliers of a
    network Hessian to near machine precision at a cost of 40 matvecs and
    ``40 x dim`` basis memory.

    Args:
      op: symmetric :class:`Operator`; its ``dim`` and ``dtype`` are the iterates'.
      key: PRNG key: start vector ``normal(split(key)[0], (dim,))`` unless ``v0``
        is given; ``split(key)[1]`` seeds breakdown restarts. May be None with
        ``v0`` (restarts then use ``PRNGKey(0)``).
      k: number of Ritz pairs, ``1 <= k <= dim``.
      num_steps: Lanczos steps = matvecs, ``k <= num_steps <= dim``.
      v0: optional ``(dim,)`` start vector of the operator's dtype.

    Returns:
      :class:`EigResult` with ``eigenvalues`` ``(k,)`` descending,
      ``eigenvectors`` ``(k, dim)`` Ritz vectors (rows), ``residuals`` ``(k,)``
      ``|beta_m s_{m,i}|``, which equals ``||A y_i - theta_i y_i||`` exactly
      under full reorthogonalization in exact arithmetic (and to about machine
      precision times ``||A||`` in floating point), and ``matvecs = num_steps``.

    Raises:
      HessianApproxError: ``k > dim``, ``num_steps > dim``, ``num_steps < k``,
        ``k < 1`` or a badly shaped ``v0``.

    References:
      Golub & Van Loan, "Matrix Computations", 4th ed., sec. 10.1;
      Ghorbani, Krishnan, Xiao, "An Investigation into Neural Net Optimization
      via Hessian Eigenvalue Density", ICML 2019.
    """
    op = require_operator(op, "lanczos")
    dim, k = op.dim, int(k)
    if not 1 <= k <= dim:
        raise HessianApproxError(
            f"k={k} Ritz pairs requested from a {dim}-dimensional operator",
            f"choose 1 <= k <= {dim}",
        )
    num_steps = default_num_steps(dim, k) if num_steps is None else int(num_steps)
    if num_steps > dim:
        raise HessianApproxError(
            f"num_steps={num_steps} exceeds the dimension {dim}",
            f"use num_steps <= {dim}",
        )
    if num_steps < k:
        raise HessianApproxError(
            f"num_steps={num_steps} is below k={k}", f"use num_steps >= {k} (a few times k is better)"
        )
    v0, restart_key = lanczos_start(op, key, v0)
    restart_key = jax.random.PRNGKey(0) if restart_key is None else restart_key
    segs, alphas, betas = _lanczos_segments(op, v0, num_steps, restart_key,
                                            default_breakdown_tol(dim, op.dtype))  # as lanczos_tridiag
    theta, s = jnp.linalg.eigh(tridiagonal(alphas, betas))
    top = jnp.arange(num_steps - 1, num_steps - 1 - k, -1)
    theta, s = theta[top], s[:, top]
    b = segs[0].shape[0]
    coef = jnp.zeros((len(segs) * b, k), s.dtype).at[:num_steps].set(s)  # Ritz vectors without joining the segments
    return EigResult(
        eigenvalues=theta,
        eigenvectors=sum(coef[j * b:(j + 1) * b].T @ seg for j, seg in enumerate(segs)),
        residuals=jnp.abs(betas[-1] * s[-1, :]),
        matvecs=jnp.asarray(num_steps, jnp.int32),
    )
