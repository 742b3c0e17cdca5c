"""Thin runners around the installed PyHessian 0.1 (top eigenvalues, trace, density) returning numpy.

The installed package is never edited. While a runner is active it temporarily rebinds two names
in the ``pyhessian.hessian`` module's namespace and restores them on exit:

- ``hessian_vector_product`` -> a counting wrapper, so every Hvp PyHessian does is counted;
- ``torch`` -> a view of torch whose ``randn`` / ``randint_like`` hand out caller-given start
  vectors or Rademacher probes (parameter-shaped slices of one flat (d,) row, in call order) and
  otherwise draw from torch's generator seeded with ``seed`` inside ``torch.random.fork_rng``
  (the caller's RNG state is untouched). Every other attribute is the real torch.

It also sets torch's default dtype to the model's (PyHessian draws vectors in the default dtype),
clears and afterwards restores the parameters' ``.grad`` (PyHessian's constructor accumulates a
create_graph gradient into them), restores the model's train/eval mode (PyHessian calls
``model.eval()``), and for ``density`` provides ``torch.eig`` through ``torch_ref.compat``.
These are process-wide while active: run one runner at a time.
"""

from __future__ import annotations

import contextlib
import importlib
import time
import warnings
from importlib import metadata
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from hessian_approx.errors import HessianApproxError
from torch_ref import compat, exact, models

_PH = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports the class)


def pyhessian_version() -> str:
    try:
        return metadata.version("pyhessian")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Feeder:
    """Hands out rows of ``vectors`` (m, d) as parameter-shaped pieces, in PyHessian's call order."""

    def __init__(self, vectors: np.ndarray, shapes: list[torch.Size], what: str):
        self.vectors, self.shapes, self.what = vectors, shapes, what
        self.calls = 0

    def next_piece(self, size, dtype: torch.dtype) -> torch.Tensor:
        row, j = divmod(self.calls, len(self.shapes))
        if row >= self.vectors.shape[0]:
            raise HessianApproxError(
                f"PyHessian asked for more than the {self.vectors.shape[0]} {self.what} given",
                f"pass more {self.what} or a smaller max_iter / top_n",
            )
        shape = self.shapes[j]
        if tuple(size) != tuple(shape):
            raise HessianApproxError(
                f"PyHessian drew a {tuple(size)} vector where parameter {j} has shape {tuple(shape)}",
                "report this: the runner's feeding assumes PyHessian 0.1's draw order",
            )
        start = sum(s.numel() for s in self.shapes[:j])
        self.calls += 1
        piece = self.vectors[row, start:start + shape.numel()]
        return torch.as_tensor(piece).to(dtype).reshape(shape).clone()


