"""The Flax side of the architecture description: one module per layer kind, padding and strides explicit."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hessian_approx.architecture import Architecture, mlp, parse  # noqa: F401  (re-exported)
from hessian_approx.errors import HessianApproxError

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid}


def windows(x, window, stride, pads=(0, 0)):
    """Sliding windows of images, by strided slices (no gather, no convolution).

    Args:
      x: (B, H, W, C).
      window: (kh, kw); stride: (sh, sw); pads: symmetric zero padding (ph, pw).
    Returns:
      (B, H', W', kh*kw, C), the window axis in row-major (i, j) order, as torch's
      unfold and max-pool scan it.
    """
    (kh, kw), (sh, sw), (ph, pw) = window, stride, pads
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return jnp.stack([x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
                      for i in range(kh) for j in range(kw)], axis=3)


def patches(x, window, stride, pads=(0, 0)):
    """Unfolded convolution inputs (B, H', W', kh*kw*C) in (kh, kw, C) order: the rows of an HWIO kernel."""
    w = windows(x, window, stride, pads)
    return w.reshape(*w.shape[:3], -1)


class Conv2d(nn.Module):
    """Conv2d as patches @ kernel (im2col): Flax nn.Conv's parameters (kernel HWIO, bias) and function.

    Under ``vmap`` over parameter tangents (dense Hessians, batched Hvps) XLA:CPU runs
    nn.Conv's convolutions as grouped convolutions, 20x slower than this matrix product.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int]

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, x.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), x.dtype)
        return patches(x, self.kernel_size, self.strides, self.pads) @ kernel.reshape(-1, self.features) + bias


def max_pool(x, window, stride):
    """Max pooling without padding; the gradient goes to the first maximum of each window in
    row-major order (as torch's MaxPool2d routes it), never split among ties."""
    w = windows(x, window, stride)
    first = jnp.argmax(jax.lax.stop_gradient(w), axis=3, keepdims=True)
    return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, w.shape, 3) == first, w, 0), axis=3)


def avg_pool(x, window, stride):
    """Average pooling without padding."""
    return jnp.mean(windows(x, window, stride), axis=3)


# kind -> (layer, Flax name, param dtype, per-sample input shape) -> callable on (B, *in_shape).
# Every padding and stride is explicit (Flax's own defaults, SAME convolutions and stride-1
# pooling, would build a different network than torch's).
FLAX_LAYERS: dict[str, Callable] = {
    "dense": lambda layer, name, dtype, shape: nn.Dense(layer.features, name=name, param_dtype=dtype),
    "conv2d": lambda layer, name, dtype, shape: Conv2d(layer.features, layer.kernel, layer.stride,
                                                       layer.pads(shape), name=name),
    "maxpool2d": lambda layer, name, dtype, shape: (lambda x: max_pool(x, layer.window, layer.stride)),
    "avgpool2d": lambda layer, name, dtype, shape: (lambda x: avg_pool(x, layer.window, layer.stride)),
    "flatten": lambda layer, name, dtype, shape: (lambda x: x.reshape(x.shape[0], -1)),
    "activation": lambda layer, name, dtype, shape: ACTIVATIONS[layer.name],
}


class Network(nn.Module):
    """The Flax network of an Architecture: (B, *input_shape) -> logits (B, C)."""

    arch: Architecture

    @nn.compact
    def __call__(self, x):
        names = {p.index: p.name for p in self.arch.param_layers}
        for i, (layer, shape) in enumerate(zip(self.arch.layers, self.arch.shapes)):
            x = FLAX_LAYERS[layer.kind](layer, names.get(i), x.dtype, shape)(x)
        return x


def build(arch: Architecture) -> Network:
    """The Flax module for ``arch``."""
    return Network(arch)


def init_params(arch: Architecture, key: jax.Array, dtype=jnp.float32) -> dict:
    """Initial parameters {"Conv_0": {"kernel" (kh, kw, in, out), "bias"}, "Dense_0": {...}} (Flax defaults).

    One compiled program per (architecture, dtype): Flax's eager initialization compiles each
    initializer per parameter shape (0.5-0.7 s each on 2 cores). The same draws either way.
    """
    return _init_fn(arch, np.dtype(dtype))(key)


@functools.lru_cache(maxsize=64)
def _init_fn(arch: Architecture, dtype: np.dtype):
    x = jax.ShapeDtypeStruct((1, *arch.input_shape), dtype)
    return jax.jit(lambda key: build(arch).init(key, jnp.zeros(x.shape, x.dtype))["params"])


