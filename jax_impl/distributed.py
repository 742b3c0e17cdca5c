"""Many processes with ``jax.distributed``: start the runtime, a global ``samples`` mesh, each process's data share.

Every process runs the same program (multi-controller JAX). After :func:`initialize`,
``jax.devices()`` lists the devices of all processes; :func:`global_mesh` lays them on one
1-D ``samples`` axis, process by process, and :func:`process_batches` assembles each
process's share of the Hessian data into global arrays
(``jax.make_array_from_process_local_data``): chunk ``c`` of the global ``Batches`` is the
concatenation of every process's chunk ``c``, its sample axis split over all devices, the
layout ``sharding.shard_batches`` gives one process's devices. The operators
(``jax_impl.operators``), the algorithms and the structured approximations then run as
they are: each device computes its samples' part of a chunk and XLA sums the parts across
devices and processes (gloo on CPU, NCCL on GPU, ICI/DCN on TPU). Parameters and vectors
are replicated: every process holds the same Hvp, Ritz values, traces and diagonals.

One rule: JAX refuses to capture a global array in a jitted closure (operators capture
their data), so run them through :func:`call`, which passes the data as arguments. (Or
turn on JAX's hoisting of captured arrays before importing JAX, :func:`hoist_captured_arrays`,
as the command line does.) On every process::

    from jax_impl import algorithms, distributed, operators
    distributed.initialize()                        # first; or (address, num_processes, process_id)
    x, y = distributed.process_share(x_all, y_all)  # or load only this process's rows
    batches = distributed.process_batches(x, y, chunk_size=1000, dtype=jnp.float64)
    problem = operators.Problem(apply, ell, params, batches)

    def top10(problem, key):                        # defined once: compiled once
        return algorithms.lanczos(operators.hvp(problem), key, k=10)

    result = distributed.call(top10, problem, jax.random.PRNGKey(0))

``sharding.sharded_batches`` does the share and placement itself when ``jax.process_count() > 1``.

Environment: JAX itself reads ``JAX_COORDINATOR_ADDRESS`` (and ``JAX_COORDINATOR_PORT``,
``JAX_COORDINATOR_BIND_ADDRESS``, ``JAX_LOCAL_DEVICE_IDS``) and detects Slurm, Open MPI,
Cloud TPU pods and Kubernetes jobs; this module also reads ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (this project's names: JAX has no variables for them).
"""

from __future__ import annotations

import functools

import numpy as np

from jax_impl.errors import HessianApproxError

# JAX is imported by the functions that use it, not here: the command line reads its flags and
# sets JAX's environment (HOIST_ENV) before JAX is first imported.
from jax_impl.distributed_setup import (  # noqa: F401  (the setup half, re-exported)
    AXIS, ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID, HOIST_ENV,
    LOOPBACK_NAMES, _int, _split_address, _loopback, resolve,
    initialize, _check_port_free, _wait_for_coordinator, _first_line, is_main_process,
    add_arguments, _from_args, initialize_from_args, hoist_captured_arrays,
)

__all__ = ["AXIS", "add_arguments", "call", "global_mesh", "hoist_captured_arrays", "initialize",
           "initialize_from_args", "is_main_process", "process_batches", "process_share", "replicate", "resolve"]


def global_mesh(devices=None) -> "jax.sharding.Mesh":
    """A 1-D ``samples`` mesh over every process's devices (default ``jax.devices()``).

    Ordered by (process, device id), so each process's devices hold one contiguous block of
    every chunk. ``jax.sharding.Mesh`` has Auto axes: XLA inserts the cross-device sums of
    a contraction over the sample axis (``jax.make_mesh`` would give Explicit axes, which
    need an output sharding on every such contraction).
    """
    import jax
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    counts = {}
    for d in devices:
        counts[d.process_index] = counts.get(d.process_index, 0) + 1
    if len(set(counts.values())) > 1:
        raise HessianApproxError(f"the processes hold different numbers of devices {dict(sorted(counts.items()))}",
                                 "give every process the same number of devices (JAX_LOCAL_DEVICE_IDS, XLA_FLAGS)")
    return Mesh(np.asarray(devices), (AXIS,))


def process_share(x, y, process_id: int | None = None, num_processes: int | None = None):
    """This process's contiguous rows of (x, y) (``np.array_split`` sizes: they differ by at most one).

    x may be a pytree of (N, ...) arrays. Every process must pass the same data.
    """
    import jax

    pid = jax.process_index() if process_id is None else int(process_id)
    count = jax.process_count() if num_processes is None else int(num_processes)
    n = len(np.asarray(y))
    if n < count:
        raise HessianApproxError(f"{n} samples cannot be shared by {count} processes",
                                 f"use at least {count} samples (one per process)")
    bounds = np.cumsum([0] + [n // count + (i < n % count) for i in range(count)])
    lo, hi = bounds[pid], bounds[pid + 1]
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[lo:hi], x), np.asarray(y)[lo:hi]


def _all_counts(n_local: int) -> np.ndarray:
    """Every process's sample count (a collective: all processes must call it)."""
    import jax

    if jax.process_count() == 1:
        return np.asarray([n_local])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray([n_local], np.int64))).reshape(-1)


