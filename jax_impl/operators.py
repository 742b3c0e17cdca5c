"""Curvature matrix-vector products (Hessian, GGN, Fisher) averaged over a dataset in fixed-size chunks."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jax_impl.errors import HessianApproxError, check_finite


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batches:
    """A dataset cut into equal chunks, with per-sample weights.

    The last chunk is padded with zero-weight copies of a real sample, so every
    chunk has one shape (one compilation) and ``sum(w * ell)`` is the exact mean
    over the real samples, whatever the remainder.

    Attributes:
      x: (num_chunks, chunk, *input_shape) inputs (any per-sample shape: (D,), (H, W, C), ...).
      y: (num_chunks, chunk) integer labels.
      w: (num_chunks, chunk) weights: 1/N for real samples, 0 for padding.
      mesh: a 1-D device mesh whose axis splits each chunk's samples (static;
        None for one device). Set by ``jax_impl.sharding.shard_batches``.
    """

    x: jax.Array
    y: jax.Array
    w: jax.Array
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_samples(self) -> int:
        return int(np.count_nonzero(np.asarray(self.w)))


def make_batches(x, y, chunk_size: int = 1000, multiple_of: int = 1, dtype=jnp.float32) -> Batches:
    """Cut (x, y) into equal zero-padded chunks.

    Args:
      x: (N, *input_shape) inputs, e.g. (N, D) vectors or (N, H, W, C) images.
      y: (N,) labels.
      chunk_size: samples per chunk (capped at N, rounded up to ``multiple_of``).
      multiple_of: chunk size granularity, e.g. the device count for sharding.
      dtype: float dtype of x and w.
    Returns:
      Batches with ceil(N / chunk) chunks.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise HessianApproxError(
            f"data shapes x {x.shape} and y {y.shape} do not match",
            "pass x as (N, ...) and y as (N,) with the same N",
        )
    if len(x) == 0:
        raise HessianApproxError("the data subset is empty", "use --hessian-samples >= 1")
    check_finite("the input data", x)
    n = len(x)
    chunk = min(int(chunk_size), n)
    chunk = -(-chunk // multiple_of) * multiple_of
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    idx = np.concatenate([np.arange(n), np.zeros(pad, dtype=np.int64)])
    w = np.concatenate([np.full(n, 1.0 / n), np.zeros(pad)])
    return Batches(
        x=jnp.asarray(x[idx].reshape(num_chunks, chunk, *x.shape[1:]), dtype),
        y=jnp.asarray(y[idx].reshape(num_chunks, chunk), jnp.int32),
        w=jnp.asarray(w.reshape(num_chunks, chunk), dtype),
    )


def _constrain(chunk: Batches, mesh) -> Batches:
    """Pin a chunk's sample axis to the mesh, so XLA splits per-sample work over devices.

    Explicit, because data captured in a closure (as matvecs capture it) loses the
    placement of the arrays it came from.
    """
    if mesh is None:
        return chunk
    from jax.sharding import NamedSharding, PartitionSpec as P

    axis = mesh.axis_names[0]
    pin = lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(axis, *[None] * (a.ndim - 1))))
    return Batches(pin(chunk.x), pin(chunk.y), pin(chunk.w))


def live(tree):
    """``tree`` behind an optimization barrier, so captured parameters and data stay runtime values.

    Matvecs close over the parameters and the data; under jit those are constants, and
    XLA would constant-fold the whole primal forward pass at compile time (20 s for the
    default CNN on 100 samples, every compilation).
    """
    return jax.lax.optimization_barrier(tree)


def _chunk_sum(fn, batches: Batches, init):
    """sum_c fn(chunk_c) by lax.scan over the chunk axis."""

    def body(acc, chunk):
        return jax.tree_util.tree_map(jnp.add, acc, fn(_constrain(Batches(*chunk), batches.mesh))), None

    out, _ = jax.lax.scan(body, init, live((batches.x, batches.y, batches.w)))
    return out


@dataclasses.dataclass(frozen=True)
class Problem:
    """A network, an output loss and the data the curvature is averaged over.

    The total loss is L(θ) = Σ_n w_n ell(apply(θ, x_n), y_n) with Σ w_n = 1.

    Attributes:
      apply: ``apply(params, x (B, *input_shape)) -> logits (B, C)``.
      ell: per-sample loss ``ell(logits (B, C), y (B,)) -> (B,)``.
      params: parameter pytree θ.
      batches: the data, as from make_batches.
    """

    apply: Callable
    ell: Callable
    params: object
    batches: Batches

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


def loss(problem: Problem):
    """The total loss L(θ) (a scalar)."""
    flat = problem.flat_params
    return _chunk_sum(lambda c: problem.chunk_loss(flat, c), problem.batches, jnp.zeros((), flat.dtype))


def gradient(problem: Problem):
    """∇L(θ), flat (d,)."""
    flat = problem.flat_params
    g = jax.grad(problem.chunk_loss)
    return _chunk_sum(lambda c: g(flat, c), problem.batches, jnp.zeros_like(flat))


def hvp(problem: Problem) -> Callable:
    """Hessian-vector product v (d,) -> H v (d,), forward-over-reverse (jvp of grad).

    Reference: Pearlmutter (1994), "Fast exact multiplication by the Hessian".
    """
    flat = problem.flat_params
    g = jax.grad(problem.chunk_loss)

    def matvec(v):
        v = jnp.asarray(v, flat.dtype)
        p0 = live(flat)
        one = lambda c: jax.jvp(lambda p: g(p, c), (p0,), (v,))[1]
        return _chunk_sum(one, problem.batches, jnp.zeros_like(v))

    return matvec


def ggn_vp(problem: Problem) -> Callable:
    """Generalized Gauss-Newton product v -> Jᵀ H_ell J v (d,) -> (d,).

    J is the Jacobian of the logits w.r.t. θ, H_ell the Hessian of the weighted
    output loss w.r.t. the logits (Schraudolph 2002; Martens 2014).
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
        v = jnp.asarray(v, flat.dtype)
        return _chunk_sum(lambda c: one(c, v), problem.batches, jnp.zeros_like(v))

    return matvec


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
        v = jnp.asarray(v, flat.dtype)
        keys = jax.random.split(key, problem.batches.x.shape[0])

        b = problem.batches

        def body(acc, xs):
            x, y, w, k = xs
            return acc + one(_constrain(Batches(x, y, w), b.mesh), v, k), None

        out, _ = jax.lax.scan(body, jnp.zeros_like(v), (*live((b.x, b.y, b.w)), keys))
        return out

    return matvec


def empirical_fisher_vp(problem: Problem) -> Callable:
    """Empirical Fisher product v -> Σ_n w_n g_n g_nᵀ v, g_n the per-sample loss gradient."""
    grad_ell = jax.grad(lambda z, y: jnp.sum(problem.ell(z, y)))
    mv = _outer_vp(problem, lambda z, c, key: grad_ell(z, c.y))
    return lambda v: mv(v)


def fisher_mc_vp(problem: Problem, key: jax.Array, mc_samples: int = 1) -> Callable:
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
    return lambda v: mv(v, key)


OPERATORS = {"hessian": hvp, "ggn": ggn_vp, "empirical_fisher": empirical_fisher_vp}
