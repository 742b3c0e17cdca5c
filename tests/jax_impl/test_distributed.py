"""Many processes (jax.distributed): two processes on 127.0.0.1 with two CPU devices each give the
single-process results; bad setups are one-line errors.

The two-process run launches tests/jax_impl/distributed_worker.py three times: two processes of one
jax.distributed run (each with its share of the data: 27 and 10 of 37 samples) and the
single-process reference on all the data, at once. Each process is its own process group and is
killed by its id in a ``finally`` (a process whose peer never arrives would wait for its
initialization timeout, then abort with SIGABRT). 30-50 s on two cores, mostly compilation.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jax_impl import distributed
from jax_impl.errors import HessianApproxError
from tests.conftest import REPO

HARD_TIMEOUT = 150  # seconds for the whole two-process run; it takes 30-50 s on two cores
CASES = ("mlp", "cnn-max")
COMPARED = ("hvp/value", "lanczos/eigenvalues", "hutchinson/trace", "hutchinson/estimates", "diag_ggn/diag")
# Variables that would make JAX (or this project) set up another run than the one launched here.
FOREIGN = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_COORDINATOR_BIND_ADDRESS", "JAX_NUM_PROCESSES",
           "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO))
    return env


def launch(out, runs: dict, timeout: float) -> dict:
    """Start every run (name -> (worker args, devices)) at once; their return codes (None: killed at the timeout).

    A run that fails stops the wait (its peer would only wait for it); every process still
    running at the end is killed, by its process group, whatever happened.
    """
    procs, logs = {}, []
    try:
        for name, (args, devices) in runs.items():
            log = open(out / f"log-{name}.txt", "w")
            logs.append(log)
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.jax_impl.distributed_worker", str(out), *args], cwd=REPO,
                env=worker_env(devices), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs.values()]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
        return {name: p.poll() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own group (start_new_session): pgid == pid
                except ProcessLookupError:
                    pass
            p.wait()
        for log in logs:
            log.close()


def test_two_processes_equal_one(tmp_path):
    """Hvp, Lanczos top-10, Hutchinson and DiagGGN of an MLP and a CNN, float64: to 1e-12 relative."""
    address = f"127.0.0.1:{free_port()}"
    cases = ["--cases", ",".join(CASES)]
    runs = {str(i): ([*cases, "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)], 2)
            for i in range(2)}
    runs["ref"] = (cases, 1)
    t0 = time.perf_counter()
    codes = launch(tmp_path, runs, HARD_TIMEOUT)
    seconds = time.perf_counter() - t0
    logs = {n: (tmp_path / f"log-{n}.txt").read_text()[-3000:] for n in runs}
    assert all(c == 0 for c in codes.values()), f"return codes {codes} after {seconds:.0f} s; logs: {logs}"
    times = {n: json.loads((tmp_path / f"times-{n}.json").read_text()) for n in runs}
    print(f"two-process run: {seconds:.1f} s; " + json.dumps(times))
    for n in ("0", "1"):
        assert times[n]["process_count"] == 2 and times[n]["devices"] == 4 and times[n]["local_devices"] == 2
    for name in CASES:
        ref = np.load(tmp_path / f"{name}-ref.npz")
        out = [np.load(tmp_path / f"{name}-{i}.npz") for i in range(2)]
        assert [int(o["local_samples"]) for o in out] == [27, 10] and int(ref["local_samples"]) == 37
        assert all(int(o["shards"]) == 4 and int(o["chunks"]) == 3 for o in out)  # split over all four devices
        for key in COMPARED:
            a = ref[key]
            for o in out:
                b = o[key]
                assert b.shape == a.shape and np.all(np.isfinite(b)), (name, key)
                # float64: only the order of the sums differs between the layouts
                assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(a)), (name, key, np.max(np.abs(a - b)))
            np.testing.assert_array_equal(out[0][key], out[1][key])  # every process holds the same result


# ---- one-line errors, in this process (checked before jax.distributed is touched) ----------------------
@pytest.fixture
def clean_env(monkeypatch):
    for k in FOREIGN:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("kwargs,env,match", [
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), {}, "is not HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:99999", num_processes=2, process_id=0), {}, "not in 1..65535"),
    (dict(coordinator_address="127.0.0.1:port", num_processes=2, process_id=0), {}, "not in 1..65535"),
    (dict(coordinator_address="no-such-host.invalid:1234", num_processes=2, process_id=0), {}, "does not resolve"),
    (dict(coordinator_address="::1:1234", num_processes=2, process_id=0), {}, "IPv6 host in brackets"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), {}, "process id 2 is not below"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=-1), {}, "process id -1 is below 0"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0), {}, "processes 0 is below 1"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes="two", process_id=0), {}, "'two' is not an integer"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
     "process id 5 is not below the number of processes 2"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "nohost"}, "is not HOST:PORT"),
])
def test_bad_setup_is_one_line(clean_env, kwargs, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(HessianApproxError, match=match) as err:
        distributed.initialize(**kwargs)
    assert "\n" not in str(err.value) and "; " in str(err.value)
    assert not jax.distributed.is_initialized()


def test_cli_flags(clean_env):
    """add_arguments + initialize_from_args: the command line's flags, with the same one-line errors."""
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    args = p.parse_args(["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "3"])
    with pytest.raises(HessianApproxError, match="process id 3 is not below the number of processes 2"):
        distributed.initialize_from_args(args)
    assert distributed.initialize_from_args(p.parse_args([])) is False  # nothing set: one process, nothing done
    assert distributed.initialize_from_args(argparse.Namespace()) is False


def test_after_jax_started_is_one_line(clean_env):
    """A good setup, too late: this process's backend is running (the message says to initialize first)."""
    jax.devices()
    with pytest.raises(HessianApproxError, match="already started its backend") as err:
        distributed.initialize(f"127.0.0.1:{free_port()}", 2, 0)
    assert "\n" not in str(err.value)
    assert not jax.distributed.is_initialized()


FRESH = """
import json, socket, sys
from jax_impl import distributed
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen()  # a port that is taken
free = socket.socket(); free.bind(("127.0.0.1", 0)); port = free.getsockname()[1]; free.close()  # one nobody serves
checks = {"missing": dict(coordinator_address=f"127.0.0.1:{port}"),
          "undetected": dict(auto=True),
          "alone": dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=1,
                        initialization_timeout=2),
          # checked before JAX listens (JAX's own failure there can crash the process, SIGSEGV)
          "taken": dict(coordinator_address=f"127.0.0.1:{busy.getsockname()[1]}", num_processes=2, process_id=0)}
out = {}
for name, kwargs in checks.items():
    try:
        distributed.initialize(**kwargs)
        out[name] = "initialized"
    except distributed.HessianApproxError as err:
        out[name] = str(err)
print(json.dumps(out))
"""


def test_unreachable_setups_are_one_line():
    """In a fresh process (JAX not started): a value no cluster supplies, process 1 whose coordinator
    never answers (JAX would abort it with SIGABRT after its timeout), a taken port."""
    proc = subprocess.run([sys.executable, "-c", FRESH], cwd=REPO, env=worker_env(1), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["missing"].startswith("the number of processes is not set and no cluster")
    assert out["undetected"].startswith("the coordinator address is not set and no cluster")
    assert out["taken"].startswith("process 0 cannot listen on 127.0.0.1:")
    assert out["alone"].startswith("no coordinator answered at 127.0.0.1:") and "within 2 s" in out["alone"]
    assert all("\n" not in v and "; " in v for v in out.values())


# ---- the data helpers on one process ----------------------------------------------------------------
def test_process_share():
    x, y = {"a": np.arange(20).reshape(10, 2), "b": np.arange(10)}, np.arange(10) * 10
    parts = [distributed.process_share(x, y, i, 3) for i in range(3)]
    assert [len(p[1]) for p in parts] == [4, 3, 3]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    np.testing.assert_array_equal(np.concatenate([p[0]["a"] for p in parts]), x["a"])
    with pytest.raises(HessianApproxError, match="2 samples cannot be shared by 3 processes"):
        distributed.process_share(np.zeros((2, 1)), np.zeros(2), 0, 3)


def test_one_process_layout_and_call(x64):
    """One process: process_batches holds make_batches's samples and weights; call gives the plain results."""
    import jax.numpy as jnp

    from jax_impl import operators
    from tests.cases import case

    c = case("mlp", "tanh", "cross_entropy", n=13)
    x, y = c.data()
    plain = operators.make_batches(x, y, 4, dtype=jnp.float64)
    placed = distributed.process_batches(x, y, 4, dtype=jnp.float64)
    assert placed.x.shape == plain.x.shape and placed.w.dtype == plain.w.dtype
    np.testing.assert_array_equal(np.asarray(placed.x), np.asarray(plain.x))
    np.testing.assert_array_equal(np.asarray(placed.w), np.asarray(plain.w))
    problem = c.problem(chunk_size=4, n=13)
    v = jnp.asarray(np.random.default_rng(0).normal(size=problem.dim))
    want = np.asarray(operators.hvp(problem)(v))
    for batches in (plain, placed):
        prob = operators.Problem(problem.apply, problem.ell, problem.params, batches)
        got = np.asarray(distributed.call(_hvp, prob, v))
        assert np.max(np.abs(got - want)) <= 1e-13 * np.max(np.abs(want))
    assert distributed.global_mesh().shape == {distributed.AXIS: len(jax.devices())}


def _hvp(problem, v):
    from jax_impl import operators

    return operators.hvp(problem)(v)