def process_batches(x, y, chunk_size: int = 1000, dtype=np.float32, mesh=None):
    """Global Batches from each process's share (x (n_p, ...), y (n_p, ...)); call it on every process.

    The global data are the processes' shares in process order (N = Σ n_p samples, each of
    weight 1/N). A chunk holds ``chunk_size`` samples in all (capped at N, rounded up to a
    multiple of the device count): ``chunk_size / num_processes`` from each process, split
    over its devices. Every process gets as many chunks as the largest share needs; the
    rest are zero-weight padding, so sums over chunks are exact means over the N samples
    whatever the shares. One process (and ``mesh`` over one process's devices) gives
    ``sharding.sharded_batches``'s layout.

    Args:
      x: this process's inputs (n_p, *input_shape), or a pytree of such arrays.
      y: its labels (n_p,) or targets (n_p, ...).
      chunk_size: samples per chunk over all processes.
      dtype: the parameters' float dtype.
      mesh: a 1-D mesh over every process's devices (default :func:`global_mesh`).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_impl.batches import Batches, make_batches

    mesh = global_mesh() if mesh is None else mesh
    devices = mesh.devices.reshape(-1)
    mine = [d for d in devices if d.process_index == jax.process_index()]
    if not mine:
        raise HessianApproxError(f"the mesh holds none of process {jax.process_index()}'s devices",
                                 "build the mesh over jax.devices() (distributed.global_mesh)")
    n_local = len(np.asarray(y))
    counts = _all_counts(n_local)
    if np.any(counts < 1):
        raise HessianApproxError(f"process(es) {np.flatnonzero(counts < 1).tolist()} hold no samples",
                                 "give every process at least one sample (distributed.process_share)")
    total = int(counts.sum())
    per_dev = -(-min(int(chunk_size), total) // len(devices))  # samples per device and chunk
    local_chunk = per_dev * len(mine)
    num_chunks = int(max(-(-int(c) // local_chunk) for c in counts))
    local = make_batches(x, y, local_chunk, multiple_of=local_chunk, dtype=dtype)
    pad = num_chunks - local.w.shape[0]

    def place(a, weights=False):
        a = np.asarray(a)
        if weights:  # 1/N for this share's real samples, 0 for padding
            a = np.where(a > 0, 1.0 / total, 0.0).astype(a.dtype)
        if pad:  # zero-weight chunks (copies of the first) up to the common chunk count
            extra = np.zeros((pad, *a.shape[1:]), a.dtype) if weights else np.repeat(a[:1], pad, axis=0)
            a = np.concatenate([a, extra])
        sharding = NamedSharding(mesh, P(None, AXIS, *[None] * (a.ndim - 2)))
        return jax.make_array_from_process_local_data(sharding, a, (num_chunks, per_dev * len(devices), *a.shape[2:]))

    return Batches(x=jax.tree_util.tree_map(place, local.x), y=place(local.y), w=place(local.w, weights=True),
                   mesh=mesh if mesh.size > 1 else None)


# ---- computing with the global data ---------------------------------------------------
def replicate(tree, mesh=None):
    """``tree``'s arrays as global arrays replicated over ``mesh`` (every process passes the same values).

    Host or single-device values become one global array each (no communication: every
    process supplies the whole value for its own devices). Leaves already on ``mesh`` stay.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = global_mesh() if mesh is None else mesh
    sharding = NamedSharding(mesh, P())

    def one(a):
        if isinstance(a, jax.Array) and a.sharding.device_set == sharding.device_set and a.is_fully_replicated:
            return a
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(sharding, a, a.shape)

    return jax.tree_util.tree_map(one, tree)


def call(fn, problem, *args):
    """``fn(problem, *args)`` in one ``jax.jit`` that takes the problem's parameters and data as arguments.

    JAX refuses to capture an array that spans other processes' devices as a constant
    (``Closing over jax.Array that spans non-addressable ... devices is not allowed``),
    and operators capture their data: so across processes, build the operators *inside*
    the jitted function, from the problem it is given::

        def top10(problem, key):
            return algorithms.lanczos(operators.hvp(problem), key, k=10)

        result = distributed.call(top10, problem, key)  # every process, same key

    The parameters are replicated over the data's mesh; ``fn``, ``problem.apply`` and
    ``problem.ell`` are static (define ``fn`` once, at module level or so, to compile once);
    ``args`` are traced (arrays, or pytrees of them). The result is replicated: every
    process holds all of it (``np.asarray`` works on each). One process works the same way.
    """
    import jax

    from jax_impl.operators import Problem

    if not isinstance(problem, Problem):
        raise HessianApproxError(f"call needs an operators.Problem, got {type(problem).__name__}",
                                 "pass operators.Problem(apply, ell, params, batches)")
    params = problem.params
    mesh = getattr(problem.batches, "mesh", None)
    if mesh is None:
        shardings = {s for a in jax.tree_util.tree_leaves((problem.batches.x, problem.batches.w))
                     for s in [getattr(a, "sharding", None)] if s is not None}
        if any(not s.is_fully_addressable for s in shardings):
            raise HessianApproxError("the data span several processes but carry no mesh",
                                     "build them with distributed.process_batches")
    else:  # on the data's devices, as jit needs every argument
        params = replicate(params, mesh)
    return _jitted()(fn, problem.apply, problem.ell, params, problem.batches, *args)


def _run(fn, apply, ell, params, batches, *args):
    from jax_impl.operators import Problem

    return fn(Problem(apply, ell, params, batches), *args)


@functools.cache
def _jitted():
    import jax

    return jax.jit(_run, static_argnums=(0, 1, 2))
