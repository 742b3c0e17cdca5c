"""Kronecker factors (KFLR, KFAC, KFRA) and the three convolution conventions against exact GGN blocks.

Exactness claims tested (float64, tolerance RTOL of test_approx: 1e-10, the rules agree with
autodiff to ~1e-15):
- any N: every bias block of the backpack/reduce conventions (and every Dense bias) is the
  exact GGN bias block (the bias Jacobian sums the locations, as G does);
- N = 1 and one output location per layer: all three conventions coincide and every block
  is exact; KFRA equals KFLR for N = 1 (its batch averages are the per-sample quantities);
- expand, any N: conv -> flatten -> Dense with an orthogonal kernel and MSE (each location's
  outputs are independent MSE terms with output Hessian (2/C) I): exact;
- reduce, any N: conv -> global average pool -> flatten -> Dense with MSE (the pooled output
  is linear in the averaged patch; the output Hessian is the same for every sample): exact;
- BackPACK's A = T x expand's A, BackPACK's G = reduce's G (Dense: all three equal).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessian_approx.architecture import parse
from jax_impl import losses, models, operators
from jax_impl.approx import CONVENTIONS, kfac, kflr, kfra
from jax_impl.materialize import dense
from tests import cases
from tests.jax_impl.test_approx import AVG, MAX, RTOL, SAME, Z, exact, flat_slices, problem, rel

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def ggn(prob):
    return np.asarray(dense(operators.ggn_vp(prob)))


def blocks_vs_exact(k, prob, g):
    """{(layer, leaf): relative error of the structure's block against the exact GGN block}."""
    sl = flat_slices(prob.params)
    return {(name, leaf): rel(k.block(name, leaf), g[sl[(name, leaf)], sl[(name, leaf)]])
            for name, leaf, _, _ in k.layout()}


def random_params(arch, seed=0):
    """Parameters drawn by numpy (these architectures are not in the registry): kernels
    N(0, 1/fan_in), biases N(0, 0.01)."""
    r = np.random.default_rng(seed)
    out = {}
    for key, shape in arch.param_shapes().items():
        layer, leaf = key.split("/")
        scale = 1 / np.sqrt(np.prod(shape[:-1])) if leaf == "kernel" else 0.1
        out.setdefault(layer, {})[leaf] = jnp.asarray(scale * r.normal(size=shape))
    return out


@functools.lru_cache(maxsize=None)
def built(text, input_shape, n, loss="mse", orthogonal_head=False, seed=0):
    """(Problem, dense GGN) for an architecture string on seeded data, chunks of 2 (padded)."""
    arch = parse(text, input_shape)
    r = np.random.default_rng(seed + 1)
    params = random_params(arch, seed)
    if orthogonal_head:
        q, _ = np.linalg.qr(r.normal(size=params["Dense_0"]["kernel"].shape))
        params["Dense_0"]["kernel"] = jnp.asarray(q)
    x = r.normal(size=(n, *arch.input_shape))
    y = r.integers(0, arch.num_classes, n)
    prob = operators.Problem(models.make_apply(arch), losses.get_loss(loss), params,
                             operators.make_batches(x, y, 2, dtype=jnp.float64))
    return prob, ggn(prob)


# ---- exactness -----------------------------------------------------------------------------
@pytest.mark.parametrize("c", cases.params([MAX, SAME]))
def test_bias_blocks_are_exact_for_any_number_of_samples(c):
    prob, g = problem(c), exact(c, "ggn_vp")
    errs = blocks_vs_exact(kflr(prob), prob, g)  # reduce's G is backpack's (tested below)
    assert max(e for (_, leaf), e in errs.items() if leaf == "bias") < RTOL, errs
    # the kernel blocks are approximations (N = 7 samples, conv T > 1)
    assert min(e for (_, leaf), e in errs.items() if leaf == "kernel") > 1e-3


def test_one_sample_one_location_all_conventions_coincide_and_are_exact():
    """Conv with a 1x1 output (T = 1), one sample: every block of every convention is exact."""
    prob, g = built("conv4k3-tanh-flatten-dense3", (3, 3, 2), 1, "cross_entropy")
    ref = kflr(prob)
    assert max(blocks_vs_exact(ref, prob, g).values()) < RTOL
    for convention in CONVENTIONS:
        for k in (kflr(prob, kfac_approx=convention), kfra(prob, kfac_approx=convention)):
            assert rel(k.dense(), ref.dense()) < RTOL, convention


def test_expand_is_exact_when_locations_are_independent_mse_terms():
    """conv3k2 -> flatten -> Dense12 (orthogonal Q) with MSE: GGN w.r.t. the conv output is (2/C) I."""
    prob, g = built("conv3k2-flatten-dense12", (3, 3, 2), 5, "mse", orthogonal_head=True)
    for fn in (kflr, kfra):
        errs = blocks_vs_exact(fn(prob, kfac_approx="expand"), prob, g)
        assert errs[("Conv_0", "kernel")] < RTOL and errs[("Conv_0", "bias")] < RTOL, (fn, errs)
    for convention in ("backpack", "reduce"):  # the test can tell the conventions apart
        assert blocks_vs_exact(kflr(prob, kfac_approx=convention), prob, g)[("Conv_0", "kernel")] > 1e-2


def test_reduce_is_exact_for_global_average_pooling():
    """conv3k2 -> avgpool3 (the whole 3x3 output) -> flatten -> Dense4 with MSE, 5 samples."""
    prob, g = built("conv3k2-avgpool3-flatten-dense4", (4, 4, 2), 5, "mse")
    for fn in (kflr, kfra):
        errs = blocks_vs_exact(fn(prob, kfac_approx="reduce"), prob, g)
        assert max(errs.values()) < RTOL, (fn, errs)
    for convention in ("backpack", "expand"):
        assert blocks_vs_exact(kflr(prob, kfac_approx=convention), prob, g)[("Conv_0", "kernel")] > 1e-2


def test_kfra_is_kflr_for_one_sample():
    """One sample: KFRA's batch averages (max-pool routing, pool and conv sandwiches) are exact."""
    for c, conventions in ((MAX, ("backpack", "expand")), (AVG, ("backpack",)), (SAME, ("backpack",))):
        prob = problem(c, n=1, chunk=1)
        for convention in conventions:
            a, b = kfra(prob, kfac_approx=convention), kflr(prob, kfac_approx=convention)
            for x, y in zip(a.G + a.A, b.G + b.A):
                assert rel(x, y) < RTOL, (c.id, convention)


# ---- the conventions' relations ------------------------------------------------------------
def test_backpack_factors_relate_to_expand_and_reduce():
    """A_backpack = T A_expand, G_backpack = G_reduce; Dense layers identical in all three."""
    c = MAX
    prob = problem(c)
    ts = {p.name: int(np.prod(p.out_shape[:-1])) for p in c.arch.param_layers}
    assert ts == {"Conv_0": 25, "Conv_1": 1, "Dense_0": 1}
    for fn in (kflr, kfra):
        bp, ex = fn(prob), fn(prob, kfac_approx="expand")
        for l, name in enumerate(bp.names):
            assert rel(bp.A[l], ts[name] * ex.A[l]) < RTOL
            assert (rel(ex.G[l], bp.G[l]) < RTOL) == (ts[name] == 1), (fn, name)
    bp, rd = kflr(prob), kflr(prob, kfac_approx="reduce")
    for l, name in enumerate(bp.names):
        assert rel(bp.G[l], rd.G[l]) < RTOL
        assert (rel(rd.A[l], bp.A[l]) < RTOL) == (ts[name] == 1), name
        assert ts[name] == 1 or rel(rd.A[l], bp.A[l] / ts[name] ** 2) > 1e-3  # not a mere rescaling


# ---- Monte Carlo -----------------------------------------------------------------------------
def test_kfac_is_unbiased_and_converges_to_kflr():
    """E[G_KFAC] = G_KFLR in each convention, and the error falls like 1/sqrt(mc_samples).

    Over K = 200 keys at M = 4 and M = 64: the mean G lies within Z standard errors of KFLR's,
    and the RMS relative Frobenius error per layer shrinks by sqrt(64/4) = 4; accepted within
    [2.5, 6.5] (an RMS over 200 keys is accurate to ~10%).
    """
    prob = problem(SAME)
    for convention, ms in (("backpack", (4, 64)), ("expand", (4,))):
        ref = kflr(prob, kfac_approx=convention)
        errs = []
        for m in ms:
            keys = jax.random.split(jax.random.PRNGKey(m), 200)
            draws = jax.vmap(lambda k: kfac(prob, k, m, kfac_approx=convention))(keys)
            for a, b in zip(draws.A, ref.A):  # A is deterministic and KFLR's
                assert rel(a[0], b) < RTOL and np.array_equal(np.asarray(a[0]), np.asarray(a[-1]))
            e = []
            for g, r in zip(draws.G, ref.G):
                g, r = np.asarray(g), np.asarray(r)
                mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(len(g))
                assert np.all(np.abs(mean - r) <= Z * se + 1e-12), (convention, m)
                e.append(np.sqrt(np.mean(np.sum((g - r) ** 2, axis=(1, 2)))) / np.linalg.norm(r))
            errs.append(np.array(e))
        if len(errs) == 2:
            ratio = errs[0] / errs[1]
            assert np.all(ratio > 2.5) and np.all(ratio < 6.5), errs


def test_chunking_and_padding_do_not_change_kfra():
    """KFRA sums its batch statistics (max-pool selections, σ' products) over chunks first."""
    c = SAME
    a, b = kfra(problem(c, chunk=1000)), kfra(problem(c))
    assert rel(a.dense(), b.dense()) < RTOL
