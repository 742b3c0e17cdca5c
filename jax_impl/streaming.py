"""Data streamed from host memory: chunks fetched by index inside the jitted scans, one chunk on the device at a time."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.algorithms.operator import check_float_dtype
from jax_impl.batches import Batches
from jax_impl.errors import HessianApproxError, check_finite

# rows checked for NaN/Inf at a time when a stream is built (bounds the temporary copy)
_CHECK_ROWS = 8192


def subset_rows(n: int, num_samples, seed: int) -> np.ndarray:
    """The rows (k,) int64 of the seeded Hessian subset of n samples, without copying any data.

    The same rows as ``data.hessian_subset``: ``default_rng(seed).choice(n, k, replace=False)``,
    in drawn order (k = n gives a permutation of all rows).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise HessianApproxError(f"--hessian-samples must be an integer, got {num_samples!r}",
                                 f"pass an integer in 1..{n} or all")
    if not 1 <= num_samples <= n:
        raise HessianApproxError(f"--hessian-samples {num_samples} is outside 1..{n} (the training set size)",
                                 f"pass a value in 1..{n}, or all")
    return np.random.default_rng(seed).choice(n, int(num_samples), replace=False).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class HostData:
    """Host-resident samples and the chunks a stream cuts from them (hashed by identity: a static jit argument).

    Attributes:
      x: (M, ...) host inputs, never copied whole (e.g. the dataset's (60000, 784) rows).
      y: (M,) integer labels or (M, C) float targets.
      rows: (num_chunks * chunk,) int64 rows of x and y in chunk order; the padding of the last
        chunk repeats the first row (its weight is zero).
      chunk: samples per chunk.
      transform: host (B, ...) rows of x -> (B, *input_shape) model inputs (e.g. reshaped images);
        None keeps the rows as they are.
      x_spec, y_spec: shape and dtype of one chunk's inputs (chunk, *input_shape) and targets.
      progress: called as ``progress(i, num_chunks)`` after chunk i is fetched (None: silent).
      prefetch: gather the next chunk in a worker thread while the device works on this one.
    """

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    chunk: int
    transform: Optional[Callable]
    x_spec: jax.ShapeDtypeStruct
    y_spec: jax.ShapeDtypeStruct
    progress: Optional[Callable] = None
    prefetch: bool = True
    _next: dict = dataclasses.field(default_factory=dict, repr=False)  # {"future": (i, Future), "pool": executor}
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def num_chunks(self) -> int:
        return len(self.rows) // self.chunk

    def gather(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``i`` as host arrays: (x (chunk, *input_shape), y (chunk, ...)) of the declared dtypes."""
        rows = self.rows[i * self.chunk:(i + 1) * self.chunk]
        x = self.x[rows]
        if self.transform is not None:
            x = self.transform(x)
        return (np.ascontiguousarray(x, dtype=self.x_spec.dtype),
                np.ascontiguousarray(self.y[rows], dtype=self.y_spec.dtype))

    def chunk_arrays(self, i) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``i`` (the callback's answer); with ``prefetch`` chunk i+1 is gathered meanwhile, in a
        worker thread, while the device computes on chunk i (numpy releases the GIL to copy)."""
        i = int(i)
        with self._lock:
            ahead = self._next.pop("future", None)
            out = ahead[1].result() if ahead is not None and ahead[0] == i else self.gather(i)
            if self.prefetch and self.num_chunks > 1:
                if "pool" not in self._next:
                    self._next["pool"] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stream")
                j = (i + 1) % self.num_chunks
                self._next["future"] = (j, self._next["pool"].submit(self.gather, j))
        if self.progress is not None:
            self.progress(i, self.num_chunks)
        return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class StreamedBatches:
    """Batches whose inputs and targets stay in host memory; only the weights live on the device.

    Inside ``batches.scan_chunks`` (every Operator, the loss, the gradient and the structured
    approximations sum over chunks through it) chunk c is fetched by ``jax.pure_callback`` at
    step c of the scan, so device memory holds one chunk whatever the number of samples. The
    chunks, their order and their zero-weight padding are those ``make_batches`` cuts from the
    same rows, so results equal the in-memory ones up to float rounding.

    Attributes:
      w: (num_chunks, chunk) weights: 1/N for real samples, 0 for padding.
      host: the HostData the chunks come from (static).
      mesh: a 1-D device mesh splitting each fetched chunk's samples (static; None for one device).
    """

    w: jax.Array
    host: HostData = dataclasses.field(metadata=dict(static=True))
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def x(self) -> jax.ShapeDtypeStruct:
        """Shape and dtype of all inputs, (num_chunks, chunk, *input_shape), as ``Batches.x`` has them."""
        s = self.host.x_spec
        return jax.ShapeDtypeStruct((self.host.num_chunks, *s.shape), s.dtype)

    @property
    def y(self) -> jax.ShapeDtypeStruct:
        s = self.host.y_spec
        return jax.ShapeDtypeStruct((self.host.num_chunks, *s.shape), s.dtype)

    @property
    def num_samples(self) -> int:
        return int(np.count_nonzero(np.asarray(self.w)))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.w.dtype)

    def fetch(self, i, w) -> Batches:
        """Chunk ``i`` (a traced int32 index) with its weights ``w`` (chunk,), fetched from host memory."""
        x, y = jax.pure_callback(self.host.chunk_arrays, (self.host.x_spec, self.host.y_spec), i,
                                 vmap_method="sequential")
        return Batches(x, y, w)


