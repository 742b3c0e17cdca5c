"""BackPACK's second-order extensions on the torch twin (MLP or CNN): one forward and backward, numpy out.

Imports torch and backpack, never jax. Conventions (BackPACK 1.7.1):

- the twin is an ``nn.Sequential`` of Linear, Conv2d, MaxPool2d, AvgPool2d, Flatten, ReLU,
  Tanh, Sigmoid (``torch_ref.models.build_twin``); anything else is refused naming the layer;
- criterion ``CrossEntropyLoss()`` or ``MSELoss()`` with one-hot targets, both with the
  default mean reduction (MSE divides by N*C, no factor 1/2);
- diagonal methods give per parameter an array of the parameter's shape
  (conv weight (out, in, kh, kw), dense weight (out, in), bias (out,));
- Kronecker methods give for a weight the factors [G (out, out), A (rows, rows)], whose
  kron(G, A) is the block in torch's row-major weight order (rows = in for Linear,
  in·kh·kw in (in, kh, kw) order for Conv2d), and for a bias [G]
  (``bridge.backpack`` documents what G and A are for convolutions);
- the Monte-Carlo methods (diag-ggn-mc, kfac) draw from torch's global generator,
  seeded with ``seed`` right before the backward pass;
- the inputs get standard (NCHW row-major) strides: an NHWC array permuted to NCHW with one
  channel passes ``is_contiguous()`` yet is channels-last, convolutions then give
  channels-last outputs and DiagHessian through tanh/sigmoid fails ("view size is not
  compatible");
- cost: KFRA backpropagates a dense batch-averaged (C·H·W)² matrix through every layer
  above a convolution; on the default CNN (28x28 input, 1000 samples, float32, one thread)
  it took ~460 s against 0.5-1.7 s for the other five extensions;
- torch's default dtype is set to the model's for the run and restored after: BackPACK
  builds some tensors with the default dtype (MSELoss's summed Hessian ``2 * eye(C)`` in
  KFRA, MaxPool2d's KFRA ``scatter`` buffer), which would otherwise cut a float64 model to
  float32 or fail with a dtype mismatch.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn

from hessian_approx.errors import HessianApproxError
from torch_ref import models

METHODS = ("diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra")
SUPPORTED = (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.ReLU, nn.Tanh, nn.Sigmoid)


def _extension(method: str, mc_samples: int):
    """(BackPACK extension, savefield) for ``method``."""
    from backpack import extensions as ext

    table = {
        "diag-ggn": (ext.DiagGGNExact, "diag_ggn_exact", False),
        "diag-ggn-mc": (ext.DiagGGNMC, "diag_ggn_mc", True),
        "diag-h": (ext.DiagHessian, "diag_h", False),
        "kfac": (ext.KFAC, "kfac", True),
        "kflr": (ext.KFLR, "kflr", False),
        "kfra": (ext.KFRA, "kfra", False),
    }
    if method not in table:
        raise HessianApproxError(f"BackPACK method {method!r} is not known", f"choose one of {', '.join(METHODS)}")
    cls, field, sampled = table[method]
    return (cls(mc_samples=mc_samples) if sampled else cls()), field


def check_supported(model: nn.Module) -> None:
    """Raise HessianApproxError unless ``model`` is an nn.Sequential of layers BackPACK handles here."""
    if not isinstance(model, nn.Sequential):
        raise HessianApproxError(f"the torch model is a {type(model).__name__}, not an nn.Sequential twin",
                                 "build it with torch_ref.models.build_twin(arch)")
    for key, module in model.named_children():
        if not isinstance(module, SUPPORTED):
            raise HessianApproxError(
                f"torch layer {key} is a {type(module).__name__}, which the BackPACK runner does not support",
                f"use only {', '.join(c.__name__ for c in SUPPORTED)}")
    if not any(isinstance(m, nn.Linear) for m in model.children()):
        raise HessianApproxError("the torch model has no Linear layer producing the logits",
                                 "end the architecture with dense<classes>")


def standard_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides for its shape (copied only when they differ)."""
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= size
    if tuple(t.stride()) == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _collect(model: nn.Module, field: str) -> dict:
    """{state_dict name: numpy array or list of numpy factors}, removing BackPACK's attributes."""
    out: dict = {}
    for name, p in model.named_parameters():
        res = getattr(p, field)
        if isinstance(res, (list, tuple)):
            out[name] = [r.detach().cpu().numpy().copy() for r in res]
        else:
            out[name] = res.detach().cpu().numpy().copy()
        delattr(p, field)
    return out


def run_backpack(model: nn.Module, x, y, loss: str, method: str, mc_samples: int = 1,
                 seed: int = 0) -> dict:
    """Run one BackPACK second-order extension on ``model`` for the data (x, y).

    Args:
      model: the torch twin (``torch_ref.models.build_twin``), weights loaded; it is
        extended in place (``backpack.extend``; harmless to repeat).
      x: inputs channels last, (N, D) or (N, H, W, C) (numpy or torch), as the JAX side
        takes them; ``torch_ref.models.as_inputs`` makes them NCHW.
      y: (N,) integer labels.
      loss: "cross_entropy" or "mse".
      method: one of diag-ggn, diag-ggn-mc, diag-h, kfac, kflr, kfra.
      mc_samples: Monte-Carlo samples per data point (diag-ggn-mc, kfac).
      seed: seed of torch's generator for the Monte-Carlo methods.
    Returns:
      {state_dict name: numpy array (diagonal methods) or list of numpy factors
      (Kronecker methods: weight [G, A], bias [G]), ..., "seconds": wall time of the
      forward and backward pass}.
    """
    from backpack import backpack, extend

    models.check_loss(loss)
    check_supported(model)
    if int(mc_samples) < 1:
        raise HessianApproxError(f"mc_samples={mc_samples} must be at least 1", "pass --mc-samples >= 1")
    extension, field = _extension(method, int(mc_samples))
    xt = standard_strides(models.as_inputs(model, x))
    t = models.targets(torch.as_tensor(np.asarray(y)), loss, models.num_classes(model), xt.dtype)
    model = extend(model)
    criterion = extend(models.criterion(loss))
    model.zero_grad()
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(xt.dtype)
        with warnings.catch_warnings():
            # the inputs need no gradient; torch warns that the full backward hook still fires
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            start = time.perf_counter()
            value = criterion(model(xt), t)
            torch.manual_seed(seed)
            with backpack(extension):
                value.backward()
            seconds = time.perf_counter() - start
    finally:
        torch.set_default_dtype(default_dtype)
    out = _collect(model, field)
    out["seconds"] = seconds
    return out
