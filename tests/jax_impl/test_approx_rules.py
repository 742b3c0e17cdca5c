"""The per-layer curvature rules (jax_impl.approx.rules) one by one against autodiff of each layer.

Oracles: jax.vjp / jax.jacobian / jax.hessian of the Flax model's per-layer callables
(jax_impl.models.FLAX_LAYERS, nn.Conv's lax.conv_general_dilated), evaluated eagerly on
tiny float64 inputs with many tied values. Tolerance 1e-12: each rule is a handful of
exact gathers, products and sums (measured errors ~1e-16).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessian_approx.architecture import parse
from hessian_approx.layers import Activation, Conv2d, MaxPool2d
from jax_impl import models
from jax_impl.approx import network
from jax_impl.approx.rules import RULES, Node, nodes, windows
from tests.cases import case

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout

TOL = 1e-12


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def tied(shape, seed=0):
    """Values with exact zeros and repeated levels, so pooling windows hold tied maxima."""
    r = np.random.default_rng(seed)
    return jnp.asarray(np.maximum(np.round(r.normal(size=shape), 0), 0.0))


def node_of(layer, in_shape, index=0):
    out = tuple(layer.out_shape(in_shape))
    return Node(index, layer, tuple(in_shape), out, "L" if layer.param_shapes(in_shape) else None)


def layer_params(nd, seed=1):
    r = np.random.default_rng(seed)
    return {k: jnp.asarray(r.normal(size=s)) for k, s in nd.layer.param_shapes(nd.in_shape).items()} or None


POOLS = [((2, 2), (2, 2)), ((2, 2), (1, 1)), ((3, 3), (2, 2)), ((2, 2), (3, 3)), ((3, 2), (3, 2))]


@pytest.mark.parametrize("window,stride", POOLS)
def test_max_pool_routes_as_jax_vjp(window, stride):
    """Tied maxima, overlapping windows, gaps and uncovered rows: the rule's Jᵀ equals JAX's vjp."""
    nd = node_of(MaxPool2d(window, stride), (7, 8, 3))
    x = tied((4, 7, 8, 3))
    s = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5, *nd.out_shape)))

    @jax.jit
    def both(x, s):
        flax_pool = lambda u: models.FLAX_LAYERS["maxpool2d"](nd.layer, None, u.dtype, nd.in_shape)(u)
        y, vjp = jax.vjp(flax_pool, x)
        ref = jax.vmap(lambda c: vjp(c)[0], in_axes=1, out_axes=1)(s)
        return RULES["maxpool2d"].forward(nd, None, x), y, RULES["maxpool2d"].jac_t(nd, None, x, s), ref

    fwd, y, got, ref = both(x, s)
    assert rel(fwd, y) == 0 and rel(got, ref) < TOL


CONVS = [Conv2d(4, (3, 3), (2, 2), (1, 1)), Conv2d(2, (3, 2), (2, 1), (1, 0)), Conv2d(3, (3, 3), (1, 1), "SAME"),
         Conv2d(2, (2, 2)), Conv2d(2, (2, 3), (3, 2), (2, 1))]


@pytest.mark.parametrize("conv", CONVS)
def test_conv_unfold_and_jac_t_reproduce_the_convolution(conv):
    """out[n, t, o] = Σ_j unfold[n, t, j] K[j, o] + b[o] with K (kh, kw, in, out) read as (kh·kw·in, out);
    the transposed convolution is the layer's vjp (strides whose floor drops rows, uneven kernels)."""
    nd = node_of(conv, (7, 6, 3))
    p = layer_params(nd)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 6, 3)))
    flax = models.FLAX_LAYERS["conv2d"](conv, "c", jnp.float64, nd.in_shape)
    y = flax.apply({"params": p}, x)
    u = RULES["conv2d"].unfold(nd, x)
    assert u.shape == (3, nd.locations, conv.kernel[0] * conv.kernel[1] * 3)
    assert rel(u @ p["kernel"].reshape(-1, conv.features) + p["bias"], y.reshape(3, -1, conv.features)) < TOL
    assert rel(RULES["conv2d"].forward(nd, p, x), y) < TOL
    s = jnp.asarray(np.random.default_rng(3).normal(size=(3, 2, *nd.out_shape)))
    _, vjp = jax.vjp(lambda u: flax.apply({"params": p}, u), x)
    assert rel(RULES["conv2d"].jac_t(nd, p, x, s), jnp.stack([vjp(s[:, v])[0] for v in range(2)], 1)) < TOL


