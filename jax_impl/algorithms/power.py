"""Power iteration with deflation by orthogonalization: PyHessian's ``eigenvalues()`` in JAX."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_impl.algorithms.hutchinson import normal_vector
from jax_impl.algorithms.operator import Operator, check_start, require_operator
from jax_impl.algorithms.results import EigResult
from jax_impl.errors import HessianApproxError

# PyHessian's ``normalization`` divides by ``||v|| + 1e-6``; its stopping rule
# divides by ``|eig| + 1e-6``. Both constants are part of the algorithm.
_PYHESSIAN_EPS = 1e-6


def pyhessian_normalize(v: jax.Array) -> jax.Array:
    """PyHessian's ``normalization``: ``v / (||v|| + 1e-6)``.

    Not exactly unit norm: ``||result|| = ||v|| / (||v|| + 1e-6)``.

    Args:
      v: ``(dim,)`` vector.

    Returns:
      ``(dim,)`` the scaled vector, same dtype.
    """
    return v / (jnp.sqrt(jnp.sum(v * v)) + _PYHESSIAN_EPS)


def _orthonormalize(w: jax.Array, basis: jax.Array, count: jax.Array) -> jax.Array:
    """PyHessian's ``orthnormal``: modified Gram-Schmidt against ``basis[:count]``.

    For each row ``u`` in turn: ``w <- w - <w, u> u`` (with the updated ``w``),
    then :func:`pyhessian_normalize`.

    Args:
      w: ``(dim,)`` vector.
      basis: ``(k, dim)`` rows; only the first ``count`` are used.
      count: ``()`` int, may be traced.
    """

    def body(j, w):
        u = basis[j]
        return w - jnp.sum(w * u) * u

    w = jax.lax.fori_loop(0, count, body, w)
    return pyhessian_normalize(w)


def power_iteration(
    op: Operator,
    key: Optional[jax.Array],
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    v0: Optional[jax.Array] = None,
) -> EigResult:
    """Top-``k`` eigenpairs by power iteration with deflation, exactly as PyHessian.

    This is ``pyhessian.hessian.eigenvalues(maxIter=max_iter, tol=tol,
    top_n=k)`` (Yao et al., 2020) for an arbitrary symmetric operator. For each
    eigenpair ``i = 0, ..., k-1``:

    1. ``v = v0[i] / (||v0[i]|| + 1e-6)`` (``v0[i]`` standard normal from
       ``key`` when ``v0`` is not given).
    2. Repeat at most ``max_iter`` times:
       ``u = orthnormal(v, found)`` (modified Gram-Schmidt against the
       eigenvectors found so far, then ``u / (||u|| + 1e-6)``);
       ``Hu = matvec(u)``; ``rho = <Hu, u>``; ``v = Hu / (||Hu|| + 1e-6)``.
       The first iteration only sets ``eig = rho``; later ones stop when
       ``|eig - rho| / (|eig| + 1e-6) < tol`` **keeping the previous** ``eig``,
       otherwise set ``eig = rho``.
    3. Store ``eig`` and ``v`` (the last normalized ``Hu``).

    Accuracy floor: the ``+ 1e-6`` makes every iterate's norm about
    ``1 - 1e-6``, so the Rayleigh quotient carries a relative bias of about
    ``-2e-6`` whatever ``tol`` is (PyHessian has the same bias).

    Deflation is only by orthogonalization, so each pair is the dominant
    (largest ``|lambda|``) eigenpair in the complement of those found so far:
    the order is PyHessian's discovery order, roughly decreasing ``|lambda|``,
    not sorted and not "top" by value when negative eigenvalues dominate. Use
    ``result.sorted()`` for descending order.

    The whole computation is one ``lax.scan`` over pairs of ``lax.while_loop``
    iterations, so it can be jitted with ``op``, ``k`` and ``max_iter`` static.

    Args:
      op: symmetric :class:`Operator`; its ``dim`` and ``dtype`` are the iterates'.
      key: PRNG key for the start vectors (unused, may be None, when ``v0`` is
        given). Start vector ``i`` is ``jax.random.normal(split(key, k)[i],
        (dim,))``.
      k: number of eigenpairs (PyHessian's ``top_n``), ``1 <= k <= dim``.
      max_iter: iterations per eigenpair (PyHessian's ``maxIter``), ``>= 1``.
      tol: relative tolerance between consecutive Rayleigh quotients.
      v0: optional ``(k, dim)`` (or ``(dim,)`` when ``k == 1``) start vectors,
        unnormalized (PyHessian draws them with ``torch.randn``), of the operator's dtype.

    Returns:
      :class:`EigResult` with

      - ``eigenvalues`` ``(k,)`` in discovery order;
      - ``eigenvectors`` ``(k, dim)``, row ``i`` the last normalized ``Hu``
        (norm ``1 - O(1e-6 / ||Hu||)``, as in PyHessian);
      - ``residuals`` ``(k,)``: ``||H u - rho u||`` of the last iterate ``u`` the
        operator was applied to (free; the returned eigenvector's own residual
        would cost one more matvec per pair);
      - ``matvecs`` ``()`` total and ``matvecs_per_pair`` ``(k,)`` operator
        applications (one per iteration, as in PyHessian);
      - ``converged`` ``(k,)`` whether the stopping rule fired before
        ``max_iter``.

    Raises:
      HessianApproxError: ``k`` not in ``[1, dim]``, ``max_iter < 1``, or ``v0``
        of the wrong shape.

    References:
      Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural Networks Through the
      Lens of the Hessian", 2020 (https://github.com/amirgholami/PyHessian).
    """
    op = require_operator(op, "power_iteration")
    dim, k, max_iter, dtype = op.dim, int(k), int(max_iter), op.dtype
    if not 1 <= k <= dim:
        raise HessianApproxError(
            f"k={k} eigenpairs requested from a {dim}-dimensional operator",
            f"choose 1 <= k <= {dim}",
        )
    if max_iter < 1:
        raise HessianApproxError(f"max_iter={max_iter} is below 1", "use max_iter >= 1")

    if v0 is None:
        if key is None:
            raise HessianApproxError("neither key nor v0 given", "pass a PRNG key or start vectors v0")
        v0 = jax.vmap(lambda kk: normal_vector(kk, (dim,), dtype))(jax.random.split(key, k))
    else:
        v0 = jnp.asarray(v0)
        if v0.shape == (dim,) and k == 1:
            v0 = v0[None]
        v0 = check_start(op, v0, (k, dim))

    tol = jnp.asarray(tol, dtype)

    def one_pair(found, inputs):
        i, start = inputs

        def cond(state):
            it, _, _, done, _ = state
            return (it < max_iter) & jnp.logical_not(done)

        def body(state):
            it, v, eig, _, _ = state
            u = _orthonormalize(v, found, i)
            hu = op(u)
            rho = jnp.sum(hu * u)
            v_new = pyhessian_normalize(hu)
            stop = (it > 0) & (jnp.abs(eig - rho) / (jnp.abs(eig) + _PYHESSIAN_EPS) < tol)
            eig_new = jnp.where(stop, eig, rho)
            residual = jnp.sqrt(jnp.sum((hu - rho * u) ** 2))
            return it + 1, v_new, eig_new, stop, residual

        init = (
            jnp.asarray(0, jnp.int32),
            pyhessian_normalize(start),
            jnp.asarray(0, dtype),
            jnp.asarray(False),
            jnp.asarray(0, dtype),
        )
        iters, v, eig, done, residual = jax.lax.while_loop(cond, body, init)
        found = found.at[i].set(v)
        return found, (eig, residual, iters, done)

    found0 = jnp.zeros((k, dim), dtype)
    vectors, (eigs, residuals, iters, done) = jax.lax.scan(
        one_pair, found0, (jnp.arange(k, dtype=jnp.int32), v0)
    )
    return EigResult(
        eigenvalues=eigs,
        eigenvectors=vectors,
        residuals=residuals,
        matvecs=jnp.sum(iters),
        matvecs_per_pair=iters,
        converged=done,
    )
