"""The PyTorch twin of jax_impl.track_loop: full-batch gradient descent with PyHessian's top eigenvalue every few steps."""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from hessian_approx.errors import HessianApproxError
from torch_ref import exact
from torch_ref import pyhessian_runner as runner


def measured_steps(steps: int, every: Optional[int]) -> list[int]:
    """The steps measured: 0, every, 2 every, ... and the last (``jax_impl.track_loop.track``'s schedule); none for every=None."""
    if every is None:
        return []
    return sorted({0, *range(every, steps, every), steps})


def track_torch(model: nn.Module, x, y, loss: str, lr: float, steps: int, every: Optional[int],
                max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` in place by full-batch GD and measure the sharpness with PyHessian every ``every`` steps.

    The loop a PyTorch user writes: ``torch.optim.SGD(model.parameters(), lr)`` on the whole
    set, one forward/backward/step per step; at step 0, every ``every`` steps and after the
    last step (the schedule of ``jax_impl.track_loop.track``) a fresh
    ``pyhessian.hessian(model, criterion, data=(inputs, targets), cuda=False)`` and its
    ``eigenvalues(maxIter=max_iter, tol=tol, top_n=1)``, through
    ``torch_ref.pyhessian_runner.top_eigenvalues(k=1)``. The runner builds that object the
    same way and adds only bookkeeping: it counts the Hvps, seeds PyHessian's random start
    vector (``seed + step``), and restores ``.grad`` and train mode afterwards. Each measured
    second covers the whole call: PyHessian's create_graph forward/backward plus its power
    iteration, and the runner's ``torch_ref.exact.prepare`` of ``x, y`` (no copy for flat
    float32 rows; one NCHW copy of channels-last images, a few milliseconds for 5000 MNIST
    images).

    Args:
      model: the torch twin (its parameters are updated).
      x: inputs (N, D) or channels-last images (N, H, W, C); y: integer labels (N,).
      loss: "cross_entropy" or "mse".
      lr: the learning rate; steps: GD steps; every: steps between measurements, or None for
        training only.
      max_iter, tol: PyHessian's maxIter and tol (it stops when the relative change of the
        Rayleigh quotient is below tol).
      seed: measurement at step t draws its start vector from torch seeded with seed + t.

    Returns:
      {"steps": measured steps, "sharpness": PyHessian's top eigenvalue at each,
       "matvecs": Hvps of each, "measure_seconds": wall seconds of each, "train_seconds": total
       seconds of the GD steps (measurements excluded), "step_seconds": seconds of each GD
       step, "train_loss": (steps,) full-batch loss before each step, "settings"}.
    """
    if steps < 1 or lr <= 0 or (every is not None and every < 1):
        raise HessianApproxError(f"steps={steps}, every={every}, lr={lr}",
                                 "use steps >= 1, lr > 0 and every >= 1 (or every=None for training only)")
    inputs, targets, criterion = exact.prepare(model, x, y, loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    at = set(measured_steps(steps, every))
    out: dict[str, Any] = {"steps": [], "sharpness": [], "matvecs": [], "measure_seconds": []}
    step_seconds, train_loss = [], []

    def measure(t: int) -> None:
        t0 = time.perf_counter()
        res = runner.top_eigenvalues(model, x, y, loss, k=1, max_iter=max_iter, tol=tol, seed=seed + t)
        out["measure_seconds"].append(time.perf_counter() - t0)
        out["steps"].append(t)
        out["sharpness"].append(float(res["eigenvalues"][0]))
        out["matvecs"].append(int(res["matvecs"]))

    model.train()
    for t in range(steps):
        if t in at:
            measure(t)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        value = criterion(model(inputs), targets)
        value.backward()
        optimizer.step()
        train_loss.append(value.item())
        step_seconds.append(time.perf_counter() - t0)
    if steps in at:
        measure(steps)
    out.update(train_seconds=float(np.sum(step_seconds)), step_seconds=step_seconds,
               train_loss=np.asarray(train_loss, dtype=np.float64),
               settings={"optimizer": f"torch.optim.SGD(lr={lr}) full batch", "every": every, "max_iter": max_iter,
                         "tol": tol, "seed": seed, "top_n": 1, "pyhessian_version": runner.pyhessian_version(),
                         "torch_threads": torch.get_num_threads(),
                         "dtype": str(next(model.parameters()).dtype).replace("torch.", "")})
    return out
