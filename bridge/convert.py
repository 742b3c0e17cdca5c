"""Flax parameters <-> the torch twin's state_dict, by one layout rule per parameterized layer kind.

Layer ``p`` of ``arch.param_layers`` (Flax name ``p.name``, torch Sequential index ``p.index``):

    Flax  params[p.name]["kernel"]  <->  torch state_dict[f"{p.index}.weight"]   (LAYOUT_RULES[kind])
    Flax  params[p.name]["bias"]    <->  torch state_dict[f"{p.index}.bias"]     (out,), as is

Rules (``LAYOUT_RULES``):

- dense: kernel (in, out) -> weight (out, in) = kernelᵀ. For a Dense fed by a Flatten
  (``p.flat_from = (H, W, C)``) the kernel's rows are in Flax's NHWC flattening order
  (h, w, c) and torch's weight columns in NCHW order (c, h, w), so the rows are permuted
  too: ``kernel.reshape(H, W, C, out).transpose(2, 0, 1, 3).reshape(-1, out).T``.
- conv2d: kernel HWIO (kh, kw, in, out) -> weight OIHW (out, in, kh, kw).

Each rule only moves entries (transposes and reshapes, copied C-contiguous), so round trips
are bitwise exact in every dtype, and ``bridge.permutation`` derives the flat-order
permutation by pushing index arrays through the same rules. Imports only numpy and the
framework-free description at import time (torch inside the functions that need it, never jax).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from hessian_approx.architecture import Architecture, ParamLayer, coerce
from hessian_approx.errors import HessianApproxError

LEAVES = ("kernel", "bias")  # Flax leaves of every parameterized kind
TORCH_LEAVES = ("weight", "bias")  # their torch names, in model.parameters() order


@dataclasses.dataclass(frozen=True)
class LayoutRule:
    """The Flax kernel <-> torch weight layout of one layer kind (biases are (out,) in both).

    Attributes:
      weight_shape: ParamLayer -> torch weight shape.
      to_torch: (ParamLayer, kernel in the Flax shape) -> weight in the torch shape.
      to_flax: (ParamLayer, weight) -> kernel; the inverse of ``to_torch``.
    Both maps only move entries, so they work on any array, index arrays included.
    """

    weight_shape: Callable[[ParamLayer], tuple]
    to_torch: Callable[[ParamLayer, np.ndarray], np.ndarray]
    to_flax: Callable[[ParamLayer, np.ndarray], np.ndarray]


def _dense_to_torch(p: ParamLayer, kernel: np.ndarray) -> np.ndarray:
    """kernel (in, out), rows (h, w, c) after a Flatten -> weight (out, in), columns (c, h, w)."""
    if p.flat_from is not None:
        h, w, c = p.flat_from
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    return np.ascontiguousarray(kernel.T)


def _dense_to_flax(p: ParamLayer, weight: np.ndarray) -> np.ndarray:
    """weight (out, in) -> kernel (in, out); the inverse of ``_dense_to_torch``."""
    kernel = weight.T
    if p.flat_from is not None:
        h, w, c = p.flat_from
        kernel = kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
    return np.ascontiguousarray(kernel)


LAYOUT_RULES: dict[str, LayoutRule] = {
    "dense": LayoutRule(
        weight_shape=lambda p: tuple(p.shapes["kernel"][::-1]),
        to_torch=_dense_to_torch,
        to_flax=_dense_to_flax,
    ),
    "conv2d": LayoutRule(  # HWIO (kh, kw, in, out) <-> OIHW (out, in, kh, kw)
        weight_shape=lambda p: tuple(p.shapes["kernel"][i] for i in (3, 2, 0, 1)),
        to_torch=lambda p, kernel: np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)),
        to_flax=lambda p, weight: np.ascontiguousarray(weight.transpose(2, 3, 1, 0)),
    ),
}


architecture = coerce  # an Architecture from itself or its dict (hessian_approx.architecture.coerce)


def rule(p: ParamLayer) -> LayoutRule:
    """The layout rule of a parameter layer's kind (a one-line error for a kind without one)."""
    if p.layer.kind not in LAYOUT_RULES:
        raise HessianApproxError(f"layer {p.name} ({p.layer.kind}) has no Flax/torch layout rule",
                                 f"use layers of kinds {', '.join(LAYOUT_RULES)} for the torch twin")
    return LAYOUT_RULES[p.layer.kind]


def torch_key(p: ParamLayer, leaf: str) -> str:
    """State-dict key of a parameter layer's ``leaf`` ("weight" or "bias"): "{p.index}.{leaf}"."""
    return f"{p.index}.{leaf}"


def torch_shapes(p: ParamLayer) -> dict[str, tuple]:
    """{"weight": torch weight shape, "bias": (out,)} of a parameter layer."""
    return {"weight": tuple(rule(p).weight_shape(p)), "bias": tuple(p.shapes["bias"])}


