"""Diagonal curvature approximations of sequential Dense networks: DiagGGN, DiagGGN-MC, DiagHessian.

These follow BackPACK's definitions (``DiagGGNExact``, ``DiagGGNMC``, ``DiagHessian``)
for a loss L(θ) = Σ_n w_n ℓ(f(θ, x_n), y_n) with Σ_n w_n = 1 (w_n = 1/N is BackPACK's
mean reduction; padding has w_n = 0):

- the network is z_0 = x K_0 + b_0, a_1 = σ(z_0), z_1 = a_1 K_1 + b_1, ..., f = z_{L-1}
  (Flax kernels K_l (in, out)); a_0 = x is the input of layer 0;
- the per-sample output-loss Hessian H_n (C, C) is written H_n = Sᵀ S with a square
  root S (V, C): exactly (V = C; diag(√p) - √p pᵀ for cross-entropy as BackPACK,
  √(2/C) I for MSE) or by Monte Carlo (V = M samples; see ``sampled_sqrt``);
- S is backpropagated to every pre-activation z_l: S_{z_l} (V, out_l), so the exact
  GGN block w.r.t. z_l of sample n is S_{z_l}ᵀ S_{z_l};
- since z_l is linear in (K_l, b_l), the GGN (and Hessian) diagonal of the kernel
  entry K_l[j, i] is Σ_n w_n a_{l,n,j}² M_n[i, i] and of the bias b_l[i] is
  Σ_n w_n M_n[i, i], with M_n the per-sample GGN (Hessian) w.r.t. z_l.

DiagHessian backpropagates the full per-sample Hessian w.r.t. z_l instead,
H_{z_l} = D (K H_{z_{l+1}} Kᵀ) D + diag(σ''(z_l) ⊙ ∂ℓ/∂a), D = diag(σ'(z_l)), which is
exact (BackPACK splits the residual diag(σ'' g) into signed square roots; the sum is
the same matrix).

The helpers below (spec and loss checks, forward pass, loss-Hessian square roots,
chunked scans) are shared with ``jax_impl.approx.kronecker``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jax_impl import losses as losses_mod
from jax_impl.approx.structures import Diagonal
from jax_impl.errors import HessianApproxError
from jax_impl.operators import Batches, Problem, _constrain

METHODS = ("diag-ggn", "diag-ggn-mc", "diag-h", "kfac", "kflr", "kfra")
SUPPORTED_ACTIVATIONS = ("relu", "tanh", "sigmoid")
SUPPORTED_LOSSES = ("cross_entropy", "mse")
MATRIX_FREE = "exact, ggn, lanczos, power, hutchinson or slq"


# ---- checks ------------------------------------------------------------------------
def resolve_spec(problem: Problem, spec, method: str):
    """The ModelSpec of ``problem``, checked to be a supported sequential Dense MLP.

    ``spec`` may be None when ``problem.apply`` came from ``models.make_apply`` (the
    spec is read from its Flax module).
    """
    if spec is None:
        for cell in getattr(problem.apply, "__closure__", None) or ():
            try:
                found = getattr(cell.cell_contents, "spec", None)
            except ValueError:  # empty cell
                continue
            if found is not None and hasattr(found, "activation"):
                spec = found
                break
    if isinstance(spec, dict):
        from jax_impl.models import ModelSpec

        spec = ModelSpec.from_dict(spec)
    if spec is None:
        raise HessianApproxError(
            f"{method} cannot tell the network's layers and activation from problem.apply",
            "pass spec=ModelSpec(...) (apply functions from models.make_apply are recognised)",
        )
    kind = getattr(spec, "kind", None)
    if kind != "mlp":
        raise HessianApproxError(
            f"model kind {kind!r} is not supported by {method} (the structured approximations "
            f"{', '.join(METHODS)} handle sequential Dense MLPs only)",
            f"use {MATRIX_FREE} for this model",
        )
    act = getattr(spec, "activation", None)
    if act not in SUPPORTED_ACTIVATIONS:
        raise HessianApproxError(
            f"activation {act!r} after layer Dense_0 is not supported by {method} "
            f"({', '.join(METHODS)} support {', '.join(SUPPORTED_ACTIVATIONS)})",
            f"use {MATRIX_FREE} for this activation",
        )
    names = tuple(f"Dense_{i}" for i in range(len(spec.widths) - 1))
    params = problem.params
    if set(params) != set(names):
        raise HessianApproxError(
            f"parameter layers {sorted(params)} do not match the spec's {list(names)}",
            "pass the ModelSpec the parameters were built from",
        )
    for name, (a, b) in zip(names, zip(spec.widths[:-1], spec.widths[1:])):
        shapes = {k: tuple(jnp.shape(v)) for k, v in params[name].items()}
        if shapes != {"kernel": (a, b), "bias": (b,)}:
            raise HessianApproxError(
                f"layer {name} has parameters {shapes}, the spec expects kernel {(a, b)} and bias {(b,)}",
                "pass the ModelSpec the parameters were built from",
            )
    return spec


def loss_name(problem: Problem, method: str) -> str:
    """``cross_entropy`` or ``mse``: which of jax_impl.losses ``problem.ell`` is."""
    for name in SUPPORTED_LOSSES:
        if problem.ell is losses_mod.LOSSES[name]:
            return name
    got = getattr(problem.ell, "__name__", repr(problem.ell))
    raise HessianApproxError(
        f"loss {got!r} is not supported by {method} ({', '.join(METHODS)} support "
        f"{', '.join(SUPPORTED_LOSSES)} from jax_impl.losses)",
        f"use {MATRIX_FREE} for other losses",
    )


# ---- network pieces ----------------------------------------------------------------
def layers(params, spec) -> list[tuple[jax.Array, jax.Array]]:
    """[(kernel (in, out), bias (out,))] in network order."""
    return [(params[f"Dense_{i}"]["kernel"], params[f"Dense_{i}"]["bias"])
            for i in range(len(spec.widths) - 1)]


def act_derivatives(activation: str, z):
    """(σ(z), σ'(z), σ''(z)), elementwise, as BackPACK writes them (ReLU'(0) = 0)."""
    if activation == "relu":
        return jnp.maximum(z, 0), (z > 0).astype(z.dtype), jnp.zeros_like(z)
    if activation == "tanh":
        t = jnp.tanh(z)
        return t, 1 - t**2, -2 * t * (1 - t**2)
    if activation == "sigmoid":
        s = jax.nn.sigmoid(z)
        return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)
    raise AssertionError(activation)


def forward(lys, activation: str, x):
    """Inputs a_l (B, in_l), σ'(z_l) and σ''(z_l) of the hidden z_l (B, out_l), logits (B, C)."""
    inputs, d1, d2 = [], [], []
    a = x
    for i, (k, b) in enumerate(lys):
        inputs.append(a)
        z = a @ k + b
        if i < len(lys) - 1:
            a, s1, s2 = act_derivatives(activation, z)
            d1.append(s1)
            d2.append(s2)
        else:
            a = z
    return inputs, d1, d2, a


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

    As BackPACK's ``sqrt_hessian_sampled``: rows are gradients of the loss at targets
    drawn from the model's likelihood, divided by √M.
    Cross-entropy: ŷ ~ Categorical(softmax(f)), row p - onehot(ŷ).
    MSE (mean over C; Gaussian with std √(1/2)): row √2 ε / √C, ε ~ N(0, I_C)
    (BackPACK: 2 (y - f) with y ~ N(f, 1/2), over √(N C) for the mean reduction).
    """
    b, c = logits.shape
    if loss == "cross_entropy":
        p = jax.nn.softmax(logits, axis=-1)
        y = jax.random.categorical(key, logits, axis=-1, shape=(mc_samples, b))
        rows = p[None] - jax.nn.one_hot(y, c, dtype=logits.dtype)  # (M, B, C)
        rows = jnp.swapaxes(rows, 0, 1)
    else:
        eps = jax.random.normal(key, (b, mc_samples, c), dtype=logits.dtype)
        rows = math.sqrt(2.0 / c) * eps
    return rows / math.sqrt(mc_samples)


def backprop_sqrt(lys, d1, s):
    """[S_{z_l} (B, V, out_l)] for every layer l, from S (B, V, C) at the logits."""
    out = [s]
    for l in range(len(lys) - 1, 0, -1):
        s = jnp.einsum("nvo,io->nvi", s, lys[l][0]) * d1[l - 1][:, None, :]
        out.append(s)
    return out[::-1]


def scan_chunks(fn, batches: Batches, init, key=None):
    """Σ_c fn(chunk_c, key_c) by lax.scan over chunks (key_c from split(key), or None)."""
    n = batches.x.shape[0]
    keys = jax.random.split(key, n) if key is not None else jnp.zeros((n,), jnp.uint32)

    def body(acc, xs):
        x, y, w, k = xs
        chunk = _constrain(Batches(x, y, w), batches.mesh)
        out = fn(chunk, k if key is not None else None)
        return jax.tree_util.tree_map(jnp.add, acc, out), None

    out, _ = jax.lax.scan(body, init, (batches.x, batches.y, batches.w, keys))
    return out


def zeros_like_layers(spec, dtype):
    """{name: {"bias": (out,), "kernel": (in, out)}} of zeros."""
    return {f"Dense_{i}": {"bias": jnp.zeros((b,), dtype), "kernel": jnp.zeros((a, b), dtype)}
            for i, (a, b) in enumerate(zip(spec.widths[:-1], spec.widths[1:]))}


def _dtype(params):
    return jax.tree_util.tree_leaves(params)[0].dtype


# ---- the diagonal of the GGN, exact or sampled ---------------------------------------
def _diag_from_sqrt(lys, inputs, d1, w, s):
    """{layer: {bias, kernel}} contributions Σ_n w_n ... of one chunk, S (B, V, C) at the logits."""
    out = {}
    for l, sz in enumerate(backprop_sqrt(lys, d1, s)):
        m = jnp.sum(sz**2, axis=1)  # (B, out): diag of the per-sample GGN w.r.t. z_l
        out[f"Dense_{l}"] = {"bias": jnp.einsum("n,ni->i", w, m),
                             "kernel": jnp.einsum("n,nj,ni->ji", w, inputs[l] ** 2, m)}
    return out


@functools.partial(jax.jit, static_argnames=("spec", "loss", "mc_samples"))
def _diag_ggn_core(params, batches, key, spec, loss, mc_samples):
    lys = layers(params, spec)

    def one(c, k):
        inputs, d1, _, logits = forward(lys, spec.activation, c.x)
        s = exact_sqrt(loss, logits) if k is None else sampled_sqrt(loss, logits, k, mc_samples)
        return _diag_from_sqrt(lys, inputs, d1, c.w, s)

    tree = scan_chunks(one, batches, zeros_like_layers(spec, _dtype(params)), key)
    return ravel_pytree(tree)[0]


def diag_ggn(problem: Problem, spec=None) -> Diagonal:
    """The exact diagonal of the GGN (BackPACK ``DiagGGNExact``).

    Args:
      problem: network, loss (cross_entropy or mse) and data.
      spec: its ModelSpec or ModelSpec.to_dict() (default: read from ``problem.apply``).
    Returns:
      Diagonal with diag (d,) in the JAX flat order.
    """
    spec = resolve_spec(problem, spec, "diag-ggn")
    loss = loss_name(problem, "diag-ggn")
    return Diagonal(_diag_ggn_core(problem.params, problem.batches, None, spec, loss, 1))


def diag_ggn_mc(problem: Problem, key: jax.Array, mc_samples: int = 1, spec=None) -> Diagonal:
    """Monte-Carlo diagonal of the GGN / Fisher (BackPACK ``DiagGGNMC(mc_samples)``).

    The loss-Hessian square root is sampled (``sampled_sqrt``), ``mc_samples`` draws per
    sample; chunk c uses ``jax.random.split(key, num_chunks)[c]``. Unbiased: its
    expectation over keys is ``diag_ggn``.
    """
    spec = resolve_spec(problem, spec, "diag-ggn-mc")
    loss = loss_name(problem, "diag-ggn-mc")
    if int(mc_samples) < 1:
        raise HessianApproxError(f"mc_samples={mc_samples} must be at least 1", "pass --mc-samples >= 1")
    return Diagonal(_diag_ggn_core(problem.params, problem.batches, key, spec, loss, int(mc_samples)))


# ---- the exact Hessian diagonal ------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("spec", "loss"))
def _diag_h_core(params, batches, spec, loss):
    lys = layers(params, spec)
    ell = losses_mod.get_loss(loss)
    grad_ell = jax.grad(lambda z, y: jnp.sum(ell(z, y)))  # per-sample gradients (rows)

    def one(c, _):
        inputs, d1, d2, logits = forward(lys, spec.activation, c.x)
        h = losses_mod.output_hessian(loss, logits)  # (B, C, C) per sample, unweighted
        g = grad_ell(logits, c.y)  # (B, C)
        out = {}
        for l in range(len(lys) - 1, -1, -1):
            m = jnp.diagonal(h, axis1=1, axis2=2)  # (B, out_l)
            out[f"Dense_{l}"] = {"bias": jnp.einsum("n,ni->i", c.w, m),
                                 "kernel": jnp.einsum("n,nj,ni->ji", c.w, inputs[l] ** 2, m)}
            if l > 0:
                k = lys[l][0]
                ha = jnp.einsum("io,nop,jp->nij", k, h, k)
                ga = g @ k.T
                h = d1[l - 1][:, :, None] * ha * d1[l - 1][:, None, :]
                h = h + jax.vmap(jnp.diag)(d2[l - 1] * ga)
                g = d1[l - 1] * ga
        return out

    tree = scan_chunks(one, batches, zeros_like_layers(spec, _dtype(params)))
    return ravel_pytree(tree)[0]


def diag_hessian(problem: Problem, spec=None) -> Diagonal:
    """The exact diagonal of the Hessian (BackPACK ``DiagHessian``), without building H.

    Backpropagates the per-sample Hessian w.r.t. each pre-activation (out_l × out_l,
    including the residual diag(σ'' ⊙ ∂ℓ/∂a) of tanh/sigmoid); memory per chunk is
    chunk × max(out_l)².
    """
    spec = resolve_spec(problem, spec, "diag-h")
    loss = loss_name(problem, "diag-h")
    return Diagonal(_diag_h_core(problem.params, problem.batches, spec, loss))
