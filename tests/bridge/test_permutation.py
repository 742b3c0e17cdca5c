"""bridge.permutation: JAX flat order <-> torch flat order, checked by gradients and Hessians of both frameworks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

torch = pytest.importorskip("torch")

from bridge.convert import layer_dims, load_into_torch  # noqa: E402
from bridge.permutation import (  # noqa: E402
    inverse,
    jax_layout,
    jax_to_torch_permutation,
    kron_block,
    layer_slices,
    num_params,
    param_slices,
    to_jax_matrix,
    to_jax_vector,
    to_torch_matrix,
    to_torch_vector,
    torch_layout,
    torch_to_jax_permutation,
)
from jax_impl import models  # noqa: E402
from jax_impl.errors import HessianApproxError  # noqa: E402
from tests.bridge.test_convert import IDS, SPECS, random_params, twin  # noqa: E402

SMALL = [SPECS[1], SPECS[3]]  # 2-4-3-2 tanh, and 11 layers of sigmoid (Dense_10 sorts before Dense_2)


def torch_flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def data(spec, n=9, seed=5):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, spec.input_dim)), r.integers(0, spec.output_dim, n)


def jax_flat_loss(spec, params, x, y):
    """(theta0 (d,) in the JAX flat order, loss(theta) = mean softmax cross-entropy)."""
    theta0, unravel = ravel_pytree(models.cast_params(params, jnp.float64))
    apply = models.make_apply(spec)

    def loss(theta):
        logp = jax.nn.log_softmax(apply(unravel(theta), jnp.asarray(x)))
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1))

    return theta0, loss


def torch_flat_loss(model, x, y):
    """(theta0 (d,) in the torch flat order, loss(theta)) via torch.func.functional_call."""
    names = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def loss(theta):
        params, start = {}, 0
        for n, shape, size in names:
            params[n] = theta[start:start + size].reshape(shape)
            start += size
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (xt,)), yt)

    return torch.from_numpy(torch_flat(model).copy()), loss


def torch_hessian(loss, theta0):
    """(d, d) by autograd twice: the gradient with create_graph, then one backward pass per entry."""
    theta = theta0.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(g.numel())]
    return torch.stack(rows).detach().numpy()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_jax_layout_is_ravel_pytree_order(spec):
    params = random_params(spec)
    flat, _ = ravel_pytree(params)
    flat = np.asarray(flat)
    assert flat.size == num_params(spec) == spec.num_params
    sl = param_slices(spec, "jax")
    assert list(sl) == [name for name, _ in jax_layout(spec)]
    for key, shape in jax_layout(spec):
        layer, leaf = key.split("/")
        assert params[layer][leaf].shape == shape
        assert np.array_equal(flat[sl[key]], params[layer][leaf].ravel()), key
    if len(spec.layer_names) > 10:
        order = list(layer_slices(spec, "jax"))
        assert order.index("Dense_10") == 2 and order.index("Dense_2") > order.index("Dense_10")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_permutation_maps_jax_flat_to_torch_flat_exactly(spec):
    params = random_params(spec)
    jax_flat = np.asarray(ravel_pytree(params)[0])
    model = load_into_torch(twin(spec, torch.float64), params, spec)
    perm = jax_to_torch_permutation(spec)
    assert perm.dtype == np.int64 and np.array_equal(np.sort(perm), np.arange(perm.size))
    assert np.array_equal(torch_flat(model), jax_flat[perm])
    assert np.array_equal(to_torch_vector(jax_flat, spec), torch_flat(model))
    assert np.array_equal(to_jax_vector(torch_flat(model), spec), jax_flat)
    assert np.array_equal(torch_to_jax_permutation(spec), inverse(perm))
    # torch slices name model.named_parameters() in order, with their sizes
    tsl = param_slices(spec, "torch")
    assert [(k, sl.stop - sl.start) for k, sl in tsl.items()] == [(n, p.numel()) for n, p in model.named_parameters()]
    assert [(k, s) for k, s in torch_layout(spec)] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    # layer slices: same layer, same values in both orders
    tf = torch_flat(model)
    for (name, js), (name2, ts) in zip(sorted(layer_slices(spec, "jax").items()),
                                       sorted(layer_slices(spec, "torch").items())):
        assert name == name2 and np.array_equal(np.sort(jax_flat[js]), np.sort(tf[ts]))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradients_agree_after_permutation(spec):
    """The oracle: the same loss differentiated by JAX and by torch, compared through the permutation."""
    params = random_params(spec, seed=7)
    x, y = data(spec)
    theta0, loss = jax_flat_loss(spec, params, x, y)
    g_jax = np.asarray(jax.jit(jax.grad(loss))(theta0))
    model = load_into_torch(twin(spec, torch.float64), params, spec)
    t0, tloss = torch_flat_loss(model, x, y)
    t0.requires_grad_(True)
    (g_torch,) = torch.autograd.grad(tloss(t0), t0)
    g_torch = g_torch.numpy()
    assert abs(float(loss(theta0)) - tloss(t0).item()) < 1e-12
    np.testing.assert_allclose(g_torch, to_torch_vector(g_jax, spec), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_jax_vector(g_torch, spec), g_jax, rtol=1e-12, atol=1e-14)
    # the identity permutation would not do (the check has teeth)
    assert not np.allclose(g_torch, g_jax)


@pytest.mark.parametrize("spec", SMALL, ids=[IDS[1], IDS[3]])
def test_hessians_agree_after_permutation(spec):
    params = random_params(spec, seed=11)
    x, y = data(spec, n=6)
    theta0, loss = jax_flat_loss(spec, params, x, y)
    H_jax = np.asarray(jax.jit(jax.hessian(loss))(theta0))
    model = load_into_torch(twin(spec, torch.float64), params, spec)
    t0, tloss = torch_flat_loss(model, x, y)
    H_torch = torch_hessian(tloss, t0)
    scale = np.max(np.abs(H_jax))
    np.testing.assert_allclose(H_torch, to_torch_matrix(H_jax, spec), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(to_jax_matrix(H_torch, spec), H_jax, rtol=1e-12, atol=1e-12 * scale)
    assert not np.allclose(H_torch, H_jax)


def test_vector_and_matrix_helpers_round_trip():
    spec = SPECS[4]
    d = num_params(spec)
    r = np.random.default_rng(0)
    v, V, M = r.normal(size=d), r.normal(size=(d, 3)), r.normal(size=(d, d))
    perm = jax_to_torch_permutation(spec)
    assert np.array_equal(to_jax_vector(to_torch_vector(v, spec), spec), v)
    assert np.array_equal(to_torch_vector(V, perm), V[perm])  # columns (e.g. eigenvectors) move together
    assert np.array_equal(to_jax_vector(to_torch_vector(V, spec), perm), V)
    assert np.array_equal(to_torch_matrix(M, spec), M[perm][:, perm])
    assert np.array_equal(to_jax_matrix(to_torch_matrix(M, spec), spec), M)
    inv = inverse(perm)
    assert np.array_equal(perm[inv], np.arange(d)) and np.array_equal(inv[perm], np.arange(d))
    # a permutation is orthogonal: eigenvalues and quadratic forms are unchanged
    assert np.isclose(v @ M @ v, to_torch_vector(v, spec) @ to_torch_matrix(M, spec) @ to_torch_vector(v, spec))


def test_kron_block_layouts_are_the_same_block_permuted():
    r = np.random.default_rng(3)
    n_in, n_out = 4, 3
    G = r.normal(size=(n_out, n_out))
    A = r.normal(size=(n_in, n_in))
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


@pytest.mark.parametrize("spec", [SPECS[1], SPECS[4]], ids=[IDS[1], IDS[4]])
def test_kron_blocks_in_the_full_permutation(spec):
    """A block-diagonal curvature built from Flax-layout blocks, moved by to_torch_matrix, has torch-layout blocks."""
    r = np.random.default_rng(1)
    d = num_params(spec)
    M = np.zeros((d, d))
    jsl, tsl = param_slices(spec, "jax"), param_slices(spec, "torch")
    factors = {}
    for i, (name, a, b) in enumerate(layer_dims(spec)):
        G, A, B = r.normal(size=(b, b)), r.normal(size=(a, a)), r.normal(size=(b, b))
        factors[i] = (G, A, B)
        k, bias = jsl[f"{name}/kernel"], jsl[f"{name}/bias"]
        M[k, k] = kron_block(G, A, "flax")
        M[bias, bias] = B
    T = to_torch_matrix(M, spec)
    for i, (G, A, B) in factors.items():
        w, bias = tsl[f"{2 * i}.weight"], tsl[f"{2 * i}.bias"]
        np.testing.assert_array_equal(T[w, w], kron_block(G, A, "torch"))
        np.testing.assert_array_equal(T[bias, bias], B)
        assert not np.any(T[w, bias])


def test_errors():
    spec = SPECS[0]
    d = num_params(spec)
    with pytest.raises(HessianApproxError, match="order 'flax'"):
        param_slices(spec, "flax")
    with pytest.raises(HessianApproxError, match="not a permutation"):
        inverse(np.array([0, 0, 1]))
    with pytest.raises(HessianApproxError, match=rf"shape \({d + 1},\).*d = {d}"):
        to_torch_vector(np.zeros(d + 1), spec)
    with pytest.raises(HessianApproxError, match=rf"shape \({d}, {d - 1}\).*\(d, d\)"):
        to_torch_matrix(np.zeros((d, d - 1)), spec)
    with pytest.raises(HessianApproxError, match=r"factor A has shape \(3, 2\)"):
        kron_block(np.eye(2), np.zeros((3, 2)))
    with pytest.raises(HessianApproxError, match="layout 'jax'"):
        kron_block(np.eye(2), np.eye(2), "jax")
