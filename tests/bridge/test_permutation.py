"""bridge.permutation: JAX flat order <-> torch flat order for MLPs and CNNs, against ravel_pytree, the twin and index math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from bridge.convert import flax_to_torch, load_into_torch  # noqa: E402
from bridge.permutation import (  # noqa: E402
    inverse, jax_layout, jax_to_torch_permutation, kernel_permutation, kron_block, layer_slices, num_params,
    param_slices, to_jax_matrix, to_jax_vector, to_torch_matrix, to_torch_vector, torch_layout,
    torch_to_jax_permutation,
)
from hessian_approx.errors import HessianApproxError  # noqa: E402
from jax_impl import losses, models  # noqa: E402
from tests.bridge.test_convert import ARCHS, random_params  # noqa: E402
from tests.torch_ref.conftest import one_torch_thread  # noqa: E402,F401  (autouse: one torch thread)
from torch_ref import exact  # noqa: E402
from torch_ref.models import build_twin  # noqa: E402


def torch_flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


@pytest.mark.parametrize("name", list(ARCHS))
def test_jax_layout_is_ravel_pytree_order(name, x64):
    arch = ARCHS[name]
    params = random_params(arch)
    flat = np.asarray(ravel_pytree(params)[0])
    assert flat.size == num_params(arch) == arch.num_params
    sl = param_slices(arch, "jax")
    assert list(sl) == [key for key, _ in jax_layout(arch)]
    for key, shape in jax_layout(arch):
        layer, leaf = key.split("/")
        assert params[layer][leaf].shape == shape and np.array_equal(flat[sl[key]], params[layer][leaf].ravel()), key
    order = list(layer_slices(arch, "jax"))
    for prefix in ("Dense", "Conv"):
        if f"{prefix}_10" in order:
            assert order.index(f"{prefix}_10") == order.index(f"{prefix}_1") + 1 < order.index(f"{prefix}_2")


@pytest.mark.parametrize("name", list(ARCHS))
def test_permutation_maps_jax_flat_to_torch_flat_exactly(name, x64):
    arch = ARCHS[name]
    params = random_params(arch)
    jax_flat = np.asarray(ravel_pytree(params)[0])
    model = load_into_torch(build_twin(arch, torch.float64), params, arch)
    perm = jax_to_torch_permutation(arch)
    assert perm.dtype == np.int64 and np.array_equal(np.sort(perm), np.arange(perm.size))
    assert np.array_equal(torch_flat(model), jax_flat[perm])
    assert np.array_equal(to_torch_vector(jax_flat, arch), torch_flat(model))
    assert np.array_equal(to_jax_vector(torch_flat(model), arch.to_dict()), jax_flat)
    assert np.array_equal(torch_to_jax_permutation(arch), inverse(perm))
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert torch_layout(arch) == named
    tsl = param_slices(arch, "torch")
    assert [(k, sl.stop - sl.start) for k, sl in tsl.items()] == [(n, int(np.prod(s))) for n, s in named]
    tf = torch_flat(model)
    js, ts = layer_slices(arch, "jax"), layer_slices(arch, "torch")
    assert sorted(js) == sorted(ts) == sorted(arch.layer_names)
    for layer in js:  # same layer, same values in both orders
        assert np.array_equal(np.sort(jax_flat[js[layer]]), np.sort(tf[ts[layer]]))


def test_permutation_by_index_arithmetic():
    """An oracle written as index formulas, not reshapes: conv3k3s2p1-tanh-avgpool2-flatten-dense3 on 8x8x1."""
    arch = ARCHS["cnn-avg"]
    (conv, dense) = arch.param_layers
    assert dense.flat_from == (2, 2, 3)
    jsl = param_slices(arch, "jax")
    expected = []
    k0 = jsl["Conv_0/kernel"].start  # kernel (3, 3, 1, 3) -> weight (3, 1, 3, 3)
    for o, i, a, b in np.ndindex(3, 1, 3, 3):
        expected.append(k0 + ((a * 3 + b) * 1 + i) * 3 + o)
    expected += list(range(jsl["Conv_0/bias"].start, jsl["Conv_0/bias"].stop))
    k1 = jsl["Dense_0/kernel"].start  # kernel (12, 3), rows (h, w, c) -> weight (3, 12), columns (c, h, w)
    for o, c, h, w in np.ndindex(3, 3, 2, 2):
        expected.append(k1 + ((h * 2 + w) * 3 + c) * 3 + o)
    expected += list(range(jsl["Dense_0/bias"].start, jsl["Dense_0/bias"].stop))
    np.testing.assert_array_equal(jax_to_torch_permutation(arch), expected)


@pytest.mark.parametrize("name", ["mlp-12", "conv-11"])
def test_gradients_agree_after_permutation(name, x64):
    """More than ten layers of a kind (sorted names): the JAX gradient, permuted, is torch's (float64, 1e-12)."""
    arch = ARCHS[name]
    params = random_params(arch, seed=7)
    r = np.random.default_rng(5)
    x, y = r.normal(size=(9, *arch.input_shape)), r.integers(0, arch.num_classes, 9)
    theta0, unravel = ravel_pytree(models.cast_params(params, jnp.float64))
    apply = models.make_apply(arch)
    loss = lambda t, x, y: jnp.mean(losses.cross_entropy(apply(unravel(t), x), y))
    g_jax = np.asarray(jax.jit(jax.grad(loss))(theta0, jnp.asarray(x), jnp.asarray(y)))
    model = load_into_torch(build_twin(arch, torch.float64), params, arch)
    g_torch = exact.loss_and_grad(model, x, y, "cross_entropy")[1]
    np.testing.assert_allclose(g_torch, to_torch_vector(g_jax, arch), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_jax_vector(g_torch, arch), g_jax, rtol=1e-12, atol=1e-14)
    assert not np.allclose(g_torch, g_jax)  # the identity would not do


