"""The data a command's curvature averages over: the Hessian subset's rows, held in device memory or streamed from host memory."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from benchmarks.options import check_stream
from jax_impl import models, sharding, streaming
from jax_impl.errors import HessianApproxError

# --stream auto streams a subset whose device copy would exceed this many bytes (MNIST float32:
# more than 21,400 samples; the full 60,000 is 188 MB). Below it the in-memory scan is kept.
STREAM_ABOVE_BYTES = 64 << 20


def use_stream(option: str, num_samples: int, sample_bytes: int, processes: int = 1) -> bool:
    """Whether to stream: --stream on, or auto with a subset above STREAM_ABOVE_BYTES in device memory
    (one process only: several processes each hold their share in device memory)."""
    check_stream(option)
    if option == "on" and processes > 1:
        raise HessianApproxError(f"--stream on runs in one process, but this run has {processes}",
                                 "use --stream off (each process holds its share of the data)")
    big = num_samples * sample_bytes > STREAM_ABOVE_BYTES
    return option == "on" or (option == "auto" and big and processes == 1)


def chunk_progress(desc: str):
    """``progress(i, num_chunks)`` for HostData: a bar over one pass's chunks, reset at each pass."""
    from benchmarks.context import progress_bar

    state = {"bar": None, "passes": 0}

    def progress(i: int, num_chunks: int) -> None:
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = progress_bar(num_chunks, desc)
        if i == 0:
            state["passes"] += 1
            bar.reset(total=num_chunks)
            bar.set_postfix_str(f"pass {state['passes']}", refresh=False)
        bar.update(1)

    return progress


def problem_batches(ctx):
    """The Batches of ``ctx``'s rows: streamed from the dataset's host arrays (``ctx.streamed``), no copy
    of the subset made, or cut into device-resident chunks as before (sharded over local devices)."""
    if not ctx.streamed:
        xs, ys = ctx.subset
        return sharding.sharded_batches(xs, ys, ctx.chunk_size, dtype=ctx.dtype)
    rows, arch, devices = ctx.subset_rows, ctx.arch, jax.local_devices()
    long = -(-len(rows) // ctx.chunk_size) >= 10
    b = streaming.stream_batches(ctx.dataset.x_train, ctx.dataset.y_train, ctx.chunk_size, rows=rows,
                                 multiple_of=len(devices), dtype=ctx.dtype,
                                 transform=lambda a: models.as_inputs(arch, a),
                                 progress=chunk_progress(f"{len(rows)} samples") if long else None)
    return b if len(devices) == 1 else dataclasses.replace(b, mesh=sharding.sample_mesh(devices))


def sample_bytes(ctx) -> int:
    """Device bytes of one sample's inputs and target in the run's dtype."""
    item = np.dtype(ctx.options.dtype).itemsize
    y = ctx.dataset.y_train
    return int(ctx.dataset.input_dim * item + (4 if y.ndim == 1 else y.shape[1] * item))


def check_rows(n: int, rows) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= n:
        raise HessianApproxError(f"rows {rows.shape} do not index the {n} training samples",
                                 "pass a non-empty 1-D array of indices")
    return rows