def normal(shape, seed):
    """numpy draws (jax.random compiles slowly on the CPU in float64)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


@functools.partial(jax.jit, static_argnums=0)
def _jac_t_pairs(arch, params, x, ss):
    """[(rule's Jᵀ s, jax.vjp's Jᵀ s)] for every layer of arch, s = ss[i] (B, V, *out_shape_i)."""
    nds = nodes(arch)
    xs, _ = network.forward(nds, params, x)
    out = []
    for nd, x, s in zip(nds, xs, ss):
        p = network.param(params, nd)
        _, vjp = jax.vjp(lambda u: RULES[nd.kind].forward(nd, p, u), x)
        out.append((RULES[nd.kind].jac_t(nd, p, x, s), jax.vmap(lambda t: vjp(t)[0], in_axes=1, out_axes=1)(s)))
    return out


@pytest.mark.parametrize("name", ["cnn-max", "cnn-avg", "cnn-same"])
def test_every_jac_t_is_the_vjp_of_the_layer(name):
    """Each rule's Jacobian-transpose product against jax.vjp of the layer, on the registry CNNs."""
    c = case(name, "tanh", "cross_entropy")
    ss = [normal((3, 4, *nd.out_shape), nd.index) for nd in nodes(c.arch)]
    pairs = _jac_t_pairs(c.arch, c.params(), tied((3, *c.arch.input_shape)) - 0.5, ss)
    for nd, (got, ref) in zip(nodes(c.arch), pairs):
        assert rel(got, ref) < TOL, nd.kind


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
def test_activation_residual_is_the_second_order_term(act):
    """residual(x, g) = diag of Σ_k g_k ∇²σ(x)_k (autodiff Hessian), None for ReLU."""
    nd = node_of(Activation(act), (2, 2, 3))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 3)))
    g = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 3)))
    r = RULES["activation"].residual(nd, x, g)
    if act == "relu":
        assert r is None
        return
    hess = jax.jit(jax.vmap(lambda u, gn: jax.hessian(lambda v: jnp.sum(gn * models.ACTIVATIONS[act](v)))(u)))
    for n, h in enumerate(np.asarray(hess(x, g)).reshape(2, 12, 12)):
        assert rel(r[n].ravel(), np.diag(h)) < TOL and rel(h, np.diag(np.diag(h))) == 0


@functools.partial(jax.jit, static_argnums=0)
def _kfra_pairs(arch, params, x, w, ms):
    """[(rule's Σ_n w_n J_nᵀ m J_n, the same from autodiff Jacobians)] for every layer, m = ms[i] symmetric."""
    nds = nodes(arch)
    xs, _ = network.forward(nds, params, x)
    out = []
    for nd, x, m in zip(nds, xs, ms):
        p, rule = network.param(params, nd), RULES[nd.kind]
        m = m + m.T
        one = lambda u: rule.forward(nd, p, u.reshape(1, *nd.in_shape)).reshape(-1)
        jac = jax.vmap(jax.jacobian(one))(x.reshape(x.shape[0], -1))  # (B, D_out, D_in)
        out.append((rule.kfra(nd, p, rule.kfra_stat(nd, x, w), m), jnp.einsum("n,nki,kl,nlj->ij", w, jac, m, jac)))
    return out


@pytest.mark.parametrize("name", ["cnn-max", "cnn-avg", "cnn-same"])
def test_kfra_rules_are_weighted_jacobian_sandwiches(name):
    """kfra(stat, m) = Σ_n w_n J_nᵀ m J_n with J_n the autodiff Jacobian of the layer at sample n
    (BackPACK's ea_jac_t_mat_jac_prod), NHWC-flattened; weights with a zero (padding) row."""
    c = case(name, "relu", "cross_entropy")
    w = jnp.asarray([0.5, 0.3, 0.2, 0.0])
    ms = [normal((nd.d_out, nd.d_out), nd.index) for nd in nodes(c.arch)]
    pairs = _kfra_pairs(c.arch, c.params(), tied((4, *c.arch.input_shape)) - 0.3, w, ms)
    for nd, (got, ref) in zip(nodes(c.arch), pairs):
        assert rel(got, ref) < TOL, nd.kind


def test_windows_gather_matches_the_definition():
    x = jnp.arange(2 * 5 * 6 * 2, dtype=jnp.float64).reshape(2, 5, 6, 2)
    u = windows(x, (3, 2), (2, 3), (1, 1))  # (B, H', W', kh, kw, C)
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    assert u.shape == (2, 3, 3, 3, 2, 2)
    for i in range(3):
        for j in range(3):
            assert np.array_equal(u[:, i, j], xp[:, 2 * i:2 * i + 3, 3 * j:3 * j + 2])


def test_nodes_follow_the_architecture():
    arch = parse("conv3k3-relu-maxpool2-flatten-dense2", (6, 6, 1))
    nds = nodes(arch)
    assert [nd.name for nd in nds] == ["Conv_0", None, None, None, "Dense_0"]
    assert [nd.locations for nd in nds if nd.name] == [16, 1]
    assert all(RULES[nd.kind].unfold is not None for nd in nds if nd.name)
