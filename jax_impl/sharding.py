"""Shard the sample axis of the Hessian data over all local devices (a 1-D jax.sharding mesh)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_impl.batches import Batches, make_batches

AXIS = "samples"


def sample_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``samples`` over ``devices`` (default: all devices of all processes).

    One process: its local devices. Several (``jax_impl.distributed.initialize`` first):
    ``distributed.global_mesh``, every process's devices, process by process.
    """
    if devices is None and jax.process_count() > 1:
        from jax_impl.distributed import global_mesh

        return global_mesh()
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def shard_batches(batches: Batches, mesh: Mesh) -> Batches:
    """Place ``batches`` so each chunk's sample axis (axis 1) is split over ``mesh``.

    The chunk size must be a multiple of the device count (make_batches with
    ``multiple_of=mesh.size`` guarantees it). Under jit, XLA then computes each
    chunk's per-sample work on its own device and sums the results across devices.
    """
    if batches.w.shape[1] % mesh.size:
        raise ValueError(f"chunk size {batches.w.shape[1]} is not a multiple of {mesh.size} devices")
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, AXIS, *[None] * (a.ndim - 2))))
    return Batches(
        x=jax.tree_util.tree_map(place, batches.x),
        y=place(batches.y),
        w=place(batches.w),
        mesh=mesh if mesh.size > 1 else None,
    )


def sharded_batches(x, y, chunk_size: int = 1000, dtype=np.float32, mesh: Mesh | None = None) -> Batches:
    """make_batches + shard_batches over all local devices (one device: no-op placement).

    ``dtype`` must be the parameters' dtype (``operators.Problem`` refuses a mix). Several
    processes (``jax.process_count() > 1``): every process passes the same (x, y), keeps its
    share (``distributed.process_share``) and the chunks span every process's devices
    (``distributed.process_batches``).
    """
    mesh = sample_mesh() if mesh is None else mesh
    if jax.process_count() > 1:
        from jax_impl import distributed

        return distributed.process_batches(*distributed.process_share(x, y), chunk_size, dtype, mesh)
    return shard_batches(make_batches(x, y, chunk_size, multiple_of=mesh.size, dtype=dtype), mesh)
