"""The permutation between the JAX flat parameter order and the torch twin's flat order (numpy only).

JAX flat order: ``jax.flatten_util.ravel_pytree(params)`` of {"Dense_i": {"bias", "kernel"}}. It
visits dict keys sorted as strings, so layers go "Dense_0", "Dense_1", "Dense_10", "Dense_11",
"Dense_2", ... and within a layer the bias (out,) comes before the kernel (in, out), each leaf
row-major. The order here is derived the same way (``sorted`` over the key tree), never assumed.

Torch flat order: ``model.parameters()`` of the twin: layer by layer in network order, the weight
(out, in) row-major, then the bias (out,).

With ``perm = jax_to_torch_permutation(spec)``: ``torch_flat = jax_flat[perm]`` and
``jax_flat = torch_flat[inverse(perm)]``; a matrix M (d, d) on JAX-ordered vectors is
``M[perm][:, perm]`` on torch-ordered ones.

Kronecker factors. For one Dense layer with weight W (out, in) = kernelᵀ, BackPACK's factors
[G (out, out), A (in, in)] approximate the weight block of the curvature as ``kron(G, A)`` in
torch row-major order (index o*in + i). The Flax kernel (in, out) is row-major with index
i*out + o, so the same block in the Flax order is ``kron(A, G)``: the same matrix with rows and
columns permuted (see ``kron_block``).
"""

from __future__ import annotations

import numpy as np

from bridge.convert import layer_dims, torch_key
from jax_impl.errors import HessianApproxError

ORDERS = ("jax", "torch")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise HessianApproxError(f"parameter order {order!r} is not known", "use order='jax' or order='torch'")


def jax_layout(spec) -> list[tuple[str, tuple[int, ...]]]:
    """[("Dense_i/leaf", Flax shape), ...] in the JAX flat order (keys sorted as strings, like ravel_pytree)."""
    tree = {name: {"kernel": (a, b), "bias": (b,)} for name, a, b in layer_dims(spec)}
    return [(f"{name}/{leaf}", tree[name][leaf]) for name in sorted(tree) for leaf in sorted(tree[name])]


def torch_layout(spec) -> list[tuple[str, tuple[int, ...]]]:
    """[("{2i}.weight", (out, in)), ("{2i}.bias", (out,)), ...] in the torch flat order (model.parameters())."""
    out = []
    for i, (_, a, b) in enumerate(layer_dims(spec)):
        out += [(torch_key(i, "weight"), (b, a)), (torch_key(i, "bias"), (b,))]
    return out


def _slices(layout) -> dict[str, slice]:
    slices, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        slices[name] = slice(start, start + size)
        start += size
    return slices


def param_slices(spec, order: str = "jax") -> dict[str, slice]:
    """Where each parameter leaf lies in the flat vector of the given order.

    Args:
      spec: the ModelSpec or its dict.
      order: "jax" -> keys "Dense_i/bias", "Dense_i/kernel" (the kernel's slice holds (in, out)
        row-major); "torch" -> keys "{2i}.weight" ((out, in) row-major), "{2i}.bias".
    Returns:
      {name: slice}, inserted in flat order; the slices tile range(d).
    """
    _check_order(order)
    return _slices(jax_layout(spec) if order == "jax" else torch_layout(spec))


def layer_slices(spec, order: str = "jax") -> dict[str, slice]:
    """{"Dense_i": slice} covering the layer's bias and weight/kernel, which are contiguous in both orders.

    Inserted in flat order (for "jax": Dense_0, Dense_1, Dense_10, ..., Dense_2, ...).
    """
    _check_order(order)
    names = {torch_key(i, leaf): name for i, (name, _, _) in enumerate(layer_dims(spec))
             for leaf in ("weight", "bias")}
    out: dict[str, slice] = {}
    for key, sl in param_slices(spec, order).items():
        layer = key.split("/")[0] if order == "jax" else names[key]
        prev = out.get(layer)
        out[layer] = sl if prev is None else slice(prev.start, sl.stop)
    return out


def num_params(spec) -> int:
    """d, the number of scalar parameters of the spec's MLP."""
    return sum(a * b + b for _, a, b in layer_dims(spec))


