"""Per-layer curvature rules, one entry per layer kind (BackPACK's derivatives, kfac-jax's blocks).

Every rule works on a batch: per-sample shapes are the architecture's (channels last),
inputs ``x`` are (B, *in_shape), backpropagated square roots ``s`` are (B, V, *out_shape)
(V columns per sample: classes, Monte-Carlo draws or residual directions). A rule gives

- ``forward(node, p, x)``: the layer's output, computed as the Flax model computes it
  (same primitives, so max-pool ties route identically);
- ``jac_t(node, p, x, s)``: Jacobian-transpose products (B, V, *out) -> (B, V, *in)
  (BackPACK ``jac_t_mat_prod``): average pooling by JAX's own vjp vmapped over V; max-pooling
  through the window each output took, read off JAX's vjp (``_pool_selection``); convolution
  as an explicit transposed convolution (tests check each against jax.vjp of the layer);
- ``residual(node, x, g)``: the input Hessian's second-order term Σ_k g_k ∇²out_k as a
  diagonal (B, *in) when it is not zero: σ''(x) ⊙ g for tanh and sigmoid (BackPACK's
  ``hessian_diagonal``); None for piecewise-linear layers (dense, conv, pools, flatten, ReLU);
- ``kfra_stat(node, x, w)`` and ``kfra(node, p, stat, m)``: KFRA's batch-averaged
  backpropagation m (D_out, D_out) -> Σ_n w_n J_nᵀ m J_n (D_in, D_in), features flattened
  in the NHWC order (BackPACK ``ea_jac_t_mat_jac_prod``); ``stat`` is the per-chunk weighted
  sum of whatever the per-sample Jacobian depends on (None where it does not);
- for Dense and Conv2d, ``unfold(node, x)`` (B, T, J): the inputs the parameters multiply,
  so that out[n, t, o] = Σ_j unfold[n, t, j] K[j, o] + b[o] with K the Flax kernel
  flattened row-major to (J, O). Dense: T = 1, J = in. Conv2d: T = H'·W' output locations,
  J = kh·kw·C_in patch entries in the kernel's (kh, kw, in) order (BackPACK's unfold order
  is (in, kh, kw); the bridge permutes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_impl import models


@dataclasses.dataclass(frozen=True)
class Node:
    """One layer in its network: ``layer`` maps (B, *in_shape) -> (B, *out_shape); ``name``
    is the Flax name of a parameter layer (``Conv_0``), else None."""

    index: int
    layer: Any
    in_shape: tuple
    out_shape: tuple
    name: str | None = None

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def locations(self) -> int:
        """T: output locations sharing the parameters (1 for Dense, H'·W' for Conv2d)."""
        return 1 if len(self.out_shape) == 1 else math.prod(self.out_shape[:-1])


def nodes(arch) -> tuple[Node, ...]:
    """The Nodes of an Architecture, network order."""
    names = {p.index: p.name for p in arch.param_layers}
    shapes = arch.shapes
    return tuple(Node(i, l, shapes[i], shapes[i + 1], names.get(i)) for i, l in enumerate(arch.layers))


# ---- shared pieces ----------------------------------------------------------------------
def act_derivatives(name: str, z):
    """(σ(z), σ'(z), σ''(z)) elementwise, as BackPACK and JAX's autodiff write them (ReLU'(0) = 0)."""
    if name == "relu":
        return jnp.maximum(z, 0), (z > 0).astype(z.dtype), jnp.zeros_like(z)
    if name == "tanh":
        t = jnp.tanh(z)
        return t, 1 - t**2, -2 * t * (1 - t**2)
    if name == "sigmoid":
        s = jax.nn.sigmoid(z)
        return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)
    raise AssertionError(name)


def _window_index(in_shape, window, stride, pads) -> np.ndarray:
    """Static gather index (H', W', kh, kw) into the (H + 2ph)·(W + 2pw) padded pixels."""
    h, w, _ = in_shape
    (kh, kw), (sh, sw), (ph, pw) = window, stride, pads
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    r = (np.arange(oh) * sh)[:, None, None, None] + np.arange(kh)[None, None, :, None]
    c = (np.arange(ow) * sw)[None, :, None, None] + np.arange(kw)[None, None, None, :]
    return r * wp + c


def windows(x, window, stride, pads=(0, 0)):
    """Zero-padded sliding windows by an exact gather: (B, H, W, C) -> (B, H', W', kh, kw, C)."""
    ph, pw = pads
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))) if ph or pw else x
    idx = _window_index(x.shape[1:], window, stride, pads)
    return xp.reshape(x.shape[0], -1, x.shape[-1])[:, idx]


