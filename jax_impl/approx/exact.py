"""The exact GGN and Hessian from per-layer structure (Dense, Conv2d), far fewer flops than d Hvps.

For a parameter layer l with unfolded inputs u (B, T, J) and backpropagated loss square
root s (B, V, T, O) (``rules``), the per-sample, per-column gradient of its kernel and bias is
g_l[n, v] = [Σ_t s[n, v, t];  Σ_t u[n, t] ⊗ s[n, v, t]], laid out as (1+J, O): the bias as
row 0, then the kernel flattened row-major (flax's own flat order, so a layer's block lands in
one contiguous slice of the matrix). The GGN is Σ_n w_n Σ_v g[n, v] g[n, v]ᵀ, block by block:

- a Dense layer (T = 1) stays factored, g = ũ ⊗ s with ũ = [1; u], so its blocks are
  Σ_n ũ_n ũ_nᵀ ⊗ (s_nᵀ s_n): one matrix product over samples, V times fewer flops than
  forming g, and a diagonal block needs only the O(O+1)/2 distinct pairs of s_nᵀ s_n;
- a Conv2d layer forms g (B, V, P) and its blocks are one matrix product over (n, v).

For piecewise-linear networks (ReLU, max/average pooling, flatten) f is linear in each
layer's parameters, so the within-layer Hessian blocks equal the GGN's, and for layers
l < m the Hessian adds R_lm = ∂F_m/∂θ_l with F_m(θ_l) = Σ_n Σ_t u_m[n, t](θ_l) ⊗ δ_m[n, t],
δ_m the loss gradient backpropagated to layer m's output (held fixed: its dependence on θ_l
is the GGN's part, and the Jacobian from layer m's output to the logits does not depend on
lower layers). R_lm is a Jacobian of layer inputs: jacfwd or jacrev, whichever side is smaller.
The Hvp route (``materialize.dense``) stays the fallback for other networks and the test oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.approx import network as net
from jax_impl.approx.rules import RULES
from jax_impl.batches import chunk_spec
from jax_impl.errors import HessianApproxError
from jax_impl.operators import Problem

PIECEWISE_LINEAR = ("relu",)  # activations whose second derivative is zero almost everywhere


def _param_nodes(nds):
    return tuple(nd for nd in nds if nd.name)


def _layout(nd, x) -> tuple[int, int, int]:
    """(T, J, O) of a parameter layer: locations, unfolded inputs, outputs."""
    u = RULES[nd.kind].unfold(nd, x)
    return u.shape[1], u.shape[2], nd.out_shape[-1]


def _factors(nds, params, c, loss):
    """Per layer (name -> (u (B, T, J), s (B, V, T, O), delta (B, T, O))) for one chunk; w folded into s, delta."""
    xs, logits = net.forward(nds, params, c.x)
    sqrt_w = jnp.sqrt(c.w).astype(logits.dtype)
    root = net.exact_sqrt(loss, logits) * sqrt_w[:, None, None]
    ell = net.losses_mod.LOSSES[loss]
    grad = jax.grad(lambda f: jnp.sum(c.w * ell(f, c.y)))(logits)  # (B, C), weights included
    out = {}
    for nd, x, ((s, _), (g, _)) in net.backprop(nds, params, xs, [(root, None), (grad[:, None], None)]):
        u = RULES[nd.kind].unfold(nd, x)
        b, t, _ = u.shape
        out[nd.name] = (u, s.reshape(b, s.shape[1], t, -1), g.reshape(b, t, -1))
    return xs, out


def _g_full(u, s):
    """(B, V, (J+1)·O) per-sample, per-column gradients of kernel and bias."""
    kern = jnp.einsum("btj,bvto->bvjo", u, s)
    g = jnp.concatenate([jnp.sum(s, axis=2)[:, :, None], kern], axis=2)
    return g.reshape(*g.shape[:2], -1)


def _ggn_block(fl, fm):
    """Σ_n Σ_v g_l g_mᵀ (P_l, P_m) for two layers given as ("kron", ũ, s) or ("full", g)."""
    if fl[0] == "kron" and fm[0] == "kron":
        return _kron_block(fl[1], fl[2], fm[1], fm[2], symmetric=fl is fm)
    if fl[0] == "kron":
        t = jnp.einsum("nvi,nvq->niq", fl[2], fm[1])
        blk = jnp.einsum("na,niq->aiq", fl[1], t)
        return blk.reshape(-1, blk.shape[-1])
    if fm[0] == "kron":
        return _ggn_block(fm, fl).T
    return jnp.einsum("nvp,nvq->pq", fl[1], fm[1])


def _kron_block(ul, sl, um, sm, symmetric: bool):
    """Σ_n (ũ_l,n ⊗ s_l,n)ᵀ(ũ_m,n ⊗ s_m,n) (A·I, B·J), laid out (a, i, b, j), as one product over n.

    ``ul`` (N, A), ``sl`` (N, V, I), ``um`` (N, B), ``sm`` (N, V, J). Block (i, j) is
    ũ_lᵀ diag(m_ij) ũ_m with m = sᵀ s per sample; ``symmetric`` (a diagonal block, l = m):
    only the pairs i <= j are multiplied (m_ij = m_ji), 0.55x the flops at I = 10.
    """
    n, a = ul.shape
    m = jnp.einsum("nvi,nvj->nij", sl, sm)
    if not symmetric:
        c = m[:, :, None, :] * um[:, None, :, None]  # (n, i, b, j): the product lands in (a, i, b, j)
        return (ul.T @ c.reshape(n, -1)).reshape(a * sl.shape[2], -1)
    i = sl.shape[2]
    iu, ju = np.triu_indices(i)
    c = m[:, iu, ju][:, :, None] * ul[:, None, :]  # (n, pair, b)
    p = (ul.T @ c.reshape(n, -1)).reshape(a, len(iu), a)
    pair = np.zeros((i, i), np.int32)
    pair[iu, ju] = pair[ju, iu] = np.arange(len(iu))
    return jnp.take(p, pair, axis=1).transpose(0, 1, 3, 2).reshape(a * i, a * i)


def _form(u, s):
    if u.shape[1] == 1:  # Dense: keep ũ ⊗ s factored
        ut = jnp.concatenate([jnp.ones((u.shape[0], 1), u.dtype), u[:, 0]], axis=1)
        return ("kron", ut, s[:, :, 0])
    return ("full", _g_full(u, s))


def _theta(nd, params, mat):
    """The layer's {kernel, bias} from the (1+J, O) layout."""
    shape = params[nd.name]["kernel"].shape
    return {**params, nd.name: {"kernel": mat[1:].reshape(shape), "bias": mat[0]}}