def jax_to_torch_permutation(spec) -> np.ndarray:
    """perm (d,) int64 with ``torch_flat = jax_flat[perm]``.

    perm[k] is the JAX flat index of the k-th torch flat parameter.
    """
    jax_sl = param_slices(spec, "jax")
    parts = []
    for name, a, b in layer_dims(spec):
        kernel_idx = np.arange(jax_sl[f"{name}/kernel"].start, jax_sl[f"{name}/kernel"].stop).reshape(a, b)
        bias_idx = np.arange(jax_sl[f"{name}/bias"].start, jax_sl[f"{name}/bias"].stop)
        parts += [kernel_idx.T.reshape(-1), bias_idx]  # torch weight (out, in) row-major, then bias
    return np.concatenate(parts).astype(np.int64)


def torch_to_jax_permutation(spec) -> np.ndarray:
    """inv (d,) int64 with ``jax_flat = torch_flat[inv]``: ``inverse(jax_to_torch_permutation(spec))``."""
    return inverse(jax_to_torch_permutation(spec))


def inverse(perm) -> np.ndarray:
    """The inverse permutation inv (d,): ``inv[perm] = arange(d)``, so ``x[perm][inv] == x``."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise HessianApproxError(f"the index array (shape {perm.shape}) is not a permutation of range(d)",
                                 "pass the output of jax_to_torch_permutation")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def _perm(spec_or_perm, inverse_: bool) -> np.ndarray:
    if isinstance(spec_or_perm, np.ndarray):
        perm = spec_or_perm
    else:
        perm = jax_to_torch_permutation(spec_or_perm)
    return inverse(perm) if inverse_ else perm


def _check_rows(what: str, v: np.ndarray, d: int, axes: int) -> None:
    if v.ndim < axes or any(v.shape[k] != d for k in range(axes)):
        raise HessianApproxError(f"{what} has shape {v.shape}, expected {'(d, d)' if axes == 2 else '(d,) or (d, k)'}"
                                 f" with d = {d}", "pass a vector or matrix over this spec's parameters")


def to_torch_vector(v, spec) -> np.ndarray:
    """A JAX-ordered v (d,) (or (d, k), columns permuted together) in the torch order: ``v[perm]``.

    ``spec`` is the ModelSpec, its dict, or a precomputed ``jax_to_torch_permutation``.
    """
    perm = _perm(spec, False)
    v = np.asarray(v)
    _check_rows("the vector", v, perm.size, 1)
    return v[perm]


def to_jax_vector(v, spec) -> np.ndarray:
    """A torch-ordered v (d,) (or (d, k)) in the JAX order: ``v[inverse(perm)]``. Inverse of to_torch_vector."""
    inv = _perm(spec, True)
    v = np.asarray(v)
    _check_rows("the vector", v, inv.size, 1)
    return v[inv]


def to_torch_matrix(M, spec) -> np.ndarray:
    """A matrix (d, d) over JAX-ordered parameters (e.g. the Hessian) in the torch order: ``M[perm][:, perm]``."""
    perm = _perm(spec, False)
    M = np.asarray(M)
    _check_rows("the matrix", M, perm.size, 2)
    return M[np.ix_(perm, perm)]


def to_jax_matrix(M, spec) -> np.ndarray:
    """A matrix (d, d) over torch-ordered parameters in the JAX order. Inverse of to_torch_matrix."""
    inv = _perm(spec, True)
    M = np.asarray(M)
    _check_rows("the matrix", M, inv.size, 2)
    return M[np.ix_(inv, inv)]


def kron_block(G, A, layout: str = "torch") -> np.ndarray:
    """The weight block of a Kronecker-factored curvature from BackPACK's factors.

    Args:
      G: (out, out), the output-side factor.
      A: (in, in), the input-side factor.
      layout: "torch" -> ``kron(G, A)`` (out*in, out*in), the block over the torch weight (out, in)
        flattened row-major; "flax" -> ``kron(A, G)`` (in*out, in*out), the same block over the Flax
        kernel (in, out) flattened row-major.
    """
    G = np.asarray(G)
    A = np.asarray(A)
    for what, f in (("G", G), ("A", A)):
        if f.ndim != 2 or f.shape[0] != f.shape[1]:
            raise HessianApproxError(f"Kronecker factor {what} has shape {f.shape}, expected a square matrix",
                                     "pass BackPACK's [G (out, out), A (in, in)]")
    if layout == "torch":
        return np.kron(G, A)
    if layout == "flax":
        return np.kron(A, G)
    raise HessianApproxError(f"Kronecker layout {layout!r} is not known", "use layout='torch' or layout='flax'")
