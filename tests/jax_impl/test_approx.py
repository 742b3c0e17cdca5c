"""Diagonal approximations, the structures and the errors against exact JAX quantities, MLP and CNN.

Oracles: the dense Hessian and GGN (materialize.dense of operators.hvp / ggn_vp) in float64
on the registry's tiny cases (tests/cases.py), the identities of DESIGN.md, Monte-Carlo
means within standard errors. Kronecker factors: test_approx_kronecker.py; the rules one
by one: test_approx_rules.py. Set HESSIAN_APPROX_ALL_CASES=1 to run every registry case
(30) instead of the covering subset below.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from hessian_approx.architecture import parse
from jax_impl import operators
from jax_impl.approx import (APPROXIMATIONS, Diagonal, KroneckerBlocks, diag_ggn, diag_ggn_mc, diag_hessian,
                             kfac, kflr, kfra)
from jax_impl.approx import network, rules
from jax_impl.errors import HessianApproxError
from jax_impl.materialize import dense
from tests import cases
from tests.cases import case

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout

# float64 throughout: rules and autodiff agree to ~1e-15 relative (measured <= 2e-15 on all
# 30 cases); 1e-10 leaves room for summation order over samples, chunks and columns.
RTOL = 1e-10
# Monte-Carlo means must lie within Z standard errors per entry (a few hundred entries:
# false-alarm chance ~1e-4 under the null) plus a floor for entries whose draws are all
# exactly equal (dead ReLUs, zero inputs).
Z = 5.0
# Every activation on a CNN, both losses, every layer kind and both pool kinds: MAX (ReLU,
# tied maxima), AVG (strided, padded conv; average pool), SAME (overlapping max-pool
# windows, SAME padding), MLP (two hidden layers).
MLP = case("mlp2", "tanh", "mse")
MAX = case("cnn-max", "relu", "cross_entropy")
AVG = case("cnn-avg", "sigmoid", "mse")
SAME = case("cnn-same", "tanh", "cross_entropy")
SUBSET = [MLP, MAX, AVG, SAME]
CASES = cases.CASES_ALL if os.environ.get("HESSIAN_APPROX_ALL_CASES") else SUBSET
N, CHUNK = 7, 3  # 3 chunks, the last padded with 2 zero-weight rows


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@functools.lru_cache(maxsize=None)
def problem(c, n=N, chunk=CHUNK):
    """c.problem(chunk_size=chunk, n=n), cached (the dense references reuse it)."""
    return c.problem(chunk_size=chunk, n=n)


@functools.lru_cache(maxsize=None)
def exact(c, op: str, n=N, chunk=CHUNK):
    """The dense float64 Hessian ("hvp") or GGN ("ggn_vp") of case c."""
    prob = problem(c, n, chunk)
    return np.asarray(dense(getattr(operators, op)(prob)))


def flat_slices(params):
    """{(layer, leaf): slice} of each leaf in the JAX flat order, read off ravel_pytree itself."""
    flat, unravel = ravel_pytree(params)
    idx = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    out = {}
    for layer in params:
        for leaf in params[layer]:
            pos = np.asarray(idx[layer][leaf]).ravel().astype(int)
            assert np.all(np.diff(pos) == 1)
            out[(layer, leaf)] = slice(int(pos[0]), int(pos[-1]) + 1)
    return out


# ---- diagonals ----------------------------------------------------------------------------
@pytest.mark.parametrize("c", cases.params(CASES))
def test_diagonals_are_the_exact_diagonals(c):
    """DiagH = diag(H), DiagGGN = diag(GGN), traces too; DiagH = DiagGGN iff no tanh/sigmoid residual."""
    prob, h, g = problem(c), exact(c, "hvp"), exact(c, "ggn_vp")
    dh, dg = diag_hessian(prob), diag_ggn(prob)
    assert isinstance(dh, Diagonal) and dh.diag.shape == (prob.dim,)
    assert rel(dh.diag, np.diag(h)) < RTOL
    assert rel(dg.diag, np.diag(g)) < RTOL
    assert abs(float(dh.trace()) - np.trace(h)) < RTOL * np.abs(np.diag(h)).sum()
    if c.activation == "relu":
        assert rel(dh.diag, dg.diag) < RTOL
    else:  # the residuals of tanh and sigmoid make them differ
        assert rel(dh.diag, dg.diag) > 1e-5


def test_relu_max_pool_cnn_hessian_diagonal_is_the_ggn_diagonal():
    """Piecewise-linear network: diag(H) = diag(GGN) (DESIGN.md), with tied maxima in the pools."""
    c = MAX
    prob = problem(c)
    nds = rules.nodes(c.arch)
    xs, _ = network.forward(nds, prob.params, prob.batches.x.reshape(-1, *c.arch.input_shape))
    pool = next(nd for nd in nds if nd.kind == "maxpool2d")
    win = np.asarray(rules.windows(xs[pool.index], pool.layer.window, pool.layer.stride))
    win = win.reshape(*win.shape[:3], -1, win.shape[-1])
    ties = (win == win.max(axis=3, keepdims=True)).sum(axis=3) > 1
    assert ties.sum() > 0  # the routing of ties is exercised
    h, g = exact(c, "hvp"), exact(c, "ggn_vp")
    assert rel(np.diag(h), np.diag(g)) < RTOL  # the identity, on the oracles themselves
    assert rel(diag_hessian(prob).diag, np.diag(g)) < RTOL


def test_diag_ggn_mc_is_unbiased():
    prob = problem(SAME)
    keys = jax.random.split(jax.random.PRNGKey(3), 400)
    draws = np.asarray(jax.vmap(lambda k: diag_ggn_mc(prob, k, mc_samples=2).diag)(keys))
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    ref = np.asarray(diag_ggn(prob).diag)
    assert np.all(np.abs(mean - ref) <= Z * se + 1e-12)
    assert rel(draws[0], ref) > 1e-3  # and it is random


def test_diag_ggn_mc_depends_only_on_key():
    prob = problem(SAME)
    k = jax.random.PRNGKey(7)
    a, b = diag_ggn_mc(prob, k, 2).diag, diag_ggn_mc(prob, k, 2).diag
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(diag_ggn_mc(prob, jax.random.PRNGKey(8), 2).diag))


def test_diag_h_residuals_are_refused_before_they_exhaust_memory():
    """The default CNN: ReLU adds no residual columns (cheap); tanh would need chunk x 4608 columns."""
    for act, ok in (("relu", True), ("tanh", False)):
        nds = rules.nodes(parse(f"conv8k5-{act}-maxpool2-conv16k5-{act}-maxpool2-flatten-dense10", (28, 28, 1)))
        if ok:
            network.check_residual_size(nds, 1000, 10, "diag-h")
        else:
            with pytest.raises(HessianApproxError, match="diag-h backpropagates 1000 x .*tanh.*smaller chunk"):
                network.check_residual_size(nds, 1000, 10, "diag-h")


# ---- the structures ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kflr", "kfra", "kfac", "diag-ggn", "diag-h"])
def test_structures_agree_with_their_dense_form(method):
    c = AVG
    prob = problem(c)
    s = APPROXIMATIONS[method](prob, None, jax.random.PRNGKey(1), 4)
    m = np.asarray(s.dense())
    assert m.shape == (prob.dim, prob.dim) and s.dim == prob.dim
    eig = np.sort(np.linalg.eigvalsh(m))[::-1]
    assert rel(s.eigenvalues(), eig) < RTOL
    assert rel(s.eigenvalues(k=5), eig[:5]) < RTOL
    assert np.all(np.diff(np.asarray(s.eigenvalues())) <= 0)
    assert abs(float(s.trace()) - np.trace(m)) < RTOL * abs(np.trace(m))
    v = np.random.default_rng(0).normal(size=prob.dim)
    assert rel(s.matvec(v), m @ v) < RTOL
    d = json.loads(json.dumps(s.to_dict(k=3)))
    assert len(d["eigenvalues"]) == 3 and abs(d["trace"] - np.trace(m)) < 1e-8 * abs(np.trace(m))


def test_kronecker_layout_follows_the_flat_order_for_conv_kernels():
    """Conv kernels (kh, kw, in, out) are the (kh·kw·in, out) matrix; layers in sorted name order."""
    c = MAX
    prob = problem(c)
    k = kflr(prob)
    assert k.names == ("Conv_0", "Conv_1", "Dense_0")
    assert [a.shape[0] for a in k.A] == [3 * 3 * 2, 2 * 2 * 3, 1 * 1 * 4]
    sl = flat_slices(prob.params)
    assert [(n, leaf) for n, leaf, _, _ in k.layout()] == sorted(sl, key=lambda t: sl[t].start)
    for name, leaf, start, stop in k.layout():
        assert (sl[(name, leaf)].start, sl[(name, leaf)].stop) == (start, stop)


def test_structures_are_pytrees_and_methods_jit():
    c = AVG
    prob = problem(c)

    @jax.jit
    def traces(params):
        p = operators.Problem(prob.apply, prob.ell, params, prob.batches)
        return kflr(p).trace(), diag_hessian(p, c.arch).trace()

    t = traces(prob.params)
    assert abs(float(t[0]) - float(kflr(prob).trace())) < 1e-12 * abs(float(t[0]))
    k = kflr(prob)
    leaves, tree = jax.tree_util.tree_flatten(k)
    assert len(leaves) == 2 * len(c.arch.param_layers)
    assert jax.tree_util.tree_unflatten(tree, leaves).names == k.names


# ---- the table, arguments and errors --------------------------------------------------------
def test_table_has_every_method_with_one_signature():
    c = AVG
    prob = problem(c)
    assert set(APPROXIMATIONS) == {"diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra"}
    for name, fn in APPROXIMATIONS.items():
        s = fn(prob, c.arch, jax.random.PRNGKey(0), 4, kfac_approx="backpack")
        assert isinstance(s, Diagonal if name.startswith("diag") else KroneckerBlocks)
        with pytest.raises(HessianApproxError, match=f"{name} got unknown option.*damping"):
            fn(prob, c.arch, jax.random.PRNGKey(0), 4, damping=1.0)
    with pytest.raises(HessianApproxError, match="kfac_approx 'kfc'.*backpack, expand, reduce"):
        APPROXIMATIONS["kflr"](prob, None, None, 1, kfac_approx="kfc")


def test_architecture_comes_from_apply_or_argument():
    """A plain apply function is refused with the matrix-free alternatives named; an explicit
    Architecture or its dict make it work and give the same result."""
    c = AVG
    prob = problem(c)
    plain = operators.Problem(lambda p, x: prob.apply(p, x), prob.ell, prob.params, prob.batches)
    for name, fn in APPROXIMATIONS.items():
        with pytest.raises(HessianApproxError, match=f"{name} cannot tell the network's layers.*arch=.*lanczos"):
            fn(plain, None, jax.random.PRNGKey(0), 1)
    ref = kflr(prob).dense()
    assert rel(kflr(plain, c.arch).dense(), ref) < RTOL
    assert rel(kflr(plain, c.arch.to_dict()).dense(), ref) < RTOL


def test_unsupported_loss_is_named():
    prob = problem(AVG)
    odd = operators.Problem(prob.apply, lambda z, y: jnp.sum(z**4, -1), prob.params, prob.batches)
    for name, fn in APPROXIMATIONS.items():
        with pytest.raises(HessianApproxError, match=f"not supported by {name}.*cross_entropy, mse.*lanczos"):
            fn(odd, None, jax.random.PRNGKey(0), 1)


def test_mismatched_parameters_data_and_unknown_layers_are_named():
    c = AVG
    prob = problem(c)
    other = parse("conv2k3-relu-flatten-dense3", (8, 8, 1))
    with pytest.raises(HessianApproxError, match="do not match the architecture"):
        diag_ggn(prob, other)
    with pytest.raises(HessianApproxError, match=r"inputs of shape \(8, 8, 1\).*\(9, 9, 1\)"):
        diag_ggn(prob, parse(c.arch.to_string(), (9, 9, 1)))
    with pytest.raises(HessianApproxError, match="mc_samples"):
        kfac(prob, jax.random.PRNGKey(0), 0)

    class Dropout:  # a layer kind the description may gain before the rules do
        kind, flax_prefix = "dropout", ""
        out_shape = staticmethod(lambda s: tuple(s))
        param_shapes = staticmethod(lambda s: {})
        token = staticmethod(lambda: "dropout")

    from hessian_approx.architecture import Architecture
    odd = Architecture(c.arch.input_shape, (*c.arch.layers[:2], Dropout(), *c.arch.layers[2:]))
    with pytest.raises(HessianApproxError, match=r"layer 2 \(dropout\) is not supported by kfra.*lanczos"):
        kfra(prob, odd)
