"""Declarative model specs (plain data) and their Flax builders."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.errors import HessianApproxError

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A sequential MLP: Dense -> activation -> ... -> Dense (logits).

    Plain data: it round-trips through ``to_dict``/``from_dict`` and JSON, so the
    PyTorch twin is built from the dict without importing JAX. The default is the
    study's network, 784-10-10 with ReLU (7,960 parameters).

    Attributes:
      input_dim: features per sample D (784 for MNIST, 64 for 8x8 digits).
      hidden: widths of the hidden layers.
      output_dim: number of logits C.
      activation: one of ``relu``, ``tanh``, ``sigmoid``.
    """

    input_dim: int = 784
    hidden: tuple[int, ...] = (10,)
    output_dim: int = 10
    activation: str = "relu"
    kind: str = "mlp"

    def __post_init__(self):
        try:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
            object.__setattr__(self, "input_dim", int(self.input_dim))
            object.__setattr__(self, "output_dim", int(self.output_dim))
        except (TypeError, ValueError):
            raise HessianApproxError(f"model widths {self.input_dim}, {self.hidden}, {self.output_dim} are not integers",
                                     "give integer widths") from None
        if self.kind != "mlp":
            raise HessianApproxError(
                f"model kind {self.kind!r} is not supported", "use kind 'mlp'"
            )
        if self.activation not in ACTIVATIONS:
            raise HessianApproxError(
                f"activation {self.activation!r} is not supported",
                f"choose one of {', '.join(ACTIVATIONS)}",
            )
        if min((self.input_dim, self.output_dim, *self.hidden)) < 1:
            raise HessianApproxError(
                f"layer widths {self.widths} must all be positive", "fix --hidden"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """(D, h_1, ..., h_L, C)."""
        return (self.input_dim, *self.hidden, self.output_dim)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Flax names of the Dense layers, input to output."""
        return tuple(f"Dense_{i}" for i in range(len(self.widths) - 1))

    @property
    def num_params(self) -> int:
        w = self.widths
        return sum(a * b + b for a, b in zip(w[:-1], w[1:]))

    def describe(self) -> str:
        """Short human name, e.g. ``mlp 784-10-10 relu``."""
        return f"{self.kind} {'-'.join(map(str, self.widths))} {self.activation}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            return cls(**d)
        except (TypeError, ValueError) as err:
            raise HessianApproxError(
                f"model spec {d!r} is malformed ({err})",
                "write it as produced by ModelSpec.to_dict()",
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        return cls.from_dict(json.loads(text))


class MLP(nn.Module):
    """Flax MLP built from a ModelSpec. Input (B, D) -> logits (B, C)."""

    spec: ModelSpec

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.spec.activation]
        for i, width in enumerate(self.spec.widths[1:]):
            x = nn.Dense(width, name=f"Dense_{i}", param_dtype=x.dtype)(x)
            if i < len(self.spec.hidden):
                x = act(x)
        return x


def build(spec: ModelSpec) -> MLP:
    """The Flax module for ``spec``."""
    return MLP(spec)


def init_params(spec: ModelSpec, key: jax.Array, dtype=jnp.float32) -> dict:
    """Initial parameters {layer: {kernel (in, out), bias (out,)}} (Flax defaults)."""
    x = jnp.zeros((1, spec.input_dim), dtype)
    return build(spec).init(key, x)["params"]


def make_apply(spec: ModelSpec):
    """``apply(params, x) -> logits``: x (B, D) -> (B, C), params as from init_params."""
    module = build(spec)

    def apply(params, x):
        return module.apply({"params": params}, x)

    return apply


def cast_params(params, dtype):
    """Cast every leaf of a parameter tree to ``dtype``."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Expected {"Dense_i/kernel": (in, out), "Dense_i/bias": (out,)} for ``spec``."""
    shapes = {}
    for name, (a, b) in zip(spec.layer_names, zip(spec.widths[:-1], spec.widths[1:])):
        shapes[f"{name}/kernel"] = (a, b)
        shapes[f"{name}/bias"] = (b,)
    return shapes


def flatten_tree(params) -> dict[str, np.ndarray]:
    """{"Dense_0/kernel": array, ...} from a nested parameter dict."""
    out = {}
    for layer, leaves in params.items():
        for leaf, value in leaves.items():
            out[f"{layer}/{leaf}"] = np.asarray(value)
    return out


def unflatten_tree(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of flatten_tree."""
    tree: dict = {}
    for key, value in flat.items():
        layer, leaf = key.split("/")
        tree.setdefault(layer, {})[leaf] = jnp.asarray(value)
    return tree
