"""Starting JAX's multi-process runtime: the coordinator address, process count and id, from flags, variables or a cluster."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time

from jax_impl.errors import HessianApproxError

# JAX is imported by the functions that use it, not here: the command line reads its flags and
# sets JAX's environment (HOIST_ENV) before JAX is first imported.

AXIS = "samples"
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"  # JAX's own
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"  # this project's (JAX reads none for the count and id)
ENV_PROCESS_ID = "JAX_PROCESS_ID"
HOIST_ENV = "JAX_USE_SIMPLIFIED_JAXPR_CONSTANTS"  # JAX's: jit passes captured arrays as arguments
LOOPBACK_NAMES = ("localhost", "ip6-localhost")



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
