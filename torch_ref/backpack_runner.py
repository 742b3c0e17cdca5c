"""BackPACK's second-order extensions on the torch twin: one forward and backward, numpy out.

Imports torch and backpack, never jax. Conventions (BackPACK 1.7):

- criterion ``CrossEntropyLoss()`` or ``MSELoss()`` with one-hot targets, both with the
  default mean reduction (MSE divides by N*C, no factor 1/2);
- diagonal methods give per parameter an array of the parameter's shape
  (weight (out, in), bias (out,));
- Kronecker methods give for a weight the factors [G (out, out), A (in, in)], whose
  kron(G, A) is the block in torch's row-major (out, in) order, and for a bias [G];
- the Monte-Carlo methods (diag-ggn-mc, kfac) draw from torch's global generator,
  seeded with ``seed`` right before the backward pass;
- torch's default dtype is set to the model's for the run and restored after:
  BackPACK builds some constants with the default dtype (e.g. MSELoss's summed Hessian
  ``2 * eye(C)`` in KFRA), which would otherwise cut a float64 model to float32.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch import nn

from jax_impl.errors import HessianApproxError
from torch_ref import models

METHODS = ("diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra")


def _extension(method: str, mc_samples: int):
    """(BackPACK extension, savefield) for ``method``."""
    from backpack import extensions as ext

    if method == "diag-ggn":
        return ext.DiagGGNExact(), "diag_ggn_exact"
    if method == "diag-ggn-mc":
        return ext.DiagGGNMC(mc_samples=mc_samples), "diag_ggn_mc"
    if method == "diag-h":
        return ext.DiagHessian(), "diag_h"
    if method == "kfac":
        return ext.KFAC(mc_samples=mc_samples), "kfac"
    if method == "kflr":
        return ext.KFLR(), "kflr"
    if method == "kfra":
        return ext.KFRA(), "kfra"
    raise HessianApproxError(
        f"BackPACK method {method!r} is not known", f"choose one of {', '.join(METHODS)}"
    )


def run_backpack(model: nn.Module, x, y, loss: str, method: str, mc_samples: int = 1,
                 seed: int = 0) -> dict:
    """Run one BackPACK second-order extension on ``model`` for the data (x, y).

    Args:
      model: the torch twin (``torch_ref.models.build_twin``), weights loaded; it is
        extended in place (``backpack.extend``; harmless to repeat).
      x: (N, D) inputs (numpy or torch).
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
    if int(mc_samples) < 1:
        raise HessianApproxError(f"mc_samples={mc_samples} must be at least 1", "pass --mc-samples >= 1")
    extension, field = _extension(method, int(mc_samples))
    xt = models.as_inputs(model, x)
    # one-hot targets for MSE; class indices for cross-entropy
    t = models.targets(torch.as_tensor(np.asarray(y)), loss, models.spec_output_dim(model), xt.dtype)
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

    out: dict = {}
    for name, p in model.named_parameters():
        res = getattr(p, field)
        if isinstance(res, (list, tuple)):
            out[name] = [r.detach().cpu().numpy().copy() for r in res]
        else:
            out[name] = res.detach().cpu().numpy().copy()
        delattr(p, field)
    out["seconds"] = seconds
    return out
