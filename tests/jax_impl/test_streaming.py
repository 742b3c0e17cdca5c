"""Streamed data (host memory, one chunk on the device at a time) against in-memory chunks and a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jax_impl import algorithms, losses, models, operators, streaming
from jax_impl.approx import APPROXIMATIONS
from jax_impl.approx.exact import ggn_by_structure, hessian_by_structure
from jax_impl.batches import make_batches
from jax_impl.errors import HessianApproxError

# float32, as it runs. Both paths sum the same chunks (same rows, order and zero-weight padding)
# in the same order through the same scan body; only the chunk's source differs (a host callback's
# buffer vs a slice of a captured array), so XLA compiles the same arithmetic and the results agree
# bit for bit here. The bound allows XLA to fuse the two bodies differently: 64 float32 ulps
# (eps 1.2e-7) of the largest entry, about 3 rounding errors in each of the ~20 terms of a chunk sum.
TOL32 = 64 * np.finfo(np.float32).eps
MLP = ("dense6-tanh-dense4", (5,))
CNN = ("conv2k3-relu-maxpool2-flatten-dense4", (6, 6, 1))


def pair(arch_text, input_shape, n=53, chunk=16, pool=80, loss="cross_entropy", dtype=jnp.float32):
    """(arch, in-memory Problem, streamed Problem) on the same n of ``pool`` flat rows, in the same order."""
    arch = models.parse(arch_text, input_shape)
    params = models.init_params(arch, jax.random.PRNGKey(0), dtype)
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size, dtype=dtype).reshape(a.shape)),
                                    params)
    r = np.random.default_rng(1)
    x = np.maximum(r.normal(size=(pool, int(np.prod(input_shape)))), 0).astype(np.float32)  # flat rows, half zeros
    y = r.integers(0, 4, pool).astype(np.int32)
    rows = r.choice(pool, n, replace=False)
    to_inputs = lambda a: models.as_inputs(arch, a)
    mem = make_batches(to_inputs(x[rows]), y[rows], chunk, dtype=dtype)
    st = streaming.stream_batches(x, y, chunk, rows=rows, dtype=dtype, transform=to_inputs)
    apply, ell = models.make_apply(arch), losses.get_loss(loss)
    return arch, operators.Problem(apply, ell, params, mem), operators.Problem(apply, ell, params, st)


def close(a, b, tol=TOL32):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * max(np.max(np.abs(b)), 1e-30), np.max(np.abs(a - b))


def test_stream_cuts_the_chunks_make_batches_cuts():
    _, mem, st = pair(*CNN)
    b = streaming.in_memory(st.batches)
    assert st.batches.x.shape == mem.batches.x.shape == (4, 16, 6, 6, 1)  # 53 samples: 3 full chunks + padding
    np.testing.assert_array_equal(b.x, mem.batches.x)
    np.testing.assert_array_equal(b.y, mem.batches.y)
    np.testing.assert_array_equal(st.batches.w, mem.batches.w)
    assert st.batches.num_samples == 53 and st.batches.dtype == np.float32


def everything(p: operators.Problem, v):
    """Loss, gradient, Hvp, GGN-vp, both Fishers and a vmapped Hvp of ``p`` at ``v``, in one program."""
    fmc = operators.fisher_mc_vp(p, jax.random.PRNGKey(3))
    vs = jnp.stack([v, -2 * v, jnp.roll(v, 1)])  # vmapped: each chunk is fetched once for all columns
    return (operators.loss(p), operators.gradient(p), operators.hvp(p)(v), operators.ggn_vp(p)(v),
            operators.empirical_fisher_vp(p)(v), fmc(v), jax.vmap(operators.hvp(p))(vs))


@pytest.mark.parametrize("arch", [MLP, CNN], ids=["mlp", "cnn"])
def test_streamed_operators_equal_in_memory(arch):
    _, mem, st = pair(*arch)
    v = jnp.asarray(np.random.default_rng(2).normal(size=mem.dim), jnp.float32)
    for a, b in zip(jax.jit(lambda v: everything(st, v))(v), jax.jit(lambda v: everything(mem, v))(v)):
        close(a, b)


def test_streamed_lanczos_hutchinson_equal_in_memory():
    _, mem, st = pair(*MLP)
    key = jax.random.PRNGKey(4)

    def run(p):
        h = operators.hvp(p)
        return algorithms.lanczos(h, key, k=5).eigenvalues, algorithms.hutchinson(h, key, num_samples=16).estimates

    for a, b in zip(jax.jit(lambda: run(st))(), jax.jit(lambda: run(mem))()):
        close(a, b)


def test_streamed_approximations_equal_in_memory():
    """All six on the tanh MLP (DiagH with its residuals); the conv rules see the same chunks (exact below)."""
    spec, mem, st = pair(*MLP)
    key = jax.random.PRNGKey(5)
    run = lambda p: [fn(p, spec, key, 2) for fn in APPROXIMATIONS.values()]  # one program for the six
    s, m = jax.jit(lambda: run(st))(), jax.jit(lambda: run(mem))()
    assert len(jax.tree_util.tree_leaves(s)) == len(jax.tree_util.tree_leaves(m)) > 6
    for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(m)):
        close(a, b)


def test_streamed_exact_by_structure_equals_in_memory():
    spec, mem, st = pair(*CNN)
    close(ggn_by_structure(st, spec), ggn_by_structure(mem, spec))
    close(hessian_by_structure(st, spec), hessian_by_structure(mem, spec))


def test_streamed_program_never_holds_all_chunks():
    """The in-memory Hvp's program carries the data, (chunks, chunk, 5) inputs; the streamed one only the
    weights (chunks, chunk) and a host callback."""
    def program(n):
        _, mem, st = pair(*MLP, n=n, pool=n)
        v = jnp.zeros(mem.dim, jnp.float32)
        return [jax.jit(operators.hvp(p).matvec).lower(v).compile() for p in (st, mem)]

    (st_small, _), (st_big, mem_big) = program(160), program(1600)
    all_inputs = "f32[100,16,5]"
    assert all_inputs in mem_big.as_text() and all_inputs not in st_big.as_text()
    assert "callback" in st_big.as_text().lower()
    small, big = st_small.memory_analysis(), st_big.memory_analysis()
    if small is not None:  # the weights' copy grows with N (4 bytes a sample), nothing else
        assert big.argument_size_in_bytes == small.argument_size_in_bytes
        assert big.temp_size_in_bytes - small.temp_size_in_bytes <= 4 * (1600 - 160) + 1024


def test_stream_refuses_bad_inputs():
    x, y = np.zeros((10, 3), np.float32), np.zeros(10, np.int32)
    with pytest.raises(HessianApproxError, match="do not match"):
        streaming.stream_batches(x, y[:9])
    with pytest.raises(HessianApproxError, match="outside the 10 samples"):
        streaming.stream_batches(x, y, rows=np.array([0, 10]))
    with pytest.raises(HessianApproxError, match="empty"):
        streaming.stream_batches(x, y, rows=np.array([], np.int64))
    with pytest.raises(HessianApproxError, match="host numpy arrays"):
        streaming.stream_batches(jnp.asarray(x), y)
    x[3, 1] = np.inf
    with pytest.raises(HessianApproxError, match="NaN or Inf"):
        streaming.stream_batches(x, y, rows=np.arange(2, 5))
    streaming.stream_batches(x, y, rows=np.arange(4, 9))  # the bad row is not streamed
    for k in (0, 11, 2.5, True):
        with pytest.raises(HessianApproxError, match="hessian-samples"):
            streaming.subset_rows(10, k, seed=0)


def test_subset_rows_are_the_hessian_subsets_rows():
    from jax_impl.data import hessian_subset

    x = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    y = np.arange(100, dtype=np.int32)
    for k, seed in ((30, 7), (100, 0)):
        np.testing.assert_array_equal(y[streaming.subset_rows(100, k, seed)], hessian_subset(x, y, k, seed)[1])


# ---- the full training set against float64 ------------------------------------------------------
def mlp_hvp_float64(params, x, y, v, chunk=10000):
    """H v of the mean cross-entropy of a Dense-ReLU-Dense network, by hand in numpy float64.

    Forward z1 = x W1 + b1, a = relu(z1), z2 = a W2 + b2; gradient g2 = (softmax(z2) - onehot)/N;
    H v is the derivative of the gradient along v (the ReLU mask fixed), summed chunk by chunk.
    """
    (b1, w1), (b2, w2) = [(np.asarray(params[k]["bias"], np.float64), np.asarray(params[k]["kernel"], np.float64))
                          for k in ("Dense_0", "Dense_1")]
    (vb1, vw1), (vb2, vw2) = [(np.asarray(v[k]["bias"], np.float64), np.asarray(v[k]["kernel"], np.float64))
                              for k in ("Dense_0", "Dense_1")]
    n, out = len(x), {k: 0.0 for k in ("b1", "w1", "b2", "w2")}
    for s in range(0, n, chunk):
        xc, yc = x[s:s + chunk].astype(np.float64), y[s:s + chunk]
        z1 = xc @ w1 + b1
        m = (z1 > 0).astype(np.float64)
        a = z1 * m
        z2 = a @ w2 + b2
        p = np.exp(z2 - z2.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g2 = (p - np.eye(w2.shape[1])[yc]) / n
        da1 = (xc @ vw1 + vb1) * m  # tangent of a
        dz2 = da1 @ w2 + a @ vw2 + vb2
        dg2 = (p * dz2 - p * np.sum(p * dz2, axis=1, keepdims=True)) / n  # softmax's Jacobian
        dgz1 = (dg2 @ w2.T + g2 @ vw2.T) * m  # tangent of the gradient at z1
        out["w2"] = out["w2"] + da1.T @ g2 + a.T @ dg2
        out["b2"] = out["b2"] + dg2.sum(axis=0)
        out["w1"] = out["w1"] + xc.T @ dgz1
        out["b1"] = out["b1"] + dgz1.sum(axis=0)
    return ravel_pytree({"Dense_0": {"bias": out["b1"], "kernel": out["w1"]},
                         "Dense_1": {"bias": out["b2"], "kernel": out["w2"]}})[0]


def mlp_and_vector(d=784, h=10, c=10):
    arch = models.mlp(d, (h,), c, "relu")
    params = models.init_params(arch, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)),
                                    params)
    flat, unravel = ravel_pytree(params)
    v = jnp.asarray(np.random.default_rng(0).normal(size=flat.size), jnp.float32)
    return arch, params, v, unravel


def test_float64_reference_is_the_float64_hvp(x64):
    """The hand-written reference against JAX's Hvp in float64 (jvp of grad), on 300 random samples."""
    arch, params, v, unravel = mlp_and_vector(d=30, h=7, c=4)
    r = np.random.default_rng(3)
    x, y = r.normal(size=(300, 30)), r.integers(0, 4, 300)
    p64 = models.cast_params(params, jnp.float64)
    prob = operators.Problem(models.make_apply(arch), losses.cross_entropy, p64,
                             make_batches(x, y, 128, dtype=jnp.float64))
    got = operators.hvp(prob)(jnp.asarray(v, jnp.float64))
    ref = mlp_hvp_float64(params, x, y, unravel(v), chunk=77)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))


def test_full_mnist_hvp_streamed_against_float64(mnist_path):
    """All 60,000 MNIST images streamed through the default MLP's float32 Hvp, against float64 numpy.

    float32 sums of 1,000 samples a chunk, then of 60 chunks: rounding of order 10 eps ~ 1e-6 of ‖H v‖
    at most (measured: 1.8e-7). 1e-5 leaves a margin of 50 over the measurement and catches a lost or
    doubled chunk (1/60 = 1.7e-2) by three orders of magnitude.
    """
    from jax_impl.data import load_idx_dir

    ds = load_idx_dir(mnist_path)
    arch, params, v, unravel = mlp_and_vector()
    st = streaming.stream_batches(ds.x_train, ds.y_train, 1000, dtype=jnp.float32)
    prob = operators.Problem(models.make_apply(arch), losses.cross_entropy, params, st)
    assert st.num_samples == 60000 and st.x.shape == (60, 1000, 784)
    got = np.asarray(operators.hvp(prob).jit()(v), np.float64)
    ref = mlp_hvp_float64(params, ds.x_train, ds.y_train, unravel(np.asarray(v, np.float64)))
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err
