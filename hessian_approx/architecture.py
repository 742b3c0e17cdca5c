"""A network as plain data: input shape plus typed layers; names, shapes, dict and string forms.

String form (the command line's ``--model``), layers joined by ``-``:

=================================  ===============================================
``dense<N>``                       Dense to N features (needs a flat input)
``conv<C>k<K>[s<S>][p<P>|same]``   Conv2d, C channels, K×K kernel (``k3x5`` for 3×5),
                                   stride S (default 1), symmetric zero padding P or
                                   SAME (default VALID, no padding)
``maxpool<K>[s<S>]``               MaxPool2d, K×K window, stride S (default K)
``avgpool<K>[s<S>]``               AvgPool2d, likewise
``flatten``                        (H, W, C) -> (H·W·C,), channels last
``relu`` ``tanh`` ``sigmoid``      activations
=================================  ===============================================

e.g. ``conv8k5-relu-maxpool2-conv16k5-relu-maxpool2-flatten-dense10`` (the default CNN,
``PRESETS["cnn"]``). The input shape comes from the data (``(28, 28, 1)`` for MNIST images,
``(784,)`` flat); the last layer's width is the number of classes.

Parameter names follow Flax's automatic naming, counted per kind: ``Conv_0``, ``Conv_1``,
``Dense_0``, ... (so weight files of the first, MLP-only, version load unchanged). The
torch twin is an ``nn.Sequential`` with one module per layer here, so layer ``i``'s
parameters are ``"{i}.weight"`` and ``"{i}.bias"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from hessian_approx.errors import HessianApproxError
from hessian_approx.layers import (
    ACTIVATIONS, Activation, AvgPool2d, Conv2d, Dense, Flatten, MaxPool2d, layer_from_dict, layer_to_dict,
)

FORMAT = "hessian-approx/architecture-1"


@dataclasses.dataclass(frozen=True)
class ParamLayer:
    """A layer with parameters, resolved in its network.

    Attributes:
      index: position in ``Architecture.layers`` (= the torch Sequential index).
      name: Flax name (``Dense_0``, ``Conv_1``, ...).
      layer: the layer.
      in_shape, out_shape: per-sample shapes around it (channels last).
      flat_from: for a Dense fed by a Flatten, the image shape (H, W, C) that was flattened
        (the Flax kernel's rows are in (h, w, c) order, torch's weight columns in (c, h, w));
        otherwise None.
      shapes: {"kernel": Flax shape, "bias": (out,)}.
    """

    index: int
    name: str
    layer: Any
    in_shape: tuple
    out_shape: tuple
    flat_from: tuple | None
    shapes: dict


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A sequential network: per-sample ``input_shape`` and ``layers`` (see module doc).

    Construction checks every layer against the shape it receives, so an architecture that
    exists is one both frameworks can build.
    """

    input_shape: tuple[int, ...]
    layers: tuple

    def __post_init__(self):
        try:
            shape = tuple(int(s) for s in self.input_shape)
        except (TypeError, ValueError):
            raise HessianApproxError(f"input shape {self.input_shape!r} is not a tuple of integers",
                                     "give the per-sample shape, e.g. (28, 28, 1) or (784,)") from None
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise HessianApproxError(f"input shape {shape} is neither (D,) nor (H, W, C)",
                                     "give the per-sample shape, e.g. (28, 28, 1) or (784,)")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "layers", tuple(self.layers))
        if not any(isinstance(l, Dense) for l in self.layers):
            raise HessianApproxError(f"architecture {self.to_string()!r} has no dense layer to produce the logits",
                                     "end it with dense<classes>, e.g. ...-flatten-dense10")
        if len(self.shapes[-1]) != 1 or not isinstance(self.layers[-1], Dense):
            raise HessianApproxError(f"architecture {self.to_string()!r} does not end in a dense layer",
                                     "end it with dense<classes>, e.g. ...-flatten-dense10")

    # ---- derived structure ----------------------------------------------------------
    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample shapes: shapes[0] the input, shapes[i + 1] the output of layer i."""
        out = [self.input_shape]
        for layer in self.layers:
            out.append(tuple(layer.out_shape(out[-1])))
        return tuple(out)

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    @property
    def param_layers(self) -> tuple[ParamLayer, ...]:
        """The layers with parameters, in network order, with their names and shapes."""
        shapes, counts, out = self.shapes, {}, []
        for i, layer in enumerate(self.layers):
            ps = layer.param_shapes(shapes[i])
            if not ps:
                continue
            n = counts.get(layer.flax_prefix, 0)
            counts[layer.flax_prefix] = n + 1
            flat_from = shapes[i - 1] if i > 0 and isinstance(self.layers[i - 1], Flatten) else None
            out.append(ParamLayer(i, f"{layer.flax_prefix}_{n}", layer, shapes[i], shapes[i + 1], flat_from, ps))
        return tuple(out)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Flax names of the parameter layers, network order."""
        return tuple(p.name for p in self.param_layers)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{"Conv_0/kernel": (kh, kw, in, out), "Conv_0/bias": (out,), "Dense_0/kernel": (in, out), ...}."""
        return {f"{p.name}/{leaf}": s for p in self.param_layers for leaf, s in p.shapes.items()}

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    @property
    def activations(self) -> tuple[str, ...]:
        return tuple(l.name for l in self.layers if isinstance(l, Activation))

    @property
    def is_mlp(self) -> bool:
        """Dense layers and activations only, on a flat input."""
        return len(self.input_shape) == 1 and all(isinstance(l, (Dense, Activation)) for l in self.layers)

    # ---- forms ------------------------------------------------------------------------
    def to_string(self) -> str:
        return "-".join(l.token() for l in self.layers)

    def describe(self) -> str:
        """Short human name, e.g. ``28x28x1 conv8k5-relu-...-dense10``."""
        return f"{'x'.join(map(str, self.input_shape))} {self.to_string()}"

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "input_shape": list(self.input_shape),
                "layers": [layer_to_dict(l) for l in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        """From ``to_dict`` output, or from the first version's MLP spec dict
        ``{"input_dim", "hidden", "output_dim", "activation", "kind": "mlp"}``."""
        if not isinstance(d, dict):
            raise HessianApproxError(f"architecture {d!r} is not a dict", "pass Architecture.to_dict() output")
        if "layers" not in d and "input_dim" in d:
            return _from_legacy(d)
        if d.get("format", FORMAT) != FORMAT or "layers" not in d or "input_shape" not in d:
            raise HessianApproxError(f"architecture dict {d!r} is not in the {FORMAT} format",
                                     "write it with Architecture.to_dict()")
        return cls(tuple(d["input_shape"]), tuple(layer_from_dict(l) for l in d["layers"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise HessianApproxError(f"architecture JSON is malformed ({err})", "write it with Architecture.to_json()") from None


def coerce(arch) -> Architecture:
    """An Architecture from itself, its ``to_dict()`` dict or the first version's MLP spec dict."""
    if isinstance(arch, Architecture):
        return arch
    if isinstance(arch, dict):
        return Architecture.from_dict(arch)
    if hasattr(arch, "keys"):  # any other mapping
        return Architecture.from_dict(dict(arch))
    raise HessianApproxError(f"architecture {arch!r} is neither an Architecture nor its dict",
                             "pass hessian_approx.architecture.parse(...) or Architecture.to_dict()")


