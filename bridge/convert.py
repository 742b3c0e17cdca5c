"""Parameter conversion between the Flax MLP (kernel (in, out)) and its torch twin (weight (out, in)).

Layout of one Dense layer i, Flax name ``Dense_i``, torch ``nn.Linear`` at Sequential index 2*i:

    Flax  params["Dense_i"]["kernel"] (in, out)   <->  torch state_dict["{2i}.weight"] (out, in)
    Flax  params["Dense_i"]["bias"]   (out,)      <->  torch state_dict["{2i}.bias"]   (out,)

The conversion is a transpose (copied, C-contiguous) and nothing else, so the round trip is
bitwise exact in every dtype. This module imports only numpy at import time (torch inside the
functions that need it, never jax), so ``bridge.weights`` can use it without JAX.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jax_impl.errors import HessianApproxError

_ACTIVATION_CLASSES = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}  # torch.nn class names


def spec_dict(spec) -> dict[str, Any]:
    """A ModelSpec, or its dict, as a plain dict ``{"input_dim", "hidden", "output_dim", "activation", "kind"}``."""
    if hasattr(spec, "to_dict"):
        return dict(spec.to_dict())
    if isinstance(spec, Mapping):
        d = dict(spec)
        if "hidden" in d:
            d["hidden"] = list(d["hidden"])
        return d
    raise HessianApproxError(f"model spec {spec!r} is neither a ModelSpec nor a dict",
                             "pass a ModelSpec or ModelSpec.to_dict()")


def layer_dims(spec) -> list[tuple[str, int, int]]:
    """[(Flax name "Dense_i", in_features, out_features), ...] in network order, for a spec or its dict."""
    d = spec_dict(spec)
    kind = d.get("kind", "mlp")
    if kind != "mlp":
        raise HessianApproxError(f"model kind {kind!r} is not supported by the bridge", "use kind 'mlp'")
    missing = [k for k in ("input_dim", "output_dim") if k not in d]
    if missing:
        raise HessianApproxError(f"model spec {d!r} lacks {', '.join(missing)}",
                                 "pass the dict produced by ModelSpec.to_dict()")
    try:
        widths = (int(d["input_dim"]), *(int(h) for h in d.get("hidden", ())), int(d["output_dim"]))
    except (TypeError, ValueError):
        raise HessianApproxError(f"model spec {d!r} has non-integer widths",
                                 "give input_dim, hidden and output_dim as integers") from None
    if min(widths) < 1:
        raise HessianApproxError(f"layer widths {widths} must all be positive", "fix the spec's widths")
    return [(f"Dense_{i}", a, b) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]


def torch_key(layer: int, leaf: str) -> str:
    """State-dict key of Dense layer ``layer``'s ``leaf`` ("weight" or "bias"): "{2*layer}.{leaf}"."""
    return f"{2 * layer}.{leaf}"


