"""Block Lanczos with full reorthogonalization: clusters and repeated eigenvalues, certified.

Single-vector Lanczos sees one vector of each eigenspace (the projection of its start vector),
so in exact arithmetic it finds a repeated eigenvalue once. A block of ``p`` start vectors
spans up to ``p`` directions of every eigenspace: block Lanczos finds multiplicities up to
``p`` and converges faster on clusters of nearly equal eigenvalues, such as the about ``C``
outliers of a ``C``-class cross-entropy Hessian. Each step applies the operator to a whole
block (``jax.vmap`` of the matvec: batched, ``p`` matvecs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from jax_impl.algorithms.certified import _certify_core, default_tol
from jax_impl.algorithms.hutchinson import normal_vector
from jax_impl.algorithms.lanczos import default_breakdown_tol
from jax_impl.algorithms.operator import Operator, check_start, require_operator
from jax_impl.algorithms.results import EigResult
from jax_impl.errors import HessianApproxError


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` for rows ``a`` ``(m, dim)``, ``b`` ``(n, dim)``, through a transposed copy of ``a``.

    XLA's CPU GEMM is slow when both operands hold ``dim`` in their contiguous axis: at dim
    203,530, ``(10, dim) @ (dim, 50)`` took 95 ms, ``b @ a.T`` from a copied ``a.T`` 23 ms (the
    barrier keeps XLA from folding the copy back into the product).
    """
    return (b @ jax.lax.optimization_barrier(a.T)).T


def _orthonormalize_block(w: jax.Array, basis: jax.Array, key: jax.Array, tol) -> Tuple[jax.Array, jax.Array]:
    """QR of the rows of ``w`` orthogonal to ``basis``, replacing dependent rows by fresh ones.

    Classical Gram-Schmidt per row against the rows already made (and ``basis``, against which
    the caller has orthogonalized ``w``), again against both where a pass removed more than
    half the row's squared norm. A row whose remaining norm is ``<= tol`` (rank deficiency:
    the block Krylov space has become invariant in that direction, or ``w`` was dependent) is
    replaced by the matching row of ``normal(key, (p, dim))`` orthogonalized against both,
    with a zero diagonal entry in ``R``.

    Args:
      w: ``(p, dim)`` rows.
      basis: ``(n, dim)`` orthonormal (or zero) rows.
      key: PRNG key of replacements.
      tol: absolute threshold of a dependent row.

    Returns:
      ``(q, r)``: ``q`` ``(p, dim)`` orthonormal rows, orthogonal to ``basis``; ``r``
      ``(p, p)`` upper triangular with ``w = r^T q`` up to the parts along ``basis`` (which
      the caller has already removed).
    """
    p, dim = w.shape

    def once(x, q):  # one classical Gram-Schmidt pass against the rows made and the basis
        h = q @ x
        x = x - q.T @ h
        return x - basis.T @ (basis @ x), h

    def orth(x, q, fresh=False):
        # The caller has orthogonalized w against the basis, so a row of w needs the basis
        # again only if the rows made cancel most of it; a fresh random row always does.
        # Twice only where a pass removed more than half the squared norm (see
        # lanczos._reorthogonalize): the skipped passes change the result by rounding only.
        if fresh:
            x1, h1 = once(x, q)
        else:
            h1 = q @ x
            x1 = x - q.T @ h1

        def twice():
            x2, h2 = once(x1, q)
            return x2, h1 + h2

        return jax.lax.cond(2 * jnp.vdot(x1, x1) < jnp.vdot(x, x), twice, lambda: (x1, h1))

    def column(c, carry):
        q, r = carry
        x, coef = orth(w[c], q)
        nrm = jnp.linalg.norm(x)
        broke = nrm <= tol

        def fresh():  # row c of normal(key, (p, dim)), drawn only here
            z, _ = orth(normal_vector(key, (p, dim), w.dtype, row=c), q, fresh=True)
            return z / jnp.linalg.norm(z)

        x = jax.lax.cond(broke, fresh, lambda: x / jnp.where(nrm > 0, nrm, 1).astype(w.dtype))
        r = r.at[:, c].set(coef.at[c].set(jnp.where(broke, 0, nrm).astype(w.dtype)))
        return q.at[c].set(x), r

    return jax.lax.fori_loop(0, p, column, (jnp.zeros_like(w), jnp.zeros((p, p), w.dtype)))


