"""Dense matrices from Operators (chunked vmap over identity columns), with a memory check first."""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from jax_impl.algorithms.operator import Operator, require_operator
from jax_impl.errors import HessianApproxError


def available_bytes(device: jax.Device | None = None) -> int:
    """Free memory on ``device``: accelerator memory stats, else free host RAM."""
    device = device or jax.devices()[0]
    stats = None
    if device.platform != "cpu":
        try:
            stats = device.memory_stats()
        except Exception:  # backends without memory stats
            stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 1 << 62


def dense_bytes(dim: int, dtype, chunk_size: int, copies: int = 2) -> int:
    """Bytes to hold ``copies`` (dim, dim) matrices plus one (chunk, dim) work block."""
    item = np.dtype(dtype).itemsize
    return item * dim * (copies * dim + chunk_size)


def check_fits(dim: int, dtype, chunk_size: int = 256, what: str = "dense matrix",
               copies: int = 2, available: int | None = None) -> None:
    """Refuse (HessianApproxError) when a (dim, dim) matrix will not fit in memory.

    ``copies`` counts the matrix and what follows it (eigh needs a second copy).
    """
    need = dense_bytes(dim, dtype, chunk_size, copies)
    have = available_bytes() if available is None else available
    if need > have:
        raise HessianApproxError(
            f"the {what} ({dim}x{dim} {np.dtype(dtype).name}) needs about "
            f"{need / 2**30:.2f} GiB but only {have / 2**30:.2f} GiB are available",
            "use the matrix-free methods (lanczos, power, hutchinson, slq), "
            "a smaller model, or float32",
        )


def dense_fn(op: Operator, chunk_size: int = 256) -> Callable:
    """A reusable ``build(progress=None) -> (dim, dim) numpy`` for the Operator ``op``.

    The vmapped, jitted chunk kernel is compiled once on the first call and reused
    by later calls (what repeated timings need); see ``dense`` for the arguments.
    """
    op = require_operator(op, "dense_fn")
    dim = op.dim
    chunk_size = max(1, min(int(chunk_size), dim))
    batched = jax.jit(jax.vmap(op))
    np_dtype = op.dtype

    def build(progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.empty((dim, dim), dtype=np_dtype)
        for start in range(0, dim, chunk_size):
            cols = np.arange(start, start + chunk_size)
            valid = cols < dim
            basis = np.zeros((chunk_size, dim), dtype=np_dtype)
            basis[np.nonzero(valid)[0], cols[valid]] = 1
            block = np.asarray(batched(basis))[valid]  # (c, d): row i is M e_{start+i}
            out[:, start:start + len(block)] = block.T
            if progress is not None:
                progress(start + len(block))
        return out

    return build


def dense(op: Operator, chunk_size: int = 256,
          progress: Callable[[int], None] | None = None, available: int | None = None) -> np.ndarray:
    """Materialize the (dim, dim) matrix whose columns are ``op(e_j)``, in the operator's dtype.

    Columns are computed ``chunk_size`` at a time by a jitted vmap over identity
    columns; the last chunk is padded so there is one compilation. The memory
    needed is checked first (HessianApproxError naming the bytes when it will not fit).

    Args:
      op: an Operator (its dim d and dtype are the result's).
      chunk_size: columns per vmapped call (memory vs speed).
      progress: called with the number of columns finished after each chunk.
      available: bytes available (default: measured); for tests.
    Returns:
      numpy array (d, d), M[:, j] = matvec(e_j).
    """
    op = require_operator(op, "dense")
    check_fits(op.dim, op.dtype, max(1, min(int(chunk_size), op.dim)), available=available)
    return dense_fn(op, chunk_size)(progress)


def diagonal(op: Operator, chunk_size: int = 256) -> np.ndarray:
    """The exact diagonal ``A_jj = e_jᵀ A e_j`` (dim,) by ``dim`` matvecs, without storing A.

    Costs what ``dense`` costs in matvecs but only O(chunk_size · dim) memory.
    """
    op = require_operator(op, "diagonal")
    dim = op.dim
    chunk_size = max(1, min(int(chunk_size), dim))
    batched = jax.jit(jax.vmap(op))
    out = np.empty(dim, dtype=op.dtype)
    for start in range(0, dim, chunk_size):
        cols = np.arange(start, start + chunk_size)
        valid = cols < dim
        basis = np.zeros((chunk_size, dim), dtype=op.dtype)
        basis[np.nonzero(valid)[0], cols[valid]] = 1
        block = np.asarray(batched(basis))
        idx = np.nonzero(valid)[0]
        out[cols[valid]] = block[idx, cols[valid]]
    return out
