"""Structured approximations (DiagGGN, DiagGGN-MC, DiagH, KFAC, KFLR, KFRA) against exact JAX quantities.

Oracles: the dense Hessian and GGN (materialize.dense of hvp / ggn_vp) in float64 on tiny
problems, the identities of DESIGN.md, and Monte-Carlo means within standard errors.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_impl import models, operators
from jax_impl.approx import (APPROXIMATIONS, Diagonal, KroneckerBlocks, diag_ggn, diag_ggn_mc,
                             diag_hessian, kfac, kflr, kfra)
from jax_impl.errors import HessianApproxError
from jax_impl.materialize import dense
from tests.helpers import tiny_problem

# float64: the backpropagated quantities and autodiff agree to ~1e-15 relative;
# 1e-10 leaves room for summation order over samples and chunks.
RTOL = 1e-10
# Monte-Carlo means must lie within Z standard errors (per entry; with ~100 entries the
# chance of a false alarm under the null is ~1e-4) plus an absolute floor for entries
# whose samples are all exactly equal (dead ReLUs).
Z = 5.0
ACTS = ["tanh", "relu", "sigmoid"]
LOSSES = ["cross_entropy", "mse"]


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def small(activation="tanh", loss="cross_entropy", n=7, chunk_size=3, hidden=(4, 3), **kw):
    """Two hidden layers, 7 samples in chunks of 3 (so the last chunk holds 2 padded rows)."""
    return tiny_problem(hidden=hidden, activation=activation, loss=loss, n=n, chunk_size=chunk_size, **kw)


def exact(prob, op):
    return dense(op(prob), prob.dim, jnp.float64)


def flat_slices(params):
    """{(layer, leaf): slice} of each leaf in the JAX flat order, read off ravel_pytree itself."""
    marks = {}
    # unravel 0, 1, 2, ...: every leaf then holds its own flat positions
    flat, unravel = ravel_pytree(params)
    idx = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    for layer in params:
        for leaf in params[layer]:
            pos = np.asarray(idx[layer][leaf]).ravel().astype(int)
            assert np.all(np.diff(pos) == 1)
            marks[(layer, leaf)] = slice(int(pos[0]), int(pos[-1]) + 1)
    return marks


# ---- diagonals ----------------------------------------------------------------------
# all six activation/loss pairs are checked against BackPACK in tests/bridge/test_backpack.py
@pytest.mark.parametrize("activation,loss", [("tanh", "cross_entropy"), ("tanh", "mse"),
                                             ("relu", "cross_entropy"), ("sigmoid", "mse")])
def test_diagonals_are_the_exact_diagonals(activation, loss):
    """DiagH = diag(H), Σ DiagH = tr(H), DiagGGN = diag(GGN); for ReLU DiagH = DiagGGN."""
    spec, prob, _, _ = small(activation, loss)
    h = exact(prob, operators.hvp)
    g = exact(prob, operators.ggn_vp)
    dh, dg = diag_hessian(prob), diag_ggn(prob)
    assert isinstance(dh, Diagonal) and dh.diag.shape == (prob.dim,)
    assert rel(dh.diag, np.diag(h)) < RTOL
    assert abs(float(dh.trace()) - np.trace(h)) < RTOL * np.max(np.abs(np.diag(h))) * prob.dim
    assert rel(dg.diag, np.diag(g)) < RTOL
    if activation == "relu":
        assert rel(dh.diag, dg.diag) < RTOL
    else:  # the residual terms of tanh and sigmoid make them differ
        assert rel(dh.diag, dg.diag) > 1e-4


@pytest.mark.parametrize("activation,loss", [("tanh", "cross_entropy"), ("relu", "mse")])
def test_diag_ggn_mc_is_unbiased(activation, loss):
    spec, prob, _, _ = small(activation, loss)
    keys = jax.random.split(jax.random.PRNGKey(3), 400)
    draws = np.asarray(jax.vmap(lambda k: diag_ggn_mc(prob, k, mc_samples=2).diag)(keys))
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    ref = np.asarray(diag_ggn(prob).diag)
    assert np.all(np.abs(mean - ref) <= Z * se + 1e-12)
    # and it is random: one draw is not the exact diagonal
    assert rel(draws[0], ref) > 1e-3


def test_diag_ggn_mc_depends_only_on_key():
    _, prob, _, _ = small()
    k = jax.random.PRNGKey(7)
    a, b = diag_ggn_mc(prob, k, 4).diag, diag_ggn_mc(prob, k, 4).diag
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(diag_ggn_mc(prob, jax.random.PRNGKey(8), 4).diag))


# ---- Kronecker factors ---------------------------------------------------------------
@pytest.mark.parametrize("activation,loss", [("tanh", "cross_entropy"), ("relu", "mse"), ("sigmoid", "mse")])
def test_kflr_is_the_exact_ggn_block_for_one_sample(activation, loss):
    spec, prob, _, _ = small(activation, loss, n=1, chunk_size=1)
    g = exact(prob, operators.ggn_vp)
    k = kflr(prob)
    assert isinstance(k, KroneckerBlocks) and k.names == spec.layer_names
    sl = flat_slices(prob.params)
    for name, leaf, start, stop in k.layout():
        s = sl[(name, leaf)]
        assert (s.start, s.stop) == (start, stop)
        assert rel(k.block(name, leaf), g[s, s]) < RTOL, (name, leaf)
    # KFRA batch-averages per sample: with one sample it is KFLR
    r = kfra(prob)
    for a, b in zip(r.G + r.A, k.G + k.A):
        assert rel(a, b) < RTOL


def test_flat_layout_with_more_than_ten_layers():
    """ravel_pytree sorts "Dense_10" before "Dense_2"; the blocks must follow."""
    spec, prob, _, _ = tiny_problem(hidden=(2,) * 10, activation="tanh", n=1, d=2, c=2)
    g = exact(prob, operators.ggn_vp)
    k = kflr(prob)
    sl = flat_slices(prob.params)
    assert [(n, leaf) for n, leaf, _, _ in k.layout()] == sorted(sl, key=lambda t: sl[t].start)
    mask = np.zeros_like(g, dtype=bool)
    for s in sl.values():
        mask[s, s] = True
    assert rel(k.dense(), np.where(mask, g, 0.0)) < RTOL
    # same for a diagonal: DiagGGN in the same flat order
    assert rel(diag_ggn(prob).diag, np.diag(g)) < RTOL


def test_linear_model_kfra_equals_kflr():
    """Without hidden layers, KFRA's and KFLR's G are both Σ_n w_n H_n."""
    _, prob, _, _ = tiny_problem(hidden=(), n=9, chunk_size=4)
    a, b = kfra(prob), kflr(prob)
    for x, y in zip(a.G + a.A, b.G + b.A):
        assert rel(x, y) < RTOL


@pytest.mark.parametrize("activation,loss", [("tanh", "cross_entropy"), ("relu", "mse")])
def test_kfac_is_unbiased_and_converges_to_kflr(activation, loss):
    """E[G_KFAC] = G_KFLR, and the error falls like 1/sqrt(mc_samples).

    Over K = 200 keys at M = 4 and M = 64: the mean G lies within Z standard errors of
    KFLR's, and the RMS relative Frobenius error per layer shrinks by sqrt(64/4) = 4;
    we accept a factor in [2.5, 6.5] (the RMS over 200 keys is accurate to ~10%).
    """
    spec, prob, _, _ = small(activation, loss)
    ref = kflr(prob)
    errs = []
    for m in (4, 64):
        keys = jax.random.split(jax.random.PRNGKey(m), 200)
        gs = jax.vmap(lambda k: kfac(prob, k, m).G)(keys)
        e = []
        for g, r in zip(gs, ref.G):
            g, r = np.asarray(g), np.asarray(r)
            mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
            assert np.all(np.abs(mean - r) <= Z * se + 1e-12), m
            e.append(np.sqrt(np.mean(np.sum((g - r) ** 2, axis=(1, 2)))) / np.linalg.norm(r))
        errs.append(np.array(e))
    ratio = errs[0] / errs[1]
    assert np.all(ratio > 2.5) and np.all(ratio < 6.5), errs
    # A is deterministic and KFLR's
    one = kfac(prob, jax.random.PRNGKey(0), 4)
    for a, b in zip(one.A, ref.A):
        assert rel(a, b) < RTOL


@pytest.mark.parametrize("method", ["diag-ggn", "diag-h", "kflr", "kfra"])
def test_chunking_and_padding_do_not_change_results(method):
    spec, whole, _, _ = small(chunk_size=1000)
    _, chunked, _, _ = small(chunk_size=3)
    key = jax.random.PRNGKey(0)
    fn = APPROXIMATIONS[method]
    a, b = fn(whole, spec, key, 1), fn(chunked, spec, key, 1)
    assert rel(a.dense(), b.dense()) < RTOL


# ---- the structures ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kflr", "kfra", "kfac", "diag-ggn", "diag-h"])
def test_structures_agree_with_their_dense_form(method):
    spec, prob, _, _ = small("tanh", "cross_entropy")
    s = APPROXIMATIONS[method](prob, spec, jax.random.PRNGKey(1), 4)
    m = np.asarray(s.dense())
    assert m.shape == (prob.dim, prob.dim)
    eig = np.sort(np.linalg.eigvalsh(m))[::-1]
    assert rel(s.eigenvalues(), eig) < RTOL
    assert rel(s.eigenvalues(k=5), eig[:5]) < RTOL
    assert np.all(np.diff(np.asarray(s.eigenvalues())) <= 0)
    assert abs(float(s.trace()) - np.trace(m)) < RTOL * abs(np.trace(m))
    v = np.random.default_rng(0).normal(size=prob.dim)
    assert rel(s.matvec(v), m @ v) < RTOL
    d = json.loads(json.dumps(s.to_dict(k=3)))
    assert len(d["eigenvalues"]) == 3 and abs(d["trace"] - np.trace(m)) < 1e-8 * abs(np.trace(m))


def test_structures_are_pytrees_and_methods_jit():
    spec, prob, _, _ = small()

    @jax.jit
    def traces(params):
        p = operators.Problem(prob.apply, prob.ell, params, prob.batches)
        return kflr(p, spec).trace(), kfra(p).trace(), diag_hessian(p).trace()

    t = traces(prob.params)
    assert abs(float(t[0]) - float(kflr(prob).trace())) < 1e-12
    k = kflr(prob)
    leaves, tree = jax.tree_util.tree_flatten(k)
    assert len(leaves) == 2 * len(spec.layer_names)
    assert jax.tree_util.tree_unflatten(tree, leaves).names == k.names


# ---- errors ------------------------------------------------------------------------
def test_unsupported_loss_is_named():
    spec, prob, _, _ = small()
    odd = operators.Problem(prob.apply, lambda z, y: jnp.sum(z**4, -1), prob.params, prob.batches)
    for name, fn in APPROXIMATIONS.items():
        with pytest.raises(HessianApproxError, match=f"not supported by {name}.*cross_entropy, mse.*lanczos"):
            fn(odd, spec, jax.random.PRNGKey(0), 1)


def test_unsupported_model_and_activation_are_named():
    spec, prob, _, _ = small()
    cnn = types.SimpleNamespace(**{**spec.to_dict(), "kind": "cnn", "widths": spec.widths})
    with pytest.raises(HessianApproxError, match="model kind 'cnn' is not supported by kfra.*lanczos"):
        kfra(prob, spec=cnn)
    gelu = types.SimpleNamespace(**{**spec.to_dict(), "activation": "gelu", "widths": spec.widths})
    with pytest.raises(HessianApproxError, match="activation 'gelu' after layer Dense_0 is not supported by diag-h.*relu, tanh, sigmoid"):
        diag_hessian(prob, spec=gelu)


def test_spec_is_needed_for_opaque_apply_and_must_match():
    spec, prob, _, _ = small()
    opaque = operators.Problem(lambda p, x: prob.apply(p, x), prob.ell, prob.params, prob.batches)
    with pytest.raises(HessianApproxError, match="pass spec="):
        kflr(opaque)
    assert rel(kflr(opaque, spec).dense(), kflr(prob).dense()) < RTOL
    other = models.ModelSpec(input_dim=5, hidden=(4,), output_dim=3, activation="tanh")
    with pytest.raises(HessianApproxError, match="do not match"):
        diag_ggn(prob, spec=other)
    with pytest.raises(HessianApproxError, match="mc_samples"):
        kfac(prob, jax.random.PRNGKey(0), 0)


def test_table_has_every_method_with_one_signature():
    spec, prob, _, _ = small()
    assert set(APPROXIMATIONS) == {"diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra"}
    for name, fn in APPROXIMATIONS.items():
        s = fn(prob, spec, jax.random.PRNGKey(0), 4)
        assert isinstance(s, Diagonal if name.startswith("diag") else KroneckerBlocks)
