"""Weight files: safetensors with the architecture and provenance in the metadata, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from jax_impl.errors import HessianApproxError, check_finite
from jax_impl.fileio import atomic_write
from hessian_approx.architecture import Architecture
from jax_impl.models import flatten_tree, unflatten_tree

LAYOUT = "flax"  # Dense kernels (in, out), Conv kernels HWIO; the bridge converts to torch's layouts


def save_checkpoint(path, params, arch: Architecture, metadata: dict | None = None) -> None:
    """Write ``params`` (Flax layout) with the architecture (JSON under "spec") and metadata to ``path``."""
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_tree(params).items()}
    for name, value in tensors.items():
        check_finite(f"the weights {name}", value)
    meta = {"spec": arch.to_json(), "layout": LAYOUT, "metadata": json.dumps(metadata or {})}
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(save(tensors, metadata=meta)))


def load_checkpoint(path, arch: Architecture | None = None):
    """Read a weight file. Returns (params, architecture, metadata).

    Files of the first, MLP-only, version (their "spec" is the old MLP dict) load as the
    equivalent Dense architecture. Raises HessianApproxError when the file is missing or
    unreadable, holds NaN or Inf, or does not match ``arch`` (when given) or its own
    stored architecture.
    """
    path = Path(path)
    if path.is_dir():
        raise HessianApproxError(f"checkpoint {path} is a folder", "pass the .safetensors file, e.g. "
                                 f"{path / 'model.safetensors'}")
    if not path.is_file():
        raise HessianApproxError(f"checkpoint {path} does not exist", "run `hessian-approx train` first or fix --checkpoint")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HessianApproxError(f"checkpoint {path} is not a readable safetensors file ({err})",
                                 "re-create it with `hessian-approx train`") from None
    if "spec" not in meta:
        raise HessianApproxError(f"checkpoint {path} has no architecture (\"spec\") in its metadata, so hessian-approx "
                                 "did not write it",
                                 "read weights from other training scripts with --weights FILE [--arch STR] "
                                 "(bridge.external.read_weights); --checkpoint takes files hessian-approx wrote")
    if meta.get("layout", LAYOUT) != LAYOUT:
        raise HessianApproxError(f"checkpoint {path} has layout {meta['layout']!r}, not {LAYOUT!r}",
                                 "convert it with bridge.weights.save_from_torch")
    try:
        stored = Architecture.from_json(meta["spec"])
        extra = json.loads(meta.get("metadata", "{}"))
    except (ValueError, TypeError) as err:
        raise HessianApproxError(f"checkpoint {path} has malformed metadata ({err})",
                                 "re-create it with `hessian-approx train`") from None
    if arch is not None and arch != stored:
        raise HessianApproxError(
            f"checkpoint {path} holds {stored.describe()} but the model asked for is {arch.describe()}",
            "leave out --model/--hidden/--activation (the file's architecture is used) or pass another --checkpoint")
    expected = stored.param_shapes()
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise HessianApproxError(
            f"checkpoint {path} does not match its spec {stored.describe()}: {diff[0][0]} is {got.get(diff[0][0])}, expected {expected.get(diff[0][0])}",
            "re-create it with `hessian-approx train`")
    for name, value in tensors.items():
        check_finite(f"the weights {name} in {path}", value)
    return unflatten_tree(tensors), stored, extra
