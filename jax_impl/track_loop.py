"""The training loop the tracker rides on: any optax optimizer, jitted chunks of steps, a curvature measurement every few steps."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl.batches import Batches
from jax_impl.errors import HessianApproxError
from jax_impl.tracking import TrackerConfig, measure, tracker_init


@dataclasses.dataclass
class TrackResult:
    """A tracked training run.

    Attributes:
      steps: ``(R,)`` the optimizer step of each measurement (0 = before training).
      metrics: name -> ``(R, ...)`` numpy arrays, one row per measurement (see
        :func:`jax_impl.tracking.measure`).
      train_loss: ``(S,)`` the mini-batch (or full-batch) loss of every step taken.
      params: the parameters after the last step taken.
      snapshots: measured step -> parameters there (the steps asked for in ``snapshot_steps``).
      diverged_at: the first step whose loss was non-finite or above ``diverge_factor`` times
        the first loss, or None; training stops there.
      seconds: wall seconds of training and of measuring (split only with ``timing=True``,
        which waits for each call; otherwise ``total``).
    """

    steps: np.ndarray
    metrics: dict
    train_loss: np.ndarray
    params: object
    snapshots: dict
    diverged_at: Optional[int]
    seconds: dict


def _make_step(apply, ell, optimizer, n: int, batch_size: int):
    """(step, batch): ``step((params, opt_state, key, x, y), t)`` for ``lax.scan`` and ``batch(x, y, key, t)``.

    The data travel as arguments (never closed over), so XLA does not constant-fold them."""
    per_epoch = n // batch_size

    def batch(x, y, key, t):
        if batch_size == n:
            return x, y
        perm = jax.random.permutation(jax.random.fold_in(key, t // per_epoch), n)
        idx = jax.lax.dynamic_slice(perm, ((t % per_epoch) * batch_size,), (batch_size,))
        return jax.tree_util.tree_map(lambda a: a[idx], x), y[idx]

    def loss(p, xb, yb):
        return jnp.mean(ell(apply(p, xb), yb))

    def step(carry, t):
        params, opt_state, key, x, y = carry
        xb, yb = batch(x, y, key, t)
        value, grad = jax.value_and_grad(loss)(params, xb, yb)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key, x, y), value

    return step, batch


def track(apply: Callable, ell: Callable, params, optimizer: optax.GradientTransformation, x, y, *,
          steps: int, every: int, key: jax.Array, batch_size: Optional[int] = None,
          curvature: Batches | str = "batch", config: TrackerConfig = TrackerConfig(),
          preconditioner: Optional[Callable] = None, snapshot_steps=(), diverge_factor: float = 1e4,
          timing: bool = False, log_every: int = 10, progress: Optional[Callable[[int, dict], None]] = None
          ) -> TrackResult:
    """Train with ``optimizer`` for ``steps`` steps and measure the curvature every ``every`` steps.

    The steps between two measurements run as one jitted ``lax.scan``; each measurement is
    one jitted :func:`jax_impl.tracking.measure` whose warm-start state stays on the device.
    The host waits for the device only every ``log_every`` measurements (divergence check,
    ``progress``) and at the end, unless ``timing`` asks it to wait after every call.

    Args:
      apply, ell: network ``apply(params, x (B, ...)) -> (B, C)`` and per-sample loss ``(B,)``.
      params: initial parameters.
      optimizer: any optax transformation (``optax.sgd(lr)`` with ``batch_size = N`` is
        full-batch gradient descent).
      x, y: training inputs ``(N, ...)`` and labels ``(N,)`` or targets ``(N, C)``, float
        inputs of the parameters' dtype.
      steps: optimizer steps; every: steps between measurements (also at step 0 and at the end).
      key: PRNG key (batches and measurements).
      batch_size: samples per step, default N (full batch); epochs reshuffle.
      curvature: ``"batch"``: the curvature of the current step's batch (the whole set for
        full batch); or a :class:`Batches` (e.g. a fixed subset) used at every measurement.
      config: what each measurement computes.
      preconditioner: for ``config.preconditioned``, ``opt_state -> P`` (e.g.
        :func:`jax_impl.tracking.adam_preconditioner`).
      snapshot_steps: measured steps at which to keep a copy of the parameters.
      diverge_factor: training stops when a loss exceeds this times the first loss.
      timing: wait after every call, so ``seconds`` splits training from measuring.
      log_every: measurements between host synchronizations.
      progress: called as ``progress(step, last_metrics)`` at every synchronization.
    """
    n = len(jax.tree_util.tree_leaves(x)[0])
    batch_size = n if batch_size is None else int(batch_size)
    if steps < 1 or every < 1 or not 1 <= batch_size <= n:
        raise HessianApproxError(f"steps={steps}, every={every}, batch_size={batch_size} for {n} samples",
                                 f"use steps >= 1, every >= 1 and 1 <= batch_size <= {n}")
    x, y = jax.tree_util.tree_map(jnp.asarray, x), jnp.asarray(y)
    step, batch = _make_step(apply, ell, optimizer, n, batch_size)
    data_key, measure_key = jax.random.split(key)

    @jax.jit
    def run(params, opt_state, t0, length_marker, x, y):
        ts = t0 + jnp.arange(length_marker.shape[0])
        (params, opt_state, *_), losses = jax.lax.scan(step, (params, opt_state, data_key, x, y), ts)
        return params, opt_state, losses

    @jax.jit
    def measure_at(params, opt_state, state, t, fixed, x, y):
        if fixed is None:
            xb, yb = batch(x, y, data_key, jnp.maximum(t - 1, 0))
            m = len(jax.tree_util.tree_leaves(xb)[0])
            dt = jax.tree_util.tree_leaves(params)[0].dtype
            b = Batches(jax.tree_util.tree_map(lambda a: a[None], xb), yb[None], jnp.full((1, m), 1 / m, dt))
        else:
            b = fixed
        return measure(config, apply, ell, params, b, state, jax.random.fold_in(measure_key, t),
                       opt_state, preconditioner)

    fixed = None if isinstance(curvature, str) else curvature
    if isinstance(curvature, str) and curvature != "batch":
        raise HessianApproxError(f"curvature={curvature!r}", "pass 'batch' or a Batches of a fixed subset")
    opt_state = optimizer.init(params)
    state = tracker_init(config, params)
    at = sorted({0, *range(every, steps, every), steps})
    rows, losses, snaps, first_loss = [], [], {}, None
    seconds = {"train": 0.0, "measure": 0.0}
    t_start = time.perf_counter()
    diverged = None
    for i, t in enumerate(at):
        if t > 0:
            t0 = time.perf_counter()
            params, opt_state, chunk = run(params, opt_state, jnp.asarray(at[i - 1], jnp.int32),
                                           jnp.zeros((t - at[i - 1], 0)), x, y)
            losses.append(chunk)
            if timing:
                jax.block_until_ready(params)
                seconds["train"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        state, metrics = measure_at(params, opt_state, state, jnp.asarray(t, jnp.int32), fixed, x, y)
        rows.append((t, metrics))
        if timing:
            jax.block_until_ready(metrics)
            seconds["measure"] += time.perf_counter() - t0
        if t in snapshot_steps:
            snaps[t] = jax.device_get(params)
        if (i + 1) % log_every == 0 or t == steps:
            host = np.concatenate([np.asarray(c) for c in losses]) if losses else np.zeros(0)
            first_loss = host[0] if len(host) and first_loss is None else first_loss
            bad = np.flatnonzero(~np.isfinite(host) | (host > diverge_factor * (first_loss or np.inf)))
            if progress is not None:
                progress(t, jax.device_get(metrics))
            if len(bad):
                diverged = int(bad[0])
                break
    seconds["total"] = time.perf_counter() - t_start
    train_loss = np.concatenate([np.asarray(c) for c in losses]) if losses else np.zeros(0)
    keep = [r for r in rows if diverged is None or r[0] <= diverged]
    metrics = {name: np.stack([np.asarray(m[name]) for _, m in keep]) for name in keep[0][1]}
    if diverged is not None:
        train_loss = train_loss[: diverged + 1]
    return TrackResult(np.array([t for t, _ in keep]), metrics, train_loss, jax.device_get(params), snaps,
                       diverged, seconds)
