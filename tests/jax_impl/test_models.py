"""ModelSpec: defaults, validation, serialization and the Flax builder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import models
from jax_impl.errors import HessianApproxError


def test_default_is_the_study_network():
    spec = models.ModelSpec()
    assert spec.describe() == "mlp 784-10-10 relu"
    assert spec.num_params == 7960 == 784 * 10 + 10 + 10 * 10 + 10
    params = models.init_params(spec, jax.random.PRNGKey(0))
    assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 7960


@pytest.mark.parametrize("act,fn", [("relu", lambda z: np.maximum(z, 0)), ("tanh", np.tanh),
                                     ("sigmoid", lambda z: 1 / (1 + np.exp(-z)))])
def test_apply_matches_numpy_forward(act, fn, rng):
    spec = models.ModelSpec(input_dim=5, hidden=(4, 3), output_dim=2, activation=act)
    params = models.init_params(spec, jax.random.PRNGKey(1), jnp.float64)
    x = rng.normal(size=(7, 5))
    h = x
    for i in range(3):
        p = params[f"Dense_{i}"]
        h = h @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
        if i < 2:
            h = fn(h)
    np.testing.assert_allclose(models.make_apply(spec)(params, jnp.asarray(x)), h, rtol=1e-12)


def test_spec_round_trips_and_validates():
    spec = models.ModelSpec(input_dim=64, hidden=(32, 16), activation="tanh")
    assert models.ModelSpec.from_json(spec.to_json()) == spec
    assert models.param_shapes(spec)["Dense_1/kernel"] == (32, 16)
    with pytest.raises(HessianApproxError, match="activation 'gelu'.*relu, tanh, sigmoid"):
        models.ModelSpec(activation="gelu")
    with pytest.raises(HessianApproxError, match="kind 'cnn'"):
        models.ModelSpec(kind="cnn")
    with pytest.raises(HessianApproxError, match="malformed"):
        models.ModelSpec.from_dict({"widths": [1, 2]})
