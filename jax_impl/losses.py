"""Per-sample output losses ell(logits, y) and their Hessians with respect to the logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_impl.errors import HessianApproxError


def cross_entropy(logits, labels):
    """Softmax cross-entropy per sample.

    Args:
      logits: (B, C).
      labels: (B,) integer classes.
    Returns:
      (B,) losses; their mean is torch's ``CrossEntropyLoss()``.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def mse(logits, labels):
    """Squared error against one-hot targets, averaged over the C outputs.

    Args:
      logits: (B, C).
      labels: (B,) integer classes (one-hot encoded here).
    Returns:
      (B,) losses; their mean is torch's ``MSELoss()`` (sum over N*C entries divided
      by N*C, no factor 1/2), BackPACK's convention.
    """
    target = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean((logits - target) ** 2, axis=-1)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def get_loss(name: str):
    """The per-sample loss called ``name``."""
    if name not in LOSSES:
        raise HessianApproxError(
            f"loss {name!r} is not supported", f"choose one of {', '.join(LOSSES)}"
        )
    return LOSSES[name]


def output_hessian(name: str, logits):
    """Closed-form Hessian of the per-sample loss w.r.t. the logits.

    Args:
      name: ``cross_entropy`` or ``mse``.
      logits: (B, C).
    Returns:
      (B, C, C): diag(p) - p pᵀ for cross-entropy (p = softmax), (2/C) I for MSE.
    """
    b, c = logits.shape
    if name == "cross_entropy":
        p = jax.nn.softmax(logits, axis=-1)
        return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    if name == "mse":
        return jnp.broadcast_to(2.0 / c * jnp.eye(c, dtype=logits.dtype), (b, c, c))
    get_loss(name)
    raise AssertionError(name)
