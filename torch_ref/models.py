"""The PyTorch twin of a plain-data ModelSpec dict, its loss criterion, targets and flat parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jax_impl.errors import HessianApproxError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
LOSSES = ("cross_entropy", "mse")


def _widths(spec: dict[str, Any]) -> tuple[int, ...]:
    """(D, h_1, ..., h_L, C) from the spec dict, validated."""
    missing = [k for k in ("input_dim", "output_dim") if k not in spec]
    if missing:
        raise HessianApproxError(
            f"model spec {spec!r} lacks {', '.join(missing)}",
            "pass the dict produced by ModelSpec.to_dict()",
        )
    try:
        widths = (int(spec["input_dim"]), *(int(h) for h in spec.get("hidden", ())), int(spec["output_dim"]))
    except (TypeError, ValueError):
        raise HessianApproxError(
            f"model spec {spec!r} has non-integer widths", "give input_dim, hidden and output_dim as integers"
        ) from None
    if min(widths) < 1:
        raise HessianApproxError(f"layer widths {widths} must all be positive", "fix the spec's widths")
    return widths


def build_twin(spec: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The torch MLP for a spec dict ``{"input_dim", "hidden", "output_dim", "activation", "kind"}``.

    Layer i is ``nn.Linear`` at Sequential index 2*i with the activation module between layers, so
    the state_dict keys are "0.weight" (h_1, D), "0.bias" (h_1,), "2.weight", ... Input (N, D) ->
    logits (N, C). Weights are torch's default initialization; load real ones with load_state_dict.
    """
    kind = spec.get("kind", "mlp")
    if kind != "mlp":
        raise HessianApproxError(f"model kind {kind!r} is not supported by the torch twin", "use kind 'mlp'")
    activation = spec.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise HessianApproxError(
            f"activation {activation!r} is not supported by the torch twin",
            f"choose one of {', '.join(ACTIVATIONS)}",
        )
    widths = _widths(spec)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b, dtype=dtype))
    return nn.Sequential(*layers)


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

    Torch flat order: each weight (out, in) row-major, then its bias, layer by layer.
    """
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def num_params(model: nn.Module) -> int:
    """d, the number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


def as_inputs(model: nn.Module, x) -> torch.Tensor:
    """x (N, D) as a tensor in the model's dtype (numpy or torch in)."""
    dtype = next(model.parameters()).dtype
    return torch.as_tensor(x).to(dtype)


def spec_output_dim(model: nn.Module) -> int:
    """C, the number of logits: out_features of the last Linear layer."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features
