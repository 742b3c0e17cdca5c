"""Flax-layout safetensors weight files read into, and written from, the torch twin without importing JAX.

The file format is ``jax_impl.checkpoint``'s: tensors "Layer_i/leaf" in the Flax layout
("Conv_0/kernel" (kh, kw, in, out), "Dense_0/kernel" (in, out), "*/bias" (out,)), metadata
{"spec": ``Architecture.to_json()``, "layout": "flax", "metadata": provenance JSON}. Files of
the first, MLP-only, version, whose "spec" is the MLP dict {"input_dim", "hidden",
"output_dim", "activation", "kind"}, load too. Either side loads what the other wrote.
Imports numpy, safetensors and (inside the functions) torch and torch_ref.models; never jax or flax.
"""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np

from bridge.convert import architecture, flax_to_torch, state_dict_from_torch, torch_to_flax
from hessian_approx.architecture import Architecture
from hessian_approx.errors import HessianApproxError, check_finite
from hessian_approx.fileio import atomic_write

LAYOUT = "flax"  # as jax_impl.checkpoint.LAYOUT


def _torch_dtype(dtype, stored: np.dtype):
    """A torch dtype from None (the file's dtype), a torch dtype, or a name/numpy dtype ("float64")."""
    import torch

    if dtype is None:
        dtype = stored
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype).removeprefix("torch.")
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise HessianApproxError(f"dtype {dtype!r} is not a torch floating-point dtype",
                                 "pass torch.float32, torch.float64 or None (the file's dtype)")
    return result


def read_flax_file(path) -> tuple[dict[str, dict[str, np.ndarray]], Architecture, dict]:
    """Read a Flax-layout weight file without JAX.

    Returns:
      (params {"Conv_0": {"bias": (out,), "kernel": (kh, kw, in, out)}, "Dense_0": ...} numpy,
       the stored Architecture, metadata dict).
    Raises:
      HessianApproxError when the file is missing, unreadable, not in the Flax layout, holds no
      architecture, does not match it (naming the tensor and its expected shape) or holds NaN/Inf.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise HessianApproxError(f"weight file {path} does not exist",
                                 "run `hessian-approx train` first or fix --checkpoint")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HessianApproxError(f"weight file {path} is not a readable safetensors file ({err})",
                                 "re-create it with `hessian-approx train`") from None
    if "spec" not in meta:
        raise HessianApproxError(f"weight file {path} has no architecture (\"spec\") in its metadata, so "
                                 "hessian-approx did not write it",
                                 "read weights from other training scripts with bridge.external.read_weights "
                                 "(--weights FILE [--arch STR]); --checkpoint takes files hessian-approx wrote")
    layout = meta.get("layout", LAYOUT)
    if layout != LAYOUT:
        raise HessianApproxError(f"weight file {path} has layout {layout!r}, expected {LAYOUT!r}",
                                 "save it with jax_impl.checkpoint.save_checkpoint or bridge.weights.save_from_torch")
    try:
        arch_dict = json.loads(meta["spec"])
        metadata = json.loads(meta.get("metadata", "{}"))
    except json.JSONDecodeError as err:
        raise HessianApproxError(f"weight file {path} has malformed JSON metadata ({err})",
                                 "re-create it with `hessian-approx train`") from None
    try:
        arch = architecture(arch_dict)
    except HessianApproxError as err:
        raise HessianApproxError(f"weight file {path} has an unusable architecture: {err.problem}", err.fix) from None
    tree: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        layer, _, leaf = key.partition("/")
        if not leaf:
            raise HessianApproxError(f"weight file {path} holds tensor {key!r}, not named 'Layer_i/leaf' "
                                     "(e.g. 'Dense_0/kernel')", "re-create it with `hessian-approx train`")
        check_finite(f"the weights {key} in {path}", value)
        tree.setdefault(layer, {})[leaf] = value
    try:
        flax_to_torch(tree, arch)  # validates every layer, leaf and shape against the architecture
    except HessianApproxError as err:
        raise HessianApproxError(f"weight file {path} does not match its architecture: {err.problem}",
                                 err.fix) from None
    return tree, arch, metadata


def load_torch_twin(path, dtype=None):
    """The torch twin of a Flax-layout weight file, with its weights.

    Args:
      path: a safetensors file written by ``jax_impl.checkpoint.save_checkpoint`` or ``save_from_torch``.
      dtype: the twin's dtype: None (default) keeps the file's dtype; else a torch dtype or a name
        such as "float64".
    Returns:
      (model, arch, metadata): ``model`` the ``nn.Sequential`` from ``torch_ref.models.build_twin``
      holding the file's weights (in the torch layout, ``bridge.convert``), ``arch`` the stored
      Architecture (legacy MLP specs converted), ``metadata`` the stored provenance dict.
    """
    import torch

    from torch_ref.models import build_twin

    tree, arch, metadata = read_flax_file(path)
    stored = next(iter(next(iter(tree.values())).values())).dtype
    model = build_twin(arch, _torch_dtype(dtype, stored))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in flax_to_torch(tree, arch).items():
            named[key].copy_(torch.from_numpy(value))
    return model, arch, metadata


def save_from_torch(path, model, arch, metadata: dict | None = None) -> None:
    """Write the twin's weights to ``path`` in the Flax layout (atomically: temp file + rename).

    Args:
      path: destination .safetensors file (parents are created).
      model: the ``nn.Sequential`` twin of ``arch``; checked layer by layer.
      arch: the Architecture (or its dict, or a legacy MLP spec dict); stored as
        ``Architecture.to_json()``.
      metadata: JSON-serializable provenance, stored under "metadata".
    Raises:
      HessianApproxError naming the layer when the model does not match ``arch``, or the tensor
      when a weight holds NaN/Inf.
    """
    from safetensors.numpy import save

    arch = architecture(arch)
    tree = torch_to_flax(state_dict_from_torch(model, arch), arch)
    tensors = {f"{layer}/{leaf}": np.ascontiguousarray(value)
               for layer, leaves in tree.items() for leaf, value in leaves.items()}
    for key, value in tensors.items():
        check_finite(f"the weights {key}", value)
    try:
        meta = {"spec": arch.to_json(), "layout": LAYOUT, "metadata": json.dumps(metadata or {})}
    except TypeError as err:
        raise HessianApproxError(f"the metadata is not JSON-serializable ({err})",
                                 "pass plain dicts, lists, strings and numbers") from None
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(save(tensors, metadata=meta)))
