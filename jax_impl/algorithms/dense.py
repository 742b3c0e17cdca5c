"""Dense symmetric eigendecomposition in descending order, the reference for the matrix-free methods."""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from jax_impl.errors import HessianApproxError


def _square(matrix) -> jax.Array:
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise HessianApproxError(
            f"matrix has shape {matrix.shape}, not square", "pass a (d, d) symmetric matrix"
        )
    return matrix


def eigvalsh_descending(matrix) -> jax.Array:
    """Eigenvalues (d,) of a symmetric (d, d) matrix, descending.

    On the CPU this calls LAPACK's values-only divide and conquer (``?syevd``, SciPy's build)
    on the lower triangle through ctypes in a worker thread (``algorithms.lapack``), so Ctrl-C
    acts at once: ``jnp.linalg.eigvalsh`` computes the eigenvectors too on CPU, about 1.6x
    slower at d = 7960. On accelerators it is jnp.linalg.eigvalsh. NaN or Inf entries are
    refused with a one-line error.
    """
    if jax.default_backend() == "cpu" and not isinstance(matrix, jax.core.Tracer):
        from jax_impl.algorithms.lapack import eigvalsh_lapack

        w = eigvalsh_lapack(matrix)
        return jnp.asarray(w[::-1].copy())
    return jnp.linalg.eigvalsh(_square(matrix))[::-1]


def eigh_descending(matrix: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix.

    Wraps ``jnp.linalg.eigh`` (which symmetrizes its input as ``(M + M^T) / 2``)
    and reverses its ascending order.

    Args:
      matrix: ``(d, d)`` symmetric.

    Returns:
      ``(eigenvalues, eigenvectors)``: ``(d,)`` descending and ``(d, d)`` with
      the unit eigenvector of ``eigenvalues[i]`` in **column** ``i``.

    Raises:
      HessianApproxError: ``matrix`` is not square.
    """
    values, vectors = jnp.linalg.eigh(_square(matrix))
    return values[::-1], vectors[:, ::-1]