def test_vector_and_matrix_helpers_round_trip():
    arch = ARCHS["cnn-same"]
    d = num_params(arch)
    r = np.random.default_rng(0)
    v, V, M = r.normal(size=d), r.normal(size=(d, 3)), r.normal(size=(d, d))
    perm = jax_to_torch_permutation(arch)
    assert np.array_equal(to_jax_vector(to_torch_vector(v, arch), arch), v)
    assert np.array_equal(to_torch_vector(V, perm), V[perm])  # columns (e.g. eigenvectors) move together
    assert np.array_equal(to_jax_vector(to_torch_vector(V, arch), perm), V)
    assert np.array_equal(to_torch_matrix(M, arch), M[perm][:, perm])
    assert np.array_equal(to_jax_matrix(to_torch_matrix(M, arch), arch), M)
    inv = inverse(perm)
    assert np.array_equal(perm[inv], np.arange(d)) and np.array_equal(inv[perm], np.arange(d))
    assert np.isclose(v @ M @ v, to_torch_vector(v, arch) @ to_torch_matrix(M, arch) @ to_torch_vector(v, arch))


@pytest.mark.parametrize("name", ["cnn-max", "cnn-same", "flatten-3x2x4"])
def test_kernel_permutation_is_the_layout_rule(name):
    arch = ARCHS[name]
    params = random_params(arch)
    state = flax_to_torch(params, arch)
    for p in arch.param_layers:
        perm = kernel_permutation(arch, p.name)
        assert np.array_equal(state[f"{p.index}.weight"].ravel(), params[p.name]["kernel"].ravel()[perm])


