"""Seeded, jitted optax training of an Architecture on a Dataset."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl.errors import HessianApproxError, check_finite
from jax_impl.losses import get_loss
from hessian_approx.architecture import Architecture
from jax_impl.models import as_inputs, init_params, make_apply


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (Adam; the defaults give >90% MNIST test accuracy
    for the 784-10-10 ReLU network and >97% for the default CNN)."""

    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    loss: str = "cross_entropy"
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise HessianApproxError(
                f"training settings {dataclasses.asdict(self)} are invalid",
                "use epochs >= 1, batch_size >= 1 and learning_rate > 0",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise HessianApproxError(f"training seed {self.seed!r} is not an integer in 0..2**32-1",
                                     "pass a seed from 0 to 4294967295 (PRNG keys hold 32 bits)")


def accuracy(apply: Callable, params, x, y, batch_size: int = 10_000) -> float:
    """Fraction of ``x`` (N, *input_shape) whose argmax logit equals ``y`` (N,).

    ``x`` may also be flat rows (N, D) when ``apply`` comes from ``make_apply`` (reshaped
    to the architecture's input shape)."""
    if getattr(apply, "arch", None) is not None:
        x = as_inputs(apply.arch, x)
    fn = jax.jit(lambda p, xb: jnp.argmax(apply(p, xb), axis=-1))
    hits = sum(int(np.sum(np.asarray(fn(params, x[i:i + batch_size])) == y[i:i + batch_size]))
               for i in range(0, len(x), batch_size))
    return hits / len(x)


def train(arch: Architecture, x_train, y_train, config: TrainConfig = TrainConfig(),
          progress: Callable[[int, float], None] | None = None):
    """Train from a seeded initialization with Adam on mini-batches.

    Args:
      arch: the network.
      x_train: (N, *input_shape) float inputs (or flat rows of the same size); y_train: (N,) labels
        or (N, C) float targets (one-hot or real for mse, class probabilities for cross-entropy).
      config: hyper-parameters; ``config.seed`` fixes init and shuffling.
      progress: called as ``progress(epoch, mean_loss)`` after each epoch.
    Returns:
      (params, history) with history = {"loss": [per-epoch mean loss]}.
    """
    x_train = as_inputs(arch, x_train)
    check_finite("the training inputs", x_train)
    apply = make_apply(arch)
    ell = get_loss(config.loss)
    key = jax.random.PRNGKey(config.seed)
    init_key, shuffle_key = jax.random.split(key)
    params = init_params(arch, init_key)
    opt = optax.adam(config.learning_rate)
    opt_state = opt.init(params)
    x = jnp.asarray(x_train, jnp.float32)
    y_train = np.asarray(y_train)
    y = jnp.asarray(y_train, jnp.int32 if y_train.ndim == 1 else jnp.float32)  # labels, or (N, C) targets
    n = len(x)
    steps = n // config.batch_size
    if steps == 0:
        raise HessianApproxError(
            f"batch size {config.batch_size} exceeds the {n} training samples",
            "lower --batch-size",
        )

    def batch_loss(p, xb, yb):
        return jnp.mean(ell(apply(p, xb), yb))

    @jax.jit
    def epoch(carry, perm, x, y):  # the data are arguments: captured, XLA would embed them as constants
        def step(c, idx):
            p, s = c
            l, g = jax.value_and_grad(batch_loss)(p, x[idx], y[idx])
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), l

        batches = perm[: steps * config.batch_size].reshape(steps, config.batch_size)
        carry, losses = jax.lax.scan(step, carry, batches)
        return carry, jnp.mean(losses)

    history = {"loss": []}
    carry = (params, opt_state)
    for e in range(config.epochs):
        perm = jax.random.permutation(jax.random.fold_in(shuffle_key, e), n)
        carry, mean_loss = epoch(carry, perm, x, y)
        history["loss"].append(float(mean_loss))
        if not np.isfinite(history["loss"][-1]):
            raise HessianApproxError(
                f"training diverged at epoch {e + 1} (loss {history['loss'][-1]})",
                "lower --learning-rate",
            )
        if progress is not None:
            progress(e + 1, history["loss"][-1])
    return carry[0], history
