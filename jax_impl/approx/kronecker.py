"""Kronecker-factored GGN approximations (KFAC, KFLR, KFRA) with three conventions for convolutions.

Notation (as in ``jax_impl.approx.diagonal``): L(θ) = Σ_n w_n ℓ_n, Σ_n w_n = 1 (w_n = 1/N:
BackPACK's mean reduction; padding w_n = 0). A parameter layer computes
z[t, o] = Σ_j a[t, j] K[j, o] + b[o] at T output locations (Dense: T = 1, a its input;
Conv2d: T = H'·W', a[t] the input patch at t in the kernel's (kh, kw, in) order). S_n
(V, T, O) is the loss-Hessian square root backpropagated to z of sample n
(``diagonal``'s S): exact for KFLR (Botev et al. 2017), sampled for KFAC (Martens &
Grosse 2015; ``mc_samples`` draws, E[SᵀS] exact; chunk c uses split(key, num_chunks)[c]).

Each layer gives (G, A): the kernel block is kron(A, G) on the Flax kernel flattened
row-major to (J, O), the bias block is G (``KroneckerBlocks``; weight and bias separate, as
BackPACK and curvlinops' default ``separate_weight_and_bias=True``). The conventions
(option ``kfac_approx``) differ only for T > 1; for Dense layers all three coincide:

- ``"backpack"`` (default; BackPACK 1.7.1 ``HBPConv2d``, the convention the BackPACK
  comparison uses):
      A = Σ_n w_n Σ_t a_{n,t} a_{n,t}ᵀ              (summed, not averaged, over t)
      G = Σ_n w_n Σ_v (Σ_t S_n[v, t]) (Σ_t S_n[v, t])ᵀ   (= the exact GGN bias block)
- ``"expand"`` (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for
  Modern Neural Network Architectures", KFAC-expand = Grosse & Martens' KFC; curvlinops'
  ``KFACType.EXPAND``: input covariance over all (n, t) divided by N·T, output-gradient
  covariance over all (n, t), the mean reduction's 1/N² corrected to 1/N):
      A = Σ_n w_n (1/T) Σ_t a_{n,t} a_{n,t}ᵀ        (= BackPACK's A / T)
      G = Σ_n w_n Σ_v Σ_t S_n[v, t] S_n[v, t]ᵀ
  Exact when the T locations are independent terms of the loss with equal output Hessians
  (each location's output feeds its own MSE term), for any N.
- ``"reduce"`` (Eschenhagen et al. 2023, KFAC-reduce; curvlinops ``KFACType.REDUCE``:
  averaged patches, output gradients summed over t):
      A = Σ_n w_n ā_n ā_nᵀ, ā_n = (1/T) Σ_t a_{n,t}   (the spatially averaged patch)
      G = Σ_n w_n Σ_v (Σ_t S_n[v, t]) (Σ_t S_n[v, t])ᵀ   (= BackPACK's G)
  Exact when the layer's output is averaged over the locations before anything nonlinear
  (conv -> global average pool -> linear head with MSE), for any N.

KFRA (Botev et al. 2017; BackPACK ``KFRA``) replaces SᵀS by batch averages at every step:
starting from Ḡ = Σ_n w_n H_n (C, C) it goes down with each kind's
``ea_jac_t_mat_jac_prod`` rule (``rules.RULES[kind].kfra``): Dense K Ḡ Kᵀ; Conv2d and
AvgPool2d Jᵀ Ḡ J; MaxPool2d Σ_n w_n J_nᵀ Ḡ J_n; Flatten Ḡ; activations
(Σ_n w_n σ'_n σ'_nᵀ) ⊙ Ḡ (the GGN curvature: no tanh/sigmoid residual, as BackPACK), with
features in the NHWC order. At a parameter layer with Ḡ (T·O, T·O) viewed as blocks
Ḡ[t, :, t', :]: ``backpack`` and ``reduce`` take G = Σ_{t,t'} Ḡ[t, :, t', :] (BackPACK's
``_factor_from_batch_average``), ``expand`` G = Σ_t Ḡ[t, :, t, :] (the same reductions as
above, applied to the batch average); A as for KFLR.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_impl import losses as losses_mod
from jax_impl.approx import network as net
from jax_impl.approx.rules import RULES
from jax_impl.approx.structures import KroneckerBlocks
from jax_impl.batches import chunk_spec
from jax_impl.errors import HessianApproxError

CONVENTIONS = ("backpack", "expand", "reduce")


def check_convention(kfac_approx: str) -> str:
    if kfac_approx not in CONVENTIONS:
        raise HessianApproxError(f"kfac_approx {kfac_approx!r} is not a known convention",
                                 f"choose one of {', '.join(CONVENTIONS)}")
    return kfac_approx


def input_factor(a, w, convention: str):
    """A (J, J) from the unfolded inputs a (B, T, J) and weights w (B,) (module docstring)."""
    if convention == "reduce":
        m = jnp.mean(a, axis=1)
        return jnp.einsum("n,ni,nj->ij", w, m, m)
    aa = jnp.einsum("n,nti,ntj->ij", w, a, a)
    return aa / a.shape[1] if convention == "expand" else aa


def output_factor(s, w, convention: str):
    """G (O, O) from the backpropagated square root s (B, V, T, O) and weights w (B,)."""
    if convention == "expand":
        return jnp.einsum("n,nvti,nvtj->ij", w, s, s)
    st = jnp.sum(s, axis=2)
    return jnp.einsum("n,nvi,nvj->ij", w, st, st)


def output_factor_averaged(m, t: int, convention: str):
    """KFRA's G (O, O) from the batch-averaged Ḡ (T·O, T·O) (NHWC order: location-major)."""
    o = m.shape[0] // t
    m4 = m.reshape(t, o, t, o)
    return jnp.einsum("tatb->ab", m4) if convention == "expand" else jnp.sum(m4, axis=(0, 2))