def block_lanczos_tridiag(op: Operator, v0: jax.Array, num_blocks: int, *, key: Optional[jax.Array] = None,
                          breakdown_tol: Optional[float] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """``num_blocks`` block Lanczos steps with full reorthogonalization.

    With ``X_j = V_j^T`` the ``(dim, p)`` block ``j``: ``A_j = X_j^T A X_j``,
    ``W = A X_j - X_j A_j - X_{j-1} B_{j-1}^T``, ``W`` orthogonalized against every earlier
    block (classical Gram-Schmidt, twice where the first pass cancels), then ``W = X_{j+1} B_j`` (QR,
    :func:`_orthonormalize_block`, dependent columns replaced by fresh random ones with a
    zero row in ``B_j``: deflation-free breakdown handling). In exact arithmetic
    ``A X = X T + X_{m+1} B_m E_m^T`` with ``T = X^T A X`` block tridiagonal: diagonal blocks
    ``A_j``, subdiagonal blocks ``B_j`` (upper triangular).

    Cost: ``num_blocks`` batched applications of ``p`` vectors (``p num_blocks`` matvecs),
    ``O((p num_blocks)^2 dim)`` flops, ``(p num_blocks + p) dim`` basis memory. Jittable with
    ``op`` and ``num_blocks`` static.

    Args:
      op: symmetric :class:`Operator`.
      v0: ``(p, dim)`` start block of the operator's dtype, full rank (orthonormalized here).
      num_blocks: ``m``, with ``m p <= dim``.
      key: PRNG key for breakdown replacements; default ``PRNGKey(0)``.
      breakdown_tol: relative threshold (of the running largest entry of ``A_j``/``B_j``),
        default ``10 sqrt(dim) eps`` as in :func:`jax_impl.algorithms.lanczos_tridiag`.

    Returns:
      ``(basis, t, b_last)``: ``basis`` ``(m p, dim)`` orthonormal rows (block ``j`` is rows
      ``j p .. (j+1) p - 1``), ``t`` ``(m p, m p)`` the block tridiagonal ``X^T A X``,
      ``b_last`` ``(p, p)`` the final ``B_m`` (residual estimates of Ritz pairs:
      ``||B_m s_i[last block]||``).

    References:
      Cullum & Donath, "A block Lanczos algorithm for computing the q algebraically largest
      eigenvalues and a corresponding eigenspace of large, sparse, real symmetric matrices",
      IEEE CDC 1974; Golub & Underwood, "The block Lanczos method for computing eigenvalues",
      Mathematical Software III, 1977; Golub & Van Loan, "Matrix Computations", 4th ed.,
      sec. 10.3.6.
    """
    op = require_operator(op, "block_lanczos_tridiag")
    dim = op.dim
    v0 = jnp.asarray(v0)
    if v0.ndim != 2 or v0.shape[0] < 1:
        raise HessianApproxError(f"start block of shape {v0.shape}", f"pass a (block_size, {dim}) start block")
    p = v0.shape[0]
    v0 = check_start(op, v0, (p, dim), "v0")
    num_blocks = int(num_blocks)
    if num_blocks < 1 or num_blocks * p > dim:
        raise HessianApproxError(
            f"num_blocks={num_blocks} blocks of {p} vectors for a {dim}-dimensional operator",
            f"choose 1 <= num_blocks <= {dim // p}")
    dtype = op.dtype
    key = jax.random.PRNGKey(0) if key is None else key
    if breakdown_tol is None:
        breakdown_tol = default_breakdown_tol(dim, dtype)
    n = num_blocks * p
    # A rank-deficient v0 (a dependent or zero row) gets a random replacement row. (An empty
    # basis: a zero one would be refilled in every column's iteration.)
    q0, _ = _orthonormalize_block(v0, jnp.zeros((0, dim), dtype), jax.random.fold_in(key, 1 << 20),
                                  breakdown_tol * jnp.max(jnp.linalg.norm(v0, axis=1)))
    basis = jnp.zeros((n + p, dim), dtype).at[:p].set(q0)
    mv = jax.vmap(op)

    def step(j, state):
        basis, diag, sub, scale = state
        vj = jax.lax.dynamic_slice_in_dim(basis, j * p, p)
        vprev = jax.lax.dynamic_slice_in_dim(basis, jnp.maximum(j - 1, 0) * p, p)
        bprev = jnp.where(j > 0, sub[jnp.maximum(j - 1, 0)], 0).astype(dtype)
        av = mv(vj)
        aj = _gram(vj, av)
        aj = (aj + aj.T) / 2
        w = av - aj @ vj - bprev @ vprev  # rows: A X_j - X_j A_j - X_{j-1} B_{j-1}^T, transposed
        w1 = w - _gram(w, basis) @ basis
        cancelled = jnp.any(2 * jnp.sum(w1 * w1, axis=1) < jnp.sum(w * w, axis=1))
        w = jax.lax.cond(cancelled, lambda: w1 - _gram(w1, basis) @ basis, lambda: w1)
        scale = jnp.maximum(scale, jnp.max(jnp.abs(aj)))
        scale = jnp.maximum(scale, jnp.max(jnp.linalg.norm(w, axis=1)))
        q, r = _orthonormalize_block(w, basis, jax.random.fold_in(key, j), breakdown_tol * scale)
        basis = jax.lax.dynamic_update_slice_in_dim(basis, q, (j + 1) * p, 0)
        return basis, diag.at[j].set(aj), sub.at[j].set(r), scale

    init = (basis, jnp.zeros((num_blocks, p, p), dtype), jnp.zeros((num_blocks, p, p), dtype),
            jnp.asarray(0, dtype))
    basis, diag, sub, _ = jax.lax.fori_loop(0, num_blocks, step, init)
    # t[j, :, i, :] is the (j, i) block of T.
    t = jnp.zeros((num_blocks, p, num_blocks, p), dtype)
    j = jnp.arange(num_blocks)
    t = t.at[j, :, j, :].set(diag)
    t = t.at[j[1:], :, j[:-1], :].set(sub[:-1])
    t = t.at[j[:-1], :, j[1:], :].set(jnp.swapaxes(sub[:-1], 1, 2))
    return basis[:n], t.reshape(n, n), sub[num_blocks - 1]


def block_lanczos(op: Operator, key: Optional[jax.Array], k: int, block_size: int, num_blocks: int,
                  v0: Optional[jax.Array] = None, *, tol: Optional[float] = None,
                  gap_bound: bool = False) -> EigResult:
    """Top-``k`` certified Ritz pairs from block Lanczos; finds multiplicities up to ``block_size``.

    :func:`block_lanczos_tridiag` for ``num_blocks`` blocks of ``p = block_size`` vectors,
    ``T = S diag(theta) S^T``, the ``k`` largest Ritz vectors ``y_i = X s_i``, then
    :func:`jax_impl.algorithms.certified.certify` (``k`` batched explicit matvecs; the
    other Ritz values, with estimates ``||B_m s_i[last block]||``, define the gaps). With
    ``gap_bound``, a repeated eigenvalue gives Ritz values equal to rounding, so its gaps
    are tiny and its ``error_bounds`` stay the residual bound.

    Args:
      op: symmetric :class:`Operator`.
      key: PRNG key: the start block is ``normal(split(key)[0], (p, dim))`` unless ``v0`` is
        given; ``split(key)[1]`` seeds breakdown replacements.
      k: pairs, ``1 <= k <= p num_blocks``.
      block_size: ``p >= 1``, at least the largest multiplicity (cluster size) to resolve.
      num_blocks: ``m``, ``m p <= dim``.
      v0: optional ``(p, dim)`` start block.
      tol: relative tolerance of ``converged`` (as in :func:`certify`).
      gap_bound: as in :func:`jax_impl.algorithms.certified.certified_lanczos`; safer here
        than with one vector when ``block_size`` covers the clusters, which are then split.

    Returns:
      :class:`EigResult`: ``eigenvalues`` ``(k,)`` descending (Rayleigh quotients),
      ``eigenvectors`` ``(k, dim)``, explicit ``residuals``, ``error_bounds``, ``converged``,
      ``matvecs = p m + k``. Jittable with ``op``, ``k``, ``block_size``, ``num_blocks`` static.

    References:
      Cullum & Donath 1974; Golub & Underwood 1977; Golub & Van Loan, 4th ed., sec. 10.3.6;
      Saad 2011, sec. 6.7 (block Lanczos) and sec. 3.2 (residual bounds).
    """
    op = require_operator(op, "block_lanczos")
    dim = op.dim
    p, num_blocks, k = int(block_size), int(num_blocks), int(k)
    if p < 1 or num_blocks < 1 or p * num_blocks > dim:
        raise HessianApproxError(
            f"block_size={p}, num_blocks={num_blocks} for a {dim}-dimensional operator",
            f"choose block_size >= 1 and 1 <= num_blocks with block_size * num_blocks <= {dim}")
    n = p * num_blocks
    if not 1 <= k <= n:
        raise HessianApproxError(f"k={k} Ritz pairs from a block Krylov space of dimension {n}",
                                 f"choose 1 <= k <= block_size * num_blocks = {n}")
    restart_key = None
    if v0 is None:
        if key is None:
            raise HessianApproxError("neither key nor v0 given", "pass a PRNG key or a start block v0")
        start_key, restart_key = jax.random.split(key)
        v0 = normal_vector(start_key, (p, dim), op.dtype)
    else:
        v0 = check_start(op, v0, (p, dim), "v0")
        if key is not None:
            restart_key = jax.random.split(key)[1]
    restart_key = jax.random.PRNGKey(0) if restart_key is None else restart_key
    tol = default_tol(op.dtype) if tol is None else tol
    return _block_lanczos_jit(op, k, num_blocks, jnp.asarray(bool(gap_bound)), v0, restart_key,
                              jnp.asarray(tol, op.dtype))


def _block_lanczos_core(op, k, num_blocks, gap_bound, v0, restart_key, tol):
    p = v0.shape[0]
    n = p * num_blocks
    basis, t, b_last = block_lanczos_tridiag(op, v0, num_blocks, key=restart_key)
    theta, s = jnp.linalg.eigh(t)  # ascending
    estimates = jnp.linalg.norm(b_last @ s[n - p:, :], axis=0)
    top = s[:, n - k:][:, ::-1]
    return _certify_core(op, True, top.T @ basis, gap_bound, theta[: n - k], estimates[: n - k], tol, n)


# Module-level jit keyed on the Operator's identity: repeated eager calls compile once.
_block_lanczos_jit = jax.jit(_block_lanczos_core, static_argnums=(0, 1, 2))
