"""bridge.metrics against hand-computed values."""

import json

import numpy as np
import pytest

from bridge.metrics import (
    compare_matrices,
    compare_vectors,
    eigenvalue_errors,
    max_abs_err,
    max_rel_err,
    rel_frobenius,
    subspace_overlap,
)
from hessian_approx.errors import HessianApproxError


def test_elementwise_errors_by_hand():
    a = np.array([1.0, 2.0, 3.0, 0.5])
    b = np.array([1.0, 2.5, 2.0, 0.0])
    # a - b = [0, -0.5, 1, 0.5]; ||a-b|| = sqrt(1.5); ||b|| = sqrt(11.25)
    assert rel_frobenius(a, b) == pytest.approx(np.sqrt(1.5 / 11.25), rel=1e-15)
    assert max_abs_err(a, b) == 1.0
    assert max_rel_err(a, b, floor=1.0) == pytest.approx(0.5)  # max(0, .5/2.5, 1/2, .5/1)
    assert max_rel_err(a, b) == pytest.approx(0.5 / 1e-12)  # zero reference entry floored at 1e-12
    assert rel_frobenius(np.zeros(3), np.zeros(3)) == 0.0 and rel_frobenius(np.ones(3), np.zeros(3)) == np.inf
    M = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert rel_frobenius(M + np.array([[0.0, 0.0], [0.0, 0.5]]), M) == pytest.approx(0.1)  # 0.5 / 5
    assert all(isinstance(f(a, b), float) for f in (rel_frobenius, max_abs_err, max_rel_err))


def test_eigenvalue_errors_by_hand():
    e = eigenvalue_errors([9.0, 2.2], [2.0, 10.0, -1.0])  # matched after sorting: (9, 10), (2.2, 2)
    assert e["k"] == 2
    assert e["abs"] == pytest.approx([1.0, 0.2])
    assert e["rel"] == pytest.approx([0.1, 0.1])
    assert e["max_rel"] == pytest.approx(0.1)
    assert eigenvalue_errors([], [1.0]) == {"abs": [], "rel": [], "max_rel": 0.0, "k": 0}
    json.dumps(e)


def test_subspace_overlap_by_hand():
    r = np.random.default_rng(0)
    U = r.normal(size=(8, 3))
    assert subspace_overlap(U, U) == pytest.approx(1.0, abs=1e-14)
    R = np.linalg.qr(r.normal(size=(3, 3)))[0]
    assert subspace_overlap(U, U @ R * 5.0) == pytest.approx(1.0, abs=1e-14)  # rotated, rescaled basis
    Q = np.linalg.qr(U, mode="complete")[0]
    assert subspace_overlap(Q[:, :3], Q[:, 3:6]) == pytest.approx(0.0, abs=1e-14)  # orthogonal spaces
    e = np.eye(4)
    # span(e0, e1) vs span(e0, e2): cosines 1 and 0 -> mean of squares 1/2
    assert subspace_overlap(e[:, [0, 1]], e[:, [0, 2]]) == pytest.approx(0.5)
    # one direction at 60 degrees: cos^2 = 1/4
    v = np.array([np.cos(np.pi / 3), np.sin(np.pi / 3), 0, 0])
    assert subspace_overlap(e[:, 0], v) == pytest.approx(0.25)
    # a subspace inside a larger one counts as fully captured
    assert subspace_overlap(e[:, [0]], e[:, [0, 1, 2]]) == pytest.approx(1.0)
    # sign flips of eigenvectors do not matter
    assert subspace_overlap(Q[:, :2], -Q[:, :2]) == pytest.approx(1.0)
    with pytest.raises(HessianApproxError, match=r"\(8, 3\) and \(7, 3\)"):
        subspace_overlap(U, U[:7])


def test_compare_vectors_and_matrices():
    c = compare_vectors([1.0, 1.0], [1.0, 0.0])
    assert c["rel_frobenius"] == pytest.approx(1.0) and c["max_abs_err"] == 1.0
    assert c["cosine"] == pytest.approx(1 / np.sqrt(2))
    json.dumps(c)
    A = np.diag([4.0, 2.0, 1.0])
    B = np.diag([5.0, 2.0, 1.0])
    m = compare_matrices(A, B, k=2)
    assert m["rel_frobenius"] == pytest.approx(1 / np.sqrt(30))
    assert m["max_abs_err"] == 1.0 and m["trace_rel_err"] == pytest.approx(1 / 8)
    assert m["eigenvalues"]["abs"] == pytest.approx([1.0, 0.0]) and m["eigenvalues"]["max_rel"] == pytest.approx(0.2)
    assert m["subspace_overlap"] == pytest.approx(1.0)
    P = np.eye(3)[[1, 0, 2]]  # swap the top two eigenvectors' directions: top-1 subspaces orthogonal
    assert compare_matrices(P @ np.diag([3.0, 1.0, 0.5]) @ P.T, np.diag([3.0, 1.0, 0.5]), k=1)["subspace_overlap"] \
        == pytest.approx(0.0)
    assert set(compare_matrices(A, B)) == {"rel_frobenius", "max_abs_err", "max_rel_err", "trace_rel_err"}
    json.dumps(m)
    with pytest.raises(HessianApproxError, match=r"shapes \(3, 3\) \(approx\) and \(2, 2\) \(exact\)"):
        compare_matrices(A, B[:2, :2])
    with pytest.raises(HessianApproxError, match="floor"):
        max_rel_err(A, B, floor=0.0)
