"""Agreement of an approximation's top-k eigenvectors with the exact ones: subspace overlap, principal angles."""

from __future__ import annotations

import numpy as np

from jax_impl.errors import HessianApproxError

# Rows whose Gram matrix is further than this from the identity are refused: float32
# eigendecompositions are orthonormal to ~1e-5 at d ~ 10^4, while a (d, k) matrix of
# eigenvectors as columns passed by mistake is off by O(1).
ORTHONORMAL_ATOL = 1e-3


def _rows(U, what: str) -> np.ndarray:
    """U as float64 (k, d) orthonormal rows (a (d,) vector is one row); one-line error otherwise."""
    U = np.asarray(U, dtype=np.float64)
    U = U[None, :] if U.ndim == 1 else U
    if U.ndim != 2:
        raise HessianApproxError(f"{what} has shape {U.shape}, expected (k, d) rows",
                                 "pass eigenvectors as the rows of a (k, d) array")
    err = float(np.max(np.abs(U @ U.T - np.eye(U.shape[0])))) if U.size else 0.0
    if not err <= ORTHONORMAL_ATOL:
        raise HessianApproxError(
            f"the rows of {what} {U.shape} are not orthonormal (max |UUᵀ - I| = {err:.3g})",
            "pass orthonormal eigenvectors as rows (k, d), e.g. eigh_descending(M)[1][:, :k].T")
    return U


def _pair(U, V) -> tuple[np.ndarray, np.ndarray]:
    U, V = _rows(U, "U"), _rows(V, "V")
    if U.shape[1] != V.shape[1]:
        raise HessianApproxError(f"U has vectors of length {U.shape[1]}, V of {V.shape[1]}",
                                 "compare eigenvectors over the same flat parameter vector")
    return U, V


def _cosines(U, V) -> np.ndarray:
    """Cosines of the principal angles (min(k, l),), descending, clipped to [0, 1]."""
    if U.shape[0] == 0 or V.shape[0] == 0:
        return np.zeros(0)
    return np.clip(np.linalg.svd(U @ V.T, compute_uv=False), 0.0, 1.0)


def subspace_overlap(U, V) -> float:
    """How much of one top-k subspace lies in the other: ‖U Vᵀ‖_F² / min(k, l) in [0, 1].

    The top-subspace overlap of Gur-Ari, Roberts & Dyer 2018 ("Gradient descent happens in a
    tiny subspace"): with orthonormal rows, ‖U Vᵀ‖_F² = Σ_i ‖V u_i‖² sums the squared lengths
    of the projections of U's vectors onto span(V), so the overlap is the mean of cos²
    over the principal angles: 1 when the spans are equal (or, for k ≠ l, one contains the
    other), 0 when they are orthogonal, cos²θ when every vector is tilted by θ out of the
    other span, k'/k when k' of k directions are shared and the rest orthogonal; a random
    k-dimensional subspace of R^d scores about k/d. Invariant to rotations within either
    subspace, hence to the sign and order of the vectors and to the choice of basis of a
    tied eigenspace (which ``per_vector_overlap`` is not).

    Args:
      U: (k, d) orthonormal rows (the approximation's eigenvectors); (d,) is one row.
      V: (l, d) orthonormal rows (the exact top eigenvectors).
    Returns:
      a float in [0, 1] (0.0 when either is empty).
    Raises:
      HessianApproxError: not 2-D, rows not orthonormal (e.g. eigenvectors as columns), or d differs.
    """
    U, V = _pair(U, V)
    c = _cosines(U, V)
    return float(min(1.0, np.sum(c ** 2) / c.size)) if c.size else 0.0


def principal_angles(U, V) -> np.ndarray:
    """The principal angles between span(U) and span(V), in degrees, ascending.

    θ_i = arccos σ_i with σ the singular values of U Vᵀ (Björck & Golub 1973): θ_1 is the
    smallest angle between any vector of one span and any of the other, and so on; all
    0° for equal spans, all 90° for orthogonal ones. ``subspace_overlap`` = mean cos²θ_i.

    Args:
      U: (k, d) orthonormal rows; V: (l, d) orthonormal rows.
    Returns:
      (min(k, l),) float64 degrees in [0, 90], ascending.
    """
    U, V = _pair(U, V)
    return np.degrees(np.arccos(_cosines(U, V)))


