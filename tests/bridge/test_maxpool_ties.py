"""Max-pool windows with exactly tied maxima: torch and JAX route the gradient to the same element.

Finding (torch 2.x CPU ``max_pool2d`` backward; JAX ``flax.linen.max_pool`` = ``lax.reduce_window``
max, whose vjp is ``select_and_scatter_add`` with ``>=`` and whose jvp selects likewise; and
``jax_impl.models.max_pool``, the product's, an argmax over the window): all send a window's
gradient to its FIRST maximum in row-major (h, w) order within the window, each channel
separately, overlapping windows independently, never split among ties (as ``jnp.max``'s
gradient would be). The numpy oracle ``first_max_vjp`` below (``np.argmax`` returns the first
occurrence) states that rule, and every implementation matches it exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

torch = pytest.importorskip("torch")

from bridge.convert import load_into_torch  # noqa: E402
from bridge.permutation import to_jax_vector  # noqa: E402
from hessian_approx.architecture import parse  # noqa: E402
from jax_impl import models  # noqa: E402
from tests.bridge.test_convert import random_params  # noqa: E402
from tests.torch_ref.conftest import one_torch_thread  # noqa: E402,F401  (autouse: one torch thread)
from torch_ref import models as tmodels  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def windows(x, g_shape, window, stride):
    """Yield ((b, i, j, c), window values (kh, kw), its top-left corner) for pool output entries."""
    (kh, kw), (sh, sw) = window, stride
    for b, i, j, ch in np.ndindex(*g_shape):
        yield (b, i, j, ch), x[b, i * sh:i * sh + kh, j * sw:j * sw + kw, ch], (i * sh, j * sw)


def first_max_vjp(x, g, window, stride, last=False):
    """Oracle: x (N, H, W, C), cotangent g (N, H', W', C) -> (N, H, W, C), each window's g at its
    first maximum in row-major order (``last``: at its last maximum instead)."""
    out = np.zeros_like(x)
    for (b, i, j, ch), win, (h0, w0) in windows(x, g.shape, window, stride):
        flat = win.ravel()
        k = flat.size - 1 - np.argmax(flat[::-1]) if last else np.argmax(flat)  # argmax: first occurrence
        a, e = np.unravel_index(k, win.shape)
        out[b, h0 + a, w0 + e, ch] += g[b, i, j, ch]
    return out


JAX_POOLS = {  # flax's max_pool, and the one the product's Flax network uses
    "flax.linen.max_pool": lambda z, window, stride: nn.max_pool(z, window, strides=stride, padding="VALID"),
    "jax_impl.models.max_pool": lambda z, window, stride: models.max_pool(z, window, stride),
}


def jax_pool_vjp(x, g, window, stride, pool):
    f = lambda z: JAX_POOLS[pool](z, window, stride)
    return np.asarray(jax.vjp(f, jnp.asarray(x))[1](jnp.asarray(g))[0])


def torch_pool_vjp(x, g, window, stride):
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    torch.nn.functional.max_pool2d(xt, window, stride).backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    return xt.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("pool", list(JAX_POOLS))
@pytest.mark.parametrize("window, stride", [((2, 2), (2, 2)), ((2, 2), (1, 1)), ((3, 2), (2, 1)), ((3, 3), (3, 3))])
def test_pool_vjp_routes_ties_to_the_first_maximum(window, stride, pool):
    r = np.random.default_rng(0)
    # -1, 0, 1 on a zero background: many windows hold tied maxima
    x = np.where(r.random((3, 7, 7, 2)) < 0.5, 0.0, r.integers(-1, 2, (3, 7, 7, 2)).astype(np.float64))
    x[0, :3, :3, :] = 0.0  # whole windows of zeros
    ho, wo = (7 - window[0]) // stride[0] + 1, (7 - window[1]) // stride[1] + 1
    g = r.normal(size=(3, ho, wo, 2))
    expected = first_max_vjp(x, g, window, stride)
    ties = sum(np.count_nonzero(win == win.max()) > 1 for _, win, _ in windows(x, g.shape, window, stride))
    assert ties > g.size // 3  # the check is about ties (a third of the windows or more)
    # exact: each entry is one cotangent or a sum of a few (overlapping windows), in the same order
    np.testing.assert_array_equal(jax_pool_vjp(x, g, window, stride, pool), expected)
    np.testing.assert_array_equal(torch_pool_vjp(x, g, window, stride), expected)
    assert not np.array_equal(first_max_vjp(x, g, window, stride, last=True), expected)  # the rule has teeth


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_forward_mode_picks_the_same_element():
    """JAX's Hvp is forward-over-reverse: the jvp through a tied window carries the first maximum's tangent
    (as does torch.func.jvp; torch's Hvp is reverse-over-reverse, covered by the vjp test)."""
    x = np.zeros((1, 2, 2, 1))
    t = np.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    for pool in JAX_POOLS.values():
        f = lambda z: pool(z, (2, 2), (2, 2))
        assert float(jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(t),))[1].ravel()[0]) == 1.0
    tt = torch.tensor(t.transpose(0, 3, 1, 2))
    out = torch.func.jvp(lambda z: torch.nn.functional.max_pool2d(z, 2), (torch.zeros(1, 1, 2, 2, dtype=tt.dtype),),
                         (tt,))[1]
    assert float(out.ravel()[0]) == 1.0


