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
import ipaddress
import os
import socket
import sys
import time

import numpy as np

from jax_impl.errors import HessianApproxError

# JAX is imported by the functions that use it, not here: the command line reads its flags and
# sets JAX's environment (HOIST_ENV) before JAX is first imported.

AXIS = "samples"
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # JAX's own
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"  # this project's (JAX reads none for the count and id)
ENV_PROCESS_ID = "JAX_PROCESS_ID"
HOIST_ENV = "JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS"  # JAX's: jit passes captured arrays as arguments
LOOPBACK_NAMES = ("localhost", "ip6-localhost")

__all__ = ["AXIS", "add_arguments", "call", "global_mesh", "hoist_captured_arrays", "initialize",
           "initialize_from_args", "is_main_process", "process_batches", "process_share", "replicate", "resolve"]


# ---- the runtime ----------------------------------------------------------------------
def _int(value, what: str, flag: str, least: int) -> int:
    try:
        out = int(str(value).strip())
    except ValueError:
        raise HessianApproxError(f"{what} {value!r} is not an integer", f"pass {flag} N with N >= {least}") from None
    if out < least:
        raise HessianApproxError(f"{what} {out} is below {least}", f"pass {flag} N with N >= {least}")
    return out


def _split_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``[v6]:port``; one-line error otherwise."""
    text = str(address).strip()
    hint = "pass --coordinator-address HOST:PORT, e.g. 10.0.0.1:1234 (process 0's host; a free port)"
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port:
        raise HessianApproxError(f"coordinator address {text!r} is not HOST:PORT", hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise HessianApproxError(f"coordinator address {text!r}: write an IPv6 host in brackets, [::1]:PORT", hint)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise HessianApproxError(f"coordinator address {text!r}: port {port!r} is not in 1..65535", hint)
    try:
        socket.getaddrinfo(host, int(port))
    except (socket.gaierror, UnicodeError) as err:
        raise HessianApproxError(f"coordinator address {text!r}: host {host!r} does not resolve ({err})",
                                 hint) from None
    return host, int(port)


def _loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(coordinator_address=None, num_processes=None, process_id=None, auto: bool = False):
    """The checked setup ``(address, num_processes, process_id, bind_address)`` (None: unset), or None
    for a single-process run; the environment fills what is None. One-line errors; no JAX import."""
    env = os.environ
    address = coordinator_address if coordinator_address is not None else env.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES) or None
    pid = process_id if process_id is not None else env.get(ENV_PROCESS_ID) or None
    if address is None and count is None and pid is None and not auto:
        return None
    count = None if count is None else _int(count, "the number of processes", "--num-processes", 1)
    pid = None if pid is None else _int(pid, "process id", "--process-id", 0)
    if count is not None and pid is not None and pid >= count:
        raise HessianApproxError(f"process id {pid} is not below the number of processes {count}",
                                 f"pass --process-id 0..{count - 1} (one id per process)")
    bind = None
    if address is not None:
        host, port = _split_address(address)
        if _loopback(host) and not env.get("JAX_COORDINATOR_BIND_ADDRESS"):
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address, count, pid, bind


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, initialization_timeout: int = 300,
               local_device_ids=None) -> bool:
    """Join a multi-process run (``jax.distributed.initialize``) before any other JAX call.

    Each argument left None is read from the environment: ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. If none of the three is set anywhere and
    ``auto`` is False, this is a single-process run: nothing happens and False is returned.
    With ``auto`` (or some set), JAX's cluster detection (Slurm, Open MPI, Cloud TPU,
    Kubernetes) fills in the rest. A coordinator on a loopback host (127.0.0.1, localhost,
    ::1) binds to that host only (JAX would bind to every interface, ``[::]``).

    Args:
      coordinator_address: ``HOST:PORT`` of process 0's coordinator service.
      num_processes: processes in the run, ``>= 1``.
      process_id: this process's id, ``0 <= process_id < num_processes``.
      auto: initialize even if none of the three is set (cluster detection supplies them).
      initialization_timeout: seconds to wait for every process; a process whose peers do
        not arrive by then is aborted by JAX (SIGABRT).
      local_device_ids: devices this process uses (GPU: default one per Slurm task).
    Returns:
      True if ``jax.distributed`` is initialized (now, or by an earlier call with the same
      process count and id), False for a single-process run.
    Raises:
      HessianApproxError: one line, for a malformed or unresolvable address, a count or id
        out of range, a missing value that no cluster supplies, or a call after JAX started
        its backend.
    """
    setup = resolve(coordinator_address, num_processes, process_id, auto)
    if setup is None:
        return False
    address, count, pid, bind = setup
    timeout = _int(initialization_timeout, "the initialization timeout", "initialization_timeout", 1)
    import jax

    if jax.distributed.is_initialized():
        state = jax._src.distributed.global_state  # noqa: SLF001 (the only record of the running setup)
        if (count in (None, state.num_processes)) and (pid in (None, state.process_id)):
            return True
        raise HessianApproxError(
            f"jax.distributed is already initialized as process {state.process_id} of {state.num_processes}",
            "initialize once per process, before any JAX computation")
    if address is not None and pid == 0:  # JAX's failure to listen can crash the process (SIGSEGV)
        _check_port_free(address, bind)
    if address is not None and pid:  # JAX would abort the process (SIGABRT) if it never answers
        _wait_for_coordinator(address, timeout)
    try:
        jax.distributed.initialize(address, count, pid, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout, coordinator_bind_address=bind)
    except RuntimeError as err:
        text = str(err)
        if "must be called before" in text:
            raise HessianApproxError(
                "jax.distributed cannot start: JAX has already started its backend in this process",
                "call distributed.initialize before any JAX computation (first thing)") from None
        if "Failed to start RPC server" in text:
            raise HessianApproxError(f"process 0 cannot listen on {bind or address} (the port is taken, or the "
                                     "host is not this machine)",
                                     "pick a free port, and process 0's own host for --coordinator-address") from None
        raise HessianApproxError(f"jax.distributed failed to start: {_first_line(text)}",
                                 "check that every process got the same coordinator address and process count "
                                 "and that process 0 can listen on its port") from None
    except (ValueError, TypeError) as err:
        missing = {"coordinator_address should be defined.": "the coordinator address",
                   "Number of processes must be defined.": "the number of processes",
                   "The process id of the current process must be defined.": "the process id"}.get(str(err))
        if missing:
            raise HessianApproxError(
                f"{missing} is not set and no cluster (Slurm, Open MPI, Cloud TPU, Kubernetes) supplies it",
                "pass --coordinator-address, --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID)") from None
        raise HessianApproxError(f"jax.distributed refused the setup: {_first_line(str(err))}",
                                 "pass --process-id 0..N-1 and --num-processes N") from None
    return True


def _check_port_free(address: str, bind: str | None) -> None:
    """One-line error if process 0 cannot listen on the coordinator's port (taken, or not this host's address)."""
    host, port = _split_address(bind or address)
    if not bind:  # JAX listens on every interface
        host = "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            s.bind((host, port))
    except OSError as err:
        raise HessianApproxError(
            f"process 0 cannot listen on {bind or address} ({err.strerror or err}: the port is taken, or the "
            "host is not this machine)",
            "pick a free port, and process 0's own host for --coordinator-address") from None


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Wait until process 0's coordinator accepts connections; a one-line error after ``timeout`` seconds.

    JAX itself would wait as long and then abort the process (SIGABRT, no Python error).
    Process 0 cannot check its peers this way: its wait for them still ends in JAX's abort.
    """
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise HessianApproxError(
                    f"no coordinator answered at {address} within {timeout:g} s ({err.strerror or err})",
                    "start process 0 (--process-id 0) with the same --coordinator-address, on that host") from None
            time.sleep(0.25)


