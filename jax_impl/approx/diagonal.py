"""Diagonal curvature approximations of layered networks: DiagGGN, DiagGGN-MC, DiagHessian.

These follow BackPACK's definitions (``DiagGGNExact``, ``DiagGGNMC``, ``DiagHessian``) for a
loss L(θ) = Σ_n w_n ℓ(f(θ, x_n), y_n), Σ_n w_n = 1 (w_n = 1/N is BackPACK's mean
reduction; padding has w_n = 0):

- the per-sample output-loss Hessian H_n (C, C) is written H_n = Sᵀ S with a square root
  S (V, C): exactly (V = C; diag(√p) - √p pᵀ for cross-entropy as BackPACK, √(2/C) I for
  MSE) or by Monte Carlo (V = M draws; ``network.sampled_sqrt``);
- S is backpropagated layer by layer with each kind's Jacobian-transpose rule
  (``rules.RULES[kind].jac_t``) to the output z (B, V, *out_shape) of every parameter layer;
- a parameter layer is z[t, o] = Σ_j a[t, j] K[j, o] + b[o] over its T output locations
  (``rules.RULES[kind].unfold``: Dense T = 1, a = its input; Conv2d T = H'·W', a = the
  input patches), so the per-sample, per-column parameter gradients are
  ∂(S_v·z)/∂K[j, o] = Σ_t a[t, j] S_v[t, o] and ∂(S_v·z)/∂b[o] = Σ_t S_v[t, o], and the GGN
  diagonal is Σ_n w_n Σ_v (that gradient)². For Dense (T = 1) this factors into
  Σ_n w_n a_j² Σ_v S_v[o]²; for Conv2d the sum over t stays inside the square.

DiagHessian adds, at every tanh/sigmoid with input z and output gradient g = ∂ℓ_n/∂σ(z), the
residual diag(σ''(z) ⊙ g) of the per-sample Hessian w.r.t. z, as BackPACK does: split into
signed square roots (one column √|r_k| e_k per feature, sign sign(r_k)) that are
backpropagated like S. Every other kind is piecewise linear (no residual), so for
ReLU networks with max-pooling DiagH = DiagGGN and costs the same. The signed sum is the
exact Hessian diagonal (its cost grows with the features of each tanh/sigmoid layer; see
``network.check_residual_size``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jax_impl import losses as losses_mod
from jax_impl.approx import network as net
from jax_impl.approx.rules import RULES
from jax_impl.approx.structures import Diagonal


def param_diag(nd, x, roots, w):
    """{"bias": (O,), "kernel": Flax shape}: Σ_n w_n Σ_roots Σ_v sign (∂(S_v·z)/∂θ)² for one layer.

    Args:
      nd: the parameter layer's Node.
      x: its input (B, *in_shape).
      roots: [(S (B, V, *out_shape), sign (B, V) or None)] at its output.
      w: (B,) sample weights.
    """
    a = RULES[nd.kind].unfold(nd, x)  # (B, T, J)
    b, t, j = a.shape
    o = nd.out_shape[-1]
    bias, kernel = jnp.zeros((o,), x.dtype), jnp.zeros((j, o), x.dtype)
    for s, sign in roots:
        s = s.reshape(b, s.shape[1], t, o)
        ws = w[:, None] if sign is None else w[:, None] * sign  # (B, V)
        bias = bias + jnp.einsum("nv,nvo->o", ws, jnp.sum(s, axis=2) ** 2)
        if t == 1:
            kernel = kernel + jnp.einsum("nj,no->jo", a[:, 0] ** 2, jnp.einsum("nv,nvo->no", ws, s[:, :, 0] ** 2))
        else:
            grad = jnp.einsum("ntj,nvto->nvjo", a, s)  # per-sample, per-column kernel gradients
            kernel = kernel + jnp.einsum("nv,nvjo->jo", ws, grad**2)
    return {"bias": bias, "kernel": kernel.reshape(nd.layer.param_shapes(nd.in_shape)["kernel"])}


def _zeros(nds, dtype):
    return {nd.name: {k: jnp.zeros(s, dtype) for k, s in nd.layer.param_shapes(nd.in_shape).items()}
            for nd in nds if nd.name}


@functools.partial(jax.jit, static_argnames=("nds", "loss", "mc_samples", "hessian"))
def _diag_core(params, batches, key, nds, loss, mc_samples, hessian):
    params, batches, key = net.runtime_inputs(params, batches, key)
    ell = losses_mod.get_loss(loss)
    grad_ell = jax.grad(lambda z, y: jnp.sum(ell(z, y)))  # per-sample gradients (rows)
    residuals = hessian and net.has_residuals(nds)  # without them DiagH is DiagGGN's computation

    def one(c, k):
        xs, logits = net.forward(nds, params, c.x)
        roots = [(net.loss_sqrt(loss, logits, k, mc_samples), None)]
        g = grad_ell(logits, c.y) if residuals else None
        return {nd.name: param_diag(nd, x, r, c.w) for nd, x, r in net.backprop(nds, params, xs, roots, g)}

    tree = net.scan_chunks(one, batches, _zeros(nds, net.dtype_of(params)), key)
    return ravel_pytree(tree)[0]


def diag_ggn(problem, arch=None) -> Diagonal:
    """The exact diagonal of the GGN (BackPACK ``DiagGGNExact``).

    Args:
      problem: network, loss (cross_entropy or mse) and data.
      arch: its Architecture or dict (default: ``problem.apply.arch``).
    Returns:
      Diagonal with diag (d,) in the JAX flat order.
    """
    nds = net.resolve(problem, arch, "diag-ggn")
    loss = net.loss_name(problem, "diag-ggn")
    return Diagonal(_diag_core(problem.params, problem.batches, None, nds, loss, 1, False))


def diag_ggn_mc(problem, key: jax.Array, mc_samples: int = 1, arch=None) -> Diagonal:
    """Monte-Carlo diagonal of the GGN / Fisher (BackPACK ``DiagGGNMC(mc_samples)``).

    ``mc_samples`` draws per sample; chunk c uses ``jax.random.split(key, num_chunks)[c]``.
    Unbiased: its expectation over keys is ``diag_ggn``.
    """
    nds = net.resolve(problem, arch, "diag-ggn-mc")
    loss = net.loss_name(problem, "diag-ggn-mc")
    m = net.check_mc_samples(mc_samples)
    return Diagonal(_diag_core(problem.params, problem.batches, key, nds, loss, m, False))


def diag_hessian(problem, arch=None) -> Diagonal:
    """The exact diagonal of the Hessian (BackPACK ``DiagHessian``), without building H.

    ReLU networks cost what DiagGGN costs; each tanh/sigmoid layer adds one backpropagated
    column per feature (refused beyond ``network.MAX_ELEMENTS`` values per chunk).
    """
    nds = net.resolve(problem, arch, "diag-h")
    loss = net.loss_name(problem, "diag-h")
    x = problem.batches.x
    net.check_residual_size(nds, x.shape[1], nds[-1].out_shape[-1], "diag-h")
    return Diagonal(_diag_core(problem.params, problem.batches, None, nds, loss, 1, True))
