"""Shared test setup: 64-bit JAX only where a test asks for it, data locations.

float32 is tested the way it runs in production: 64-bit JAX is off. A test that computes in
float64 with JAX takes the ``x64`` fixture (``jax.enable_x64`` for that test only); a module
that is float64 throughout sets ``pytestmark = pytest.mark.usefixtures("x64")``; a test
parametrized over ``dtype`` uses ``x64_if_float64``. The autouse
``x64_stays_off`` checks that no test leaves the process-wide switch on.
"""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

# numpy's OpenBLAS on one thread per process (before numpy is first imported, here): two pytest-xdist
# workers on two cores each running two BLAS threads spin against each other; the tests' linear
# algebra is small. 30% less CPU on the sketch and algorithm tests. An explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache per pytest run, shared by its pytest-xdist workers: tests
# that build the same program (the two reproduce runs, commands on one checkpoint, the shared
# cases of tests/cases.py in several files) compile it once. A cache only: a hit loads the
# executable that compiling would give (the key is the HLO, the compile options, the jax and
# jaxlib versions and the backend). A new temporary folder each run, removed at its end, so no
# run sees another's; HESSIAN_APPROX_TEST_XLA_CACHE=off turns it off, =DIR keeps one in DIR.
_CACHE_ENV = "HESSIAN_APPROX_TEST_XLA_CACHE"
_OWN_CACHE = None
if not os.environ.get(_CACHE_ENV):  # the controller (or a plain run) makes it; the workers inherit it
    _OWN_CACHE = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="hessian-approx-xla-cache-")
if os.environ[_CACHE_ENV] != "off":
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("HESSIAN_APPROX_TEST_XLA_CACHE_MIN_SECS", "0.5")))
    if importlib.util.find_spec("filelock"):  # a size limit makes workers read and write under a file lock
        jax.config.update("jax_compilation_cache_max_size", 16 << 30)
    else:  # no lock: one folder per process, so no worker reads a file another is writing
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(dir=os.environ[_CACHE_ENV]))


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# Who may turn 64-bit JAX on process-wide: the command line's --dtype float64 (a CLI process
# runs one configuration). Library code must not; tests use the x64 fixture instead.
X64_SWITCH_ALLOWED = ("benchmarks.context",)


def mnist_dir() -> Path | None:
    """The MNIST IDX directory: $HESSIAN_APPROX_DATA, else ../shared/data/mnist beside the repo."""
    for cand in (os.environ.get("HESSIAN_APPROX_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if cand and (Path(cand) / "train-labels-idx1-ubyte.gz").exists():
            return Path(cand)
    return None


@pytest.fixture
def mnist_path():
    d = mnist_dir()
    if d is None:
        pytest.skip("MNIST IDX files not found (set HESSIAN_APPROX_DATA or place ../shared/data/mnist)")
    return d


@pytest.fixture
def x64():
    """64-bit JAX for one test only (``jax.enable_x64``), so float32 tests run as in production."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def x64_if_float64(request):
    """64-bit JAX when the test's ``dtype`` parameter is float64 (any spelling: "float64",
    np.float64, torch.float64); off otherwise, as in production."""
    spec = getattr(request.node, "callspec", None)
    dtype = spec.params.get("dtype") if spec is not None else None
    with jax.enable_x64("float64" in str(dtype)):
        yield


@pytest.fixture(autouse=True)
def x64_stays_off():
    """64-bit JAX is off, process-wide, before and after every test.

    ``benchmarks.context.Context`` turns it on with ``jax.config.update`` for --dtype float64
    (the command line's switch); tests doing that run under ``x64``, and the switch is turned
    back off here so that it cannot leak into later tests. Any other caller of the switch
    (library code must not flip it) fails the test.
    """
    if jax.enable_x64.get_global():
        jax.config.update("jax_enable_x64", False)
        pytest.fail("64-bit JAX was on process-wide before this test (set at import or by a "
                    "module-scoped fixture); use the x64 fixture instead")
    callers = []
    update = jax.config.update

    def recording_update(name, value, *args, **kwargs):
        if name == "jax_enable_x64" and value:
            callers.append(sys._getframe(1).f_globals.get("__name__", "?"))
        return update(name, value, *args, **kwargs)

    jax.config.update = recording_update  # an instance attribute over Config.update
    yield
    del jax.config.update
    left_on = jax.enable_x64.get_global()
    if left_on:
        jax.config.update("jax_enable_x64", False)
    others = sorted({c for c in callers if c not in X64_SWITCH_ALLOWED})
    if others:
        pytest.fail(f"jax_enable_x64 was switched on process-wide by {', '.join(others)}; only "
                    f"{', '.join(X64_SWITCH_ALLOWED)} may (tests: use the x64 fixture)")
    if left_on and not callers:
        pytest.fail("64-bit JAX was left on process-wide (not through jax.config.update); "
                    "use the x64 fixture instead")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
