"""Curvature along training: a jittable tracker of sharpness (λ_max of H), GGN sharpness, trace and Adam's preconditioned sharpness.

Written in optax's shape: :func:`tracker_init` makes a small state of device arrays (the last
top Ritz vectors, for warm starts) and :func:`measure` is a pure function
``(state, params, batches, key[, opt_state]) -> (state, metrics)`` that can run inside the
jitted training step or outside it with the same values. The curvature is that of the
weighted loss over ``batches`` (a fixed subset, or the current mini-batch, as the caller
chooses). The training loop that calls it every few steps is :mod:`jax_impl.track_loop`.

References:
  Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient descent on neural networks typically occurs
  at the edge of stability", ICLR 2021 (sharpness λ_max(H) against 2/η).
  Cohen et al., "Adaptive gradient methods at the edge of stability", 2022 (the
  preconditioned sharpness λ_max(P⁻¹H) of Adam against (2 + 2β₁)/((1 - β₁) η) = 38/η).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jax_impl import operators
from jax_impl.algorithms.hutchinson import hutchinson
from jax_impl.algorithms.lanczos_tol import lanczos_tol
from jax_impl.algorithms.operator import Operator
from jax_impl.algorithms.sketch_trace import xtrace
from jax_impl.batches import Batches
from jax_impl.errors import HessianApproxError

TRACES = ("hutchinson", "xtrace")


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """What each measurement computes, and how precisely.

    Attributes:
      k: top eigenvalues of the Hessian per measurement (the first is the sharpness).
      tol: Lanczos stops when every top-k residual estimate is ``<= tol * |θ|_max``, so each
        value is within that relative distance of an eigenvalue (default 1e-3, PyHessian's
        default tolerance).
      max_steps: most Lanczos steps (matvecs) per eigenproblem.
      min_steps: fewest Lanczos steps per eigenproblem (default 3: one more than a warm
        start needs to see a rival direction of its random admixture).
      warm_start: start each Lanczos run from the previous top-k Ritz vectors (their sum)
        plus a random vector of relative weight ``mix``; else from a random vector.
      mix: weight of the fresh random direction in a warm start (keeps every eigenvector in
        the Krylov space, so a new top eigenvalue overtaking the old one is found).
      trace: None, "hutchinson" or "xtrace" (the Hessian trace each measurement).
      trace_matvecs: matvecs of the trace estimator.
      ggn: also λ_max of the generalized Gauss-Newton matrix.
      preconditioned: also λ_max(P⁻¹H) for the diagonal preconditioner P read from the
        optimizer state by a ``preconditioner`` function (see :func:`adam_preconditioner`).
    """

    k: int = 1
    tol: float = 1e-3
    max_steps: int = 60
    min_steps: int = 3
    warm_start: bool = True
    mix: float = 0.1
    trace: Optional[str] = None
    trace_matvecs: int = 30
    ggn: bool = False
    preconditioned: bool = False

    def __post_init__(self):
        if self.k < 1 or self.max_steps < max(self.k, self.min_steps) or self.min_steps < 1:
            raise HessianApproxError(f"tracker k={self.k}, min_steps={self.min_steps}, max_steps={self.max_steps}",
                                     "use k >= 1 and max_steps >= max(k, min_steps)")
        if not 0 < self.tol < 1:
            raise HessianApproxError(f"tracker tol={self.tol}", "pass a relative tolerance in (0, 1), e.g. 1e-3")
        if not 0 <= self.mix:
            raise HessianApproxError(f"tracker mix={self.mix}", "pass a mix >= 0 (0.1 is the default)")
        if self.trace is not None and self.trace not in TRACES:
            raise HessianApproxError(f"tracker trace={self.trace!r} is not known", f"use one of {', '.join(TRACES)} or None")
        if self.trace is not None and self.trace_matvecs < (3 if self.trace == "xtrace" else 1):
            raise HessianApproxError(f"tracker trace_matvecs={self.trace_matvecs}",
                                     "use at least 1 matvec for hutchinson and 3 for xtrace")


class TrackerState(NamedTuple):
    """Warm starts carried between measurements (zeros before the first).

    Attributes:
      hessian: ``(k, d)`` the last top-k Ritz vectors of H.
      ggn: ``(d,)`` the last top Ritz vector of the GGN.
      preconditioned: ``(d,)`` the last top Ritz vector of P^{-1/2} H P^{-1/2}.
      count: ``()`` int32, measurements made.
    """

    hessian: jax.Array
    ggn: jax.Array
    preconditioned: jax.Array
    count: jax.Array


def tracker_init(config: TrackerConfig, params) -> TrackerState:
    """The state before the first measurement, for parameters shaped like ``params``."""
    flat = ravel_pytree(params)[0]
    z = jnp.zeros_like(flat)
    return TrackerState(jnp.zeros((config.k,) + flat.shape, flat.dtype), z, z, jnp.asarray(0, jnp.int32))


def adam_preconditioner(b2: float = 0.999, eps: float = 1e-8) -> Callable:
    """``opt_state -> P`` (a pytree like the parameters): Adam's ``sqrt(ν̂) + eps``.

    ``ν̂ = ν / (1 - b2^t)`` is the bias-corrected second moment of an optax Adam state (found
    by name, ``nu`` and ``count``, anywhere in a chain). Pass the optimizer's own ``b2`` and
    ``eps``. Cohen et al. (2022) compare λ_max(P⁻¹H) with ``(2 + 2 b1) / ((1 - b1) lr)``.
    """

    def precond(opt_state):
        try:
            nu = optax.tree_utils.tree_get(opt_state, "nu")
            count = optax.tree_utils.tree_get(opt_state, "count")
        except (KeyError, ValueError) as err:
            raise HessianApproxError(f"the optimizer state has no single Adam second moment ({err})",
                                     "pass opt_state of optax.adam (or a chain holding one scale_by_adam)") from None
        corr = 1 - b2 ** jnp.maximum(count, 1).astype(jax.tree_util.tree_leaves(nu)[0].dtype)
        return jax.tree_util.tree_map(lambda n: jnp.sqrt(n / corr) + eps, nu)

    return precond


def _warm_start(prev: jax.Array, key: jax.Array, mix: float, warm: bool) -> jax.Array:
    """Start vector: sum of the previous vectors (rows of ``prev``) plus ``mix`` of a random unit vector."""
    z = jax.random.normal(key, prev.shape[-1:], prev.dtype)
    z = z / jnp.linalg.norm(z)
    if not warm:
        return z
    s = jnp.sum(jnp.atleast_2d(prev), axis=0)
    n = jnp.linalg.norm(s)
    return jnp.where(n > 0, s / jnp.where(n > 0, n, 1) + mix * z, z)


def _top(op: Operator, prev, key, config: TrackerConfig, k: int):
    k_start, k_run = jax.random.split(key)
    v0 = _warm_start(prev, k_start, config.mix, config.warm_start)
    return lanczos_tol(op, k_run, k=k, tol=config.tol, max_steps=min(config.max_steps, op.dim),
                       min_steps=min(max(config.min_steps, k), op.dim), v0=v0)


def linearized(apply: Callable, ell: Callable, params, batches: Batches):
    """Loss, gradient, and Hessian and GGN Operators that reuse one forward-backward pass.

    ``operators.hvp`` recomputes the forward and backward pass in every matvec (it can stream
    any amount of data). Here ``jax.linearize`` of the chunked (loss, gradient) keeps the
    intermediate values of every chunk, so each Hessian-vector product is one tangent pass
    (jvp of grad, Pearlmutter 1994), and the GGN's ``Jᵀ H_ell J v`` is a jvp and the transpose
    of the linearized network outputs (``jax.linear_transpose``). Memory: the activations of
    all samples in ``batches`` (use ``operators`` for data beyond memory).

    Returns:
      ``(loss (), gradient (d,), hessian Operator, ggn Operator)``.
    """
    problem = operators.Problem(apply, ell, params, batches)
    flat, dim, dtype = problem.flat_params, problem.dim, problem.dtype
    vg = jax.value_and_grad(problem.chunk_loss)

    def loss_and_grad(f):
        return operators.chunk_sum(lambda c: vg(f, c), batches, (jnp.zeros((), dtype), jnp.zeros_like(f)))

    (loss, grad), tangent = jax.linearize(loss_and_grad, flat)
    h = Operator(lambda v: tangent(v)[1], dim, dtype, psd=False, name="hessian")

    def outputs(f):
        body = lambda _, c: (None, problem.apply(problem.unravel(f), c[0]))
        return jax.lax.scan(body, None, (batches.x,))[1]  # (chunks, B, C)

    z, jv = jax.linearize(outputs, flat)
    jt = jax.linear_transpose(jv, flat)

    def ggn_matvec(v):
        u = jv(v)
        ell_w = lambda zz: jnp.sum(batches.w * jax.vmap(problem.ell)(zz, batches.y))
        hu = jax.jvp(jax.grad(ell_w), (z,), (u,))[1]
        return jt(hu)[0]

    ggn = Operator(ggn_matvec, dim, dtype, psd=operators._convex_output_loss(problem), name="ggn")
    return loss, grad, h, ggn


def measure(config: TrackerConfig, apply: Callable, ell: Callable, params, batches: Batches,
            state: TrackerState, key: jax.Array, opt_state=None, preconditioner: Optional[Callable] = None):
    """One curvature measurement at ``params`` over ``batches``; jittable (config, apply, ell static).

    Args:
      config: what to compute.
      apply: ``apply(params, x (B, ...)) -> outputs (B, C)``; ell: per-sample loss ``(B,)``.
      params: parameter pytree θ.
      batches: the data the curvature averages over (a fixed subset or the current batch).
      state: from :func:`tracker_init` or the previous call.
      key: PRNG key of this measurement (random admixture, trace probes).
      opt_state, preconditioner: for ``config.preconditioned``: ``preconditioner(opt_state)``
        is the diagonal P as a pytree like ``params`` (:func:`adam_preconditioner`).

    Returns:
      ``(state, metrics)``; metrics holds device scalars/arrays: ``loss``, ``gradient_norm``,
      ``sharpness`` (λ_max(H)), ``eigenvalues`` ``(k,)``, ``residuals`` ``(k,)``,
      ``lanczos_matvecs``, ``converged``; with ``trace``: ``trace``, ``trace_stderr``; with
      ``ggn``: ``ggn_sharpness``, ``ggn_matvecs``; with ``preconditioned``:
      ``preconditioned_sharpness``, ``preconditioned_matvecs``.
    """
    loss, grad, h, ggn = linearized(apply, ell, params, batches)
    keys = jax.random.split(key, 4)
    res = _top(h, state.hessian, keys[0], config, config.k)
    metrics = {"loss": loss, "gradient_norm": jnp.linalg.norm(grad),
               "sharpness": res.eigenvalues[0], "eigenvalues": res.eigenvalues, "residuals": res.residuals,
               "lanczos_matvecs": res.matvecs, "converged": jnp.all(res.converged)}
    new = state._replace(hessian=res.eigenvectors, count=state.count + 1)
    if config.trace is not None:
        est = (hutchinson(h, keys[1], config.trace_matvecs) if config.trace == "hutchinson"
               else xtrace(h, keys[1], config.trace_matvecs))
        metrics.update(trace=est.trace, trace_stderr=est.stderr)
    if config.ggn:
        g = _top(ggn, state.ggn, keys[2], config, 1)
        metrics.update(ggn_sharpness=g.eigenvalues[0], ggn_matvecs=g.matvecs)
        new = new._replace(ggn=g.eigenvectors[0])
    if config.preconditioned:
        if preconditioner is None or opt_state is None:
            raise HessianApproxError("preconditioned sharpness needs opt_state and a preconditioner",
                                     "pass opt_state=... and preconditioner=adam_preconditioner(b2, eps)")
        p = ravel_pytree(preconditioner(opt_state))[0].astype(h.dtype)
        s = 1 / jnp.sqrt(p)
        op = Operator(lambda v: s * h(s * v), h.dim, h.dtype, psd=False, name="preconditioned_hessian")
        q = _top(op, state.preconditioned, keys[3], config, 1)
        # before the first update Adam has no second moment (P = eps): undefined, reported as NaN
        defined = optax.tree_utils.tree_get(opt_state, "count") > 0
        metrics.update(preconditioned_sharpness=jnp.where(defined, q.eigenvalues[0], jnp.nan),
                       preconditioned_matvecs=q.matvecs)
        new = new._replace(preconditioned=q.eigenvectors[0])
    return new, metrics