class _TorchView:
    """torch as pyhessian.hessian sees it while a runner is active (see the module docstring)."""

    def __init__(self, n_params: int, counter: dict, start_vectors: _Feeder | None, probes: _Feeder | None):
        self._n_params, self._counter = n_params, counter
        self._start, self._probes = start_vectors, probes
        self._randn_calls = 0
        self.starts: list[int] = []  # Hvp count when each new start vector began (one per eigenvalue)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def randn(self, *size, **kwargs) -> torch.Tensor:
        if self._randn_calls % self._n_params == 0:
            self.starts.append(self._counter["n"])
        self._randn_calls += 1
        if self._start is None:
            return torch.randn(*size, **kwargs)
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return self._start.next_piece(shape, kwargs.get("dtype") or torch.get_default_dtype())

    def randint_like(self, p: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._probes is None:
            return torch.randint_like(p, *args, **kwargs)
        return self._probes.next_piece(p.shape, p.dtype)


@contextlib.contextmanager
def _rebind(module, name: str, value) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    original = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(original)


@contextlib.contextmanager
def _clean_model(model: nn.Module) -> Iterator[None]:
    """Clear .grad for PyHessian's accumulation; restore grads and train/eval mode afterwards."""
    params = list(model.parameters())
    grads, training = [p.grad for p in params], model.training
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g  # also drops PyHessian's create_graph gradient and its graph
        model.train(training)


def _check_vectors(vectors, d: int, what: str) -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[1] != d:
        raise HessianApproxError(
            f"{what} have shape {arr.shape} but the model has {d} parameters",
            f"pass a (m, {d}) array in torch flat order",
        )
    return arr


@contextlib.contextmanager
def _session(model, x, y, loss, seed, start_vectors=None, probes=None, eig=False):
    """Yield (pyhessian.hessian object, hvp counter dict, torch view), everything restored afterwards."""
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float64):
        raise HessianApproxError(f"model dtype {dtype} is not supported by PyHessian", "use float32 or float64")
    xt, t, crit = exact.prepare(model, x, y, loss)
    shapes = [p.shape for p in model.parameters()]
    counter = {"n": 0}
    original_hvp = _PH.hessian_vector_product

    def counted_hvp(gradsH, params, v):
        counter["n"] += 1
        return original_hvp(gradsH, params, v)

    view = _TorchView(len(shapes), counter,
                      None if start_vectors is None else _Feeder(start_vectors, shapes, "start vectors"),
                      None if probes is None else _Feeder(probes, shapes, "probes"))
    with contextlib.ExitStack() as stack:
        # PyHessian's loss.backward(create_graph=True) warns of a grad/graph cycle; _clean_model breaks it.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(seed)
        stack.enter_context(_default_dtype(dtype))
        stack.enter_context(_clean_model(model))
        stack.enter_context(_rebind(_PH, "hessian_vector_product", counted_hvp))
        stack.enter_context(_rebind(_PH, "torch", view))
        if eig:
            stack.enter_context(compat.torch_eig())
        yield _PH.hessian(model, crit, data=(xt, t), cuda=False), counter, view


def _settings(model, **extra) -> dict[str, Any]:
    return {**extra, "model_mode": "eval", "pyhessian_version": pyhessian_version(),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "normalization_eps": 1e-6, "device": "cpu"}


def top_eigenvalues(model: nn.Module, x, y, loss: str, k: int = 10, max_iter: int = 100, tol: float = 1e-3,
                    start_vectors=None, seed: int = 0) -> dict[str, Any]:
    """PyHessian's power iteration with deflation for the top-k eigenvalues (largest |lambda| first).

    Args:
      x: inputs (N, D) or channels-last images (N, H, W, C); y: integer labels (N,);
        loss: "cross_entropy" or "mse".
      k: how many eigenvalues (PyHessian's top_n); max_iter, tol: its maxIter and tol; it stops an
        eigenvalue when |lam_i - lam_{i-1}| / (|lam_{i-1}| + 1e-6) < tol.
      start_vectors: optional (k, d) starting vectors in torch flat order, fed in place of
        PyHessian's torch.randn draws (it normalizes them); else drawn with torch seeded by ``seed``.

    Returns:
      {"eigenvalues": (k,) in found order, "eigenvectors": (k, d) torch flat order (norm ~1-1e-6),
       "iterations": Hvps per eigenvalue, "matvecs": total Hvps, "seconds", "settings"}.
    """
    if k < 1 or max_iter < 1:
        raise HessianApproxError(f"k={k} and max_iter={max_iter} must be positive", "pass k >= 1 and max_iter >= 1")
    d = models.num_params(model)
    if start_vectors is not None:
        start_vectors = _check_vectors(start_vectors, d, "start vectors")
        if start_vectors.shape[0] != k:
            raise HessianApproxError(
                f"{start_vectors.shape[0]} start vectors for k={k} eigenvalues", "pass exactly k start vectors"
            )
    t0 = time.perf_counter()
    with _session(model, x, y, loss, seed, start_vectors=start_vectors) as (ph, counter, view):
        values, vectors = ph.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        matvecs = counter["n"]
    seconds = time.perf_counter() - t0
    marks = view.starts + [matvecs]
    return {
        "eigenvalues": np.asarray(values, dtype=np.float64),
        "eigenvectors": np.stack([torch.cat([p.detach().reshape(-1) for p in v]).numpy() for v in vectors]),
        "iterations": [b - a for a, b in zip(marks[:-1], marks[1:])],
        "matvecs": int(matvecs),
        "seconds": seconds,
        "settings": _settings(model, max_iter=max_iter, tol=tol, top_n=k,
                              start="start_vectors" if start_vectors is not None else f"torch.randn seed {seed}"),
    }


