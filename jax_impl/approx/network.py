"""The network walk of the structured approximations: checks, forward, loss square roots, backprop."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hessian_approx.architecture import Architecture
from jax_impl import losses as losses_mod
from jax_impl.approx.rules import RULES, Node, nodes
from jax_impl.errors import HessianApproxError
from jax_impl.batches import Batches, num_chunks
from jax_impl.batches import scan_chunks as batches_scan
from jax_impl.operators import Problem, live

METHODS = ("diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra")
SUPPORTED_LOSSES = ("cross_entropy", "mse")
MATRIX_FREE = "exact, ggn, lanczos, power, hutchinson or slq"
# DiagH with tanh/sigmoid backpropagates one residual column per feature (as BackPACK does);
# refuse before allocating more than this many values per chunk.
MAX_ELEMENTS = 1 << 30


# ---- checks ---------------------------------------------------------------------------
def resolve(problem: Problem, arch, method: str) -> tuple[Node, ...]:
    """The Nodes of ``problem``'s network, checked against its parameters and data.

    Args:
      problem: network, loss and data.
      arch: an Architecture, its ``to_dict()`` (or the first version's MLP spec dict), or
        None to read ``problem.apply.arch`` (set by ``models.make_apply``).
      method: the approximation's name, for messages.
    """
    if arch is None:
        arch = getattr(problem.apply, "arch", None)
    if arch is None:
        raise HessianApproxError(
            f"{method} cannot tell the network's layers from problem.apply (a plain apply function)",
            f"pass arch=Architecture(...) (apply functions from models.make_apply carry it), or use {MATRIX_FREE}")
    if isinstance(arch, dict):
        arch = Architecture.from_dict(arch)
    if not isinstance(arch, Architecture):
        raise HessianApproxError(f"arch {type(arch).__name__} is not an Architecture",
                                 "pass hessian_approx.architecture.Architecture or its to_dict()")
    nds = nodes(arch)
    for nd in nds:
        if nd.kind not in RULES:
            raise HessianApproxError(
                f"layer {nd.index} ({nd.layer.token()}) is not supported by {method} "
                f"(its rules cover {', '.join(RULES)})", f"use {MATRIX_FREE} for this model")
    want = {p.name: {k: tuple(v) for k, v in p.shapes.items()} for p in arch.param_layers}
    try:
        got = {n: {k: tuple(jnp.shape(v)) for k, v in leaves.items()} for n, leaves in problem.params.items()}
    except AttributeError:
        got = None
    if got != want:
        raise HessianApproxError(f"parameters {got} do not match the architecture's {want}",
                                 "pass the Architecture the parameters were built from")
    if tuple(problem.batches.x.shape[2:]) != arch.input_shape:
        raise HessianApproxError(
            f"inputs of shape {tuple(problem.batches.x.shape[2:])} per sample do not fit the architecture's "
            f"{arch.input_shape}", "pass data of the model's input shape (models.as_inputs)")
    return nds


def loss_name(problem: Problem, method: str) -> str:
    """``cross_entropy`` or ``mse``: which of jax_impl.losses ``problem.ell`` is."""
    for name in SUPPORTED_LOSSES:
        if problem.ell is losses_mod.LOSSES[name]:
            return name
    got = getattr(problem.ell, "__name__", repr(problem.ell))
    raise HessianApproxError(
        f"loss {got!r} is not supported by {method} ({', '.join(METHODS)} support "
        f"{', '.join(SUPPORTED_LOSSES)} from jax_impl.losses)", f"use {MATRIX_FREE} for other losses")


def check_mc_samples(mc_samples) -> int:
    if int(mc_samples) < 1:
        raise HessianApproxError(f"mc_samples={mc_samples} must be at least 1", "pass --mc-samples >= 1")
    return int(mc_samples)


def _residual_at(nd: Node) -> bool:
    """Whether the layer's input Hessian has a second-order residual (tanh, sigmoid; not ReLU
    or the piecewise-linear kinds), asked of its rule."""
    z = jnp.zeros((1, *nd.in_shape))
    return RULES[nd.kind].residual(nd, z, z) is not None


def has_residuals(nds) -> bool:
    first = min(i for i, nd in enumerate(nds) if nd.name)
    return any(_residual_at(nd) for nd in nds[first + 1:])


def check_residual_size(nds, chunk: int, num_classes: int, method: str) -> None:
    """Refuse DiagH when the residual square roots (one column per feature of every tanh or
    sigmoid above a layer) would exceed MAX_ELEMENTS values per chunk at some layer."""
    first = min(i for i, nd in enumerate(nds) if nd.name)
    v = num_classes
    for nd in nds[first + 1:][::-1]:
        if _residual_at(nd):
            v += nd.d_in
        if chunk * v * nd.d_in > MAX_ELEMENTS:
            raise HessianApproxError(
                f"{method} backpropagates {chunk} x {v} x {nd.d_in} values per chunk below layer {nd.index} "
                f"(the {'/'.join(sorted({n.layer.name for n in nds if n.kind == 'activation'} - {'relu'}))} "
                "residuals, one column per feature, as BackPACK)",
                "use a smaller chunk size, ReLU, diag-ggn, or hutchinson for the Hessian diagonal")


# ---- the network ----------------------------------------------------------------------
def param(params, nd: Node):
    return params[nd.name] if nd.name else None


def forward(nds, params, x):
    """([layer inputs x_i (B, *in_shape_i)], logits (B, C)), as the Flax model computes them."""
    xs = []
    for nd in nds:
        xs.append(x)
        x = RULES[nd.kind].forward(nd, param(params, nd), x)
    return xs, x


def exact_sqrt(loss: str, logits):
    """S (B, C, C) with S[n]ᵀ S[n] = the per-sample output-loss Hessian (BackPACK's sqrt_hessian).

    Cross-entropy: S[v, c] = √p_c δ_vc - p_c √p_v; MSE (mean over C): √(2/C) I.
    """
    b, c = logits.shape
    if loss == "cross_entropy":
        p = jax.nn.softmax(logits, axis=-1)
        tau = jnp.sqrt(p)
        return jax.vmap(jnp.diag)(tau) - tau[:, :, None] * p[:, None, :]
    return jnp.broadcast_to(math.sqrt(2.0 / c) * jnp.eye(c, dtype=logits.dtype), (b, c, c))


def sampled_sqrt(loss: str, logits, key, mc_samples: int):
    """Monte-Carlo square root S (B, M, C), E[S[n]ᵀ S[n]] = the output-loss Hessian.

    As BackPACK's ``sqrt_hessian_sampled``: rows are gradients of the loss at targets drawn
    from the model's likelihood, divided by √M. Cross-entropy: ŷ ~ Categorical(softmax(f)),
    row p - onehot(ŷ). MSE (mean over C; Gaussian with std √(1/2)): row √(2/C) ε, ε ~ N(0, I_C).
    """
    b, c = logits.shape
    if loss == "cross_entropy":
        p = jax.nn.softmax(logits, axis=-1)
        y = jax.random.categorical(key, logits, axis=-1, shape=(mc_samples, b))
        rows = jnp.swapaxes(p[None] - jax.nn.one_hot(y, c, dtype=logits.dtype), 0, 1)
    else:
        rows = math.sqrt(2.0 / c) * jax.random.normal(key, (b, mc_samples, c), dtype=logits.dtype)
    return rows / math.sqrt(mc_samples)


def loss_sqrt(loss: str, logits, key, mc_samples: int):
    """The exact square root when ``key`` is None, else the sampled one."""
    return exact_sqrt(loss, logits) if key is None else sampled_sqrt(loss, logits, key, mc_samples)


def _diag_root(r):
    """A signed square root of diag(r), r (B, *shape): (S (B, D, *shape), sign (B, D)), D = prod(shape)."""
    b, shape = r.shape[0], r.shape[1:]
    d = math.prod(shape)
    eye = jnp.eye(d, dtype=r.dtype).reshape(d, *shape)
    return eye[None] * jnp.sqrt(jnp.abs(r))[:, None], jnp.sign(r).reshape(b, d)


def backprop(nds, params, xs, roots, g=None):
    """Walk from the logits down to the first parameter layer; yield (node, x, roots) at each
    parameter layer, roots = [(S (B, V, *out_shape), sign (B, V) or None)] at its output.

    With ``g`` (B, C), the per-sample loss gradient at the logits, the residuals of
    tanh/sigmoid are added as signed square roots on the way (exact DiagH; BackPACK's
    ``DiagHessian``): Σ_roots sign · SᵀS is then the full per-sample Hessian w.r.t. the output.
    """
    first = min(i for i, nd in enumerate(nds) if nd.name)
    for i in range(len(nds) - 1, first - 1, -1):
        nd, x, p = nds[i], xs[i], param(params, nds[i])
        if nd.name:
            yield nd, x, roots
        if i == first:
            return
        rule = RULES[nd.kind]
        r = rule.residual(nd, x, g) if g is not None else None
        roots = [(rule.jac_t(nd, p, x, s), sign) for s, sign in roots]
        if g is not None:
            g = rule.jac_t(nd, p, x, g[:, None])[:, 0]
        if r is not None:
            roots.append(_diag_root(r))


def runtime_inputs(params, batches: Batches, key=None):
    """(params, batches, key) behind an optimization barrier (``operators.live``), at the top of
    every jitted core: when a caller jits a closure over the problem (``jax.jit(lambda k:
    kflr(problem))``), its parameters and data are compile-time constants, and XLA would
    otherwise constant-fold the whole approximation at compile time (a (784, 784) input
    factor for the MNIST MLP: seconds of compilation, XLA's slow-operation alarm, and a
    "run" that returns a stored constant)."""
    return live((params, batches, key))


def scan_chunks(fn, batches: Batches, init, key=None):
    """Σ_c fn(chunk_c, key_c) by lax.scan over chunks (key_c = split(key, num_chunks)[c], or None);
    streamed batches (``jax_impl.streaming``) fetch one chunk at a time from host memory."""
    keys = jax.random.split(key, num_chunks(batches)) if key is not None else None
    return batches_scan(fn, batches, init, keys)


def dtype_of(params):
    return jax.tree_util.tree_leaves(params)[0].dtype
