"""The one registry of test cases (architectures x activations x losses), shared by the operator,
approximation and cross-framework tests, MLP and CNN alike.

Every case is small enough for dense float64 references (d <= ~400) and its inputs have a
zero background (about half the pixels exactly 0), so max-pool windows after a convolution
hold tied maxima, as MNIST's do.

Use ``CASES_ALL`` (all combinations) or ``CASES`` (each architecture x activation once, the
losses alternating) as pytest params with readable ids (``params()``), or pick by name with
``case("cnn-max", "relu", "mse")``. JAX-side helpers import JAX lazily so that torch-only
tests can use the registry without it.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from hessian_approx.architecture import Architecture, parse

# name -> (string form with {act} for the activation, per-sample input shape)
ARCHITECTURES = {
    "mlp": ("dense5-{act}-dense3", (6,)),
    "mlp2": ("dense4-{act}-dense4-{act}-dense3", (5,)),
    "cnn-max": ("conv3k3-{act}-maxpool2-conv4k2-{act}-flatten-dense3", (7, 7, 2)),
    "cnn-avg": ("conv3k3s2p1-{act}-avgpool2-flatten-dense3", (8, 8, 1)),
    "cnn-same": ("conv2k3same-{act}-maxpool2s1-flatten-dense3", (5, 5, 1)),
}
ACTIVATIONS = ("relu", "tanh", "sigmoid")
LOSSES = ("cross_entropy", "mse")


@dataclasses.dataclass(frozen=True)
class Case:
    """One architecture with one activation and one loss, on ``n`` seeded samples."""

    arch_name: str
    activation: str
    loss: str
    n: int = 6
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.arch_name}-{self.activation}-{self.loss}"

    @property
    def arch(self) -> Architecture:
        text, shape = ARCHITECTURES[self.arch_name]
        return parse(text.format(act=self.activation), shape)

    @property
    def is_cnn(self) -> bool:
        return not self.arch.is_mlp

    def data(self, n: int | None = None):
        """(x (n, *input_shape) float64 with ~half exact zeros, y (n,) int labels)."""
        n = self.n if n is None else n
        r = np.random.default_rng(self.seed)
        shape = (n, *self.arch.input_shape)
        x = np.where(r.random(shape) < 0.5, 0.0, r.normal(size=shape))
        y = r.integers(0, self.arch.num_classes, n)
        return x, y

    def params(self, dtype="float64"):
        """Flax initial parameters (seeded), biases and kernels perturbed so no symmetry hides an error.

        A fresh tree each call (the arrays are shared and immutable), so tests may edit it.
        float64 needs 64-bit JAX (the ``x64`` fixture): without it the arrays would silently be
        float32, so that is an error here.
        """
        import jax

        dtype = np.dtype(dtype).name
        x64 = bool(jax.config.jax_enable_x64)
        if np.dtype(dtype).itemsize > 4 and not x64:
            raise RuntimeError(f"case {self.id}: {dtype} parameters need 64-bit JAX (use the x64 fixture)")
        return jax.tree_util.tree_map(lambda a: a, _init(self.arch, self.seed, dtype, x64))

    def problem(self, dtype="float64", chunk_size: int = 1000, n: int | None = None):
        """operators.Problem on this case's data and parameters."""
        from jax_impl import losses, models, operators

        x, y = self.data(n)
        batches = operators.make_batches(x, y, chunk_size, dtype=dtype)
        return operators.Problem(models.make_apply(self.arch), losses.get_loss(self.loss),
                                 self.params(dtype), batches)


@functools.lru_cache(maxsize=None)
def _init(arch, seed, dtype, x64):
    """Keyed on the 64-bit JAX state ``x64`` too: float32 parameters made with it on round differently."""
    import jax
    import jax.numpy as jnp

    from jax_impl import models

    def make():
        params = models.cast_params(models.init_params(arch, jax.random.PRNGKey(seed)), dtype)
        return jax.tree_util.tree_map(
            lambda a: a + 0.1 * jnp.sin(jnp.arange(a.size).reshape(a.shape) + 1.0).astype(a.dtype), params)

    return jax.jit(make)()  # jitted: eager Flax initialization took 5-7 s per architecture


CASES_ALL = [Case(a, act, loss) for a in ARCHITECTURES for act in ACTIVATIONS for loss in LOSSES]
# Every architecture with every activation, the losses alternating: each pair and each loss
# covered at half the cost of CASES_ALL (for the slower dense-matrix tests).
CASES = [Case(a, act, LOSSES[i % 2])
         for i, (a, act) in enumerate((a, act) for a in ARCHITECTURES for act in ACTIVATIONS)]


def case(arch_name: str, activation: str = "relu", loss: str = "cross_entropy", **kw) -> Case:
    return Case(arch_name, activation, loss, **kw)


def params(cases=None):
    """pytest.param list with readable ids, for ``@pytest.mark.parametrize("c", params())``."""
    import pytest

    return [pytest.param(c, id=c.id) for c in (CASES if cases is None else cases)]
