"""Eigenvectors of the structures (from their factors) against dense eigh, and the eigenvector-agreement measures.

Oracles: eigh of ``dense()`` (per vector up to sign where the eigenvalues are distinct, the
top-k projector where they tie), the residual ‖S u − λ u‖ through ``matvec``, the flat order
of ``ravel_pytree`` on a registry case, and constructed subspaces with known principal angles.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_impl import operators
from jax_impl.algorithms import eigh_descending
from jax_impl.approx import APPROXIMATIONS, Diagonal, KroneckerBlocks, kflr
from jax_impl.approx.agreement import (eigenvector_agreement, per_vector_overlap, principal_angles,
                                       subspace_overlap, top_eigenvectors)
from jax_impl.errors import HessianApproxError
from jax_impl.materialize import dense
from tests.cases import case

TOL = 1e-10  # float64: factor eigh and dense eigh agree to ~1e-14 on these sizes


def spd(r, n, ties=None):
    """A random symmetric positive definite (n, n); with ``ties``, the given eigenvalues instead."""
    q, _ = np.linalg.qr(r.normal(size=(n, n)))
    w = r.uniform(0.1, 3.0, n) if ties is None else np.asarray(ties, float)
    return jnp.asarray((q * w) @ q.T)


def random_blocks(r, shapes, names, ties=None):
    """KroneckerBlocks with SPD factors: shapes [(O, J)] per layer, in ``names`` order."""
    G = tuple(spd(r, o, None if ties is None else ties[l][0]) for l, (o, _) in enumerate(shapes))
    A = tuple(spd(r, j, None if ties is None else ties[l][1]) for l, (_, j) in enumerate(shapes))
    return KroneckerBlocks(G, A, tuple(names))


def assert_top_eigenpairs(struct, vals, vecs, k):
    """(vals (k,), vecs (k, d)) is a top-k eigendecomposition of struct (ties allowed):
    eigenvalues = the dense top-k, rows orthonormal, every residual ‖S u − λ u‖ ≈ 0."""
    vals, vecs = np.asarray(vals), np.asarray(vecs)
    M = np.asarray(struct.dense())
    scale = np.max(np.abs(M))
    assert vals.shape == (k,) and vecs.shape == (k, M.shape[0])
    np.testing.assert_allclose(vals, np.linalg.eigvalsh(M)[::-1][:k], rtol=0, atol=TOL * scale)
    np.testing.assert_allclose(vals, np.asarray(struct.eigenvalues(k)), rtol=0, atol=TOL * scale)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(k), rtol=0, atol=TOL)
    res = np.asarray(jax.vmap(struct.matvec)(jnp.asarray(vecs))) - vals[:, None] * vecs
    assert np.max(np.abs(res)) < TOL * scale
    np.testing.assert_allclose(vecs @ M.T, vals[:, None] * vecs, rtol=0, atol=TOL * scale)


# ---- eigenvectors of the structures ---------------------------------------------------------
@pytest.mark.usefixtures("x64")
def test_kronecker_eigenvectors_equal_dense_eigh_per_vector():
    r = np.random.default_rng(0)
    # names out of string order ("Dense_10" < "Dense_2"), shapes (O, J) all different
    s = random_blocks(r, [(3, 4), (2, 5), (4, 2), (1, 3)], ["Dense_2", "Conv_0", "Dense_10", "Dense_0"])
    d = s.dim
    w, V = eigh_descending(s.dense())
    w, V = np.asarray(w), np.asarray(V)
    assert np.min(-np.diff(w)) > 1e-6  # distinct: each eigenvector is unique up to sign
    vals, vecs = s.eigh()
    assert_top_eigenpairs(s, vals, vecs, d)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(vecs) * V.T, axis=1)), 1.0, rtol=0, atol=1e-8)
    for k in (1, 7, d):
        vk, uk = s.eigh(k)
        np.testing.assert_allclose(np.asarray(vk), np.asarray(vals[:k]), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(uk), np.asarray(vecs[:k]), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(s.eigenvectors(k)), np.asarray(uk), rtol=0, atol=0)
    assert s.eigh(10 * d)[1].shape == (d, d)  # k > d gives d, as eigenvalues(k) does
    assert s.eigh(0)[1].shape == (0, d)
    with pytest.raises(HessianApproxError, match="k=-1"):
        s.eigh(-1)


@pytest.mark.usefixtures("x64")
def test_kronecker_eigenvectors_with_ties_span_the_dense_eigenspaces():
    r = np.random.default_rng(1)
    # products repeat within a layer (G = I) and across layers and leaves (bias 2 = 2·1 = 1·2)
    ties = [((1.0, 1.0), (3.0, 2.0, 1.0)), ((2.0, 0.5), (1.0, 2.0))]
    s = random_blocks(r, [(2, 3), (2, 2)], ["Dense_0", "Dense_1"], ties)
    w = np.asarray(np.linalg.eigvalsh(np.asarray(s.dense())))[::-1]
    vals, vecs = s.eigh()
    assert_top_eigenpairs(s, vals, vecs, s.dim)
    _, V = np.linalg.eigh(np.asarray(s.dense()))
    V = V[:, ::-1]
    # the top-k projector is unique where k ends a cluster of equal eigenvalues
    ends = [k for k in range(1, s.dim) if w[k - 1] - w[k] > 1e-8]
    assert len(ends) < s.dim - 1  # there are ties
    for k in ends:
        U = np.asarray(s.eigenvectors(k))
        np.testing.assert_allclose(U.T @ U, V[:, :k] @ V[:, :k].T, rtol=0, atol=1e-10)
        assert abs(subspace_overlap(U, V[:, :k].T) - 1) < 1e-12


@pytest.mark.usefixtures("x64")
def test_kronecker_eigenvectors_follow_the_flat_parameter_order():
    """On a CNN (conv kernel (kh, kw, in, out), bias before kernel): each eigenvector, unravelled
    with ravel_pytree's own unravel, lives on one leaf, the bias one an eigenvector of G, the
    kernel one the rank-one (J, O) matrix u vᵀ with A u = α u and G v = γ v."""
    c = case("cnn-max", "relu", "cross_entropy")
    prob = c.problem()
    s = kflr(prob, c.arch)
    flat, unravel = ravel_pytree(prob.params)
    assert s.dim == flat.size
    vals, vecs = s.eigh(40)
    assert_top_eigenpairs(s, vals, vecs, 40)
    leaves_seen = set()
    for lam, u in zip(np.asarray(vals), np.asarray(vecs)):
        tree = unravel(jnp.asarray(u))
        hit = [(layer, leaf) for layer in tree for leaf in tree[layer]
               if np.any(np.asarray(tree[layer][leaf]) != 0)]
        assert len(hit) == 1, hit
        layer, leaf = hit[0]
        leaves_seen.add(leaf)
        x = np.asarray(tree[layer][leaf])
        l = s.names.index(layer)
        G, A = np.asarray(s.G[l]), np.asarray(s.A[l])
        if leaf == "bias":
            np.testing.assert_allclose(G @ x, lam * x, rtol=0, atol=1e-10 * np.max(np.abs(G)))
        else:
            m = x.reshape(-1, x.shape[-1])  # (J, O), J in the kernel's (kh, kw, in) order
            uu, sv, vvt = np.linalg.svd(m)
            assert sv[1] < 1e-10 * sv[0]  # rank one: kron(u, v)
            a_u, g_v = uu[:, 0], vvt[0]
            alpha, gamma = a_u @ A @ a_u, g_v @ G @ g_v
            np.testing.assert_allclose(A @ a_u, alpha * a_u, rtol=0, atol=1e-10 * np.max(np.abs(A)))
            np.testing.assert_allclose(G @ g_v, gamma * g_v, rtol=0, atol=1e-10 * np.max(np.abs(G)))
            assert abs(alpha * gamma - lam) < 1e-10 * abs(lam)
    assert leaves_seen == {"bias", "kernel"}


@pytest.mark.usefixtures("x64")
def test_diagonal_eigenvectors_are_unit_vectors_of_the_top_entries():
    diag = jnp.asarray([0.5, 3.0, -1.0, 3.0, 0.0, 2.0, 0.0])
    s = Diagonal(diag)
    vals, vecs = s.eigh(4)
    np.testing.assert_array_equal(np.asarray(vals), [3.0, 3.0, 2.0, 0.5])
    np.testing.assert_array_equal(np.asarray(vecs), np.eye(7)[[1, 3, 5, 0]])  # ties by flat index
    assert_top_eigenpairs(s, *s.eigh(), 7)
    np.testing.assert_array_equal(np.asarray(s.eigenvectors(2)), np.eye(7)[[1, 3]])
    # against eigh of dense(): equal top-k subspaces at every cluster boundary
    _, V = eigh_descending(s.dense())
    for k in (2, 3, 4, 7):
        assert abs(subspace_overlap(s.eigenvectors(k), np.asarray(V)[:, :k].T) - 1) < 1e-12
    r = np.random.default_rng(2)
    s = Diagonal(jnp.asarray(r.normal(size=30)))
    vals, vecs = s.eigh(5)
    idx = np.argsort(-np.asarray(s.diag))[:5]
    np.testing.assert_array_equal(np.asarray(vecs), np.eye(30)[idx])
    _, V = eigh_descending(s.dense())
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(vecs) * np.asarray(V)[:, :5].T, axis=1)), 1.0, atol=1e-12)


def test_float32_structures_keep_their_dtype():
    r = np.random.default_rng(3)
    G = (jnp.asarray(np.asarray(spd(r, 3)), jnp.float32),)
    A = (jnp.asarray(np.asarray(spd(r, 4)), jnp.float32),)
    s = KroneckerBlocks(G, A, ("Dense_0",))
    vals, vecs = s.eigh(5)
    assert vals.dtype == vecs.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(vecs) @ np.asarray(vecs).T - np.eye(5))) < 1e-5
    assert abs(eigenvector_agreement(s, top_eigenvectors(np.asarray(s.dense()), 5)[1])["subspace_overlap"] - 1) < 1e-5
    assert Diagonal(jnp.ones(4, jnp.float32)).eigh(2)[1].dtype == jnp.float32


# ---- the agreement measures -----------------------------------------------------------------
def orthonormal_rows(r, d, k):
    q, _ = np.linalg.qr(r.normal(size=(d, k)))
    return q.T


def test_overlap_of_a_subspace_with_itself_an_orthogonal_one_and_a_rotation():
    r = np.random.default_rng(4)
    Q = orthonormal_rows(r, 20, 10)
    U, W = Q[:4], Q[4:8]
    assert abs(subspace_overlap(U, U) - 1) < 1e-12
    assert abs(subspace_overlap(U, W)) < 1e-12
    np.testing.assert_allclose(principal_angles(U, W), 90.0, atol=1e-6)
    R = orthonormal_rows(r, 4, 4)  # a random rotation inside span(U)
    assert abs(subspace_overlap(R @ U, U) - 1) < 1e-12
    np.testing.assert_allclose(principal_angles(R @ U, U), 0.0, atol=1e-5)
    assert np.all(per_vector_overlap(R @ U, U) < 1)  # a mixed basis: each vector has no single match
    np.testing.assert_allclose(per_vector_overlap(-U[::-1], U), 1.0, atol=1e-12)  # sign and order free
    # half shared, half orthogonal: 1/2; a subspace inside a larger one: 1
    assert abs(subspace_overlap(Q[[0, 1, 8, 9]], Q[:4]) - 0.5) < 1e-12
    assert abs(subspace_overlap(Q[:2], Q[:6]) - 1) < 1e-12
    # a random 1-D subspace of R^d against a fixed k-dim one: k/d on average
    m = np.mean([subspace_overlap(orthonormal_rows(r, 20, 1), U) for _ in range(2000)])
    assert abs(m - 4 / 20) < 0.02


@pytest.mark.parametrize("theta", [0.0, 17.0, 45.0, 80.0, 90.0])
def test_overlap_at_a_known_angle_is_cos_squared(theta):
    r = np.random.default_rng(5)
    Q = orthonormal_rows(r, 15, 6)
    V, W = Q[:3], Q[3:]  # W orthogonal to span(V)
    t = np.radians(theta)
    U = np.cos(t) * V + np.sin(t) * W  # every vector tilted by theta out of span(V); rows orthonormal
    assert abs(subspace_overlap(U, V) - np.cos(t) ** 2) < 1e-12
    np.testing.assert_allclose(principal_angles(U, V), theta, atol=1e-5)
    np.testing.assert_allclose(per_vector_overlap(U, V), np.cos(t), atol=1e-12)
    # different angles per direction: the overlap is the mean cos², the angles ascending
    ts = np.radians([60.0, 10.0, 30.0])
    U = np.cos(ts)[:, None] * V + np.sin(ts)[:, None] * W
    assert abs(subspace_overlap(U, V) - np.mean(np.cos(ts) ** 2)) < 1e-12
    np.testing.assert_allclose(principal_angles(U, V), [10.0, 30.0, 60.0], atol=1e-5)


def test_the_measures_refuse_columns_and_mismatched_lengths():
    r = np.random.default_rng(6)
    U = orthonormal_rows(r, 12, 3)
    with pytest.raises(HessianApproxError, match="not orthonormal"):
        subspace_overlap(U.T, U.T)  # eigenvectors as columns
    with pytest.raises(HessianApproxError, match="length"):
        subspace_overlap(U, orthonormal_rows(r, 11, 3))
    with pytest.raises(HessianApproxError, match="k=4"):
        eigenvector_agreement(Diagonal(jnp.ones(12)), U, 4)
    with pytest.raises(HessianApproxError, match="dimension is 13"):
        eigenvector_agreement(Diagonal(jnp.ones(13)), U)


@pytest.mark.usefixtures("x64")
def test_agreement_on_a_small_network():
    """mlp-relu-cross_entropy (d = 53): each approximation against the GGN's and the Hessian's
    top-10. What must hold: the exact matrix agrees with itself (1); every approximation scores
    in [0, 1], the overlap is the mean cos² of its principal angles; each structure agrees
    with its own dense top-10 (1)."""
    c = case("mlp", "relu", "cross_entropy")
    prob = c.problem()
    k = 10
    for which, op in (("ggn", operators.ggn_vp), ("hessian", operators.hvp)):
        M = np.asarray(dense(op(prob)))
        w, V = top_eigenvectors(M, k)
        np.testing.assert_allclose(w, np.linalg.eigvalsh(M)[::-1][:k], atol=1e-12)
        assert abs(subspace_overlap(V, V) - 1) < 1e-12
        exact_self = eigenvector_agreement(type("Exact", (), {"eigenvectors": lambda self, k: V[:k]})(), V, k)
        assert abs(exact_self["subspace_overlap"] - 1) < 1e-12
        for name, fn in APPROXIMATIONS.items():
            s = fn(prob, c.arch, jax.random.PRNGKey(0))
            a = eigenvector_agreement(s, V, k)
            json.dumps(a)
            assert set(a) == {"k", "subspace_overlap", "per_vector_overlap", "principal_angles_deg"}
            assert 0 <= a["subspace_overlap"] <= 1 and len(a["per_vector_overlap"]) == k
            assert all(0 <= x <= 1 for x in a["per_vector_overlap"])
            assert all(0 <= x <= 90 for x in a["principal_angles_deg"])
            cos2 = np.mean(np.cos(np.radians(a["principal_angles_deg"])) ** 2)
            assert abs(a["subspace_overlap"] - cos2) < 1e-9
            if which == "ggn":
                ws, Vs = top_eigenvectors(np.asarray(s.dense()), k + 1)
                assert ws[k - 1] - ws[k] > 1e-8 * abs(ws[0]), name  # the top-k subspace is unique
                assert abs(eigenvector_agreement(s, Vs, k)["subspace_overlap"] - 1) < 1e-9, name