def _to_numpy(value) -> np.ndarray:
    """A numpy copy of a numpy/jax array or a torch tensor (detached, on the CPU)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        try:
            return value.numpy().copy()
        except TypeError:  # e.g. bfloat16 has no numpy dtype: refused, never cast silently
            raise HessianApproxError(f"a tensor of dtype {value.dtype} has no numpy dtype",
                                     "cast the weights to float32 or float64 first") from None
    return np.array(value, copy=True)


def _check_shape(what: str, value: np.ndarray, expected: tuple, fix: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise HessianApproxError(f"{what} has shape {tuple(value.shape)}, expected {tuple(expected)}", fix)


def _flax_leaves(params, p: ParamLayer, fix: str) -> dict[str, np.ndarray]:
    """{"kernel", "bias"} of layer ``p`` from a Flax tree, checked against its shapes."""
    want = f"kernel {p.shapes['kernel']} and bias {p.shapes['bias']}"
    if p.name not in params:
        raise HessianApproxError(f"Flax parameters lack layer {p.name!r} (expected {want})", fix)
    leaves = params[p.name]
    if not isinstance(leaves, Mapping):
        raise HessianApproxError(f"Flax layer {p.name!r} is a {type(leaves).__name__}, not a dict of leaves", fix)
    extra = sorted(set(leaves) - set(LEAVES))
    if extra:
        raise HessianApproxError(f"Flax layer {p.name!r} holds {extra[0]!r}; a {p.layer.kind} layer has only {want}",
                                 fix)
    out = {}
    for leaf in LEAVES:
        if leaf not in leaves:
            raise HessianApproxError(f"Flax layer {p.name!r} lacks {leaf!r} (expected shape {p.shapes[leaf]})", fix)
        out[leaf] = _to_numpy(leaves[leaf])
        _check_shape(f"Flax {p.name}/{leaf}", out[leaf], p.shapes[leaf], fix)
    return out


def flax_to_torch(params, arch) -> dict[str, np.ndarray]:
    """The torch twin's state_dict, as numpy, from a Flax parameter tree.

    Args:
      params: {"Conv_0": {"kernel": (kh, kw, in, out), "bias": (out,)}, "Dense_0": {"kernel":
        (in, out), "bias"}, ...} (numpy or jax leaves, dict or FrozenDict; any dtype, integer
        index arrays included).
      arch: the Architecture, or its dict.
    Returns:
      {"{i}.weight": torch layout, "{i}.bias": (out,), ...} in network order (= the order of
      ``model.parameters()``), C-contiguous numpy arrays in the dtype of the leaves.
    Raises:
      HessianApproxError naming the layer/leaf and the expected shape when the tree does not
      match the architecture (missing or extra layer or leaf, wrong shape).
    """
    arch = architecture(arch)
    if not isinstance(params, Mapping):
        raise HessianApproxError(f"the Flax parameters are a {type(params).__name__}, not a dict of layers",
                                 "pass the tree {'Dense_0': {'kernel', 'bias'}, ...} (e.g. from init_params)")
    fix = f"pass parameters of the model {arch.to_string()!r}"
    extra = sorted(set(params) - set(arch.layer_names))
    if extra:
        raise HessianApproxError(
            f"Flax parameters hold layer {extra[0]!r} that the architecture's {list(arch.layer_names)} lack", fix)
    out: dict[str, np.ndarray] = {}
    for p in arch.param_layers:
        leaves = _flax_leaves(params, p, fix)
        out[torch_key(p, "weight")] = rule(p).to_torch(p, leaves["kernel"])
        out[torch_key(p, "bias")] = np.ascontiguousarray(leaves["bias"])
    return out


def torch_to_flax(state_dict, arch) -> dict[str, dict[str, np.ndarray]]:
    """A Flax parameter tree (numpy leaves) from the torch twin's state_dict.

    Args:
      state_dict: {"{i}.weight", "{i}.bias", ...} of torch tensors or numpy arrays (e.g.
        ``model.state_dict()`` or the output of ``flax_to_torch``).
      arch: the Architecture, or its dict.
    Returns:
      {name: {"bias": (out,), "kernel": Flax shape}, ...} in network order, C-contiguous numpy
      leaves in the dtype of the tensors. For JAX arrays pass it through
      ``jax_impl.models.unflatten_tree`` (or ``jax.tree.map(jnp.asarray, tree)``).
    Raises:
      HessianApproxError naming the key, its layer and the expected shape when the state_dict
      does not match the architecture (missing or extra key, wrong shape).
    """
    arch = architecture(arch)
    if not isinstance(state_dict, Mapping):
        raise HessianApproxError(f"the torch state_dict is a {type(state_dict).__name__}, not a dict",
                                 "pass model.state_dict()")
    fix = "pass the state_dict of the torch twin of this architecture (torch_ref.models.build_twin)"
    expected = {torch_key(p, leaf): (p, s) for p in arch.param_layers for leaf, s in torch_shapes(p).items()}
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise HessianApproxError(f"torch state_dict holds {extra[0]!r}, which the twin of {arch.to_string()!r} "
                                 f"lacks (expected keys {list(expected)})", fix)
    tree: dict[str, dict[str, np.ndarray]] = {}
    for p in arch.param_layers:
        arrays = {}
        for leaf, shape in torch_shapes(p).items():
            key = torch_key(p, leaf)
            if key not in state_dict:
                raise HessianApproxError(f"torch state_dict lacks {key!r} (layer {p.name}, expected shape {shape})", fix)
            arrays[leaf] = _to_numpy(state_dict[key])
            _check_shape(f"torch {key} (layer {p.name})", arrays[leaf], shape, fix)
        tree[p.name] = {"bias": np.ascontiguousarray(arrays["bias"]), "kernel": rule(p).to_flax(p, arrays["weight"])}
    return tree


def _describe(module) -> str:
    """One line: "Conv2d(2, 3, kernel_size=(3, 3), stride=(1, 1))"."""
    return f"{type(module).__name__}({module.extra_repr()})"


_PAIRS = ("kernel_size", "stride", "padding", "dilation")


def _config(module) -> tuple:
    """A module's type and public configuration, ints of window-like fields as pairs, bias presence."""
    cfg = {k: v for k, v in vars(module).items()
           if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, tuple, type(None)))}
    for k in _PAIRS:
        if isinstance(cfg.get(k), int):
            cfg[k] = (cfg[k], cfg[k])
    if "bias" in module._parameters:
        cfg["bias"] = module.bias is not None
    return type(module), sorted(cfg.items())