def stream_batches(x, y, chunk_size: int = 1000, rows=None, multiple_of: int = 1, dtype=jnp.float32,
                   transform: Optional[Callable] = None, progress: Optional[Callable] = None) -> StreamedBatches:
    """StreamedBatches over ``rows`` of host arrays (x, y): the chunks ``make_batches(x[rows], y[rows])`` cuts.

    Args:
      x: (M, ...) host inputs (numpy; a memory map works), one array (no pytrees). Float rows
        become ``dtype`` and integer rows int32, chunk by chunk, after ``transform``.
      y: (M,) integer labels or (M, ...) float targets.
      chunk_size: samples per chunk (capped at N, rounded up to ``multiple_of``).
      rows: (N,) indices of the samples to stream, in order (default: all M in order).
      multiple_of: chunk size granularity (the device count when sharding chunks).
      dtype: float dtype of the inputs, float targets and weights (the parameters').
      transform: host (B, ...) rows -> (B, *input_shape) model inputs (e.g. ``models.as_inputs``).
      progress: ``progress(i, num_chunks)`` after each fetched chunk (e.g. a progress bar).
    Returns:
      StreamedBatches with ceil(N / chunk) chunks; the rows are checked for NaN/Inf here.
    """
    dtype = check_float_dtype(dtype, "the data")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise HessianApproxError(f"streamed data must be host numpy arrays, got x {type(x).__name__} and "
                                 f"y {type(y).__name__}", "pass numpy arrays x (M, ...) and y (M, ...)")
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise HessianApproxError(f"data shapes x {x.shape} and y {y.shape} do not match",
                                 "pass x (M, ...) and y (M,) labels or (M, ...) targets with the same M")
    for what, a in (("inputs", x), ("labels or targets", y)):
        if a.dtype.kind not in "fiub":
            raise HessianApproxError(f"{what} of dtype {a.dtype} are not numbers", "pass numeric arrays")
    rows = np.arange(len(x), dtype=np.int64) if rows is None else np.asarray(rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise HessianApproxError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}",
                                 "pass the indices of the samples to stream")
    n = len(rows)
    if n == 0:
        raise HessianApproxError("the data are empty", "pass at least one sample (--hessian-samples >= 1)")
    if rows.min() < 0 or rows.max() >= len(x):
        raise HessianApproxError(f"rows lie in {rows.min()}..{rows.max()}, outside the {len(x)} samples",
                                 f"pass indices in 0..{len(x) - 1}")
    for start in range(0, n, _CHECK_ROWS):
        block = rows[start:start + _CHECK_ROWS]
        check_finite("the input data", x[block])
        check_finite("the targets", y[block])
    chunk = -(-min(int(chunk_size), n) // multiple_of) * multiple_of
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    padded = np.concatenate([rows.astype(np.int64), np.full(pad, rows[0], np.int64)])
    sample = x[padded[:1]] if transform is None else np.asarray(transform(x[padded[:1]]))
    x_dtype = dtype if sample.dtype.kind == "f" else np.dtype(np.int32)
    y_dtype = np.dtype(np.int32) if y.dtype.kind in "iub" and y.ndim == 1 else dtype
    host = HostData(x=x, y=y, rows=padded, chunk=chunk, transform=transform,
                    x_spec=jax.ShapeDtypeStruct((chunk, *sample.shape[1:]), x_dtype),
                    y_spec=jax.ShapeDtypeStruct((chunk, *y.shape[1:]), y_dtype), progress=progress)
    w = np.concatenate([np.full(n, 1.0 / n), np.zeros(pad)])
    return StreamedBatches(w=jnp.asarray(w.reshape(num_chunks, chunk), dtype), host=host)


def in_memory(batches: StreamedBatches) -> Batches:
    """The same chunks as device-resident Batches, all fetched now: x (num_chunks, chunk, ...), y, w."""
    h = batches.host
    xs, ys = zip(*(h.gather(i) for i in range(h.num_chunks)))
    return Batches(jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)), batches.w, batches.mesh)