def _to_numpy(value) -> np.ndarray:
    """A numpy copy of a numpy/jax array or a torch tensor (detached, on the CPU)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        try:
            return value.numpy().copy()
        except TypeError:  # e.g. bfloat16 has no numpy dtype
            return value.double().numpy()
    return np.array(value, copy=True)


def _check_shape(what: str, value: np.ndarray, expected: tuple[int, ...], fix: str) -> None:
    if tuple(value.shape) != expected:
        raise HessianApproxError(f"{what} has shape {tuple(value.shape)}, expected {expected}", fix)


def flax_to_torch(params, spec) -> dict[str, np.ndarray]:
    """The torch twin's state_dict, as numpy, from a Flax parameter tree.

    Args:
      params: {"Dense_i": {"kernel": (in, out), "bias": (out,)}, ...} (numpy or jax leaves,
        dict or FrozenDict).
      spec: the ModelSpec or its dict.
    Returns:
      {"0.weight": (out, in), "0.bias": (out,), "2.weight": ..., ...} in network order,
      C-contiguous numpy arrays in the dtype of the leaves (weight = kernelᵀ, exact).
    Raises:
      HessianApproxError naming the layer/leaf and the expected shape when the tree does not
      match the spec (missing or extra layer or leaf, wrong shape).
    """
    layers = layer_dims(spec)
    if not isinstance(params, Mapping):
        raise HessianApproxError(f"the Flax parameters are a {type(params).__name__}, not a dict of layers",
                                 "pass the tree {'Dense_0': {'kernel', 'bias'}, ...} (e.g. from init_params)")
    fix = "pass parameters of the model this spec describes"
    expected_names = [name for name, _, _ in layers]
    extra = sorted(set(params) - set(expected_names))
    if extra:
        raise HessianApproxError(f"Flax parameters hold layer {extra[0]!r} that the spec {expected_names} lacks", fix)
    out: dict[str, np.ndarray] = {}
    for i, (name, a, b) in enumerate(layers):
        if name not in params:
            raise HessianApproxError(
                f"Flax parameters lack layer {name!r} (expected kernel {(a, b)} and bias {(b,)})", fix)
        leaves = params[name]
        if not isinstance(leaves, Mapping):
            raise HessianApproxError(f"Flax layer {name!r} is a {type(leaves).__name__}, not a dict of leaves", fix)
        extra = sorted(set(leaves) - {"kernel", "bias"})
        if extra:
            raise HessianApproxError(
                f"Flax layer {name!r} holds {extra[0]!r}; a Dense layer has only kernel {(a, b)} and bias {(b,)}", fix)
        for leaf, shape in (("kernel", (a, b)), ("bias", (b,))):
            if leaf not in leaves:
                raise HessianApproxError(f"Flax layer {name!r} lacks {leaf!r} (expected shape {shape})", fix)
        kernel = _to_numpy(leaves["kernel"])
        bias = _to_numpy(leaves["bias"])
        _check_shape(f"Flax {name}/kernel", kernel, (a, b), fix)
        _check_shape(f"Flax {name}/bias", bias, (b,), fix)
        out[torch_key(i, "weight")] = np.ascontiguousarray(kernel.T)
        out[torch_key(i, "bias")] = np.ascontiguousarray(bias)
    return out


def torch_to_flax(state_dict, spec) -> dict[str, dict[str, np.ndarray]]:
    """A Flax parameter tree (numpy leaves) from the torch twin's state_dict.

    Args:
      state_dict: {"0.weight": (out, in), "0.bias": (out,), ...} of torch tensors or numpy arrays
        (e.g. ``model.state_dict()`` or the output of ``flax_to_torch``).
      spec: the ModelSpec or its dict.
    Returns:
      {"Dense_i": {"bias": (out,), "kernel": (in, out)}, ...}, C-contiguous numpy leaves in the
      dtype of the tensors (kernel = weightᵀ, exact). Pass through ``jax.numpy.asarray`` (or
      ``jax_impl.models.unflatten_tree``) for JAX arrays.
    Raises:
      HessianApproxError naming the key and the expected shape when the state_dict does not match
      the spec (missing or extra key, wrong shape: e.g. a Conv2d or BatchNorm in place of a Linear).
    """
    layers = layer_dims(spec)
    if not isinstance(state_dict, Mapping):
        raise HessianApproxError(f"the torch state_dict is a {type(state_dict).__name__}, not a dict",
                                 "pass model.state_dict()")
    fix = "pass the state_dict of the torch twin of this spec (torch_ref.models.build_twin)"
    expected = {}
    for i, (name, a, b) in enumerate(layers):
        expected[torch_key(i, "weight")] = (b, a)
        expected[torch_key(i, "bias")] = (b,)
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise HessianApproxError(
            f"torch state_dict holds {extra[0]!r}, which the twin of {'-'.join(str(a) for _, a, _ in layers)}-"
            f"{layers[-1][2]} lacks (expected keys {list(expected)})", fix)
    tree: dict[str, dict[str, np.ndarray]] = {}
    for i, (name, a, b) in enumerate(layers):
        arrays = {}
        for leaf in ("weight", "bias"):
            key = torch_key(i, leaf)
            if key not in state_dict:
                raise HessianApproxError(
                    f"torch state_dict lacks {key!r} (layer {name}, expected shape {expected[key]})", fix)
            arrays[leaf] = _to_numpy(state_dict[key])
            _check_shape(f"torch {key} (layer {name})", arrays[leaf], expected[key], fix)
        tree[name] = {"bias": np.ascontiguousarray(arrays["bias"]),
                      "kernel": np.ascontiguousarray(arrays["weight"].T)}
    return tree


def check_twin(model, spec) -> None:
    """Raise HessianApproxError unless ``model`` has the torch twin's structure for ``spec``.

    The twin is ``nn.Sequential(Linear(D, h_1), Act(), Linear(h_1, h_2), ..., Linear(h_L, C))``
    with biases, and Act the spec's activation (ReLU, Tanh or Sigmoid). The message names the
    Sequential index and the layer found (e.g. an unsupported Conv2d or GELU).
    """
    from torch import nn

    layers = layer_dims(spec)
    activation = spec_dict(spec).get("activation", "relu")
    if activation not in _ACTIVATION_CLASSES:
        raise HessianApproxError(f"activation {activation!r} is not supported by the bridge",
                                 f"choose one of {', '.join(_ACTIVATION_CLASSES)}")
    act_cls = getattr(nn, _ACTIVATION_CLASSES[activation])
    fix = "build the model with torch_ref.models.build_twin(spec)"
    if not isinstance(model, nn.Sequential):
        raise HessianApproxError(f"the torch model is a {type(model).__name__}, not an nn.Sequential twin", fix)
    children = list(model.named_children())
    for idx, (key, module) in enumerate(children):
        if idx % 2 == 0:
            i = idx // 2
            if not isinstance(module, nn.Linear):
                want = f"Linear({layers[i][1]}, {layers[i][2]})" if i < len(layers) else "nothing"
                raise HessianApproxError(
                    f"torch layer {key} is an unsupported {type(module).__name__}; expected {want} (Flax Dense_{i})",
                    fix)
            if i >= len(layers):
                raise HessianApproxError(
                    f"torch layer {key} (Linear {module.in_features}->{module.out_features}) is beyond the spec's "
                    f"{len(layers)} Dense layers", fix)
            name, a, b = layers[i]
            if (module.in_features, module.out_features) != (a, b) or module.bias is None:
                raise HessianApproxError(
                    f"torch layer {key} is Linear({module.in_features}, {module.out_features}, "
                    f"bias={module.bias is not None}); expected Linear({a}, {b}, bias=True) for Flax {name} "
                    f"(weight {(b, a)}, bias {(b,)})", fix)
        elif not isinstance(module, act_cls):
            raise HessianApproxError(
                f"torch layer {key} is an unsupported {type(module).__name__}; expected {act_cls.__name__} "
                f"(activation {activation!r}) between Dense layers", fix)
    need = 2 * len(layers) - 1
    if len(children) < need:
        idx = len(children)
        name, a, b = layers[(idx + 1) // 2]
        what = f"Linear({a}, {b}) for Flax {name}" if idx % 2 == 0 else f"{act_cls.__name__} before Flax {name}"
        raise HessianApproxError(f"torch model has {len(children)} modules but the spec needs {need}: "
                                 f"it lacks layer {idx} ({what})", fix)
    if len(children) > need:
        key, module = children[need]
        raise HessianApproxError(f"torch model has an extra layer {key} ({type(module).__name__}) after the "
                                 f"last Linear({layers[-1][1]}, {layers[-1][2]}); the spec needs {need} modules", fix)


def load_into_torch(model, params, spec):
    """Copy Flax ``params`` into the torch twin ``model`` in place; returns ``model``.

    Args:
      model: the ``nn.Sequential`` twin (torch_ref.models.build_twin); its dtype and device are kept
        (values are cast by ``Tensor.copy_``).
      params: Flax tree {"Dense_i": {"kernel": (in, out), "bias": (out,)}} (numpy or jax leaves).
      spec: the ModelSpec or its dict.
    Raises:
      HessianApproxError naming the layer when the model or the tree does not match the spec.
    """
    import torch

    check_twin(model, spec)
    state = flax_to_torch(params, spec)
    named = dict(model.named_parameters())
    for key, value in state.items():
        target = named[key]
        with torch.no_grad():
            target.copy_(torch.from_numpy(value))
    return model


def state_dict_from_torch(model, spec) -> dict[str, np.ndarray]:
    """The twin's parameters as a numpy state_dict {"0.weight": (out, in), ...}, after ``check_twin``."""
    check_twin(model, spec)
    return {k: _to_numpy(v) for k, v in model.state_dict().items()}
