"""The ctypes LAPACK eigensolver: values against float64 numpy, the lower triangle only, interruptible."""

import _thread
import ctypes
import threading
import time

import numpy as np
import pytest

from jax_impl.algorithms import lapack
from jax_impl.algorithms.lapack import eigvalsh_lapack, native_call_running, run_interruptibly
from jax_impl.errors import HessianApproxError

HAVE_MKL = lapack._mkl() is not None


@pytest.fixture(params=["mkl", "openblas"])
def driver(request, monkeypatch):
    """Each test below once per driver: MKL (the ``mkl`` extra; skipped without it) and SciPy's OpenBLAS."""
    if request.param == "mkl" and not HAVE_MKL:
        pytest.skip("the mkl wheel is not installed")
    if request.param == "openblas":
        monkeypatch.setattr(lapack, "_mkl", lambda: None)
    assert lapack.driver().startswith(request.param)
    return request.param


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_values_match_float64_and_read_the_lower_triangle(dtype, rtol, driver):
    # rtol: float32 eigenvalues are backward stable to ~n·eps·|λ|max (n = 200, eps 6e-8 -> 1e-5)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 200))
    a = a + a.T
    garbage = np.tril(a) + np.triu(np.full_like(a, 1e3), 1)  # the upper triangle must be ignored
    w = eigvalsh_lapack(garbage.astype(dtype))
    ref = np.linalg.eigvalsh(a)
    assert w.dtype == dtype
    np.testing.assert_allclose(w, ref, atol=rtol * np.abs(ref).max())
    assert garbage[0, 1] == 1e3  # input untouched


def test_nonfinite_and_nonsquare_refused():
    m = np.eye(3)
    m[1, 1] = np.inf
    with pytest.raises(HessianApproxError, match="1 NaN or Inf"):
        eigvalsh_lapack(m)
    with pytest.raises(HessianApproxError, match="not square"):
        eigvalsh_lapack(np.ones((2, 3)))


def test_the_gil_is_released_during_the_call(driver):
    a = np.random.default_rng(1).standard_normal((1500, 1500)).astype(np.float32)
    a = a + a.T
    ticks = []
    t = threading.Thread(target=eigvalsh_lapack, args=(a,))
    start = time.monotonic()
    t.start()
    while t.is_alive():
        time.sleep(0.01)
        ticks.append(time.monotonic())
    gaps = np.diff([start, *ticks])
    assert len(ticks) > 3 and gaps.max() < 0.25  # SciPy's wrapper holds the GIL: one gap of the whole call


def test_interrupt_reaches_the_caller_at_once():
    libc = ctypes.CDLL(None)
    threading.Timer(0.2, _thread.interrupt_main).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_interruptibly(libc.usleep, 3_000_000)  # a 3 s foreign call without the GIL
    assert time.monotonic() - t0 < 1.0
    assert native_call_running()  # the worker is still inside its call ...
    time.sleep(3.2)
    assert not native_call_running()  # ... and done later


def test_two_stage_driver_matches():
    """?syevd_2stage (LAPACKE from SciPy's OpenBLAS; issue 14's eigensolver search) gives the same values."""
    from jax_impl.algorithms.lapack import _syevd_2stage_values

    a = np.random.default_rng(2).standard_normal((300, 300))
    a = a + a.T
    np.testing.assert_allclose(_syevd_2stage_values(a.copy()), np.linalg.eigvalsh(a), atol=1e-12 * np.abs(a).max() * 300)


def test_mkl_is_used_where_installed_and_can_be_turned_off(monkeypatch):
    """The ``mkl`` wheel installed: MKL's driver, unless HESSIAN_APPROX_EIGENSOLVER=openblas."""
    if not HAVE_MKL:
        pytest.skip("the mkl wheel is not installed")
    lapack._mkl.cache_clear()
    monkeypatch.setenv("HESSIAN_APPROX_EIGENSOLVER", "openblas")
    try:
        assert lapack.driver() == "openblas ?syevd"
    finally:
        lapack._mkl.cache_clear()
        monkeypatch.delenv("HESSIAN_APPROX_EIGENSOLVER")
    assert lapack.driver() == "mkl ?syevd"
