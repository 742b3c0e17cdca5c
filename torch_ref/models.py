"""The torch side of the architecture description: one nn module per layer kind, inputs, criteria, flat parameters."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hessian_approx.architecture import Architecture, coerce
from hessian_approx.errors import HessianApproxError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
LOSSES = ("cross_entropy", "mse")


def _conv(layer, in_shape, dtype) -> nn.Module:
    return nn.Conv2d(in_shape[2], layer.features, layer.kernel, stride=layer.stride,
                     padding=layer.pads(in_shape), dtype=dtype)


# kind -> (layer, per-sample input shape (channels last), dtype) -> the torch module on NCHW or (N, D).
# Every stride and padding is explicit, as on the Flax side (jax_impl.models.FLAX_LAYERS).
TORCH_LAYERS: dict[str, Callable[[Any, tuple, torch.dtype], nn.Module]] = {
    "dense": lambda layer, in_shape, dtype: nn.Linear(in_shape[0], layer.features, dtype=dtype),
    "conv2d": _conv,
    "maxpool2d": lambda layer, in_shape, dtype: nn.MaxPool2d(layer.window, layer.stride),
    "avgpool2d": lambda layer, in_shape, dtype: nn.AvgPool2d(layer.window, layer.stride),
    "flatten": lambda layer, in_shape, dtype: nn.Flatten(),
    "activation": lambda layer, in_shape, dtype: ACTIVATIONS[layer.name](),
}


architecture = coerce  # an Architecture from itself or its dict (hessian_approx.architecture.coerce)


def twin_layer(layer, in_shape, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The torch module of one layer on a per-sample (channels-last) input shape."""
    if layer.kind not in TORCH_LAYERS:
        raise HessianApproxError(f"layer kind {layer.kind!r} has no torch module",
                                 f"use one of {', '.join(TORCH_LAYERS)}")
    return TORCH_LAYERS[layer.kind](layer, tuple(in_shape), dtype)


def build_twin(arch, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The torch twin of ``arch`` (an Architecture, its dict, or a legacy MLP spec dict).

    One module per layer of ``arch.layers``, so the state_dict keys are "{i}.weight" and
    "{i}.bias" for each ParamLayer index i (the MLP preset: "0.weight", "2.weight"). Linear
    weight (out, in), Conv2d weight (out, in, kh, kw). Input (N, D) or NCHW (see ``as_inputs``)
    -> logits (N, C). Weights are torch's default initialization (load real ones with
    ``bridge.convert.load_into_torch``). The Architecture is kept as ``model.arch``.
    """
    arch = architecture(arch)
    model = nn.Sequential(*(twin_layer(l, s, dtype) for l, s in zip(arch.layers, arch.shapes)))
    model.arch = arch  # a plain attribute: not a parameter, not in the state_dict
    return model


def model_arch(model: nn.Module) -> Architecture | None:
    """The Architecture a twin was built from (``build_twin``), or None for another module."""
    arch = getattr(model, "arch", None)
    return arch if isinstance(arch, Architecture) else None


def check_loss(loss: str) -> None:
    """Raise HessianApproxError unless ``loss`` is "cross_entropy" or "mse"."""
    if loss not in LOSSES:
        raise HessianApproxError(f"loss {loss!r} is not supported", f"choose one of {', '.join(LOSSES)}")


def criterion(loss: str) -> nn.Module:
    """``nn.CrossEntropyLoss()`` (mean softmax CE) or ``nn.MSELoss()`` (mean over N*C, no 1/2)."""
    check_loss(loss)
    return nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()


def targets(y_int, loss: str, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the criterion compares the logits with.

    Args:
      y_int: integer labels (N,) (numpy or torch).
      loss: "cross_entropy" -> int64 labels (N,); "mse" -> one-hot (N, num_classes) in ``dtype``.
    """
    check_loss(loss)
    y = torch.as_tensor(y_int).long().reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise HessianApproxError(
            f"labels range over [{int(y.min())}, {int(y.max())}] but the model has {num_classes} classes",
            "use labels in 0..num_classes-1",
        )
    if loss == "cross_entropy":
        return y
    return nn.functional.one_hot(y, num_classes).to(dtype)


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached 1-D tensor (d,) in ``model.parameters()`` order.

    Torch flat order: layer by layer in network order, each weight row-major ((out, in) or
    (out, in, kh, kw)), then its bias.
    """
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def num_params(model: nn.Module) -> int:
    """d, the number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


def num_classes(model: nn.Module) -> int:
    """C, the number of logits: the twin's ``arch.num_classes``, else out_features of the last Linear."""
    arch = model_arch(model)
    if arch is not None:
        return arch.num_classes
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise HessianApproxError(f"the torch model {type(model).__name__} has no Linear layer giving the logits",
                                 "build it with torch_ref.models.build_twin")
    return last[-1].out_features


spec_output_dim = num_classes  # the first version's name


def nchw(x, dtype: torch.dtype) -> torch.Tensor:
    """Channels-last images (N, H, W, C) as an NCHW tensor in ``dtype`` with standard strides.

    Standard means (C*H*W, H*W, W, 1) even when C == 1: ``permute(...).contiguous()`` then keeps
    the permuted strides (a size-1 dimension does not break contiguity), torch treats the tensor
    as channels-last, and BackPACK's DiagHessian fails ("view size is not compatible") when tanh
    or sigmoid follows a convolution.
    """
    src = torch.as_tensor(x).permute(0, 3, 1, 2)
    out = torch.empty(tuple(src.shape), dtype=dtype, memory_format=torch.contiguous_format)
    return out.copy_(src)


def as_inputs(model: nn.Module, x) -> torch.Tensor:
    """Inputs as the twin takes them, in the model's dtype (numpy or torch in).

    Flat inputs (N, D) pass unchanged; channels-last images (N, H, W, C) become NCHW with
    standard strides (``nchw``). With the twin's Architecture known (``model.arch``), inputs
    whose per-sample size matches are first reshaped to its input shape (images flattened
    channels last, or flat rows of an image network), as ``jax_impl.models.as_inputs`` does.
    """
    dtype = next(model.parameters()).dtype
    arch = model_arch(model)
    if isinstance(x, torch.Tensor):
        x = x.detach()
    else:
        x = np.asarray(x)
    if arch is not None:
        shape = tuple(arch.input_shape)
        if tuple(x.shape[1:]) != shape:
            same_size = x.ndim >= 1 and int(np.prod(x.shape[1:])) == int(np.prod(shape))
            # flat rows, flat models and one-channel images reshape safely; anything else would
            # scramble channels (an NCHW (C, H, W) array is not an (H, W, C) one)
            safe = x.ndim == 2 or len(shape) == 1 or shape[-1] == 1
            if not (same_size and safe):
                raise HessianApproxError(
                    f"inputs of shape {tuple(x.shape[1:])} per sample do not fit the model's input {shape}",
                    "pass data of the model's input shape (images channels last), or a model built for this data")
            x = x.reshape((x.shape[0], *shape))
    if x.ndim == 4:
        return nchw(x, dtype)
    if x.ndim != 2:
        raise HessianApproxError(f"inputs have shape {tuple(x.shape)}, neither (N, D) nor (N, H, W, C)",
                                 "pass flat rows or channels-last images")
    return torch.as_tensor(x).to(dtype)
