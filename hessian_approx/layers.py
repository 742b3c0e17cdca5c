"""Typed layers of the framework-free architecture description: shapes, parameters, string tokens.

Shapes are per sample, channels last: an image is (H, W, C), a vector (D,). Every layer
kind declares, once:

- ``kind``: its name in dicts and tables;
- ``out_shape(in_shape)``: the shape it produces (a one-line error when it cannot take
  ``in_shape``);
- ``param_shapes(in_shape)``: its parameters in the Flax layout ({} for none): Dense
  ``kernel`` (in, out) and ``bias`` (out,); Conv2d ``kernel`` (kh, kw, in, out) (HWIO)
  and ``bias`` (out,);
- ``token()``: its word in the command-line string (see ``hessian_approx.architecture``).

Nothing here imports JAX or torch; ``jax_impl.models`` and ``torch_ref.models`` each map
``kind`` to their own module, and ``bridge.convert`` maps it to a layout rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from hessian_approx.errors import HessianApproxError

ACTIVATIONS = ("relu", "tanh", "sigmoid")


def _pair(value, what: str) -> tuple[int, int]:
    """(a, b) from an int or a pair of ints, checked positive."""
    try:
        pair = (int(value), int(value)) if isinstance(value, (int, float, str)) else tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise HessianApproxError(f"{what} {value!r} is not an integer or a pair of integers",
                                 f"give {what} as an integer") from None
    if len(pair) != 2 or min(pair) < 1:
        raise HessianApproxError(f"{what} {value!r} must be one or two positive integers", f"fix the {what}")
    return pair


def _image(in_shape, who: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise HessianApproxError(f"{who} needs an image input (H, W, C) but gets shape {tuple(in_shape)}",
                                 "reorder the layers (convolutions and pooling come before flatten)")
    return tuple(in_shape)


def _window_out(size: int, window: int, stride: int, pad_total: int, who: str, axis: str) -> int:
    out = (size + pad_total - window) // stride + 1
    if size + pad_total < window:
        raise HessianApproxError(f"{who} has a {window}-wide window but its input is only {size} {axis}",
                                 "use a smaller kernel or pool, or fewer layers before it")
    return out


@dataclasses.dataclass(frozen=True)
class Dense:
    """Fully connected layer on a flat input (D,) -> (features,)."""

    features: int
    kind: ClassVar[str] = "dense"
    flax_prefix: ClassVar[str] = "Dense"

    def __post_init__(self):
        object.__setattr__(self, "features", _pair(self.features, "dense width")[0])

    def out_shape(self, in_shape):
        if len(in_shape) != 1:
            raise HessianApproxError(f"{self.token()} needs a flat input but gets shape {tuple(in_shape)}",
                                     f"put flatten before {self.token()}")
        return (self.features,)

    def param_shapes(self, in_shape):
        return {"kernel": (in_shape[0], self.features), "bias": (self.features,)}

    def token(self) -> str:
        return f"dense{self.features}"


@dataclasses.dataclass(frozen=True)
class Conv2d:
    """2-D convolution on (H, W, C_in) -> (H', W', features), cross-correlation as in both frameworks.

    ``padding`` is "VALID", "SAME" (XLA's rule; refused where it would pad unevenly, which
    torch's Conv2d cannot) or explicit symmetric zero padding (ph, pw).
    """

    features: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    kind: ClassVar[str] = "conv2d"
    flax_prefix: ClassVar[str] = "Conv"

    def __post_init__(self):
        object.__setattr__(self, "features", _pair(self.features, "conv channel count")[0])
        object.__setattr__(self, "kernel", _pair(self.kernel, "conv kernel size"))
        object.__setattr__(self, "stride", _pair(self.stride, "conv stride"))
        p = self.padding
        if isinstance(p, str):
            if p.upper() not in ("VALID", "SAME"):
                raise HessianApproxError(f"conv padding {p!r} is not known", "use VALID, SAME or (ph, pw)")
            p = p.upper()
        else:
            try:
                p = (int(p), int(p)) if isinstance(p, int) else tuple(int(v) for v in p)
            except (TypeError, ValueError):
                p = None
            if p is None or len(p) != 2 or min(p) < 0:
                raise HessianApproxError(f"conv padding {self.padding!r} is not VALID, SAME or two integers >= 0",
                                         "use VALID, SAME or (ph, pw)")
        object.__setattr__(self, "padding", p)

    def pads(self, in_shape) -> tuple[int, int]:
        """Symmetric zero padding (ph, pw) on the given input."""
        if self.padding == "VALID":
            return (0, 0)
        if self.padding != "SAME":
            return self.padding
        pads = []
        for size, k, s, axis in zip(in_shape[:2], self.kernel, self.stride, ("high", "wide")):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            if total % 2:
                raise HessianApproxError(
                    f"{self.token()} with SAME padding pads a {size} {axis} input unevenly ({total // 2} and "
                    f"{total - total // 2}), which torch's Conv2d cannot", "use an odd kernel or explicit padding p<n>")
            pads.append(total // 2)
        return tuple(pads)

    def out_shape(self, in_shape):
        h, w, _ = _image(in_shape, self.token())
        ph, pw = self.pads(in_shape)
        return (_window_out(h, self.kernel[0], self.stride[0], 2 * ph, self.token(), "high"),
                _window_out(w, self.kernel[1], self.stride[1], 2 * pw, self.token(), "wide"), self.features)

    def param_shapes(self, in_shape):
        return {"kernel": (*self.kernel, in_shape[2], self.features), "bias": (self.features,)}

    def token(self) -> str:
        kh, kw = self.kernel
        t = f"conv{self.features}k{kh}" + (f"x{kw}" if kw != kh else "")
        if self.stride != (1, 1):
            t += f"s{self.stride[0]}" + (f"x{self.stride[1]}" if self.stride[1] != self.stride[0] else "")
        if self.padding == "SAME":
            t += "same"
        elif self.padding != "VALID" and self.padding != (0, 0):
            t += f"p{self.padding[0]}" + (f"x{self.padding[1]}" if self.padding[1] != self.padding[0] else "")
        return t


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Pooling without padding (VALID, floor): (H, W, C) -> (H', W', C)."""

    window: tuple[int, int] = (2, 2)
    stride: tuple[int, int] | None = None  # None: the window (both frameworks' default)
    flax_prefix: ClassVar[str] = ""

    def __post_init__(self):
        object.__setattr__(self, "window", _pair(self.window, "pool window"))
        object.__setattr__(self, "stride", self.window if self.stride is None else _pair(self.stride, "pool stride"))

    def out_shape(self, in_shape):
        h, w, c = _image(in_shape, self.token())
        return (_window_out(h, self.window[0], self.stride[0], 0, self.token(), "high"),
                _window_out(w, self.window[1], self.stride[1], 0, self.token(), "wide"), c)

    def param_shapes(self, in_shape):
        return {}

    def token(self) -> str:
        t = f"{self.kind.removesuffix('2d')}{self.window[0]}" + (f"x{self.window[1]}" if self.window[1] != self.window[0] else "")
        if self.stride != self.window:
            t += f"s{self.stride[0]}" + (f"x{self.stride[1]}" if self.stride[1] != self.stride[0] else "")
        return t


@dataclasses.dataclass(frozen=True)
class MaxPool2d(_Pool):
    kind: ClassVar[str] = "maxpool2d"


@dataclasses.dataclass(frozen=True)
class AvgPool2d(_Pool):
    kind: ClassVar[str] = "avgpool2d"


@dataclasses.dataclass(frozen=True)
class Flatten:
    """(H, W, C) -> (H*W*C,) in channels-last (row-major NHWC) order; torch flattens (C, H, W)."""

    kind: ClassVar[str] = "flatten"
    flax_prefix: ClassVar[str] = ""

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def param_shapes(self, in_shape):
        return {}

    def token(self) -> str:
        return "flatten"


@dataclasses.dataclass(frozen=True)
class Activation:
    """Elementwise relu, tanh or sigmoid; any shape."""

    name: str = "relu"
    kind: ClassVar[str] = "activation"
    flax_prefix: ClassVar[str] = ""

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise HessianApproxError(f"activation {self.name!r} is not supported", f"choose one of {', '.join(ACTIVATIONS)}")

    def out_shape(self, in_shape):
        return tuple(in_shape)

    def param_shapes(self, in_shape):
        return {}

    def token(self) -> str:
        return self.name


LAYER_KINDS = {cls.kind: cls for cls in (Dense, Conv2d, MaxPool2d, AvgPool2d, Flatten, Activation)}


def layer_to_dict(layer) -> dict:
    """{"kind": ..., fields...} with tuples as lists (JSON)."""
    d = {"kind": layer.kind}
    for f in dataclasses.fields(layer):
        v = getattr(layer, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def layer_from_dict(d: dict):
    """Inverse of layer_to_dict."""
    if not isinstance(d, dict) or d.get("kind") not in LAYER_KINDS:
        raise HessianApproxError(f"layer {d!r} has no known kind", f"use one of {', '.join(LAYER_KINDS)}")
    fields = {k: v for k, v in d.items() if k != "kind"}
    try:
        return LAYER_KINDS[d["kind"]](**fields)
    except TypeError as err:
        raise HessianApproxError(f"layer {d!r} is malformed ({err})", "write it as layer_to_dict does") from None
