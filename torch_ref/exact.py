"""Exact loss, gradient, Hessian-vector products and dense Hessian of the torch twin by autograd twice."""

from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from hessian_approx.errors import HessianApproxError
from torch_ref import models

METHODS = ("func", "autograd", "loop")
# Fastest on the study's 784-10-10 ReLU net (d = 7960), float32, 1000 random samples
# (time_hessian_methods, medians of 3, torch 2.13, 2-core CPU shared with other jobs):
#   2 threads, quiet machine:  loop 4.7 s / 6.3 s, func 8.6 s / 7.5 s, autograd 9.9 s / 9.1 s (two runs);
#   1 thread, load ~3:         loop 12.6 s, func 17.1 s, autograd 20.4 s;
#   2 threads, load ~4-5:      func 20.4 s, autograd 27.7 s, loop 28.3 s (oversubscribed threads
#   hurt loop's many small batched backward calls most).
DEFAULT_METHOD = "loop"
# Rows of the Hessian per batched backward call in method "loop". On the 784-10-10 net (d = 7960,
# N = 1000, 2 cores): 1 row per call (no batching) 9.4 s, 16 rows 6.1 s, 64 rows 5.3 s,
# 128 rows 5.2 s, 1024 rows 6.5 s, all 7960 rows in one call 10.5 s.
LOOP_ROWS = 128
# Convolutional twins: the default CNN (d = 5994, 10 samples, 2 cores) took 91 s by "loop"
# (torch's batched double backward through conv layers), 32 s by "autograd" and 15 s by
# "func"; so conv nets use "func", in chunks of FUNC_ROWS tangents.
FUNC_ROWS = 256


def default_method(model: nn.Module) -> str:
    """The fastest measured method for this twin: "func" with convolutions, else DEFAULT_METHOD."""
    return "func" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else DEFAULT_METHOD


