"""Weight files from other training scripts (torch state_dicts, Flax msgpack, safetensors) read into the Flax layout."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from bridge.convert import torch_shapes, torch_to_flax
from bridge.external_formats import (  # noqa: F401  (STATE_DICT_KEYS, TRAIN_STATE_KEYS, natural_key re-exported)
    STATE_DICT_KEYS, TRAIN_STATE_KEYS, load_msgpack, load_safetensors, load_torch, natural_key, open_and_hash, sniff,
)
from hessian_approx.architecture import Architecture, coerce, mlp, parse
from hessian_approx.errors import HessianApproxError, check_finite
from hessian_approx.layers import ACTIVATIONS, Flatten

FORMATS = ("hessian-approx", "torch-state-dict", "flax-msgpack", "flax-safetensors", "torch-safetensors")
LEAVES = {"torch": ("weight", "bias"), "flax": ("kernel", "bias")}  # per layout: the weight leaf, then the bias

ARCH_FIX = "pass the architecture the weights were trained with (arch=, --arch)"
CONV_PROBLEM = ("the weight file holds convolutions, whose stride, padding and pooling the tensor shapes do "
                "not determine")
CONV_FIX = "pass the architecture with arch= (--arch 'conv8k5-relu-maxpool2-...')"
ACTIVATION_PROBLEM = "the weight file does not say which activation the network uses"
ACTIVATION_FIX = f"pass activation= (--activation {'|'.join(ACTIVATIONS)}) or arch= (--arch)"
INFER_FIX = "pass the architecture with arch= (--arch), e.g. 'dense16-tanh-dense10'"


def read_weights(path, arch=None, input_shape=None, activation=None):
    """Read a weight file of any supported origin into the project's Flax layout.

    Args:
      path: a weight file, recognized by its content (not its suffix):
        - ``hessian-approx``: safetensors with the architecture in the metadata (``jax_impl.checkpoint``,
          ``bridge.weights``), read by ``bridge.weights.read_flax_file``;
        - ``torch-state-dict``: ``torch.save(model.state_dict())`` (``.pt``/``.pth``), or a dict holding it
          under "state_dict" or "model_state_dict"; keys "{module path}.weight" (out, in) or
          (out, in, kh, kw) and "{module path}.bias" (out,); layers in the file's (registration) order;
        - ``torch-safetensors``: the same keys in a safetensors file (``safetensors.torch.save_file``);
          layers in natural-sort order of their module paths ("net.2" before "net.10");
        - ``flax-msgpack``: ``flax.serialization.to_bytes(params)`` (or of {"params": params});
        - ``flax-safetensors``: nested Flax keys joined by "/" or "." ("Dense_0/kernel",
          "params.Dense_0.kernel"); kernels (in, out) or (kh, kw, in, out).
        Flax layers named ``Dense_i``/``Conv_i`` are matched to the architecture by name, others
        (``nn.Dense(name="hidden")``) by natural-sort order of their names.
      arch: the network: an Architecture, its dict, or a layer string (``"dense16-tanh-dense10"``,
        parsed on ``input_shape``, or on the first dense layer's input width when that is not
        given). None: the file's own (project files), else inferred from the tensor shapes
        (Dense-only networks; see ``_infer_architecture``).
      input_shape: per-sample input shape, e.g. (28, 28, 1) for images or (784,); used only when
        the architecture is inferred or given as a string.
      activation: "relu", "tanh" or "sigmoid"; used only when the architecture is inferred.
    Returns:
      (params, arch, info): params the Flax tree {"Dense_0": {"kernel": (in, out), "bias": (out,)},
      "Conv_0": {"kernel": (kh, kw, in, out), "bias": (out,)}, ...} of C-contiguous numpy arrays in
      the file's dtype, ready for ``jax_impl.models.make_apply(arch)`` (inputs NHWC); the
      Architecture; info {"weights_file", "weights_sha256", "weights_format" (one of ``FORMATS``),
      "architecture_source": "file metadata" | "given" | "inferred from tensor shapes"}.
    Raises:
      HessianApproxError (one line) when the file is missing, unreadable or of an unknown format,
      when a tensor is not floating-point, holds NaN/Inf or differs in dtype from another, when
      tensors are missing, extra or of the wrong shape for the architecture (naming the tensor, its
      shape and the expected one), or when the architecture cannot be inferred.
    """
    path = Path(path)
    head, digest = open_and_hash(path)
    info = {"weights_file": str(path), "weights_sha256": digest}
    kind, header = sniff(path, head)
    if kind == "safetensors" and "spec" in (header.get("__metadata__") or {}):
        return _read_project_file(path, arch, info)
    if kind == "torch":
        fmt, layout, items, natural = "torch-state-dict", "torch", load_torch(path), False
    elif kind == "msgpack":
        fmt, layout, items, natural = "flax-msgpack", "flax", load_msgpack(path), True
    else:
        layout, items = load_safetensors(path, header)
        fmt, natural = f"{layout}-safetensors", True
    groups = _groups(items, layout, path)
    if natural:
        groups.sort(key=lambda g: natural_key(g[0]))
    _check_tensors(items, path)
    if arch is None:
        arch = _infer_architecture(groups, layout, input_shape, activation, f"weight file {path}")
        source = "inferred from tensor shapes"
    else:
        arch, source = _given(arch, input_shape, groups, layout), "given"
    params = _pair(groups, arch, layout, path)
    return params, arch, {**info, "weights_format": fmt, "architecture_source": source}


def _infer_architecture(groups, layout: str, input_shape=None, activation=None,
                        where="the weight file") -> Architecture:
    """The Dense-act-...-Dense network that the layers' shapes and ``activation`` determine.

    Args:
      groups: the file's parameter layers in network order, as ``_groups`` returns them:
        [(module path, {leaf: (tensor name, array)}), ...].
      layout: "torch" (weights (out, in)) or "flax" (kernels (in, out)).
      input_shape: None or (D,): flat inputs of the first layer's width D; (H, W, C) with
        H·W·C = D: images. As the ``mlp`` preset does on images, the network takes them flattened
        channels last (``jax_impl.models.as_inputs``), input shape (H·W·C,); only a torch network
        on images with C > 1 channels gets a leading Flatten on (H, W, C) instead, since torch
        flattens NCHW images in (c, h, w) order (``bridge.convert`` permutes the first kernel's rows).
      activation: the activation between the dense layers; needed when there are two or more.
    Returns:
      The Architecture (``mlp(D, hidden, classes, activation)`` on flat inputs).
    Raises:
      HessianApproxError when a weight is a convolution (4-D), the widths do not chain, torch
      Sequential indices leave other than one module between dense layers, ``activation`` is
      missing, or ``input_shape`` does not hold D values.
    """
    if not groups:
        raise HessianApproxError(f"{where} holds no layer weights", "pass a file with the network's weights")
    wleaf = LEAVES[layout][0]
    widths = []  # (key, in, out)
    for _, leaves in groups:
        key, w = leaves[wleaf]
        if w.ndim == 4:
            raise HessianApproxError(CONV_PROBLEM, CONV_FIX)
        if w.ndim != 2:
            raise HessianApproxError(f"{where}: tensor {key!r} has shape {tuple(w.shape)}, neither a dense (2-D) "
                                     "nor a convolution (4-D) weight", ARCH_FIX)
        widths.append((key, *(w.shape[::-1] if layout == "torch" else w.shape)))
    for (k0, _, out0), (k1, in1, _) in zip(widths, widths[1:]):
        if in1 != out0:
            raise HessianApproxError(f"{where}: the dense layers do not chain: {k1!r} takes {in1} inputs but "
                                     f"{k0!r} before it gives {out0} outputs", INFER_FIX)
    if layout == "torch":
        _check_sequential_gaps([g[0] for g in groups], where)
    if len(groups) > 1 and activation is None:
        raise HessianApproxError(ACTIVATION_PROBLEM, ACTIVATION_FIX)
    in_dim, hidden, classes = widths[0][1], tuple(w[2] for w in widths[:-1]), widths[-1][2]
    net = mlp(in_dim, hidden, classes, activation or "relu")
    if input_shape is None:
        return net
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise HessianApproxError(f"input_shape {input_shape!r} is not a tuple of integers",
                                 "give the per-sample shape, e.g. (28, 28, 1) or (784,)") from None
    if math.prod(shape) != in_dim:
        raise HessianApproxError(f"{where}: input_shape {shape} holds {math.prod(shape)} values per sample but the "
                                 f"first layer {widths[0][0]!r} takes {in_dim}",
                                 "pass the per-sample shape of the data the network was trained on")
    if len(shape) == 3 and layout == "torch" and shape[2] > 1:
        return Architecture(shape, (Flatten(), *net.layers))
    return net


def _read_project_file(path: Path, arch, info: dict):
    """A hessian-approx file through ``bridge.weights.read_flax_file``; a given ``arch`` must agree."""
    from bridge.weights import read_flax_file

    tree, stored, _ = read_flax_file(path)
    items = [(f"{layer}/{leaf}", value) for layer, leaves in tree.items() for leaf, value in leaves.items()]
    _check_tensors(items, path)
    if arch is not None:
        given = _given(arch, stored.input_shape if isinstance(arch, str) else None, None, "flax")
        if given != stored:
            raise HessianApproxError(f"weight file {path} holds {stored.describe()} but arch= is {given.describe()}",
                                     "leave out arch= (--arch): the file's architecture is used")
    params = {name: {leaf: np.ascontiguousarray(v) for leaf, v in tree[name].items()} for name in stored.layer_names}
    return params, stored, {**info, "weights_format": "hessian-approx", "architecture_source": "file metadata"}


# ---- checks and pairing ---------------------------------------------------------------------


def _groups(items, layout: str, path: Path) -> list[tuple[str, dict]]:
    """Tensors grouped per layer: [(module path, {leaf: (tensor name, array)}), ...], in file order.

    ``items`` are (name, array) or, for Flax safetensors, (slash-joined path, array, name in the file).
    """
    sep = "." if layout == "torch" else "/"
    groups: dict[str, dict] = {}
    for item in items:
        name, value, shown = (*item, item[0])[:3]
        module, _, leaf = name.rpartition(sep)  # a bare layer's "weight"/"kernel": module ""
        if leaf not in LEAVES[layout]:
            raise HessianApproxError(
                f"weight file {path} holds tensor {shown!r}, which is not the {' or '.join(LEAVES[layout])} of a "
                "dense or convolution layer", "save only the weights and biases of Linear/Conv2d (Dense/Conv) layers")
        groups.setdefault(module, {})[leaf] = (shown, value)
    for module, leaves in groups.items():
        for leaf in LEAVES[layout]:
            if leaf not in leaves:
                have = next(iter(leaves.values()))[0]
                raise HessianApproxError(
                    f"weight file {path} holds {have!r} but no {leaf} of layer {module!r}",
                    "every layer needs a weight and a bias (save the model with bias=True, or add zero biases)")
    return list(groups.items())


def _check_tensors(items, path: Path) -> None:
    """Every tensor floating-point and finite, all of one dtype (never cast)."""
    first = None
    for item in items:
        name, value = (item[2] if len(item) > 2 else item[0]), item[1]
        if value.dtype.kind != "f":
            raise HessianApproxError(f"weight file {path}: tensor {name!r} has dtype {value.dtype}, not a "
                                     "floating-point dtype", "save the weights in float32 or float64")
        check_finite(f"the weights {name} in {path}", value)
        if first is None:
            first = (name, value.dtype)
        elif value.dtype != first[1]:
            raise HessianApproxError(f"weight file {path} mixes dtypes: tensor {first[0]!r} is {first[1]} but "
                                     f"{name!r} is {value.dtype}",
                                     "save every tensor in one dtype (e.g. model.float() or model.double() "
                                     "before saving)")


def _check_sequential_gaps(modules: list[str], where) -> None:
    """Torch Sequential indices of consecutive dense layers must be 2 apart (one activation between)."""
    split = [m.rpartition(".") for m in modules]
    if not all(last.isdigit() for _, _, last in split) or len({pre for pre, _, _ in split}) != 1:
        return  # named modules ("fc1", "fc2"): nothing to check
    idx = [int(last) for _, _, last in split]
    if idx[0] > 1:
        raise HessianApproxError(f"{where}: the first dense layer {modules[0]!r} has {idx[0]} modules before it in "
                                 "the torch Sequential, which the tensor shapes do not describe", INFER_FIX)
    for (a, i), (b, j) in zip(zip(modules, idx), zip(modules[1:], idx[1:])):
        if j - i != 2:
            between = "no module" if j - i == 1 else f"{j - i - 1} modules"
            raise HessianApproxError(f"{where}: torch layers {a!r} and {b!r} have {between} between them, so the "
                                     "tensor shapes do not say which activation (one module) lies between them",
                                     INFER_FIX)


def _given(arch, input_shape, groups, layout: str) -> Architecture:
    """An Architecture from itself, its dict, or a layer string (parsed on ``input_shape`` or the first width)."""
    if not isinstance(arch, str):
        return coerce(arch)
    if input_shape is None:
        _, w = groups[0][1][LEAVES[layout][0]] if groups else (None, None)
        if w is None or w.ndim != 2:
            raise HessianApproxError(f"the layer string {arch!r} does not give the input shape",
                                     "pass input_shape= (e.g. (28, 28, 1)) with a layer string")
        input_shape = (w.shape[1] if layout == "torch" else w.shape[0],)
    return parse(arch, input_shape)


def _pair(groups, arch: Architecture, layout: str, path: Path) -> dict:
    """The Flax tree of ``arch`` from the grouped tensors (network order), every shape checked (naming the tensor).

    Flax layers named ``Dense_i``/``Conv_i`` are matched by name, all others by position; torch
    tensors go through ``bridge.convert.torch_to_flax`` (Dense after Flatten: rows permuted).
    """
    layers = arch.param_layers
    where = f"weight file {path}"
    auto = re.compile(r"(Dense|Conv)_\d+")
    if layout == "flax" and groups and all(auto.fullmatch(m) for m, _ in groups):
        by_name = dict(groups)
        extra = [m for m in by_name if m not in arch.layer_names]
        if extra:
            raise HessianApproxError(f"{where} holds layer {extra[0]!r}, which {arch.describe()} lacks (its layers: "
                                     f"{', '.join(arch.layer_names)})", ARCH_FIX)
        ordered = [(p.name, by_name[p.name]) if p.name in by_name else None for p in layers]
    else:
        ordered = list(groups)
        if len(ordered) > len(layers):
            _, leaves = ordered[len(layers)]
            names = ", ".join(repr(k) for k, _ in leaves.values())
            raise HessianApproxError(f"{where} holds tensors {names} beyond the {len(layers)} layers with parameters "
                                     f"of {arch.describe()}", ARCH_FIX)
        ordered = ordered + [None] * (len(layers) - len(ordered))
    wleaf, bleaf = LEAVES[layout]
    state, tree = {}, {}
    for p, group in zip(layers, ordered):
        expected = torch_shapes(p) if layout == "torch" else p.shapes
        expected = {wleaf: expected["weight" if layout == "torch" else "kernel"], bleaf: expected["bias"]}
        if group is None:
            raise HessianApproxError(f"{where} has no tensors for layer {p.name} of {arch.describe()} (expected "
                                     f"{wleaf} {expected[wleaf]} and bias {expected[bleaf]})", ARCH_FIX)
        for leaf in (wleaf, bleaf):
            key, value = group[1][leaf]
            if tuple(value.shape) != tuple(expected[leaf]):
                raise HessianApproxError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected "
                                         f"{tuple(expected[leaf])} for {p.name}/{'kernel' if leaf == wleaf else 'bias'}"
                                         f" of {arch.describe()}", ARCH_FIX)
        if layout == "torch":
            state[f"{p.index}.weight"], state[f"{p.index}.bias"] = group[1][wleaf][1], group[1][bleaf][1]
        else:
            tree[p.name] = {"bias": np.ascontiguousarray(group[1][bleaf][1]),
                            "kernel": np.ascontiguousarray(group[1][wleaf][1])}
    return torch_to_flax(state, arch) if layout == "torch" else tree
