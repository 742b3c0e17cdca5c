"""Per-layer blocks (jax_impl.blocks): slices of the dense Hessian, the ReLU oracle H_ll = GGN_ll, subset = embed.

References are independent of the operators under test: ``jax.hessian`` of the plain mean loss
over the flat parameters (float64; matvec-built and autodiff-built matrices agree to ~1e-14
relative, 1e-10 leaves room for the chunked summation order) and numpy's eigvalsh.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jax_impl as ha
from hessian_approx.architecture import mlp, parse
from jax_impl import blocks, losses, materialize, models
from jax_impl.errors import HessianApproxError

pytestmark = pytest.mark.usefixtures("x64")

TOL = 1e-10


class ResidualLayerNorm(nn.Module):
    """Dense -> LayerNorm -> tanh with a residual connection, then a Dense head (no architecture description)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)
        h = h + jnp.tanh(nn.LayerNorm()(nn.Dense(6)(h)))
        return nn.Dense(3)(h)


ARCHS = {
    "mlp-tanh": lambda: mlp(8, (6,), 3, "tanh"),
    "mlp-relu": lambda: mlp(8, (6,), 3, "relu"),
    "cnn-relu-maxpool": lambda: parse("conv3k3-relu-maxpool2-flatten-dense3", (8, 8, 1)),
}


@functools.lru_cache(maxsize=None)
def _case(which):
    """(Curvature of the Hessian, reference dense Hessian (d, d) from jax.hessian of the flat mean loss)."""
    rng = np.random.default_rng(0)
    if which == "layernorm":
        model = ResidualLayerNorm()
        x = rng.standard_normal((16, 5))
        params = model.init(jax.random.PRNGKey(1), jnp.asarray(x))["params"]
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        apply = lambda p, xx: model.apply({"params": p}, xx)
    else:
        model = ARCHS[which]()
        x = rng.standard_normal((16, *model.input_shape))
        params = models.init_params(model, jax.random.PRNGKey(1), jnp.float64)
        apply = models.make_apply(model)
    y = rng.integers(0, 3, size=16)
    H = ha.hessian(model, params, (x, y), loss="cross_entropy", chunk_size=8)
    flat, unravel = ravel_pytree(params)
    f = lambda t: jnp.mean(losses.cross_entropy(apply(unravel(t), jnp.asarray(x)), jnp.asarray(y)))
    return H, np.asarray(jax.jit(jax.hessian(f))(flat))


def _index(params, paths):
    sl = blocks.block_slices(params)
    return np.concatenate([np.arange(sl[p].start, sl[p].stop) for p in paths])


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-300))


def test_paths_and_slices_follow_ravel_order():
    params = {"Dense_2": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
              "Dense_10": {"kernel": jnp.zeros((3, 1)), "bias": jnp.zeros(1)},
              "Block_0": {"Conv_1": {"bias": jnp.zeros(2), "kernel": jnp.zeros((1, 1, 2, 2))}},
              "extra": (jnp.zeros(2), jnp.zeros((1, 2)))}
    paths = blocks.param_paths(params)
    assert paths == ["Block_0/Conv_1/bias", "Block_0/Conv_1/kernel", "Dense_10/bias", "Dense_10/kernel",
                     "Dense_2/bias", "Dense_2/kernel", "extra/0", "extra/1"]
    flat, unravel = ravel_pytree(params)
    tagged = unravel(jnp.arange(flat.size, dtype=flat.dtype))  # each entry holds its flat index
    leaves = dict(zip(paths, jax.tree_util.tree_leaves(tagged)))
    slices = blocks.block_slices(params)
    assert list(slices) == paths and slices["extra/1"].stop == flat.size
    for p, s in slices.items():
        np.testing.assert_array_equal(np.ravel(leaves[p]), np.arange(s.start, s.stop))
    assert blocks.select(params)["Block_0"] == ["Block_0/Conv_1/bias", "Block_0/Conv_1/kernel"]
    assert blocks.select(params, ["Block_0/Conv_1/kernel"]) == {"Block_0/Conv_1/kernel": ["Block_0/Conv_1/kernel"]}


@pytest.mark.parametrize("which,method", [("mlp-tanh", "lanczos"), ("cnn-relu-maxpool", "exact")])
def test_per_layer_blocks_are_slices_of_the_dense_hessian(which, method):
    H, ref = _case(which)
    params = H.problem.params
    layers = blocks.select(params, "per-layer")
    assert list(layers) == (["Dense_0", "Dense_1"] if which.startswith("mlp") else ["Conv_0", "Dense_0"])
    spectra = H.blocks(k=4, method=method)
    assert list(spectra) == list(layers)
    rng = np.random.default_rng(1)
    for name, paths in layers.items():
        idx = _index(params, paths)
        block = ref[np.ix_(idx, idx)]
        op = blocks.block_operator(H.problem, paths)
        assert (op.name, op.dim, op.dtype, op.psd) == (f"hessian[{name}]", len(idx), np.float64, False)
        if method == "lanczos":  # the CNN's block matvecs are checked densely in the ReLU test
            v = jnp.asarray(rng.standard_normal(op.dim))
            assert _rel(op.jit()(v), block @ v) < TOL
        res = spectra[name]
        assert res["dim"] == len(idx) and res["paths"] == paths and res["trace_method"] == "exact"
        assert _rel(res["eigenvalues"], np.linalg.eigvalsh(block)[::-1][:4]) < 1e-8
        assert abs(res["trace"] - np.trace(block)) < TOL * np.abs(block).sum()
        lanczos_steps = min(len(idx), 80)  # min(b, max(8 k, 80)), then b for the exact diagonal
        assert res["matvecs"] == (lanczos_steps + len(idx) if method == "lanczos" else len(idx))


