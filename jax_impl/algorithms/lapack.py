"""Values-only symmetric eigensolvers: MKL's or SciPy's LAPACK called through ctypes, off the main thread.

SciPy's f2py wrappers hold Python's global interpreter lock for the whole LAPACK call, so
Ctrl-C or SIGTERM during a 7,960² eigendecomposition waits for it (76 s was seen). ctypes
releases the lock during a foreign call; the call runs in a daemon thread and the main thread
waits in short slices, so an interrupt is raised within about 0.1 s. The routines are the
ones ``scipy.linalg.cython_lapack`` exports (the same OpenBLAS build SciPy uses), or, where
the ``mkl`` wheel is installed (the ``mkl`` extra), MKL's ``LAPACKE_?syevd``: 2.3x faster
on a 7,960² float32 Hessian on the 2-core Xeon here (5.6 s against 12.7 s; PyTorch's
``eigvalsh``, also MKL, 5.6 s), see README "Eigensolvers".
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
import threading

import numpy as np

from jax_impl.errors import HessianApproxError

_INT = ctypes.POINTER(ctypes.c_int)
_CHAR = ctypes.c_char_p


def _routine(name: str, argtypes: list):
    """A ctypes function for ``name`` from ``scipy.linalg.cython_lapack`` (all arguments by pointer)."""
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_ptr(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *argtypes)(address)


def _syevd_values(a: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of the symmetric ``a`` (its upper triangle in C order) by ``?syevd``.

    ``a`` is overwritten. Workspace from LAPACK's own query (lwork = liwork = -1).
    """
    n = a.shape[0]
    real = np.float64 if a.dtype == np.float64 else np.float32
    ptr = ctypes.POINTER(ctypes.c_double if real == np.float64 else ctypes.c_float)
    fn = _routine("dsyevd" if real == np.float64 else "ssyevd",
                  [_CHAR, _CHAR, _INT, ptr, _INT, ptr, ptr, _INT, _INT, _INT, _INT])
    w = np.empty(n, real)
    c_n, info = ctypes.c_int(n), ctypes.c_int(0)
    work_q, iwork_q = np.zeros(1, real), np.zeros(1, np.int32)
    minus1 = ctypes.c_int(-1)
    # C order holds the transpose: LAPACK's "U" (column major) reads our lower triangle
    args = lambda work, lwork, iwork, liwork: (  # noqa: E731
        b"N", b"U", ctypes.byref(c_n), a.ctypes.data_as(ptr), ctypes.byref(c_n), w.ctypes.data_as(ptr),
        work.ctypes.data_as(ptr), ctypes.byref(lwork), iwork.ctypes.data_as(_INT), ctypes.byref(liwork),
        ctypes.byref(info))
    fn(*args(work_q, minus1, iwork_q, minus1))
    lwork, liwork = ctypes.c_int(max(1, int(work_q[0]))), ctypes.c_int(max(1, int(iwork_q[0])))
    work, iwork = np.empty(lwork.value, real), np.empty(liwork.value, np.int32)
    fn(*args(work, lwork, iwork, liwork))
    if info.value != 0:
        raise HessianApproxError(f"LAPACK {'d' if real == np.float64 else 's'}syevd failed (info {info.value})",
                                 "check that the matrix is finite and symmetric")
    return w


_RUNNING: set = set()  # tokens of the worker calls still inside ``fn``


def native_call_running() -> bool:
    """True while a call started by ``run_interruptibly`` is still running (e.g. after Ctrl-C).

    A process must then leave with ``os._exit``: OpenBLAS's exit handler waits for its
    worker threads, and the interpreter's shutdown can crash under a running foreign call.
    """
    return bool(_RUNNING)


def run_interruptibly(fn, *args):
    """``fn(*args)`` in a daemon thread; the caller waits in 0.1 s slices so Ctrl-C and SIGTERM act at once.

    Useful only for calls that release the GIL (ctypes foreign calls, XLA executions). If
    the caller is interrupted, the thread finishes in the background and its result is
    dropped; ``native_call_running()`` says so. (The wait uses an Event, not
    ``Thread.join``: an interrupted join marks a running thread as stopped, bpo-45274.)
    """
    box: dict = {}
    done = threading.Event()
    token = object()

    def target():
        try:
            box["out"] = fn(*args)
        except BaseException as err:  # handed to the caller
            box["err"] = err
        finally:
            _RUNNING.discard(token)
            done.set()

    _RUNNING.add(token)
    threading.Thread(target=target, daemon=True, name="hessian-approx-lapack").start()
    while not done.wait(0.1):
        pass
    if "err" in box:
        raise box["err"]
    return box["out"]