def test_kron_block_layouts_are_the_same_block_permuted():
    r = np.random.default_rng(3)
    n_in, n_out = 4, 3
    G, A = r.normal(size=(n_out, n_out)), r.normal(size=(n_in, n_in))
    G, A = G @ G.T, A @ A.T
    torch_block, flax_block = kron_block(G, A, "torch"), kron_block(G, A, layout="flax")
    assert np.array_equal(torch_block, np.kron(G, A)) and np.array_equal(flax_block, np.kron(A, G))
    # torch weight W (out, in) row-major index o*in+i holds the Flax kernel entry (i, o) = flax index i*out+o
    local = np.arange(n_in * n_out).reshape(n_in, n_out).T.reshape(-1)
    np.testing.assert_array_equal(torch_block, flax_block[np.ix_(local, local)])
    # what the block does: (G ⊗ A) vec_r(W) = vec_r(G W Aᵀ); (A ⊗ G) vec_r(Wᵀ) = vec_r((G W Aᵀ)ᵀ)
    W = r.normal(size=(n_out, n_in))
    np.testing.assert_allclose(torch_block @ W.ravel(), (G @ W @ A.T).ravel(), rtol=1e-12)
    np.testing.assert_allclose(flax_block @ W.T.ravel(), (G @ W @ A.T).T.ravel(), rtol=1e-12)
    # with the layer named, a plain Dense gives the same kron(A, G)
    arch = ARCHS["mlp"]
    p = arch.param_layers[0]
    a, g = r.normal(size=(p.shapes["kernel"][0],) * 2), r.normal(size=(p.shapes["kernel"][1],) * 2)
    np.testing.assert_array_equal(kron_block(g, a, "flax", arch, p.name), np.kron(a, g))


@pytest.mark.parametrize("name", ["mlp-12", "cnn-same", "cnn-max"])
def test_kron_blocks_in_the_full_permutation(name):
    """A block-diagonal curvature with torch-layout Kronecker blocks, moved by to_jax_matrix, has the
    Flax-layout blocks kron_block(..., "flax", arch, name) (conv and Dense-after-Flatten included)."""
    arch = ARCHS[name]
    r = np.random.default_rng(1)
    d = num_params(arch)
    T = np.zeros((d, d))
    jsl, tsl = param_slices(arch, "jax"), param_slices(arch, "torch")
    factors = {}
    for p in arch.param_layers:
        out = p.shapes["bias"][0]
        m = int(np.prod(p.shapes["kernel"])) // out
        G, A, B = r.normal(size=(out, out)), r.normal(size=(m, m)), r.normal(size=(out, out))
        factors[p.name] = (G, A, B)
        w, bias = tsl[f"{p.index}.weight"], tsl[f"{p.index}.bias"]
        T[w, w], T[bias, bias] = kron_block(G, A, "torch"), B
    M = to_jax_matrix(T, arch)
    for p in arch.param_layers:
        G, A, B = factors[p.name]
        k, bias = jsl[f"{p.name}/kernel"], jsl[f"{p.name}/bias"]
        np.testing.assert_array_equal(M[k, k], kron_block(G, A, "flax", arch, p.name))
        np.testing.assert_array_equal(M[bias, bias], B)
        assert not np.any(M[k, bias])
        if p.layer.kind == "dense" and p.flat_from is None:
            np.testing.assert_array_equal(M[k, k], kron_block(G, A, "flax"))


def test_errors():
    arch = ARCHS["cnn-max"]
    d = num_params(arch)
    with pytest.raises(HessianApproxError, match="order 'flax'"):
        param_slices(arch, "flax")
    with pytest.raises(HessianApproxError, match="not a permutation"):
        inverse(np.array([0, 0, 1]))
    with pytest.raises(HessianApproxError, match=rf"shape \({d + 1},\).*d = {d}"):
        to_torch_vector(np.zeros(d + 1), arch)
    with pytest.raises(HessianApproxError, match=rf"shape \({d}, {d - 1}\).*\(d, d\)"):
        to_torch_matrix(np.zeros((d, d - 1)), arch)
    with pytest.raises(HessianApproxError, match=r"factor A has shape \(3, 2\)"):
        kron_block(np.eye(2), np.zeros((3, 2)))
    with pytest.raises(HessianApproxError, match="layout 'jax'"):
        kron_block(np.eye(2), np.eye(2), "jax")
    with pytest.raises(HessianApproxError, match=r"do not cover the 54 kernel entries of Conv_0"):
        kron_block(np.eye(3), np.eye(17), "flax", arch, "Conv_0")
    with pytest.raises(HessianApproxError, match=r"'Dense_5' is not a parameter layer"):
        kernel_permutation(arch, "Dense_5")