@pytest.mark.parametrize("which", ["mlp-relu", "cnn-relu-maxpool"])
def test_relu_layer_blocks_of_hessian_and_ggn_agree_but_cross_layer_blocks_do_not(which):
    """DESIGN.md's oracle: a piecewise-linear network is linear in each one layer's parameters,
    so that layer's block of H is the GGN's; two layers together are not (the test can fail)."""
    H, ref = _case(which)
    problem = H.problem
    layers = blocks.select(problem.params)
    for name, paths in layers.items():
        h = materialize.dense(blocks.block_operator(problem, paths, "hessian"))
        g_op = blocks.block_operator(problem, paths, "ggn")
        assert g_op.psd and g_op.name == f"ggn[{name}]"
        g = materialize.dense(g_op)
        assert _rel(h, ref[np.ix_(_index(problem.params, paths), _index(problem.params, paths))]) < TOL
        assert _rel(g, h) < 1e-12
    both = blocks.select(problem.params, {"cross": list(layers)})["cross"]
    h = materialize.dense(blocks.block_operator(problem, both, "hessian"))
    g = materialize.dense(blocks.block_operator(problem, both, "ggn"))
    assert _rel(g, h) > 1e-3


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_subset_block_matvec_equals_embed_apply_slice(matrix):
    H, _ = _case("cnn-relu-maxpool")
    problem = H.problem
    paths = ["Dense_0/bias", "Conv_0/kernel"]  # not contiguous, given out of flat order
    cheap = blocks.block_operator(problem, paths, matrix)
    embed = blocks.block_operator(problem, paths, matrix, how="embed")
    assert cheap.dim == embed.dim == 27 + 3 and cheap.name == embed.name == f"{matrix}[Conv_0/kernel+Dense_0/bias]"
    vs = jnp.asarray(np.random.default_rng(2).standard_normal((3, cheap.dim)))
    a, b = jax.vmap(cheap)(vs), jax.vmap(embed)(vs)
    assert _rel(a, b) < TOL
    with pytest.raises(HessianApproxError, match="how='embed'"):
        blocks.block_operator(problem, paths, "empirical_fisher", how="subset")


def test_select_filters_leaves_and_names():
    H, _ = _case("mlp-tanh")
    params = H.problem.params

    def kernels(path):
        return path.endswith("kernel")

    assert blocks.select(params, kernels) == {"kernels": ["Dense_0/kernel", "Dense_1/kernel"]}
    assert blocks.select(params, lambda p: p.startswith("Dense_1")) == {"selected": ["Dense_1/bias", "Dense_1/kernel"]}
    assert blocks.select(params, "per-leaf") == {p: [p] for p in
                                                 ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]}
    assert blocks.select(params, {"heads": ["Dense_1/kernel", "Dense_0/bias"]}) == {
        "heads": ["Dense_0/bias", "Dense_1/kernel"]}
    with pytest.raises(HessianApproxError) as err:
        blocks.select(params, ["Dense_0", "Dense_7"])
    msg = str(err.value)
    assert "\n" not in msg and "'Dense_7'" in msg and "Dense_0, Dense_1" in msg
    with pytest.raises(HessianApproxError, match="selects no parameter"):
        blocks.select(params, lambda p: False)
    kernels_only = H.blocks(kernels, k=2, method="exact")
    assert list(kernels_only) == ["kernels"] and kernels_only["kernels"]["dim"] == 8 * 6 + 6 * 3


def test_a_flax_model_outside_the_description_layernorm():
    H, ref = _case("layernorm")
    assert H.arch is None
    assert list(blocks.select(H.problem.params)) == ["Dense_0", "Dense_1", "Dense_2", "LayerNorm_0"]
    res = H.blocks(["LayerNorm_0"], k=3)  # scale and bias (6 + 6): Lanczos on the matrix-free block
    assert list(res) == ["LayerNorm_0"] and res["LayerNorm_0"]["dim"] == 12
    for name, r in res.items():
        idx = _index(H.problem.params, r["paths"])
        block = ref[np.ix_(idx, idx)]
        assert _rel(r["eigenvalues"], np.linalg.eigvalsh(block)[::-1][:3]) < 1e-8
        assert abs(r["trace"] - np.trace(block)) < TOL * np.abs(block).sum()


def test_float32_block_with_a_hutchinson_trace():
    """A large block's trace (here: any block, threshold 0) is Hutchinson's, with its stderr; float32 stays float32."""
    H, ref = _case("mlp-tanh")
    params32 = models.cast_params(H.problem.params, jnp.float32)
    rng = np.random.default_rng(0)  # the same data as _case
    x = rng.standard_normal((16, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=16)
    H32 = ha.hessian(mlp(8, (6,), 3, "tanh"), params32, (x, y), chunk_size=8)
    res = blocks.block_spectra(H32.problem, ["Dense_1"], k=2, trace_exact_max_dim=0, num_samples=200)["Dense_1"]
    idx = _index(params32, res["paths"])
    block = ref[np.ix_(idx, idx)]
    assert res["eigenvalues"].dtype == np.float32 and res["trace_method"] == "hutchinson"
    assert res["matvecs"] == min(len(idx), 80) + 200
    assert _rel(res["eigenvalues"], np.linalg.eigvalsh(block)[::-1][:2]) < 1e-4
    assert 0 < res["trace_stderr"] and abs(res["trace"] - np.trace(block)) < 5 * res["trace_stderr"]