def _first_line(text: str) -> str:
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return lines[0] if lines else "no message"


def is_main_process() -> bool:
    """Whether this is process 0 (the one that prints and writes files)."""
    import jax

    return jax.process_index() == 0


# ---- the command line -----------------------------------------------------------------
def add_arguments(parser) -> None:
    """``--coordinator-address``, ``--num-processes``, ``--process-id``, ``--distributed`` (an argument group)."""
    g = parser.add_argument_group("many processes (jax.distributed)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help=f"process 0's host and a free port; every process passes the same (default ${ENV_ADDRESS})")
    g.add_argument("--num-processes", default=None, metavar="N",
                   help=f"processes in the run (default ${ENV_NUM_PROCESSES}, or the cluster's)")
    g.add_argument("--process-id", default=None, metavar="I",
                   help=f"this process's id, 0..N-1 (default ${ENV_PROCESS_ID}, or the cluster's)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose setup JAX detects (Slurm, Open MPI, Cloud TPU pod, Kubernetes)")


def _from_args(args) -> tuple:
    return (getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
            getattr(args, "process_id", None), bool(getattr(args, "distributed", False)))


def initialize_from_args(args, captured_arrays: bool = True) -> bool:
    """:func:`initialize` from the flags of :func:`add_arguments` (missing attributes count as unset).

    With ``captured_arrays`` (the command line's case: its operators and algorithms capture
    the problem's data in closures, which JAX refuses for arrays that span other processes'
    devices), a multi-process run also turns on JAX's hoisting of captured arrays into
    arguments (``JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS=1``, read when JAX is imported): call
    this before anything imports JAX. Code that goes through :func:`call` needs neither.
    """
    address, count, pid, auto = _from_args(args)
    if resolve(address, count, pid, auto) is None:  # checked before anything else happens
        return False
    if captured_arrays:
        hoist_captured_arrays()
    return initialize(address, count, pid, auto=auto)


def hoist_captured_arrays() -> None:
    """Make jit pass arrays captured in closures as arguments (``JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS=1``).

    An experimental JAX switch (jax 0.10; "will exist only briefly, while we transition
    users", the new behaviour becoming the default): JAX reads it on import, so this must run
    before JAX is first imported; after, it is a one-line error unless the switch is already on.
    """
    if os.environ.get(HOIST_ENV, "").lower() in ("1", "true", "yes", "on"):
        return
    if "jax" in sys.modules:
        raise HessianApproxError(
            f"JAX was imported before {HOIST_ENV}=1 could be set, so operators that capture the data "
            "cannot run across processes",
            "call distributed.initialize_from_args before importing JAX, or set the variable in the launch "
            "environment (or use distributed.call)")
    os.environ[HOIST_ENV] = "1"


# ---- the mesh and the data ------------------------------------------------------------
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
