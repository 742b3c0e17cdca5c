"""Curvature Operators (Hessian, GGN, Fisher) of a loss averaged over a dataset in fixed-size chunks."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jax_impl.algorithms.operator import Operator, check_float_dtype
from jax_impl.batches import Batches, batches_from_iterable, make_batches, num_chunks, scan_chunks
from jax_impl.errors import HessianApproxError

__all__ = ["Batches", "Problem", "batches_from_iterable", "empirical_fisher_vp", "fisher_mc_vp", "ggn_vp",
           "chunk_sum", "gradient", "hvp", "live", "loss", "make_batches", "OPERATORS"]


def live(tree):
    """``tree`` behind an optimization barrier, so captured parameters and data stay runtime values.

    Matvecs close over the parameters and the data; under jit those are constants, and
    XLA would constant-fold the whole primal forward pass at compile time (20 s for the
    default CNN on 100 samples, every compilation).
    """
    return jax.lax.optimization_barrier(tree)


def chunk_sum(fn, batches: Batches, init):
    """sum_c fn(chunk_c) by lax.scan over the chunk axis; StreamedBatches fetch each chunk from host memory."""
    return scan_chunks(lambda c, _: fn(c), live(batches), init)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A network, an output loss and the data the curvature is averaged over.

    The total loss is L(θ) = Σ_n w_n ell(apply(θ, x_n), y_n) with Σ w_n = 1.

    Every floating parameter, the floating inputs, float targets and weights share one
    dtype, which is the dtype of every Operator built from the problem; a mix is a one-line
    error at construction (never a silent cast), and so is float64 without 64-bit JAX.

    Attributes:
      apply: ``apply(params, x (B, ...)) -> outputs (B, C)``; x may be a pytree.
      ell: per-sample loss ``ell(outputs (B, C), y (B, ...)) -> (B,)``.
      params: parameter pytree θ.
      batches: the data, as from make_batches (device-resident) or ``streaming.stream_batches``
        (host-resident, fetched one chunk at a time).
    """

    apply: Callable
    ell: Callable
    params: object
    batches: Batches

    def __post_init__(self):
        dtype = params_dtype(self.params)
        data = [("the sample weights", self.batches.w)]
        data += [("the inputs", a) for a in jax.tree_util.tree_leaves(self.batches.x)
                 if jnp.issubdtype(a.dtype, jnp.floating)]
        if jnp.issubdtype(self.batches.y.dtype, jnp.floating):
            data.append(("the targets", self.batches.y))
        for what, a in data:
            if a.dtype != dtype:
                raise HessianApproxError(
                    f"the parameters are {dtype.name} but {what} are {np.dtype(a.dtype).name}",
                    f"build the data with make_batches(..., dtype={dtype.name}) (dtypes are never mixed silently)")

    @property
    def dtype(self) -> np.dtype:
        """The one floating dtype of parameters and data."""
        return np.dtype(self.flat_params.dtype)

    @property
    def flat_params(self) -> jax.Array:
        return ravel_pytree(self.params)[0]

    @property
    def unravel(self) -> Callable:
        return ravel_pytree(self.params)[1]

    @property
    def dim(self) -> int:
        return int(self.flat_params.size)

    def chunk_loss(self, flat, chunk: Batches):
        """Σ_{n in chunk} w_n ell_n at flat parameters ``flat`` (d,)."""
        logits = self.apply(self.unravel(flat), chunk.x)
        return jnp.sum(chunk.w * self.ell(logits, chunk.y))