def prepare(model: nn.Module, x, y, loss: str) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(inputs in the model's dtype, targets as the criterion wants them, criterion).

    ``x`` is (N, D) or channels-last images (N, H, W, C), given to the twin as NCHW
    (``models.as_inputs``). ``y`` is integer labels (N,), or float (N, C) targets taken as is (one-hot or real
    for "mse", class probabilities for "cross_entropy", as torch's CrossEntropyLoss takes them).
    """
    models.check_loss(loss)
    xt = models.as_inputs(model, x)
    yt = torch.as_tensor(y)
    if yt.ndim == 2:  # float targets: one-hot or real (mse), class probabilities (cross_entropy)
        t = yt.to(xt.dtype)
    else:
        t = models.targets(yt, loss, models.num_classes(model), xt.dtype)
    if t.shape[0] != xt.shape[0]:
        raise HessianApproxError(
            f"{xt.shape[0]} inputs but {t.shape[0]} labels", "pass one label per input row"
        )
    return xt, t, models.criterion(loss)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters()]


def flat_loss_fn(model: nn.Module, x, y, loss: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(f, theta0)``: f(theta (d,)) -> scalar loss via torch.func.functional_call; theta0 (d,) the weights."""
    xt, t, crit = prepare(model, x, y, loss)
    named = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]
    theta0 = models.flat_params(model)

    def f(theta: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape, size in named:
            params[name] = theta[start:start + size].reshape(shape)
            start += size
        return crit(torch.func.functional_call(model, params, (xt,)), t)

    return f, theta0


def loss_and_grad(model: nn.Module, x, y, loss: str) -> tuple[float, np.ndarray]:
    """(mean loss, gradient (d,) in torch flat order) at the model's weights."""
    xt, t, crit = prepare(model, x, y, loss)
    value = crit(model(xt), t)
    grads = torch.autograd.grad(value, _params(model))
    return float(value.detach()), torch.cat([g.reshape(-1) for g in grads]).numpy()


def _flat_grad_graph(model: nn.Module, x, y, loss: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(gradient (d,) with its graph kept for a second backward, parameter list)."""
    xt, t, crit = prepare(model, x, y, loss)
    params = _params(model)
    grads = torch.autograd.grad(crit(model(xt), t), params, create_graph=True)
    return torch.cat([g.reshape(-1) for g in grads]), params


def _check_vector(v, d: int, dtype: torch.dtype) -> torch.Tensor:
    vt = torch.as_tensor(np.asarray(v)).to(dtype)
    if vt.shape != (d,):
        raise HessianApproxError(
            f"vector has shape {tuple(vt.shape)} but the model has {d} parameters",
            f"pass a flat vector of shape ({d},) in torch flat order",
        )
    return vt


def hvp(model: nn.Module, x, y, loss: str, v) -> np.ndarray:
    """H v (d,) by double backprop; v (d,) and the result in torch flat order."""
    g, params = _flat_grad_graph(model, x, y, loss)
    vt = _check_vector(v, g.numel(), g.dtype)
    hv = torch.autograd.grad(g, params, grad_outputs=vt)
    return torch.cat([h.reshape(-1) for h in hv]).detach().numpy()


def available_memory_bytes() -> int:
    """Physical memory available now (bytes), from os.sysconf; a huge number where unknown."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**62


def check_memory(d: int, itemsize: int) -> int:
    """Raise HessianApproxError unless twice d*d*itemsize bytes fit in available RAM; return d*d*itemsize.

    Twice: the result plus the intermediates of the same size the methods build on the way.
    """
    need = d * d * itemsize
    have = available_memory_bytes()
    if 2 * need > have:
        raise HessianApproxError(
            f"the dense {d}x{d} Hessian needs {need} bytes ({2 * need} with work space) "
            f"but only {have} bytes of RAM are available",
            "use a smaller model or fewer parameters, or a matrix-free method (hvp, Lanczos)",
        )
    return need


def _hessian_func(model, x, y, loss, rows: int = FUNC_ROWS) -> torch.Tensor:
    """Forward-over-reverse (torch.func jvp of grad), vmapped over ``rows`` unit tangents at a time.

    torch.func.hessian would push all d tangents at once: d copies of every activation
    (30 GB for the default CNN on 100 samples); chunks bound that.
    """
    f, theta0 = flat_loss_fn(model, x, y, loss)
    d = theta0.numel()
    # jacrev, not grad: torch 2.13's jvp of torch.func.grad fails on MSE ("ZeroTensors are immutable")
    hvp = torch.func.vmap(lambda v: torch.func.jvp(torch.func.jacrev(f), (theta0,), (v,))[1])
    out = torch.empty(d, d, dtype=theta0.dtype)
    with warnings.catch_warnings():  # torch's own forward-AD decompositions still call torch.jit.script
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        for start in range(0, d, rows):
            stop = min(start + rows, d)
            e = torch.zeros(stop - start, d, dtype=theta0.dtype)
            e[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out[start:stop] = hvp(e).detach()
    return out


def _hessian_autograd(model, x, y, loss) -> torch.Tensor:
    f, theta0 = flat_loss_fn(model, x, y, loss)
    # vectorize=True (vmap over the rows) with the default reverse-over-reverse strategy: on the
    # 784-10-10 net it took 9.7 s against 15.3 s for outer_jacobian_strategy="forward-mode".
    return torch.autograd.functional.hessian(f, theta0, vectorize=True)


def _hessian_loop(model, x, y, loss, rows: int = LOOP_ROWS) -> torch.Tensor:
    """Double backprop: one Hessian row per gradient, ``rows`` rows per call (is_grads_batched)."""
    g, params = _flat_grad_graph(model, x, y, loss)
    d = g.numel()
    out = torch.empty(d, d, dtype=g.dtype)
    for start in range(0, d, rows):
        stop = min(start + rows, d)
        if stop - start == 1:
            e = torch.zeros(d, dtype=g.dtype)
            e[start] = 1.0
            cols = torch.autograd.grad(g, params, grad_outputs=e, retain_graph=True)
            out[start] = torch.cat([c.reshape(-1) for c in cols])
            continue
        e = torch.zeros(stop - start, d, dtype=g.dtype)
        e[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        cols = torch.autograd.grad(g, params, grad_outputs=e, retain_graph=True, is_grads_batched=True)
        out[start:stop] = torch.cat([c.reshape(stop - start, -1) for c in cols], dim=1)
    return out


_IMPLS = {"func": _hessian_func, "autograd": _hessian_autograd, "loop": _hessian_loop}


def hessian(model: nn.Module, x, y, loss: str, method: str | None = None) -> np.ndarray:
    """The dense Hessian (d, d) of the mean loss in torch flat order, in the model's dtype.

    Args:
      model: the twin (N, D) or NCHW -> (N, C).
      x: inputs (N, D) or channels-last images (N, H, W, C); y: integer labels (N,).
      loss: "cross_entropy" or "mse".
      method: "func" (torch.func.hessian of the flat-parameter loss), "autograd"
        (torch.autograd.functional.hessian, vectorized), "loop" (double backprop, batched rows),
        or None for the fastest measured (``default_method``).
    """
    method = default_method(model) if method is None else method
    if method not in _IMPLS:
        raise HessianApproxError(f"Hessian method {method!r} is unknown", f"choose one of {', '.join(METHODS)}")
    dtype = next(model.parameters()).dtype
    check_memory(models.num_params(model), torch.empty(0, dtype=dtype).element_size())
    h = _IMPLS[method](model, x, y, loss)
    return h.detach().reshape(h.shape[0], -1).numpy()


def time_hessian_methods(model: nn.Module, x, y, loss: str, repeats: int = 3,
                         methods: tuple[str, ...] = METHODS) -> dict[str, float]:
    """{method: median wall-clock seconds of ``repeats`` dense Hessians} for each method."""
    times = {}
    for method in methods:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hessian(model, x, y, loss, method=method)
            runs.append(time.perf_counter() - t0)
        times[method] = statistics.median(runs)
    return times
