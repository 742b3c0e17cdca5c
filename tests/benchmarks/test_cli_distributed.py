"""The command line's multi-process flags (jax_impl.distributed): one-line errors before any JAX work.

A two-process run of the command line itself is in the README (about 30 s on two cores with the
digits data); tests/jax_impl/test_distributed.py runs the operators across two processes.
"""

import pytest

from benchmarks.cli import main


@pytest.fixture(autouse=True)
def no_setup_in_env(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("flags,message", [
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "error: process id 2 is not below the number of processes 2; pass --process-id 0..1"),
    (["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
     "error: coordinator address '127.0.0.1' is not HOST:PORT"),
    (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "zero", "--process-id", "0"],
     "error: the number of processes 'zero' is not an integer"),
])
def test_bad_setup_is_one_line(capsys, flags, message):
    assert main(["eigs", "--dataset", "digits", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
