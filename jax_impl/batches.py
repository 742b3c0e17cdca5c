"""A dataset cut into equal zero-weight-padded chunks (inputs of any shape or pytree), and the scan that sums over them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.algorithms.operator import check_float_dtype
from jax_impl.errors import HessianApproxError, check_finite


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batches:
    """A dataset cut into equal chunks, with per-sample weights.

    The last chunk is padded with zero-weight copies of a real sample, so every
    chunk has one shape (one compilation) and ``sum(w * ell)`` is the exact mean
    over the real samples, whatever the remainder.

    Attributes:
      x: (num_chunks, chunk, *input_shape) inputs, or a pytree of such arrays (any
        per-sample shapes: (D,), (H, W, C), token ids (T,), ...).
      y: (num_chunks, chunk) integer labels, or (num_chunks, chunk, *target_shape) float targets.
      w: (num_chunks, chunk) weights: 1/N for real samples, 0 for padding.
      mesh: a 1-D device mesh whose axis splits each chunk's samples (static;
        None for one device). Set by ``jax_impl.sharding.shard_batches``.
    """

    x: object
    y: jax.Array
    w: jax.Array
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_samples(self) -> int:
        return int(np.count_nonzero(np.asarray(self.w)))

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of the weights, floating inputs and float targets."""
        return np.dtype(self.w.dtype)


def _leaves(x) -> list:
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(x)]


def make_batches(x, y, chunk_size: int = 1000, multiple_of: int = 1, dtype=jnp.float32) -> Batches:
    """Cut (x, y) into equal zero-padded chunks.

    Args:
      x: (N, *input_shape) inputs, e.g. (N, D) vectors or (N, H, W, C) images, or a pytree
        of arrays that all have N rows. Floating leaves become ``dtype``; integer leaves
        (token ids) stay integers (int32).
      y: (N,) integer labels, or (N, ...) targets (one-hot or real-valued; become ``dtype``).
      chunk_size: samples per chunk (capped at N, rounded up to ``multiple_of``).
      multiple_of: chunk size granularity, e.g. the device count for sharding.
      dtype: float dtype of the floating inputs, float targets and weights (float64
        needs 64-bit JAX; the parameters of the Problem must have the same dtype).
    Returns:
      Batches with ceil(N / chunk) chunks.
    """
    dtype = check_float_dtype(dtype, "the data")
    leaves = _leaves(x)
    y = np.asarray(y)
    n = len(leaves[0]) if leaves and leaves[0].ndim else -1
    if not leaves or any(a.ndim < 1 or len(a) != n for a in leaves) or y.ndim < 1 or len(y) != n:
        shapes = [a.shape for a in leaves]
        raise HessianApproxError(
            f"data shapes x {shapes[0] if len(shapes) == 1 else shapes} and y {y.shape} do not match",
            "pass x (N, ...) (or a pytree of such arrays) and y (N,) labels or (N, ...) targets with the same N",
        )
    if n == 0:
        raise HessianApproxError("the data are empty", "pass at least one sample (--hessian-samples >= 1)")
    for a in leaves:
        if a.dtype.kind not in "fiub":
            raise HessianApproxError(f"inputs of dtype {a.dtype} are not numbers", "pass numeric arrays")
        check_finite("the input data", a)
    if y.dtype.kind not in "fiub":
        raise HessianApproxError(f"labels or targets of dtype {y.dtype} are not numbers",
                                 "pass integer labels (N,) or float targets (N, C)")
    check_finite("the targets", y)
    chunk = min(int(chunk_size), n)
    chunk = -(-chunk // multiple_of) * multiple_of
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    idx = np.concatenate([np.arange(n), np.zeros(pad, dtype=np.int64)])
    w = np.concatenate([np.full(n, 1.0 / n), np.zeros(pad)])

    def cut(a, as_dtype):
        return jnp.asarray(a[idx].reshape(num_chunks, chunk, *a.shape[1:]), as_dtype)

    def leaf_dtype(a):
        return dtype if a.dtype.kind == "f" else jnp.int32

    xs = jax.tree_util.tree_map(lambda a: cut(np.asarray(a), leaf_dtype(np.asarray(a))), x)
    y_dtype = jnp.int32 if y.dtype.kind in "iub" and y.ndim == 1 else dtype
    return Batches(x=xs, y=cut(y, y_dtype), w=jnp.asarray(w.reshape(num_chunks, chunk), dtype))


def batches_from_iterable(batches, dtype=jnp.float32) -> Batches:
    """Batches from an iterable of (x, y) batches (e.g. a data loader), one chunk per batch.

    The batches are held in memory; the last may be smaller (padded with zero weights), so
    averages are exact means over all samples, as PyHessian's multi-batch mode.

    Args:
      batches: iterable of (x (B, ...), y (B, ...)) pairs of numpy/jax arrays (or x pytrees).
      dtype: as in :func:`make_batches`.
    """
    xs, ys, size = [], [], 0
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise HessianApproxError(f"a batch is a {type(item).__name__}, not an (x, y) pair",
                                     "yield (inputs, targets) pairs")
        x, y = item
        xs.append(jax.tree_util.tree_map(np.asarray, x))
        ys.append(np.asarray(y))
        size = max(size, len(ys[-1]))
    if not xs:
        raise HessianApproxError("the iterable of batches is empty", "pass at least one (x, y) batch")
    x = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *xs)
    return make_batches(x, np.concatenate(ys), chunk_size=size, dtype=dtype)


def constrain(chunk: Batches, mesh) -> Batches:
    """Pin a chunk's sample axis to the mesh, so XLA splits per-sample work over devices.

    Explicit, because data captured in a closure (as matvecs capture it) loses the
    placement of the arrays it came from.
    """
    if mesh is None:
        return chunk
    from jax.sharding import NamedSharding, PartitionSpec as P

    axis = mesh.axis_names[0]
    pin = lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(axis, *[None] * (a.ndim - 1))))
    return Batches(jax.tree_util.tree_map(pin, chunk.x), pin(chunk.y), pin(chunk.w))


def num_chunks(batches) -> int:
    """The number of chunks of Batches or StreamedBatches (``jax_impl.streaming``)."""
    return int(batches.w.shape[0])


def chunk_spec(batches) -> Batches:
    """Batches of ShapeDtypeStructs for one chunk (x (chunk, ...), y, w (chunk,)), for ``jax.eval_shape``."""
    one = lambda a: jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype)
    return Batches(jax.tree_util.tree_map(one, batches.x), one(batches.y), one(batches.w))


def scan_chunks(fn, batches, init, keys=None):
    """Σ_c fn(chunk_c, key_c) by ``lax.scan`` over the chunks (key_c = keys[c], or None without keys).

    Args:
      fn: ``fn(chunk: Batches, key) -> pytree`` shaped like ``init``.
      batches: Batches (chunks sliced from device arrays) or ``streaming.StreamedBatches``
        (chunk c fetched from host memory at step c: one chunk on the device at a time).
      init: the zero of the sum.
      keys: (num_chunks, ...) per-chunk PRNG keys, or None.
    """
    fetch = getattr(batches, "fetch", None)
    if fetch is None:
        xs, get = (batches.x, batches.y, batches.w), lambda c: Batches(*c)
    else:
        xs, get = (jnp.arange(num_chunks(batches), dtype=jnp.int32), batches.w), lambda c: fetch(*c)

    def body(acc, item):
        c, k = item
        return jax.tree_util.tree_map(jnp.add, acc, fn(constrain(get(c), batches.mesh), k)), None

    out, _ = jax.lax.scan(body, init, (xs, keys))
    return out
