"""Error metrics between an approximation and a reference (numpy only; results are JSON-friendly floats).

Convention: ``a``/``approx`` is the approximation, ``b``/``exact`` the reference; relative errors
divide by the reference. Inputs may be numpy, jax or (CPU) torch arrays of equal shape.
"""

from __future__ import annotations

import numpy as np

from hessian_approx.errors import HessianApproxError

DEFAULT_FLOOR = 1e-12


def _pair(a, b, what: str = "the arrays") -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise HessianApproxError(f"{what} to compare have shapes {a.shape} (approx) and {b.shape} (exact)",
                                 "compare quantities in the same parameter order and shape")
    return a, b


def rel_frobenius(a, b) -> float:
    """||a - b||_F / ||b||_F for arrays of one shape (any rank); 0 when both are zero, inf when only b is."""
    a, b = _pair(a, b)
    num = float(np.linalg.norm((a - b).ravel()))
    den = float(np.linalg.norm(b.ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def max_abs_err(a, b) -> float:
    """max |a - b| over all entries (0 for empty arrays)."""
    a, b = _pair(a, b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def max_rel_err(a, b, floor: float = DEFAULT_FLOOR) -> float:
    """max |a - b| / max(|b|, floor), entrywise; ``floor`` (> 0) keeps zero entries of b finite."""
    if not floor > 0:
        raise HessianApproxError(f"floor {floor!r} must be positive", "pass e.g. floor=1e-12")
    a, b = _pair(a, b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))) if a.size else 0.0


def eigenvalue_errors(approx, exact, floor: float = DEFAULT_FLOOR) -> dict:
    """Errors of approximate eigenvalues against exact ones, matched in descending order.

    Args:
      approx: (k,) eigenvalues of the approximation.
      exact: (m,) reference eigenvalues (e.g. the full spectrum). Both are sorted descending and
        the top min(k, m) are compared pairwise.
      floor: lower bound on |exact| in the relative error.
    Returns:
      {"abs": [|approx_i - exact_i|], "rel": [abs_i / max(|exact_i|, floor)], "max_rel": max of rel
      (0.0 when nothing is compared), "k": number compared}.
    """
    a = np.sort(np.asarray(approx, dtype=np.float64).ravel())[::-1]
    e = np.sort(np.asarray(exact, dtype=np.float64).ravel())[::-1]
    k = min(a.size, e.size)
    err = np.abs(a[:k] - e[:k])
    rel = err / np.maximum(np.abs(e[:k]), floor)
    return {"abs": [float(x) for x in err], "rel": [float(x) for x in rel],
            "max_rel": float(rel.max()) if k else 0.0, "k": int(k)}


def _orth(U: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis (d, r) of the column space of U (d, k), r = numerical rank."""
    if U.size == 0:
        return U.reshape(U.shape[0], 0)
    u, s, _ = np.linalg.svd(U, full_matrices=False)
    return u[:, s > rtol * s[0]] if s[0] > 0 else u[:, :0]


def subspace_overlap(U, V) -> float:
    """Mean squared cosine of the principal angles between the column spaces of U and V.

    Args:
      U: (d, k) basis (need not be orthonormal).
      V: (d, l) basis.
    Returns:
      ||Qᵤᵀ Qᵥ||_F² / min(rank U, rank V) in [0, 1]: 1 when one space contains the other (same
      subspace), 0 when they are orthogonal. A 1-D array is taken as one column.
    """
    U = np.asarray(U, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    U = U[:, None] if U.ndim == 1 else U
    V = V[:, None] if V.ndim == 1 else V
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != V.shape[0]:
        raise HessianApproxError(f"the bases have shapes {U.shape} and {V.shape}, expected (d, k) and (d, l)",
                                 "pass eigenvectors as columns over the same parameter order")
    qu, qv = _orth(U), _orth(V)
    r = min(qu.shape[1], qv.shape[1])
    if r == 0:
        return 0.0
    return float(min(1.0, np.sum((qu.T @ qv) ** 2) / r))


def compare_vectors(approx, exact, floor: float = DEFAULT_FLOOR) -> dict:
    """{"rel_frobenius", "max_abs_err", "max_rel_err", "cosine"} of approx (d,) against exact (d,)."""
    a, b = _pair(approx, exact, "the vectors")
    na, nb = np.linalg.norm(a.ravel()), np.linalg.norm(b.ravel())
    cosine = float(a.ravel() @ b.ravel() / (na * nb)) if na > 0 and nb > 0 else 0.0
    return {"rel_frobenius": rel_frobenius(a, b), "max_abs_err": max_abs_err(a, b),
            "max_rel_err": max_rel_err(a, b, floor), "cosine": cosine}


def compare_matrices(approx, exact, k: int | None = None, floor: float = DEFAULT_FLOOR) -> dict:
    """Errors of approx (d, d) against exact (d, d).

    Returns:
      {"rel_frobenius", "max_abs_err", "max_rel_err", "trace_rel_err"}; with ``k``, the matrices
      are taken as symmetric and it adds {"eigenvalues": eigenvalue_errors of the top-k,
      "subspace_overlap": of the top-k eigenvectors}.
    """
    a, b = _pair(approx, exact, "the matrices")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise HessianApproxError(f"the matrices have shape {a.shape}, expected square (d, d)",
                                 "pass dense curvature matrices")
    tb = float(np.trace(b))
    dt = abs(float(np.trace(a)) - tb)
    out = {"rel_frobenius": rel_frobenius(a, b), "max_abs_err": max_abs_err(a, b),
           "max_rel_err": max_rel_err(a, b, floor), "trace_rel_err": dt / max(abs(tb), floor)}
    if k is not None:
        k = int(min(k, a.shape[0]))
        wa, va = np.linalg.eigh((a + a.T) / 2)
        wb, vb = np.linalg.eigh((b + b.T) / 2)
        out["eigenvalues"] = eigenvalue_errors(wa[::-1][:k], wb[::-1][:k], floor)
        out["subspace_overlap"] = subspace_overlap(va[:, ::-1][:, :k], vb[:, ::-1][:, :k])
    return out
