"""Compatibility layer: a temporary ``torch.eig`` (removed from torch) so PyPI's PyHessian 0.1 density runs.

PyHessian 0.1's ``hessian.density`` builds the symmetric tridiagonal Lanczos matrix T and calls
``torch.eig(T, eigenvectors=True)``, which torch 1.9 deprecated and torch 2.x removed. The
context manager ``torch_eig()`` installs a stand-in on the ``torch`` module for the duration of a
``with`` block and puts back what was there afterwards: torch 2.x keeps a ``torch.eig`` stub
that only raises "deprecated since version 1.9 and is now removed", and that stub is restored (an
old torch whose ``torch.eig`` still works is left untouched). The stand-in returns what old torch returned:

- ``eigenvalues``: (n, 2) tensor, column 0 the real parts, column 1 the imaginary parts (zeros,
  since T is symmetric);
- ``eigenvectors``: (n, n) tensor whose columns are the unit eigenvectors (an empty tensor when
  ``eigenvectors=False``, as old torch gave).

It is computed with ``torch.linalg.eigh`` because T is real symmetric, so eigenvalues come in
ascending order (old torch's LAPACK ``geev`` order was unspecified; PyHessian does not depend on
it). A non-symmetric input raises ``HessianApproxError`` rather than giving a wrong answer.
The patch is process-wide while it is active: do not run torch code on other threads that
expects ``torch.eig`` to be absent at the same time.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import torch

from hessian_approx.errors import HessianApproxError

EigResult = collections.namedtuple("EigResult", ["eigenvalues", "eigenvectors"])


def symmetric_eig(a: torch.Tensor, eigenvectors: bool = False) -> EigResult:
    """Old ``torch.eig`` for a real symmetric (n, n) matrix: ((n, 2) [real, imag], (n, n) or empty)."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise HessianApproxError(
            f"torch.eig stand-in got shape {tuple(a.shape)}", "pass a square (n, n) matrix"
        )
    scale = float(a.abs().max()) if a.numel() else 0.0
    if not torch.allclose(a, a.T, rtol=0.0, atol=1e-12 * max(scale, 1.0)):
        raise HessianApproxError(
            "torch.eig stand-in got a non-symmetric matrix",
            "use torch.linalg.eig for general matrices; the stand-in only serves PyHessian's tridiagonal T",
        )
    values, vectors = torch.linalg.eigh(a)
    pairs = torch.stack([values, torch.zeros_like(values)], dim=1)
    return EigResult(pairs, vectors if eigenvectors else torch.empty(0, dtype=a.dtype))


_MISSING = object()


def torch_has_working_eig() -> bool:
    """Whether ``torch.eig`` exists and runs (torch < 1.13); torch 2.x keeps a stub that raises."""
    fn = getattr(torch, "eig", None)
    if fn is None or fn is symmetric_eig:
        return False
    try:
        fn(torch.ones(1, 1), eigenvectors=True)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


@contextlib.contextmanager
def torch_eig() -> Iterator[None]:
    """Provide a working ``torch.eig`` inside the block; put back what was there (or nothing) on exit."""
    if torch_has_working_eig():
        yield
        return
    original = torch.__dict__.get("eig", _MISSING)
    torch.eig = symmetric_eig
    try:
        yield
    finally:
        if original is _MISSING:
            del torch.eig
        else:
            torch.eig = original