def params_dtype(params) -> np.dtype:
    """The floating dtype shared by every floating leaf of ``params``, else a one-line error."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise HessianApproxError("the parameter tree is empty", "pass the model's parameters")
    found = {}
    for path, leaf in leaves:
        dt = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
        if dt.kind != "f":
            raise HessianApproxError(f"parameter {jax.tree_util.keystr(path)} has dtype {dt.name}",
                                     "pass floating-point parameters (float32 or float64)")
        found.setdefault(dt, jax.tree_util.keystr(path))
    if len(found) > 1:
        (a, pa), (b, pb) = list(found.items())[:2]
        raise HessianApproxError(f"the parameters mix dtypes: {pa} is {a.name} and {pb} is {b.name}",
                                 "cast every parameter to one dtype (float32, or float64 for references)")
    return check_float_dtype(next(iter(found)), "the parameters")


def loss(problem: Problem):
    """The total loss L(θ) (a scalar)."""
    flat = problem.flat_params
    return chunk_sum(lambda c: problem.chunk_loss(flat, c), problem.batches, jnp.zeros((), flat.dtype))


def gradient(problem: Problem):
    """∇L(θ), flat (d,)."""
    flat = problem.flat_params
    g = jax.grad(problem.chunk_loss)
    return chunk_sum(lambda c: g(flat, c), problem.batches, jnp.zeros_like(flat))


def hvp(problem: Problem) -> Operator:
    """The Hessian as an Operator: v (d,) -> H v (d,), forward-over-reverse (jvp of grad); indefinite.

    Reference: Pearlmutter (1994), "Fast exact multiplication by the Hessian".
    """
    flat = problem.flat_params
    g = jax.grad(problem.chunk_loss)

    def matvec(v):
        p0 = live(flat)
        one = lambda c: jax.jvp(lambda p: g(p, c), (p0,), (v,))[1]
        return chunk_sum(one, problem.batches, jnp.zeros_like(v))

    return Operator(matvec, problem.dim, problem.dtype, psd=False, name="hessian")


def _convex_output_loss(problem: Problem) -> bool:
    """Whether the per-sample loss is one of the built-in losses, convex in the outputs."""
    from jax_impl import losses

    return any(problem.ell is f for f in losses.LOSSES.values())


def ggn_vp(problem: Problem) -> Operator:
    """The generalized Gauss-Newton matrix as an Operator: v -> Jᵀ H_ell J v (d,) -> (d,).

    J is the Jacobian of the logits w.r.t. θ, H_ell the Hessian of the weighted
    output loss w.r.t. the logits (Schraudolph 2002; Martens 2014). Flagged PSD for the
    built-in losses (convex in the outputs); a user loss may not be convex, so not flagged.
    """
    flat = problem.flat_params

    def one(c, v):
        f = lambda p: problem.apply(problem.unravel(p), c.x)
        p0 = live(flat)
        logits, jv = jax.jvp(f, (p0,), (v,))
        ell_w = lambda z: jnp.sum(c.w * problem.ell(z, c.y))
        hjv = jax.jvp(jax.grad(ell_w), (logits,), (jv,))[1]
        return jax.vjp(f, p0)[1](hjv)[0]

    def matvec(v):
        return chunk_sum(lambda c: one(c, v), problem.batches, jnp.zeros_like(v))

    return Operator(matvec, problem.dim, problem.dtype, psd=_convex_output_loss(problem), name="ggn")


def _outer_vp(problem: Problem, residuals: Callable) -> Callable:
    """v -> Σ_n w_n g_n (g_nᵀ v) with g_n = J_nᵀ r_n and r_n = residuals(logits, chunk)."""
    flat = problem.flat_params

    def one(c, v, key):
        f = lambda p: problem.apply(problem.unravel(p), c.x)
        p0 = live(flat)
        logits, jv = jax.jvp(f, (p0,), (v,))
        r = residuals(logits, c, key)  # (B, C) or (S, B, C)
        s = jnp.sum(r * jv, axis=-1)  # g_nᵀ v per sample (and MC draw)
        coeff = jnp.mean(jnp.reshape(s[..., None] * r, (-1,) + jv.shape), axis=0)
        return jax.vjp(f, p0)[1](c.w[:, None] * coeff)[0]

    def matvec(v, key=jax.random.PRNGKey(0)):
        keys = jax.random.split(key, num_chunks(problem.batches))
        return scan_chunks(lambda c, k: one(c, v, k), live(problem.batches), jnp.zeros_like(v), keys)

    return matvec


def empirical_fisher_vp(problem: Problem) -> Operator:
    """The empirical Fisher as an Operator: v -> Σ_n w_n g_n g_nᵀ v, g_n the per-sample loss gradient; PSD."""
    grad_ell = jax.grad(lambda z, y: jnp.sum(problem.ell(z, y)))
    mv = _outer_vp(problem, lambda z, c, key: grad_ell(z, c.y))
    return Operator(lambda v: mv(v), problem.dim, problem.dtype, psd=True, name="empirical_fisher")


def fisher_mc_vp(problem: Problem, key: jax.Array, mc_samples: int = 1) -> Operator:
    """Monte-Carlo Fisher product for cross-entropy: labels drawn from softmax(logits).

    Each matvec uses the same draws (fixed by ``key``), so the operator is a fixed
    symmetric PSD matrix; its expectation over keys is the GGN.
    """
    from jax_impl.losses import cross_entropy

    if problem.ell is not cross_entropy:
        raise HessianApproxError("the Monte-Carlo Fisher samples labels from a softmax, so it needs cross-entropy",
                                 "use ggn_vp (equal to the Fisher in expectation) for other losses")
    grad_ell = jax.grad(lambda z, y: jnp.sum(problem.ell(z, y)))

    def residuals(z, c, k):
        ys = jax.random.categorical(k, z, axis=-1, shape=(mc_samples,) + z.shape[:-1])
        return jax.vmap(lambda y: grad_ell(z, y))(ys)

    mv = _outer_vp(problem, residuals)
    return Operator(lambda v: mv(v, key), problem.dim, problem.dtype, psd=True, name="fisher_mc")


OPERATORS = {"hessian": hvp, "ggn": ggn_vp, "empirical_fisher": empirical_fisher_vp}