def make_apply(arch: Architecture) -> Callable:
    """``apply(params, x) -> logits``: x (B, *input_shape) -> (B, C)."""
    module = build(arch)

    def apply(params, x):
        return module.apply({"params": params}, x)

    apply.arch = arch  # lets the structured approximations find the layers
    return apply


def cast_params(params, dtype):
    """Cast every leaf of a parameter tree to ``dtype`` (float64 needs 64-bit JAX: else a one-line error)."""
    from jax_impl.algorithms.operator import check_float_dtype

    dtype = check_float_dtype(dtype, "the parameters")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def param_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """{"Conv_0/kernel": (kh, kw, in, out), ..., "Dense_0/bias": (out,)} for ``arch``."""
    return arch.param_shapes()


def flatten_tree(params) -> dict[str, np.ndarray]:
    """{"Dense_0/kernel": array, ...} from a nested parameter dict."""
    out = {}
    for layer, leaves in params.items():
        for leaf, value in leaves.items():
            out[f"{layer}/{leaf}"] = np.asarray(value)
    return out


def unflatten_tree(flat) -> dict:
    """Inverse of flatten_tree; also takes an already nested {layer: {leaf: array}} tree."""
    tree: dict = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            tree[key] = {leaf: jnp.asarray(v) for leaf, v in value.items()}
            continue
        layer, sep, leaf = key.partition("/")
        if not sep:
            raise HessianApproxError(f"parameter {key!r} is not named 'layer/leaf'",
                                     "pass {'Dense_0/kernel': ...} or a nested {'Dense_0': {'kernel': ...}} tree")
        tree.setdefault(layer, {})[leaf] = jnp.asarray(value)
    return tree


def input_layout(arch: Architecture, x) -> str:
    """How ``as_inputs`` maps x (N, ...) (numpy or jax) to (N, *arch.input_shape), for provenance.

    Returns:
      "as given": per-sample shape equal to the input shape (images are read channels last,
        NHWC; a cube (C, C, C) cannot tell NCHW from NHWC and is read as NHWC);
      "flattened": flat rows (N, D) of the right size, reshaped row-major (the built-in
        datasets: images flattened channels last), or any (N, ...) of the right size for a flat
        (D,) input (flattened row-major);
      "NCHW->NHWC": (N, C, H, W) images for an (H, W, C) input, transposed (for C == 1 a
        reshape: identical values);
      "NHW->NHWC": (N, H, W) for an (H, W, 1) input, a unit channel axis appended.
    Raises a one-line HessianApproxError for anything else, and for (N, C, H, C) arrays whose
    last axis could equally be channels (NCHW of (H, C, C) or NHWC of another image size).
    """
    shape = tuple(int(s) for s in arch.input_shape)
    xs = tuple(int(s) for s in np.shape(x))
    per = xs[1:]
    if len(xs) >= 1 and per == shape:
        return "as given"
    same_size = len(xs) >= 1 and int(np.prod(per)) == int(np.prod(shape))
    if same_size and (len(xs) == 2 or len(shape) == 1):
        return "flattened"
    if len(shape) == 3 and len(per) == 3:
        h, w, c = shape
        if per == (c, h, w):
            if c > 1 and w == c:
                raise HessianApproxError(
                    f"inputs of shape {per} per sample are NCHW images for the model's input {shape} or "
                    f"channels-last images of another size (ambiguous)",
                    f"pass them channels last (NHWC) as {shape}, e.g. x.transpose(0, 2, 3, 1)")
            return "NCHW->NHWC"
    if len(shape) == 3 and shape[2] == 1 and per == shape[:2]:
        return "NHW->NHWC"
    raise HessianApproxError(f"inputs of shape {per} per sample do not fit the model's input {shape}",
                             "pass data of the model's input shape (images channels last, NHWC, or NCHW), "
                             "flat rows, or a model built for this data")


def as_inputs(arch: Architecture, x) -> np.ndarray:
    """x (N, ...) as (N, *arch.input_shape): reshaped or transposed as ``input_layout`` says.

    Equal shapes pass as given; flat rows are reshaped row-major (images flattened channels
    last); NCHW images (N, C, H, W) are transposed to NHWC (never reshaped, which would scramble
    channels); anything else raises a one-line error.
    """
    x = np.asarray(x)
    layout = input_layout(arch, x)
    if layout == "as given":
        return x
    if layout == "NCHW->NHWC" and x.shape[1] > 1:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x.reshape((x.shape[0], *arch.input_shape))