def check_twin(model, arch) -> None:
    """Raise HessianApproxError unless ``model`` has the torch twin's structure for ``arch``.

    The twin is ``torch_ref.models.build_twin(arch)``: an ``nn.Sequential`` with one module per
    layer. Each module must have the expected type and configuration (in/out sizes, kernel,
    stride, padding, window, bias); the message names the Sequential index, what was found, what
    was expected and, for a parameter layer, its Flax name and torch shapes.
    """
    import torch
    from torch import nn

    from torch_ref.models import twin_layer

    arch = architecture(arch)
    fix = "build the model with torch_ref.models.build_twin(arch)"
    if not isinstance(model, nn.Sequential):
        raise HessianApproxError(f"the torch model is a {type(model).__name__}, not an nn.Sequential twin", fix)
    names = {p.index: p for p in arch.param_layers}
    children = list(model.named_children())
    for i, (layer, shape) in enumerate(zip(arch.layers, arch.shapes)):
        with torch.device("meta"):  # the module's configuration only, no memory or initialization
            expected = twin_layer(layer, shape)
        if i >= len(children):
            raise HessianApproxError(f"torch model has {len(children)} modules but {arch.to_string()!r} needs "
                                     f"{len(arch.layers)}: it lacks layer {i} ({_describe(expected)})", fix)
        key, found = children[i]
        if _config(found) != _config(expected):
            what = "an unsupported " if type(found) is not type(expected) else ""
            p = names.get(i)
            detail = "" if p is None else (f" for Flax {p.name} (weight {torch_shapes(p)['weight']}, "
                                           f"bias {torch_shapes(p)['bias']})")
            raise HessianApproxError(f"torch layer {key} is {what}{_describe(found)}; expected "
                                     f"{_describe(expected)}{detail}", fix)
    if len(children) > len(arch.layers):
        key, found = children[len(arch.layers)]
        raise HessianApproxError(f"torch model has an extra layer {key} ({_describe(found)}) after the last of "
                                 f"the {len(arch.layers)} layers of {arch.to_string()!r}", fix)


def load_into_torch(model, params, arch):
    """Copy Flax ``params`` into the torch twin ``model`` in place; returns ``model``.

    Args:
      model: the ``nn.Sequential`` twin (torch_ref.models.build_twin); its dtype and device are
        kept (values are cast by ``Tensor.copy_``).
      params: Flax tree {"Conv_0": {"kernel", "bias"}, "Dense_0": ...} (numpy or jax leaves).
      arch: the Architecture, or its dict.
    Raises:
      HessianApproxError naming the layer when the model or the tree does not match ``arch``.
    """
    import torch

    check_twin(model, arch)
    state = flax_to_torch(params, arch)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            named[key].copy_(torch.from_numpy(value))
    return model


def state_dict_from_torch(model, arch) -> dict[str, np.ndarray]:
    """The twin's parameters as a numpy state_dict {"{i}.weight": torch layout, ...}, after ``check_twin``."""
    check_twin(model, arch)
    return {k: _to_numpy(v) for k, v in model.state_dict().items()}