def _sandwich(node, p, stat, m):
    """Jᵀ m J for a layer whose Jacobian J is the same for every sample (Conv2d, AvgPool2d;
    BackPACK's ``ea_jac_t_mat_jac_prod``): the rule's own jac_t on the rows of m, twice.
    (D_out, D_out) -> (D_in, D_in)."""
    x0 = jnp.zeros((1, *node.in_shape), m.dtype)  # linear layers: J does not depend on x
    jt = lambda rows: RULES[node.kind].jac_t(node, p, x0, rows.reshape(1, -1, *node.out_shape)).reshape(-1, node.d_in)
    return jt(jt(m).T).T  # rows: m J (D_out, D_in); again on its columns: Jᵀ m J (m symmetric)


# ---- per kind ---------------------------------------------------------------------------
def _dense_forward(node, p, x):
    return x @ p["kernel"] + p["bias"]


def _conv_forward(node, p, x):
    """As flax.linen.Conv: lax.conv_general_dilated (NHWC, HWIO) plus the bias."""
    ph, pw = node.layer.pads(node.in_shape)
    y = lax.conv_general_dilated(x, p["kernel"], node.layer.stride, ((ph, ph), (pw, pw)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"]


def _conv_jac_t(node, p, x, s):
    """Jᵀ s for a convolution: the transposed convolution, written as a forward convolution
    (flipped kernel with in/out swapped, input dilated by the stride, padding k - 1 - p plus
    the rows the forward's floor left out). Equal to jax.vjp of the layer (whose dimension-
    number form XLA:CPU runs ~6x slower inside the chunk scan). (B, V, *out) -> (B, V, *in)."""
    l, (b, v) = node.layer, s.shape[:2]
    (h, w, _), (oh, ow, o) = node.in_shape, node.out_shape
    kt = jnp.flip(p["kernel"], (0, 1)).transpose(0, 1, 3, 2)
    cfg = [(k - 1 - q, k - 1 - q + size + 2 * q - k - (n - 1) * st)
           for size, k, st, q, n in zip((h, w), l.kernel, l.stride, l.pads(node.in_shape), (oh, ow))]
    y = lax.conv_general_dilated(s.reshape(b * v, oh, ow, o), kt, (1, 1), cfg, lhs_dilation=l.stride,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, v, *node.in_shape)


def _conv_unfold(node, x):
    """(B, H, W, C) -> patches (B, H'·W', kh·kw·C) in the kernel's (kh, kw, in) order."""
    l = node.layer
    u = windows(x, l.kernel, l.stride, l.pads(node.in_shape))
    return u.reshape(x.shape[0], node.locations, -1)


def _free_forward(node, p, x):
    """Parameter-free layers through the Flax model's own callables (identical routing)."""
    return models.FLAX_LAYERS[node.kind](node.layer, None, x.dtype, node.in_shape)(x)


def _vjp_jac_t(node, p, x, s):
    """Jᵀ s per sample by JAX's vjp of the batched forward, vmapped over the V columns."""
    _, vjp = jax.vjp(lambda u: RULES[node.kind].forward(node, p, u), x)
    return jax.vmap(lambda c: vjp(c)[0], in_axes=1, out_axes=1)(s)


def _act_jac_t(node, p, x, s):
    return s * act_derivatives(node.layer.name, x)[1][:, None]


def _act_residual(node, x, g):
    """σ''(x) ⊙ g (B, *in) for tanh and sigmoid; None for ReLU (σ'' = 0)."""
    if node.layer.name == "relu":
        return None
    return act_derivatives(node.layer.name, x)[2] * g


def _act_kfra_stat(node, x, w):
    """Σ_n w_n σ'_n σ'_nᵀ (D, D) over flattened features (BackPACK elementwise ea rule)."""
    d = act_derivatives(node.layer.name, x)[1].reshape(x.shape[0], -1)
    return jnp.einsum("n,ni,nj->ij", w, d, d)


def _pool_selection(node, x):
    """0/1 (B, H', W', kh, kw, C): which window entry each max-pool output takes.

    Derived from JAX's own vjp: the windows are laid out side by side as a non-overlapping
    (H'·kh, W'·kw) image, max-pooled with the same window (same primitive, same order in
    the window, hence the same tie-break as the model's forward) and differentiated with
    a cotangent of ones.
    """
    b, (kh, kw), c = x.shape[0], node.layer.window, x.shape[-1]
    u = windows(x, node.layer.window, node.layer.stride)
    oh, ow = u.shape[1:3]
    tiles = u.transpose(0, 1, 3, 2, 4, 5).reshape(b, oh * kh, ow * kw, c)
    pool = lambda t: models.FLAX_LAYERS["maxpool2d"](dataclasses.replace(node.layer, stride=(kh, kw)), None,
                                                      t.dtype, t.shape[1:])(t)
    y, vjp = jax.vjp(pool, tiles)
    sel = vjp(jnp.ones_like(y))[0]
    return sel.reshape(b, oh, kh, ow, kw, c).transpose(0, 1, 3, 2, 4, 5)


def windows_t(u, in_shape, window, stride):
    """The transpose of ``windows`` (no padding): (..., H', W', kh, kw, C) -> (..., H, W, C),
    each window entry added back to its pixel. Deterministic (no scatter, whose atomic adds
    reorder sums on GPUs): a reshape where the windows tile the image, else one strided
    placement (lax.pad with interior padding) per window offset."""
    (h, w, c), (kh, kw), (sh, sw) = in_shape, window, stride
    lead, (oh, ow) = u.shape[:-5], u.shape[-5:-3]
    u = u.reshape(-1, oh, ow, kh, kw, c)
    if (sh, sw) == (kh, kw):
        img = u.transpose(0, 1, 3, 2, 4, 5).reshape(-1, oh * kh, ow * kw, c)
        out = jnp.pad(img, ((0, 0), (0, h - oh * kh), (0, w - ow * kw), (0, 0)))
    else:
        out = 0
        for i in range(kh):
            for j in range(kw):
                rows = (i, h - i - (oh - 1) * sh - 1, sh - 1)  # (low, high, interior) padding
                cols = (j, w - j - (ow - 1) * sw - 1, sw - 1)
                out = out + lax.pad(u[:, :, :, i, j], jnp.zeros((), u.dtype), [(0, 0, 0), rows, cols, (0, 0, 0)])
    return out.reshape(*lead, h, w, c)


def _maxpool_jac_t(node, p, x, s):
    """Jᵀ s: each output's column routed to the window entry the forward took (``_pool_selection``)."""
    sel = _pool_selection(node, x)  # (B, H', W', kh, kw, C)
    u = s[:, :, :, :, None, None, :] * sel[:, None]
    return windows_t(u, node.in_shape, node.layer.window, node.layer.stride)


def _maxpool_kfra_stat(node, x, w):
    """Q = Σ_n w_n s_n s_nᵀ (E, E), s_n the flattened selection (E = H'·W'·kh·kw·C)."""
    s = _pool_selection(node, x).reshape(x.shape[0], -1)
    return jnp.einsum("n,ni,nj->ij", w, s, s)


def _maxpool_kfra(node, p, q, m):
    """Σ_n w_n J_nᵀ m J_n for max-pooling: J_n = Sel_n ∘ U (U the window gather, Sel_n picking
    the entry each window took), so the sum is Uᵀ ((m expanded over the window) ⊙ Q) U with
    Q = Σ_n w_n s_n s_nᵀ the selection statistic (``_maxpool_kfra_stat``); as BackPACK's
    per-sample loop, in one pass. (D_out, D_out) -> (D_in, D_in), E² memory."""
    (kh, kw), c = node.layer.window, node.in_shape[-1]
    oh, ow = node.out_shape[:2]
    e = oh * ow * kh * kw * c
    mx = jnp.broadcast_to(m.reshape(oh, ow, 1, 1, c, oh, ow, 1, 1, c), (oh, ow, kh, kw, c) * 2).reshape(e, e)
    mx = mx * q
    def ut(a):  # (R, E) -> (R, D_in): Uᵀ applied to every row
        u = a.reshape(-1, oh, ow, kh, kw, c)
        return windows_t(u, node.in_shape, node.layer.window, node.layer.stride).reshape(a.shape[0], -1)

    return ut(ut(mx).T).T  # Uᵀ mx U, rows then columns


@dataclasses.dataclass(frozen=True)
class Rule:
    """The curvature rules of one layer kind (see the module docstring)."""

    forward: Callable
    jac_t: Callable
    kfra: Callable
    residual: Callable = lambda node, x, g: None
    kfra_stat: Callable = lambda node, x, w: None
    unfold: Callable | None = None


RULES: dict[str, Rule] = {
    "dense": Rule(
        forward=_dense_forward,
        jac_t=lambda node, p, x, s: s @ p["kernel"].T,
        kfra=lambda node, p, stat, m: p["kernel"] @ m @ p["kernel"].T,
        unfold=lambda node, x: x[:, None, :]),
    "conv2d": Rule(
        forward=_conv_forward,
        jac_t=_conv_jac_t,
        kfra=_sandwich,
        unfold=_conv_unfold),
    "maxpool2d": Rule(
        forward=_free_forward, jac_t=_maxpool_jac_t, kfra=_maxpool_kfra, kfra_stat=_maxpool_kfra_stat),
    "avgpool2d": Rule(
        forward=_free_forward, jac_t=_vjp_jac_t, kfra=_sandwich),
    "flatten": Rule(
        forward=_free_forward,
        jac_t=lambda node, p, x, s: s.reshape(*s.shape[:2], *node.in_shape),
        kfra=lambda node, p, stat, m: m),
    "activation": Rule(
        forward=_free_forward,
        jac_t=_act_jac_t,
        kfra=lambda node, p, stat, m: stat * m,
        residual=_act_residual,
        kfra_stat=_act_kfra_stat),
}