def tied_conv_pool():
    """conv1k1 (kernel [1, 1], bias 0.5, no activation) -> maxpool2 -> flatten -> dense1 (kernel G, bias 0).

    One 4x4x2 image whose windows tie with DIFFERENT pixels: window (0,0) holds (1, 2) at (0,0)
    and (2, 1) at (1,1), both 3.5 after the conv; window (1,0) holds (3, 0) at (2,0) and (0, 3)
    at (3,1); windows (0,1) and (1,1) tie at the bias value 0.5 (zero pixels; one -1 pixel).
    """
    arch = parse("conv1k1-maxpool2-flatten-dense1", (4, 4, 2))
    x = np.zeros((1, 4, 4, 2))
    x[0, 0, 0], x[0, 1, 1], x[0, 2, 0], x[0, 3, 1], x[0, 2, 2] = (1, 2), (2, 1), (3, 0), (0, 3), (-1, -1)
    g = np.array([1.0, 2.0, 3.0, 4.0])  # dense kernel: the cotangent of the four windows (h, w order)
    params = {"Conv_0": {"kernel": np.ones((1, 1, 2, 1)), "bias": np.array([0.5])},
              "Dense_0": {"kernel": g.reshape(4, 1), "bias": np.zeros(1)}}
    return arch, params, x


def test_parameter_gradients_follow_the_first_maximum():
    """Ties between different pixels: the conv kernel's gradient shows which element each framework picked."""
    arch, params, x = tied_conv_pool()
    apply = models.make_apply(arch)
    jp = jax.tree_util.tree_map(jnp.asarray, params)
    grads, gx_jax = jax.jit(jax.grad(lambda p, z: apply(p, z).sum(), argnums=(0, 1)))(jp, jnp.asarray(x))
    gx_jax = np.asarray(gx_jax)
    model = load_into_torch(tmodels.build_twin(arch, torch.float64), params, arch)
    xt = tmodels.as_inputs(model, x).requires_grad_(True)
    model(xt).sum().backward()
    # first maxima (0,0) -> (1, 2) with G=1 and (2,0) -> (3, 0) with G=3: kernel grad (1 + 9, 2 + 0);
    # the last maxima would give (2 + 0, 1 + 9). The bias gets sum(G) whichever element is picked.
    first = np.array([10.0, 2.0])
    np.testing.assert_array_equal(np.asarray(grads["Conv_0"]["kernel"]).ravel(), first)
    np.testing.assert_array_equal(model[0].weight.grad.numpy().ravel(), first)
    assert float(grads["Conv_0"]["bias"][0]) == model[0].bias.grad.item() == 10.0
    # input gradient: each window's G times the kernel (1, 1) at its first maximum (within-window
    # ties at the bias value included: window (0,1) -> pixel (0,2), window (1,1) -> pixel (2,3))
    expected = np.zeros((1, 4, 4, 2))
    for (h, w), gw in zip([(0, 0), (0, 2), (2, 0), (2, 3)], (1.0, 2.0, 3.0, 4.0)):
        expected[0, h, w] = gw
    np.testing.assert_array_equal(gx_jax, expected)
    np.testing.assert_array_equal(xt.grad.numpy().transpose(0, 2, 3, 1), expected)


def test_zero_background_conv_pool_gradients_agree():
    """conv (no activation) -> maxpool on zero-background images: windows tie at the bias value.

    Tied windows of zero patches send the same parameter gradient whichever element is picked
    (patch zero, bias 1), so there the routing shows only in the input gradient, which agrees too.
    """
    arch = parse("conv3k3-maxpool2-conv2k2-flatten-dense3", (8, 8, 2))
    r = np.random.default_rng(1)
    x = np.zeros((4, 8, 8, 2))
    x[:, 4:7, 4:7] = r.normal(size=(4, 3, 3, 2))  # a blob in a corner of a zero background
    params = random_params(arch, seed=2)
    apply = models.make_apply(arch)
    jp = jax.tree_util.tree_map(jnp.asarray, params)
    loss = lambda p, z: jnp.sum(jnp.sin(apply(p, z)))
    g_p, gx_jax = jax.jit(jax.grad(loss, argnums=(0, 1)))(jp, jnp.asarray(x))
    g_jax, gx_jax = np.asarray(ravel_pytree(g_p)[0]), np.asarray(gx_jax)
    model = load_into_torch(tmodels.build_twin(arch, torch.float64), params, arch)
    xt = tmodels.as_inputs(model, x).requires_grad_(True)
    torch.sin(model(xt)).sum().backward()
    g_torch = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    # float64, the same sums in different orders: 1e-12
    np.testing.assert_allclose(to_jax_vector(g_torch, arch), g_jax, rtol=0, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy().transpose(0, 2, 3, 1), gx_jax, rtol=0, atol=1e-12)
    assert np.count_nonzero(gx_jax[:, :4, :4]) > 0  # gradient reaches the tied background windows