def _from_legacy(d: dict) -> Architecture:
    if d.get("kind", "mlp") != "mlp":
        raise HessianApproxError(f"model kind {d.get('kind')!r} is not supported", "use kind 'mlp'")
    try:
        widths = (int(d["input_dim"]), *(int(h) for h in d.get("hidden", ())), int(d["output_dim"]))
    except (KeyError, TypeError, ValueError):
        raise HessianApproxError(f"model spec {d!r} has missing or non-integer widths",
                                 "give input_dim, hidden and output_dim as integers") from None
    return mlp(widths[0], widths[1:-1], widths[-1], d.get("activation", "relu"))


def mlp(input_dim: int = 784, hidden=(10,), num_classes: int = 10, activation: str = "relu") -> Architecture:
    """Dense(h_1) -> act -> ... -> Dense(C) on flat inputs (D,)."""
    layers = []
    for h in hidden:
        layers += [Dense(h), Activation(activation)]
    return Architecture((input_dim,), (*layers, Dense(num_classes)))


_TOKEN = re.compile(
    r"^(?:dense(?P<dense>\d+)"
    r"|conv(?P<conv>\d+)k(?P<kh>\d+)(?:x(?P<kw>\d+))?(?:s(?P<sh>\d+)(?:x(?P<sw>\d+))?)?"
    r"(?:p(?P<ph>\d+)(?:x(?P<pw>\d+))?|(?P<same>same)|(?P<valid>valid))?"
    r"|(?P<pool>max|avg)pool(?P<wh>\d+)(?:x(?P<ww>\d+))?(?:s(?P<qh>\d+)(?:x(?P<qw>\d+))?)?"
    r"|(?P<flatten>flatten)|(?P<act>" + "|".join(ACTIVATIONS) + r"))$")


def parse_layer(token: str):
    """One word of the string form (see the module doc) -> a layer."""
    m = _TOKEN.match(token.strip().lower())
    if m is None:
        raise HessianApproxError(
            f"layer {token!r} is not understood",
            "write layers like dense10, conv8k5, conv16k3s2p1, maxpool2, avgpool2, flatten, relu, tanh, sigmoid")
    g = m.groupdict()
    two = lambda a, b: (int(a), int(b if b is not None else a))
    if g["dense"]:
        return Dense(int(g["dense"]))
    if g["conv"]:
        padding = "SAME" if g["same"] else two(g["ph"], g["pw"]) if g["ph"] else "VALID"
        stride = two(g["sh"], g["sw"]) if g["sh"] else (1, 1)
        return Conv2d(int(g["conv"]), two(g["kh"], g["kw"]), stride, padding)
    if g["pool"]:
        cls = MaxPool2d if g["pool"] == "max" else AvgPool2d
        return cls(two(g["wh"], g["ww"]), two(g["qh"], g["qw"]) if g["qh"] else None)
    if g["flatten"]:
        return Flatten()
    return Activation(g["act"])


PRESETS = {
    "mlp": "dense10-relu-dense10",
    "cnn": "conv8k5-relu-maxpool2-conv16k5-relu-maxpool2-flatten-dense10",
}


def parse(text: str, input_shape) -> Architecture:
    """An architecture from a preset name (``mlp``, ``cnn``) or the string form, on ``input_shape``.

    A network whose first layer is dense takes flat inputs: on image data its input shape is
    (H·W·C,), the images flattened channels last. One starting with conv or pool needs
    image input (H, W, C).
    """
    if not isinstance(text, str) or not text.strip():
        raise HessianApproxError(f"model {text!r} is empty", f"pass a preset ({', '.join(PRESETS)}) or a layer string")
    words = PRESETS.get(text.strip().lower(), text).split("-")
    layers = tuple(parse_layer(w) for w in words)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3 and isinstance(layers[0], (Dense, Activation)):
        shape = (math.prod(shape),)  # a flat network on images: data are flattened (channels last)
    return Architecture(shape, layers)