def _residual_block(nds, params, c, l_nd, m_nd, delta_m):
    """R_lm (P_l, P_m) = ∂F_m/∂θ_l, F_m(θ_l) = Σ_n Σ_t u_m[n, t] ⊗ δ_m[n, t] (m's bias columns are zero)."""
    i_m = next(i for i, nd in enumerate(nds) if nd.name == m_nd.name)
    pl = params[l_nd.name]
    theta0 = jnp.concatenate([pl["bias"][None], pl["kernel"].reshape(-1, pl["kernel"].shape[-1])], axis=0)

    def f_m(theta):
        _, x_m = net.forward(nds[:i_m], _theta(l_nd, params, theta), c.x)
        return jnp.einsum("btj,bto->jo", RULES[m_nd.kind].unfold(m_nd, x_m), delta_m)

    j_m, o_m = jax.eval_shape(f_m, theta0).shape
    jac = (jax.jacfwd if theta0.size <= j_m * o_m else jax.jacrev)(f_m)(theta0)  # (J_m, O_m, J_l+1, O_l)
    jac = jnp.concatenate([jnp.zeros((o_m, theta0.size), jac.dtype), jac.reshape(j_m * o_m, theta0.size)])
    return jac.T


@functools.partial(jax.jit, static_argnames=("nds", "loss", "hessian"))
def _blocks(params, batches, nds, loss, hessian):
    """{(l, m): block (P_l, P_m)} for l <= m over the parameter layers, summed over chunks."""
    params, batches, _ = net.runtime_inputs(params, batches)
    names = [nd.name for nd in _param_nodes(nds)]
    pnodes = dict(zip(names, _param_nodes(nds)))

    def one(c, _):
        _, fac = _factors(nds, params, c, loss)
        forms = {n: _form(u, s) for n, (u, s, _) in fac.items()}
        out = {}
        for i, l in enumerate(names):
            for m in names[i:]:
                blk = _ggn_block(forms[l], forms[m])
                if hessian and m != l:
                    blk = blk + _residual_block(nds, params, c, pnodes[l], pnodes[m], fac[m][2])
                out[(l, m)] = blk
        return out

    shapes = jax.eval_shape(lambda c: one(c, None), chunk_spec(batches))
    init = jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, sd.dtype), shapes)
    return net.scan_chunks(one, batches, init)


