"""Reference eigensolver: SciPy's eigsh (ARPACK) on an Operator, counting matvecs."""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.errors import HessianApproxError


def eigsh_reference(op: Operator, k: int, tol: float = 0.0, *, key: Optional[jax.Array] = None,
                    ncv: Optional[int] = None, maxiter: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """SciPy's ``eigsh`` (ARPACK, implicitly restarted Lanczos) on an Operator, counting matvecs.

    A numpy-side reference for matvec counts, not a JAX algorithm: the operator is wrapped
    in a ``scipy.sparse.linalg.LinearOperator`` whose matvec calls a jitted ``op`` and
    counts columns. ARPACK's stopping rule is relative per pair, ``||r_i|| <= tol |theta_i|``
    (``tol = 0``: machine precision), stricter than
    :func:`jax_impl.algorithms.certified.adaptive_lanczos`'s
    ``tol * max_j |theta_j|`` for the smaller of the top-k.

    Args:
      op: symmetric :class:`Operator` (a float64 one needs 64-bit JAX on, as it was built).
      k: number of largest algebraic eigenvalues (``which="LA"``), ``k < dim``.
      tol: ARPACK's relative tolerance.
      key: PRNG key of the start vector ``normal(key, (dim,))``; default
        ``numpy.random.default_rng(0)`` (ARPACK's own random start differs call to call).
      ncv: Lanczos vectors kept (ARPACK default ``min(dim, max(2 k + 1, 20))``).
      maxiter: restart limit (ARPACK default ``10 dim``).

    Returns:
      ``(eigenvalues (k,) descending float64 numpy, matvecs)``.

    References:
      Lehoucq, Sorensen, Yang, "ARPACK Users' Guide", SIAM 1998.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = require_operator(op, "eigsh_reference")
    dim = op.dim
    if not 1 <= int(k) < dim:
        raise HessianApproxError(f"eigsh needs 1 <= k < dim, got k={k} for dim {dim}", f"choose k < {dim}")
    count = [0]
    mv = jax.jit(op)

    def matvec(x):
        count[0] += 1
        return np.asarray(mv(jnp.asarray(np.ravel(x), op.dtype)))

    lin = LinearOperator((dim, dim), matvec=matvec, dtype=op.dtype)
    if key is not None:
        start = np.asarray(jax.random.normal(key, (dim,), op.dtype))
    else:
        start = np.random.default_rng(0).standard_normal(dim).astype(op.dtype)
    values = eigsh(lin, k=int(k), which="LA", tol=tol, v0=start, ncv=ncv, maxiter=maxiter,
                   return_eigenvectors=False)
    return np.sort(np.asarray(values, np.float64))[::-1], count[0]