def per_vector_overlap(U, V) -> np.ndarray:
    """For each vector u_i of U, its best match in V: max_j |⟨u_i, v_j⟩| in [0, 1].

    The |cosine| between the i-th approximate eigenvector and the closest exact one (sign
    ignored). 1 when u_i is (up to sign) one of the v_j; lower both when u_i points
    elsewhere and when it is a mix of exact eigenvectors, so it is informative where the
    exact eigenvalues are well separated and pessimistic inside near-degenerate clusters,
    where ``subspace_overlap`` is the fair measure.

    Args:
      U: (k, d) orthonormal rows; V: (l, d) orthonormal rows.
    Returns:
      (k,) float64 (zeros when V is empty).
    """
    U, V = _pair(U, V)
    if V.shape[0] == 0:
        return np.zeros(U.shape[0])
    return np.clip(np.max(np.abs(U @ V.T), axis=1), 0.0, 1.0)


def top_eigenvectors(matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k eigenpairs of a dense symmetric matrix, eigenvectors as rows.

    scipy's ``eigh`` restricted to the k largest (LAPACK ``syevr``), cheaper than the full
    decomposition for k ≪ d; in the matrix's float dtype (float32 stays float32).

    Args:
      matrix: (d, d) symmetric (numpy or jax); k: 1 <= k <= d.
    Returns:
      (eigenvalues (k,) descending, eigenvectors (k, d) orthonormal rows).
    """
    import scipy.linalg

    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HessianApproxError(f"matrix has shape {m.shape}, not square", "pass a (d, d) symmetric matrix")
    d = m.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
        raise HessianApproxError(f"k={k!r} is not between 1 and the dimension {d}", f"pass 1 <= k <= {d}")
    w, v = scipy.linalg.eigh(m, subset_by_index=[d - k, d - 1], check_finite=False)
    return w[::-1].copy(), v[:, ::-1].T.copy()


def eigenvector_agreement(structure, exact_vectors, k: int | None = None) -> dict:
    """How well a structured approximation's top-k eigenvectors match the exact top-k.

    Args:
      structure: anything with ``eigenvectors(k) -> (k, d)`` rows (``Diagonal``,
        ``KroneckerBlocks``), in the same flat parameter order as ``exact_vectors``.
      exact_vectors: (m, d) orthonormal rows, the exact top eigenvectors, descending (e.g.
        ``top_eigenvectors(H, k)[1]``).
      k: how many to compare (default m); the first k rows of ``exact_vectors`` are used.
    Returns:
      {"k": int, "subspace_overlap": float in [0, 1], "per_vector_overlap": [k floats]
      (for the approximation's i-th eigenvector, its |cosine| with the closest exact one),
      "principal_angles_deg": [k floats, ascending]}: JSON-friendly.
      With ties at the k-th eigenvalue of either side, the top-k subspace itself is not
      unique and every measure depends on the basis chosen.
    """
    V = np.asarray(exact_vectors)
    V = V[None, :] if V.ndim == 1 else V
    m = V.shape[0] if V.ndim == 2 else 0
    k = m if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= m:
        raise HessianApproxError(f"k={k!r} is not between 1 and the {m} exact eigenvectors given",
                                 f"pass 1 <= k <= {m}, or more exact eigenvectors")
    dim = getattr(structure, "dim", None)
    if dim is not None and V.shape[1] != dim:
        raise HessianApproxError(f"the exact eigenvectors have length {V.shape[1]}, the structure's dimension is {dim}",
                                 "compare over the same parameters in the same flat order")
    U, V = _pair(structure.eigenvectors(int(k)), V[: int(k)])
    return {"k": int(k), "subspace_overlap": subspace_overlap(U, V),
            "per_vector_overlap": [float(x) for x in per_vector_overlap(U, V)],
            "principal_angles_deg": [float(x) for x in principal_angles(U, V)]}
