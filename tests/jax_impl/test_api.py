"""The front door (jax_impl.api): any Flax model or apply function, dtypes that follow the parameters.

References are independent of the operators under test: ``jax.hessian`` of the plain mean loss
(float64, where matvec-built and autodiff-built matrices agree to rounding, ~1e-14 relative;
1e-10 leaves room for the summation order of chunks) and dense ``numpy.linalg.eigvalsh``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jax_impl as ha
from hessian_approx.architecture import mlp
from jax_impl import losses, models, operators
from jax_impl.errors import HessianApproxError

TOL = 1e-10


class ResidualLayerNorm(nn.Module):
    """Dense -> LayerNorm -> tanh with a residual connection, then a Dense head."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)
        h = h + jnp.tanh(nn.LayerNorm()(nn.Dense(6)(h)))
        return nn.Dense(3)(h)


class TinyAttention(nn.Module):
    """Token embedding, one self-attention head with a residual, mean pooling, a Dense head."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(7, 4)(tokens)  # (B, T, 4)
        h = h + nn.SelfAttention(num_heads=1, qkv_features=4, deterministic=True)(h)
        return nn.Dense(3)(jnp.mean(h, axis=1))


def _reference(apply, params, x, y, ell):
    """jax.hessian of the plain mean loss, flat (d, d), and its flat parameters.

    Jitted: one compilation instead of eager op-by-op dispatch (13 s for the attention model);
    the same autodiff, equal to the eager result to ~1e-16 relative."""
    flat, unravel = ravel_pytree(params)
    f = lambda t: jnp.mean(ell(apply(unravel(t), x), y))
    return np.asarray(jax.jit(jax.hessian(f))(flat)), flat


@functools.lru_cache(maxsize=None)
def _model_case(which):
    """(module, float64 variables, x, y); built once per model (callers run under x64, do not mutate)."""
    rng = np.random.default_rng(0)
    if which == "layernorm":
        module, x = ResidualLayerNorm(), rng.standard_normal((24, 5))
    else:
        module, x = TinyAttention(), rng.integers(0, 7, size=(24, 5))
    params = jax.jit(module.init)(jax.random.PRNGKey(1), jnp.asarray(x))  # jitted: eager init took ~3 s
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    return module, params, x, rng.integers(0, 3, size=24)


@pytest.mark.parametrize("which", ["layernorm", "attention"])
def test_matrix_free_methods_on_models_outside_the_description(x64, which):
    module, variables, x, y = _model_case(which)
    H = ha.hessian(module, variables, (x, y), chunk_size=7)  # 24 = 3 full chunks + a padded one
    apply = lambda p, xx: module.apply({"params": p}, xx)
    ref, _ = _reference(apply, variables["params"], jnp.asarray(x), jnp.asarray(y), losses.cross_entropy)
    v = np.random.default_rng(1).standard_normal(H.dim)
    np.testing.assert_allclose(H.hvp(v), ref @ v, rtol=TOL, atol=TOL * np.abs(ref).max())
    exact = np.sort(np.linalg.eigvalsh(ref))[::-1]
    top = H.eigenvalues(k=5, num_steps=H.dim)  # a full Krylov space: exact up to rounding
    np.testing.assert_allclose(top.eigenvalues, exact[:5], rtol=1e-8, atol=1e-10 * abs(exact[0]))
    # Hutchinson: within 5 standard errors of the exact trace. 320 = 10 batches of hutchinson's default 32
    # probes (300 compiled a second, remainder batch of 12 too: ~2 s; the remainder has its own tests)
    tr = H.trace(num_samples=320)
    assert abs(float(tr.trace) - np.trace(ref)) < 5 * float(tr.stderr)
    assert H.trace(method="exact") == pytest.approx(np.trace(ref), rel=TOL)


def test_structured_methods_refuse_a_model_outside_the_description_naming_the_layer(x64):
    module, variables, x, y = _model_case("layernorm")
    H = ha.hessian(module, variables, (x, y))
    with pytest.raises(HessianApproxError, match="LayerNorm_0") as err:
        H.approximation("kfac")
    assert "\n" not in str(err.value)


def test_every_array_is_float64_for_float64_parameters(x64):
    arch = mlp(4, (3,), 3, "tanh")
    params = models.init_params(arch, jax.random.PRNGKey(0), jnp.float64)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 4)).astype(np.float32), rng.integers(0, 3, 10)  # float32 data
    H = ha.hessian(arch, params, (x, y))
    out = {
        "loss": H.loss(), "gradient": H.gradient(), "hvp": H.hvp(np.ones(H.dim)),
        "hvp(pytree)": H.hvp(params), "dense": H.dense(),
        "density": H.density(num_steps=10, num_bins=50),
        "trace(exact)": np.float64(H.trace(method="exact")),
        "diagonal(exact)": H.diagonal(), "diagonal(diag-h)": H.diagonal("diag-h"),
        "ggn": ha.ggn(arch, params, (x, y)).dense(),
    }
    for method in ("lanczos", "power", "exact"):
        out[f"eigenvalues({method})"] = H.eigenvalues(k=2, method=method, max_iter=5)
    for method in ("hutchinson", "pyhessian"):
        out[f"trace({method})"] = H.trace(num_samples=5, method=method)
    out["diagonal(hutchinson)"] = H.diagonal("hutchinson", num_samples=5)
    out["sharded_batches"] = ha_sharded = __import__("jax_impl.sharding", fromlist=["x"]).sharded_batches(
        x, y, dtype=np.float64)
    assert ha_sharded.x.dtype == jnp.float64
    for name, value in out.items():
        for leaf in jax.tree_util.tree_leaves(value):
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                assert jnp.asarray(leaf).dtype == jnp.float64, name


def test_float32_parameters_compute_in_float32():
    arch = mlp(4, (3,), 3, "relu")
    params = models.init_params(arch, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    H = ha.hessian(arch, params, (rng.standard_normal((10, 4)), rng.integers(0, 3, 10)))  # float64 data
    assert H.dtype == np.float32 and H.eigenvalues(k=2).eigenvalues.dtype == jnp.float32


def test_float64_parameters_without_64bit_jax_are_refused():
    arch = mlp(4, (3,), 3, "relu")
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                    models.init_params(arch, jax.random.PRNGKey(0)))
    with pytest.raises(HessianApproxError, match="64-bit JAX is off"):
        ha.hessian(arch, params, (np.zeros((2, 4)), np.zeros(2, int)))


def test_mixed_parameter_dtypes_are_a_one_line_error(x64):
    arch = mlp(4, (3,), 3, "relu")
    params = models.init_params(arch, jax.random.PRNGKey(0), jnp.float64)
    params["Dense_1"]["bias"] = params["Dense_1"]["bias"].astype(jnp.float32)
    with pytest.raises(HessianApproxError, match="mix dtypes.*Dense_1.*bias") as err:
        ha.hessian(arch, params, (np.zeros((2, 4)), np.zeros(2, int)))
    assert "\n" not in str(err.value)


def test_data_of_another_dtype_than_the_problem_is_refused(x64):
    arch = mlp(4, (3,), 3, "relu")
    params = models.init_params(arch, jax.random.PRNGKey(0), jnp.float64)
    batches = operators.make_batches(np.zeros((2, 4)), np.zeros(2, int))  # float32 by default
    with pytest.raises(HessianApproxError, match="parameters are float64 but the sample weights are float32"):
        operators.Problem(models.make_apply(arch), losses.cross_entropy, params, batches)


def test_an_iterable_of_batches_gives_the_same_operator_as_arrays(x64):
    arch = mlp(4, (3,), 3, "tanh")
    params = models.init_params(arch, jax.random.PRNGKey(0), jnp.float64)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((11, 4)), rng.integers(0, 3, 11)
    whole = ha.hessian(arch, params, (x, y)).dense()
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 11, 4)]  # batches of 4, 4, 3
    np.testing.assert_allclose(ha.hessian(arch, params, iter(loader)).dense(), whole, rtol=TOL, atol=1e-14)


@pytest.mark.parametrize("targets", ["one-hot", "real"])
def test_mse_with_float_targets_against_jax_hessian(x64, targets):
    arch = mlp(4, (5,), 3, "sigmoid")
    params = models.init_params(arch, jax.random.PRNGKey(3), jnp.float64)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 4))
    y = np.eye(3)[rng.integers(0, 3, 9)] if targets == "one-hot" else rng.standard_normal((9, 3))
    H = ha.hessian(arch, params, (x, y), loss="mse")
    ref, _ = _reference(models.make_apply(arch), params, jnp.asarray(x), jnp.asarray(y), losses.mse)
    np.testing.assert_allclose(H.dense(), ref, rtol=TOL, atol=TOL * np.abs(ref).max())


def test_a_user_per_sample_loss(x64):
    arch = mlp(4, (3,), 2, "tanh")
    params = models.init_params(arch, jax.random.PRNGKey(4), jnp.float64)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    huber = lambda out, t: jnp.sum(jnp.sqrt(1 + (out - t) ** 2) - 1, axis=-1)
    H = ha.hessian(arch, params, (x, y), loss=huber)
    ref, _ = _reference(models.make_apply(arch), params, jnp.asarray(x), jnp.asarray(y), huber)
    np.testing.assert_allclose(H.dense(), ref, rtol=TOL, atol=TOL * np.abs(ref).max())
    assert not ha.ggn(arch, params, (x, y), loss=huber).operator.psd  # unknown convexity: not flagged
    assert ha.ggn(arch, params, (x, y), loss="mse").operator.psd and not H.operator.psd