@functools.lru_cache(maxsize=1)
def _mkl():
    """MKL's single dynamic library from the ``mkl`` wheel (``<prefix>/lib/libmkl_rt.so.*``), or None.

    Loaded with RTLD_LOCAL, so its symbols do not replace OpenBLAS's (SciPy, jaxlib) or
    PyTorch's. ``HESSIAN_APPROX_EIGENSOLVER=openblas`` turns it off.
    """
    if os.environ.get("HESSIAN_APPROX_EIGENSOLVER", "").lower() == "openblas":
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True):
            try:
                return ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            except OSError:
                continue
    return None


def driver() -> str:
    """The values-only eigensolver :func:`eigvalsh_lapack` calls here: ``"mkl ?syevd"`` or ``"openblas ?syevd"``."""
    return "mkl ?syevd" if _mkl() is not None else "openblas ?syevd"


def _mkl_syevd_values(a: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues by MKL's ``LAPACKE_?syevd`` (values only, ``a``'s lower triangle); ``a`` is overwritten."""
    real = np.float64 if a.dtype == np.float64 else np.float32
    fn = getattr(_mkl(), "LAPACKE_" + ("d" if real == np.float64 else "s") + "syevd")
    ptr = ctypes.POINTER(ctypes.c_double if real == np.float64 else ctypes.c_float)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int, ptr, ctypes.c_int, ptr]
    n = a.shape[0]
    w = np.empty(n, real)
    info = fn(102, b"N", b"U", n, a.ctypes.data_as(ptr), n, w.ctypes.data_as(ptr))  # 102: column major
    if info != 0:
        raise HessianApproxError(f"MKL ?syevd failed (info {info})", "check that the matrix is finite and symmetric")
    return w


def eigvalsh_lapack(matrix) -> np.ndarray:
    """Eigenvalues (d,) ascending of a symmetric (d, d) float32/float64 matrix, by ``?syevd``, values only.

    MKL's where the ``mkl`` wheel is installed, else SciPy's OpenBLAS (:func:`driver` says
    which). Reads the lower triangle (as ``numpy.linalg.eigvalsh`` with UPLO="L"); the input
    is not modified. Refuses NaN or Inf with a one-line error before any work.
    """
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HessianApproxError(f"matrix has shape {m.shape}, not square", "pass a (d, d) symmetric matrix")
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float64)
    if not np.isfinite(m).all():
        bad = int(m.size - np.count_nonzero(np.isfinite(m)))
        raise HessianApproxError(f"the {m.shape[0]}x{m.shape[0]} matrix holds {bad} NaN or Inf entries",
                                 "the curvature overflowed: check the weights' scale or use --dtype float64")
    a = np.array(m, order="C", copy=True)
    return run_interruptibly(_mkl_syevd_values if _mkl() is not None else _syevd_values, a)


def _lapacke(name: str):
    """``scipy_LAPACKE_<name>`` from the OpenBLAS build SciPy bundles (LAPACKE's C interface), or None."""
    import scipy

    libs = sorted(glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "*openblas*.so*")))
    for path in libs:
        try:
            return getattr(ctypes.CDLL(path), f"scipy_LAPACKE_{name}")
        except (OSError, AttributeError):
            continue
    return None


def _syevd_2stage_values(a: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues by LAPACK's two-stage ``?syevd_2stage`` (values only); ``a`` is overwritten."""
    real = np.float64 if a.dtype == np.float64 else np.float32
    fn = _lapacke(("d" if real == np.float64 else "s") + "syevd_2stage")
    if fn is None:
        raise HessianApproxError("SciPy's OpenBLAS has no LAPACKE ?syevd_2stage", "use driver='syevd'")
    ptr = ctypes.POINTER(ctypes.c_double if real == np.float64 else ctypes.c_float)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int, ptr, ctypes.c_int, ptr]
    n = a.shape[0]
    w = np.empty(n, real)
    info = fn(102, b"N", b"U", n, a.ctypes.data_as(ptr), n, w.ctypes.data_as(ptr))  # 102: column major
    if info != 0:
        raise HessianApproxError(f"LAPACK ?syevd_2stage failed (info {info})", "check that the matrix is finite")
    return w
