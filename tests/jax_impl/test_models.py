"""The Flax network of an architecture: forward passes against independent numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessian_approx.architecture import mlp, parse
from jax_impl import models
from jax_impl.errors import HessianApproxError

ACT = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "sigmoid": lambda z: 1 / (1 + np.exp(-z))}


def np_conv(x, k, b, stride, pad):
    """Cross-correlation by explicit patches: x (N, H, W, C), k (kh, kw, C, O) -> (N, H', W', O)."""
    x = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    kh, kw = k.shape[:2]
    ho = (x.shape[1] - kh) // stride[0] + 1
    wo = (x.shape[2] - kw) // stride[1] + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[3]))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw, :]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, k) + b
    return out


def np_pool(x, window, stride, reduce):
    ho = (x.shape[1] - window[0]) // stride[0] + 1
    wo = (x.shape[2] - window[1]) // stride[1] + 1
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = reduce(x[:, i * stride[0]:i * stride[0] + window[0],
                                    j * stride[1]:j * stride[1] + window[1]], axis=(1, 2))
    return out


def np_forward(arch, params, x):
    """The network written out in numpy, layer by layer (independent of Flax)."""
    names = {p.index: p.name for p in arch.param_layers}
    for i, (layer, shape) in enumerate(zip(arch.layers, arch.shapes)):
        p = params.get(names.get(i), {})
        if layer.kind == "dense":
            x = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
        elif layer.kind == "conv2d":
            x = np_conv(x, np.asarray(p["kernel"]), np.asarray(p["bias"]), layer.stride, layer.pads(shape))
        elif layer.kind == "maxpool2d":
            x = np_pool(x, layer.window, layer.stride, np.max)
        elif layer.kind == "avgpool2d":
            x = np_pool(x, layer.window, layer.stride, np.mean)
        elif layer.kind == "flatten":
            x = x.reshape(len(x), -1)
        else:
            x = ACT[layer.name](x)
    return x


def test_study_mlp_has_7960_parameters():
    params = models.init_params(mlp(), jax.random.PRNGKey(0))
    assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 7960 == mlp().num_params


def test_init_params_are_flax_eager_draws_bit_for_bit():
    """init_params compiles Flax's initialization once: the same draws as Flax's own eager init."""
    arch = parse("conv2k3-relu-flatten-dense3", (4, 4, 1))
    key = jax.random.PRNGKey(7)
    ours = models.init_params(arch, key)
    flax_eager = models.build(arch).init(key, jnp.zeros((1, 4, 4, 1)))["params"]
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(flax_eager)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(flax_eager)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert models.init_params(arch, key) is not ours  # a fresh tree each call


@pytest.mark.parametrize("text,shape", [
    ("dense4-relu-dense3-tanh-dense2", (5,)),
    ("conv8k5-relu-maxpool2-conv16k5-sigmoid-maxpool2-flatten-dense10", (28, 28, 1)),
    ("conv3k3s2p1-tanh-avgpool2-flatten-dense3", (9, 9, 2)),
    ("conv2k3x5same-relu-maxpool3x2s1x2-flatten-dense4", (7, 9, 3)),
])
def test_forward_matches_numpy(text, shape, rng, x64):
    arch = parse(text, shape)
    params = models.init_params(arch, jax.random.PRNGKey(1), jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a + 0.05, params)  # nonzero biases
    assert {k: tuple(v.shape) for k, v in models.flatten_tree(params).items()} == arch.param_shapes()
    x = rng.normal(size=(3, *shape))
    got = models.make_apply(arch)(params, jnp.asarray(x))
    # float64 throughout; sums of a few hundred products round at ~1e-15
    np.testing.assert_allclose(got, np_forward(arch, params, x), rtol=1e-10, atol=1e-12)


def test_flax_defaults_would_build_another_network():
    """Flax's pooling defaults to stride 1 and its Conv to SAME padding: the description overrides both."""
    import flax.linen as nn

    x = jnp.ones((1, 8, 8, 1))
    assert nn.max_pool(x, (2, 2)).shape == (1, 7, 7, 1)  # Flax default: stride 1
    arch = parse("conv2k3-maxpool2-flatten-dense2", (8, 8, 1))
    params = models.init_params(arch, jax.random.PRNGKey(0))
    assert params["Dense_0"]["kernel"].shape == (3 * 3 * 2, 2)  # 8 -conv3 VALID-> 6 -pool2 s2-> 3


def test_inputs_are_reshaped_only_when_sizes_agree(rng):
    arch = parse("cnn", (28, 28, 1))
    assert models.as_inputs(arch, rng.normal(size=(2, 784))).shape == (2, 28, 28, 1)
    with pytest.raises(HessianApproxError, match="do not fit the model's input"):
        models.as_inputs(arch, rng.normal(size=(2, 64)))


def test_unflatten_accepts_flat_and_nested_trees():
    flat = {"Dense_0/kernel": np.ones((2, 3)), "Dense_0/bias": np.zeros(3)}
    assert models.unflatten_tree(flat)["Dense_0"]["kernel"].shape == (2, 3)
    nested = {"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}
    assert models.unflatten_tree(nested)["Dense_0"]["bias"].shape == (3,)
    with pytest.raises(HessianApproxError, match="not named 'layer/leaf'"):
        models.unflatten_tree({"kernel": np.ones(2)})


def test_layers_equal_flax_builtins(rng, x64):
    """The im2col Conv2d and the window pools compute what nn.Conv, nn.max_pool and nn.avg_pool do."""
    import flax.linen as nn

    x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)))
    conv = models.Conv2d(4, (3, 2), (2, 1), (1, 0))
    params = conv.init(jax.random.PRNGKey(0), x)
    ref = nn.Conv(4, (3, 2), strides=(2, 1), padding=((1, 1), (0, 0)))
    assert jax.tree_util.tree_map(jnp.shape, ref.init(jax.random.PRNGKey(0), x)) == \
        jax.tree_util.tree_map(jnp.shape, params)
    np.testing.assert_allclose(conv.apply(params, x), ref.apply(params, x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(models.max_pool(x, (3, 2), (2, 2)), nn.max_pool(x, (3, 2), (2, 2)), rtol=0)
    np.testing.assert_allclose(models.avg_pool(x, (2, 2), (1, 2)), nn.avg_pool(x, (2, 2), (1, 2)), rtol=1e-12)


def test_max_pool_routes_ties_to_the_first_element():
    """A window of equal values sends its whole gradient to its first (top-left) element."""
    x = jnp.zeros((1, 4, 4, 1)).at[0, 2, 3, 0].set(1.0)
    g = jax.grad(lambda x: jnp.sum(models.max_pool(x, (2, 2), (2, 2)) * jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)))(x)
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 3] = 1, 2, 3, 4
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)
