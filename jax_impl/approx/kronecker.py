"""Kronecker-factored GGN approximations of sequential Dense networks: KFAC, KFLR, KFRA.

All three follow BackPACK 1.7 (``backpack.extensions.KFAC/KFLR/KFRA``) for a loss
L(θ) = Σ_n w_n ℓ(f(θ, x_n), y_n), Σ_n w_n = 1 (w_n = 1/N: BackPACK's mean reduction;
padding w_n = 0). Notation as in ``jax_impl.approx.diagonal``: a_l the input of Dense
layer l, z_l its output (pre-activation), S (V, C) a square root of the per-sample
output-loss Hessian, S_{z_l} (V, out_l) its backpropagation to z_l.

Per layer the result is (G_l, A_l); the bias block is G_l and the kernel block
kron(A_l, G_l) in the Flax (in, out) row-major order (BackPACK's [G, A] for the torch
weight (out, in)); see ``KroneckerBlocks``. In every method

    A_l = Σ_n w_n a_{l,n} a_{l,n}ᵀ                (the batch mean of a aᵀ; BackPACK's
                                                   "E[J^T E(H) J]" expectation approximation)

and G_l differs:

- KFLR (Botev et al. 2017): G_l = Σ_n w_n S_{z_l}ᵀ S_{z_l} with the exact square root,
  i.e. the batch mean of the per-sample GGN w.r.t. z_l. With one sample, G ⊗ A and
  G are exactly the GGN's kernel and bias blocks.
- KFAC (Martens & Grosse 2015): the same with the Monte-Carlo square root
  (``diagonal.sampled_sqrt``: cross-entropy labels drawn from softmax(f); MSE Gaussian
  targets, std √(1/2)), ``mc_samples`` draws per sample, rows scaled by 1/√M.
  E[G_KFAC] = G_KFLR.
- KFRA (Botev et al. 2017): batch averages at every step. Starting from
  Ḡ = Σ_n w_n H_n (C, C) (BackPACK's ``sum_hessian`` with mean reduction),
  G_{L-1} = Ḡ, and going down through Dense layer l and the activation before it:
      Ḡ_a = K_l Ḡ_{z_l} K_lᵀ                       (Linear.ea_jac_t_mat_jac_prod)
      G_{l-1} = Ḡ_{z_{l-1}} = (Σ_n w_n σ'_n σ'_nᵀ) ⊙ Ḡ_a   (Elementwise.ea_jac_t_mat_jac_prod)
  BackPACK runs KFRA with curvature type GGN, which drops the second-order residual
  of tanh and sigmoid (``Curvature.modify_residual`` -> None), so no residual term is
  added here either; ReLU has none. Bias factor = G_l (the averaged matrix itself).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_impl import losses as losses_mod
from jax_impl.approx.diagonal import (
    _dtype, backprop_sqrt, exact_sqrt, forward, layers, loss_name, resolve_spec,
    sampled_sqrt, scan_chunks,
)
from jax_impl.approx.structures import KroneckerBlocks
from jax_impl.errors import HessianApproxError
from jax_impl.operators import Problem


def _names(spec):
    return tuple(f"Dense_{i}" for i in range(len(spec.widths) - 1))


def _zeros(spec, dtype):
    w = spec.widths
    return ([jnp.zeros((b, b), dtype) for b in w[1:]], [jnp.zeros((a, a), dtype) for a in w[:-1]])


@functools.partial(jax.jit, static_argnames=("spec", "loss", "mc_samples"))
def _sqrt_factors(params, batches, key, spec, loss, mc_samples):
    lys = layers(params, spec)

    def one(c, k):
        inputs, d1, _, logits = forward(lys, spec.activation, c.x)
        s = exact_sqrt(loss, logits) if k is None else sampled_sqrt(loss, logits, k, mc_samples)
        gs = [jnp.einsum("n,nvi,nvj->ij", c.w, sz, sz) for sz in backprop_sqrt(lys, d1, s)]
        as_ = [jnp.einsum("n,ni,nj->ij", c.w, a, a) for a in inputs]
        return gs, as_

    return scan_chunks(one, batches, _zeros(spec, _dtype(params)), key)


def kflr(problem: Problem, spec=None) -> KroneckerBlocks:
    """KFLR: exact loss-Hessian square root backpropagated (BackPACK ``KFLR``).

    Args:
      problem: network, loss (cross_entropy or mse) and data.
      spec: its ModelSpec (default: read from ``problem.apply``).
    Returns:
      KroneckerBlocks, G_l (out, out) and A_l (in, in) per layer.
    """
    spec = resolve_spec(problem, spec, "kflr")
    loss = loss_name(problem, "kflr")
    g, a = _sqrt_factors(problem.params, problem.batches, None, spec, loss, 1)
    return KroneckerBlocks(tuple(g), tuple(a), _names(spec))


def kfac(problem: Problem, key: jax.Array, mc_samples: int = 1, spec=None) -> KroneckerBlocks:
    """KFAC: Monte-Carlo loss-Hessian square root backpropagated (BackPACK ``KFAC(mc_samples)``).

    ``mc_samples`` targets are drawn per sample; chunk c uses
    ``jax.random.split(key, num_chunks)[c]``. E[G] over keys is KFLR's G; A is KFLR's A.
    """
    spec = resolve_spec(problem, spec, "kfac")
    loss = loss_name(problem, "kfac")
    if int(mc_samples) < 1:
        raise HessianApproxError(f"mc_samples={mc_samples} must be at least 1", "pass --mc-samples >= 1")
    g, a = _sqrt_factors(problem.params, problem.batches, key, spec, loss, int(mc_samples))
    return KroneckerBlocks(tuple(g), tuple(a), _names(spec))


@functools.partial(jax.jit, static_argnames=("spec", "loss"))
def _kfra_factors(params, batches, spec, loss):
    lys = layers(params, spec)
    dtype = _dtype(params)
    w = spec.widths

    def one(c, _):
        inputs, d1, _, logits = forward(lys, spec.activation, c.x)
        hbar = jnp.einsum("n,nij->ij", c.w, losses_mod.output_hessian(loss, logits))
        as_ = [jnp.einsum("n,ni,nj->ij", c.w, a, a) for a in inputs]
        dd = [jnp.einsum("n,ni,nj->ij", c.w, d, d) for d in d1]
        return hbar, as_, dd

    init = (jnp.zeros((w[-1], w[-1]), dtype),
            [jnp.zeros((a, a), dtype) for a in w[:-1]],
            [jnp.zeros((h, h), dtype) for h in w[1:-1]])
    hbar, as_, dd = scan_chunks(one, batches, init)
    gs = [hbar]
    for l in range(len(lys) - 1, 0, -1):
        k = lys[l][0]
        gs.append(dd[l - 1] * (k @ gs[-1] @ k.T))
    return gs[::-1], as_


def kfra(problem: Problem, spec=None) -> KroneckerBlocks:
    """KFRA: recursive batch-averaged GGN backpropagation (BackPACK ``KFRA``; see module doc)."""
    spec = resolve_spec(problem, spec, "kfra")
    loss = loss_name(problem, "kfra")
    g, a = _kfra_factors(problem.params, problem.batches, spec, loss)
    return KroneckerBlocks(tuple(g), tuple(a), _names(spec))