def _check_probes(probes, d: int, needed: int, what: str) -> np.ndarray:
    probes = _check_vectors(probes, d, "probes")
    if probes.shape[0] < needed:
        raise HessianApproxError(f"{probes.shape[0]} probes for {what}", f"pass at least {needed} probes")
    if not np.all(np.abs(probes) == 1):
        raise HessianApproxError("probes hold entries other than +1 and -1", "pass Rademacher (+-1) probes")
    return probes


def trace(model: nn.Module, x, y, loss: str, max_iter: int = 100, tol: float = 1e-3, probes=None,
          seed: int = 0) -> dict[str, Any]:
    """PyHessian's Hutchinson trace estimate.

    It stops after i probes when |mean_i - mean_{i-1}| / (mean_{i-1} + 1e-6) < tol, or after max_iter.

    Args:
      probes: optional Rademacher (m, d), m >= max_iter, fed in place of its torch.randint_like draws.

    Returns:
      {"trace": mean of the estimates, "estimates": [v_i^T H v_i], "matvecs", "seconds", "settings"}.
    """
    if max_iter < 1:
        raise HessianApproxError(f"max_iter={max_iter} must be positive", "pass max_iter >= 1")
    d = models.num_params(model)
    if probes is not None:
        probes = _check_probes(probes, d, max_iter, f"max_iter={max_iter}")
    t0 = time.perf_counter()
    with _session(model, x, y, loss, seed, probes=probes) as (ph, counter, _):
        estimates = ph.trace(maxIter=max_iter, tol=tol)
        matvecs = counter["n"]
    return {
        "trace": float(np.mean(estimates)),
        "estimates": [float(e) for e in estimates],
        "matvecs": int(matvecs),
        "seconds": time.perf_counter() - t0,
        "settings": _settings(model, max_iter=max_iter, tol=tol,
                              probes="probes" if probes is not None else f"torch.randint_like seed {seed}"),
    }


def density(model: nn.Module, x, y, loss: str, iters: int = 100, n_v: int = 1, seed: int = 0,
            probes=None) -> dict[str, Any]:
    """PyHessian's stochastic Lanczos quadrature (SLQ) spectral density.

    Each of n_v runs does ``iters`` Lanczos steps with full reorthogonalization from a Rademacher
    start; nodes are the eigenvalues of the tridiagonal T, weights the squared first components of
    its eigenvectors (via the torch.eig stand-in of torch_ref.compat: ascending nodes).

    Args:
      iters: Lanczos steps, 1..d.  n_v: number of runs.
      probes: optional Rademacher (n_v, d) start vectors fed in place of torch.randint_like.

    Returns:
      {"nodes": (n_v, iters), "weights": (n_v, iters) (each row sums to 1), "matvecs", "seconds",
       "settings"}.
    """
    d = models.num_params(model)
    if not 1 <= iters <= d or n_v < 1:
        raise HessianApproxError(
            f"iters={iters} and n_v={n_v} are out of range for {d} parameters",
            f"pass 1 <= iters <= {d} and n_v >= 1",
        )
    if probes is not None:
        probes = _check_probes(probes, d, n_v, f"n_v={n_v}")
    t0 = time.perf_counter()
    with _session(model, x, y, loss, seed, probes=probes, eig=True) as (ph, counter, _):
        nodes, weights = ph.density(iter=iters, n_v=n_v)
        matvecs = counter["n"]
    return {
        "nodes": np.asarray(nodes, dtype=np.float64),
        "weights": np.asarray(weights, dtype=np.float64),
        "matvecs": int(matvecs),
        "seconds": time.perf_counter() - t0,
        "settings": _settings(model, iters=iters, n_v=n_v, eig="torch_ref.compat.symmetric_eig (eigh)",
                              probes="probes" if probes is not None else f"torch.randint_like seed {seed}"),
    }
