"""Small problems for the tests: tiny MLPs on random data, in float64 (CNNs and more: tests/cases.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl import losses, models, operators


def tiny_problem(hidden=(4,), activation="tanh", loss="cross_entropy", n=12, d=5, c=3,
                 chunk_size=1000, seed=0, dtype=jnp.float64):
    spec = models.mlp(d, hidden, c, activation)
    params = models.cast_params(models.init_params(spec, jax.random.PRNGKey(seed)), dtype)
    # perturb the zero biases so that no symmetry hides an error
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.sin(jnp.arange(a.size).reshape(a.shape) + 1.0), params)
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d))
    y = r.integers(0, c, n)
    batches = operators.make_batches(x, y, chunk_size, dtype=dtype)
    return spec, operators.Problem(models.make_apply(spec), losses.get_loss(loss), params, batches), x, y