def _flat_index(problem: Problem, nd) -> np.ndarray:
    """Positions in the flat parameter vector of the layer's (1+J, O) layout (bias, then kernel rows)."""
    idx = problem.unravel(jnp.arange(problem.dim))
    kern, bias = np.asarray(idx[nd.name]["kernel"]), np.asarray(idx[nd.name]["bias"])
    return np.concatenate([bias[None], kern.reshape(-1, kern.shape[-1])]).ravel()


def _where(index: np.ndarray):
    """A slice for ``index`` if it is a contiguous ascending range (flax's order), else the index itself."""
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


def _check(problem: Problem, arch, hessian: bool, what: str):
    nds = net.resolve(problem, arch, what)
    loss = net.loss_name(problem, what)
    for nd in nds:
        if nd.name and set(problem.params[nd.name]) != {"kernel", "bias"}:
            raise HessianApproxError(f"layer {nd.name} has parameters {sorted(problem.params[nd.name])}",
                                     "use the Hvp route (materialize.dense(operators.hvp(problem)))")
        if hessian and nd.kind == "activation" and nd.layer.name not in PIECEWISE_LINEAR:
            raise HessianApproxError(
                f"{what} needs a piecewise-linear network, but layer {nd.index} is {nd.layer.name}",
                "use the Hvp route (materialize.dense(operators.hvp(problem))) for smooth activations")
    return nds, loss


def _assemble(problem: Problem, nds, blocks) -> np.ndarray:
    dim = problem.dim
    out = np.zeros((dim, dim), dtype=np.dtype(problem.dtype))
    index = {nd.name: _flat_index(problem, nd) for nd in _param_nodes(nds)}
    if sum(len(v) for v in index.values()) != dim:
        raise HessianApproxError("the parameter layers do not cover every parameter",
                                 "use the Hvp route (materialize.dense(operators.hvp(problem)))")
    for (l, m), blk in blocks.items():
        blk = np.asarray(blk)
        rows, cols = _where(index[l]), _where(index[m])
        contiguous = isinstance(rows, slice) and isinstance(cols, slice)
        out[(rows, cols) if contiguous else np.ix_(index[l], index[m])] = blk
        if l != m:
            out[(cols, rows) if contiguous else np.ix_(index[m], index[l])] = blk.T
    return out


def ggn_by_structure(problem: Problem, arch=None) -> np.ndarray:
    """The exact GGN (d, d) of a Dense/Conv2d network with cross-entropy or MSE, from per-layer structure.

    Args:
      problem: network (``models.make_apply``), loss and data.
      arch: the Architecture (default: ``problem.apply.arch``).
    Returns:
      numpy (d, d) in the parameters' dtype and flat order (``problem.unravel``).
    Raises:
      HessianApproxError for layers outside the rules or other losses.
    """
    nds, loss = _check(problem, arch, hessian=False, what="ggn_by_structure")
    return _assemble(problem, nds, _blocks(problem.params, problem.batches, nds, loss, False))


def hessian_by_structure(problem: Problem, arch=None) -> np.ndarray:
    """The exact Hessian (d, d) of a piecewise-linear Dense/Conv2d network (ReLU, pooling, flatten).

    Within-layer blocks are the GGN's; cross-layer blocks add the residual Jacobians (module
    docstring). Same arguments and result as ``ggn_by_structure``; refuses smooth activations.
    """
    nds, loss = _check(problem, arch, hessian=True, what="hessian_by_structure")
    return _assemble(problem, nds, _blocks(problem.params, problem.batches, nds, loss, True))


def unsupported(problem: Problem, arch=None, hessian: bool = True) -> str | None:
    """Why ``hessian_by_structure`` (or ``ggn_by_structure`` when not ``hessian``) cannot take
    ``problem``, or None when it can."""
    try:
        _check(problem, arch, hessian, "hessian_by_structure" if hessian else "ggn_by_structure")
    except HessianApproxError as err:
        return err.problem
    return None