def _param_nodes(nds):
    return [nd for nd in nds if nd.name]


def _factor_zeros(nds, dtype):
    ps = _param_nodes(nds)
    j = lambda nd: RULES[nd.kind].unfold(nd, jnp.zeros((1, *nd.in_shape), dtype)).shape[-1]
    return ({nd.name: jnp.zeros((nd.out_shape[-1],) * 2, dtype) for nd in ps},
            {nd.name: jnp.zeros((j(nd),) * 2, dtype) for nd in ps})


def _blocks(nds, g, a) -> KroneckerBlocks:
    names = tuple(nd.name for nd in _param_nodes(nds))
    return KroneckerBlocks(tuple(g[n] for n in names), tuple(a[n] for n in names), names)


@functools.partial(jax.jit, static_argnames=("nds", "loss", "mc_samples", "convention"))
def _sqrt_factors(params, batches, key, nds, loss, mc_samples, convention):
    params, batches, key = net.runtime_inputs(params, batches, key)
    def one(c, k):
        xs, logits = net.forward(nds, params, c.x)
        roots = [(net.loss_sqrt(loss, logits, k, mc_samples), None)]
        g, a = {}, {}
        for nd, x, ((s, _),) in net.backprop(nds, params, xs, roots):
            u = RULES[nd.kind].unfold(nd, x)
            g[nd.name] = output_factor(s.reshape(*s.shape[:2], u.shape[1], -1), c.w, convention)
            a[nd.name] = input_factor(u, c.w, convention)
        return g, a

    return net.scan_chunks(one, batches, _factor_zeros(nds, net.dtype_of(params)), key)


def kflr(problem, arch=None, kfac_approx: str = "backpack") -> KroneckerBlocks:
    """KFLR: the exact loss-Hessian square root backpropagated (BackPACK ``KFLR``).

    Args:
      problem: network, loss (cross_entropy or mse) and data.
      arch: its Architecture or dict (default: ``problem.apply.arch``).
      kfac_approx: the convolution convention, "backpack", "expand" or "reduce" (module doc).
    Returns:
      KroneckerBlocks, G (O, O) and A (J, J) per parameter layer, network order.
    """
    nds = net.resolve(problem, arch, "kflr")
    loss = net.loss_name(problem, "kflr")
    conv = check_convention(kfac_approx)
    g, a = _sqrt_factors(problem.params, problem.batches, None, nds, loss, 1, conv)
    return _blocks(nds, g, a)


def kfac(problem, key: jax.Array, mc_samples: int = 1, arch=None, kfac_approx: str = "backpack") -> KroneckerBlocks:
    """KFAC: a Monte-Carlo loss-Hessian square root backpropagated (BackPACK ``KFAC(mc_samples)``).

    E[G] over keys is KFLR's G (same convention); A is KFLR's A.
    """
    nds = net.resolve(problem, arch, "kfac")
    loss = net.loss_name(problem, "kfac")
    conv = check_convention(kfac_approx)
    m = net.check_mc_samples(mc_samples)
    g, a = _sqrt_factors(problem.params, problem.batches, key, nds, loss, m, conv)
    return _blocks(nds, g, a)


@functools.partial(jax.jit, static_argnames=("nds", "loss", "convention"))
def _kfra_factors(params, batches, nds, loss, convention):
    params, batches, _ = net.runtime_inputs(params, batches)
    first = min(i for i, nd in enumerate(nds) if nd.name)
    dtype = net.dtype_of(params)

    def stats(c, _):
        xs, logits = net.forward(nds, params, c.x)
        hbar = jnp.einsum("n,nij->ij", c.w, losses_mod.output_hessian(loss, logits))
        a = {nd.name: input_factor(RULES[nd.kind].unfold(nd, x), c.w, convention)
             for nd, x in zip(nds, xs) if nd.name}
        st = {str(i): RULES[nd.kind].kfra_stat(nd, xs[i], c.w) for i, nd in enumerate(nds) if i > first}
        return hbar, a, {k: v for k, v in st.items() if v is not None}

    shapes = jax.eval_shape(stats, chunk_spec(batches), None)
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, dtype), shapes)
    m, a, st = net.scan_chunks(stats, batches, init)
    g = {}
    for i in range(len(nds) - 1, first - 1, -1):
        nd = nds[i]
        if nd.name:
            g[nd.name] = output_factor_averaged(m, nd.locations, convention)
        if i > first:
            m = RULES[nd.kind].kfra(nd, net.param(params, nd), st.get(str(i)), m)
    return g, a


def kfra(problem, arch=None, kfac_approx: str = "backpack") -> KroneckerBlocks:
    """KFRA: recursive batch-averaged GGN backpropagation (BackPACK ``KFRA``; module doc).

    Holds one (D, D) matrix per layer output (D = its flattened features) and, for each
    activation and max-pool, a (D, D) batch statistic.
    """
    nds = net.resolve(problem, arch, "kfra")
    loss = net.loss_name(problem, "kfra")
    conv = check_convention(kfac_approx)
    g, a = _kfra_factors(problem.params, problem.batches, nds, loss, conv)
    return _blocks(nds, g, a)
