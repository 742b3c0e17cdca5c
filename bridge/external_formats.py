"""Format detection and readers for external weight files (torch.save, Flax msgpack, safetensors)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from hessian_approx.errors import HessianApproxError

STATE_DICT_KEYS = ("state_dict", "model_state_dict")  # where training checkpoints keep the model's state_dict
TRAIN_STATE_KEYS = ("step", "opt_state")  # what a Flax TrainState holds besides "params" (dropped)

_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled torch magic number
_SAFETENSORS_FLOATS = ("F16", "F32", "F64")  # safetensors dtype names numpy reads as floats


def natural_key(name: str) -> tuple:
    """Sort key comparing runs of digits as numbers: "net.2" < "net.10", "Dense_9" < "Dense_10"."""
    return tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name)))


def open_and_hash(path: Path) -> tuple[bytes, str]:
    """(the first 16 bytes, sha256 hex of the whole file), with one-line errors."""
    if not path.exists():
        raise HessianApproxError(f"weight file {path} does not exist", "check the path given to --weights")
    if not path.is_file():
        raise HessianApproxError(f"weight file {path} is not a file", "pass the path of a weight file to --weights")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            h.update(head)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise HessianApproxError(f"weight file {path} cannot be read ({err.strerror or err})",
                                 "check the file's permissions or pass another --weights") from None
    return head, h.hexdigest()


def sniff(path: Path, head: bytes) -> tuple[str, dict | None]:
    """("torch" | "safetensors" | "msgpack", the safetensors header or None) from the file's first bytes."""
    if head.startswith(b"PK\x03\x04") or head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch", None
    header = _safetensors_header(path, head)
    if header is not None:
        return "safetensors", header
    if head and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):  # a msgpack map
        return "msgpack", None
    what = "is empty" if not head else "is of an unknown format"
    raise HessianApproxError(
        f"weight file {path} {what}: neither a torch.save state_dict, a safetensors file nor Flax msgpack",
        "save the weights with torch.save(model.state_dict(), path), safetensors' save_file or "
        "flax.serialization.to_bytes(params)")


def _safetensors_header(path: Path, head: bytes) -> dict | None:
    """The JSON header of a safetensors file, or None when the file is not one."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n > min(path.stat().st_size - 8, 100 << 20):
        return None
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def load_torch(path: Path) -> list[tuple[str, np.ndarray]]:
    """[(key, numpy array), ...] of a torch.save state_dict, in the file's order."""
    try:
        import torch
    except ImportError:
        raise HessianApproxError(f"weight file {path} is a PyTorch file, and reading it needs torch",
                                 "install the torch extra (pip install -e '.[torch]')") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle, zip and torch errors alike)
        raise HessianApproxError(f"weight file {path} is not a torch.save state_dict that torch.load(weights_only="
                                 f"True) accepts ({_first_line(err)})",
                                 "save the weights with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise HessianApproxError(f"weight file {path} holds a {type(obj).__name__}, not a state_dict",
                                 "save the weights with torch.save(model.state_dict(), path)")
    items = []
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:
                raise HessianApproxError(f"weight file {path}: tensor {key!r} is bfloat16, which numpy cannot hold",
                                         "save the weights in float32 or float64 (model.float() before saving)")
            value = value.detach().cpu().numpy().copy()
        elif not isinstance(value, np.ndarray):
            raise HessianApproxError(f"weight file {path}: entry {key!r} is a {type(value).__name__}, not a tensor "
                                     f"(top-level keys: {list(obj)[:6]})",
                                     "save model.state_dict(), or a dict holding it under 'state_dict'")
        items.append((str(key), value))
    return items


def load_msgpack(path: Path) -> list[tuple[str, np.ndarray]]:
    """[("Dense_0/kernel", array), ...] of ``flax.serialization.to_bytes`` output, an outer "params" dropped."""
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:  # noqa: BLE001  (msgpack raises several types)
        raise HessianApproxError(f"weight file {path} is not readable Flax msgpack ({_first_line(err)})",
                                 "save the parameters with flax.serialization.to_bytes(params)") from None
    if not isinstance(tree, Mapping):
        raise HessianApproxError(f"weight file {path} holds a msgpack {type(tree).__name__}, not a parameter dict",
                                 "save the parameters with flax.serialization.to_bytes(params)")
    if "params" in tree and all(k == "params" or k in TRAIN_STATE_KEYS for k in tree):
        tree = tree["params"]
    items = []

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            items.append((prefix, node if isinstance(node, np.ndarray) else np.asarray(node)))

    walk("", tree)
    return items


def load_safetensors(path: Path, header: dict) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """(layout "torch" | "flax", [(key, array), ...]) of a safetensors file without the project's metadata."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, entry in entries.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _SAFETENSORS_FLOATS:
            raise HessianApproxError(f"weight file {path}: tensor {key!r} has dtype {dtype}, not float16, float32 or "
                                     "float64", "save the weights in float32 or float64")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HessianApproxError(f"weight file {path} is not a readable safetensors file ({err})",
                                 "re-save it with safetensors' save_file") from None
    leaves = {_split(key)[-1] for key in tensors}
    if "weight" in leaves and "kernel" in leaves:
        raise HessianApproxError(f"weight file {path} mixes torch ('.weight') and Flax ('kernel') tensor names",
                                 "save one network per file, from one framework")
    if "weight" in leaves:
        return "torch", [(k, tensors[k]) for k in sorted(tensors, key=natural_key)]
    items = []
    for key in sorted(tensors, key=natural_key):
        parts = _split(key)
        if parts[0] == "params" and len(parts) > 2:
            parts = parts[1:]
        items.append(("/".join(parts), tensors[key], key))
    return "flax", items


def _first_line(err: Exception) -> str:
    """An exception's first line (at most 200 characters), or its type's name when it has no text."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _split(key: str) -> list[str]:
    """A tensor name's components: split on "/" when it has one, else on "."."""
    return key.split("/") if "/" in key else key.split(".")

