"""The permutation between the JAX flat parameter order and the torch twin's flat order, for any architecture.

JAX flat order: ``jax.flatten_util.ravel_pytree(params)`` of {name: {"bias", "kernel"}}. It
visits dict keys sorted as strings, so layers go "Conv_0", "Conv_1", "Dense_0", "Dense_1",
"Dense_10", "Dense_2", ... and within a layer the bias comes before the kernel, each leaf
row-major in the Flax shape. The order here is derived the same way (``sorted``), never assumed.

Torch flat order: ``model.parameters()`` of the twin: layer by layer in network order, the weight
row-major in the torch shape ((out, in) or (out, in, kh, kw)), then the bias.

The permutation is not written out by hand: the JAX flat indices, arranged as a Flax tree, are
pushed through ``bridge.convert.flax_to_torch`` (the per-kind layout rules, including the
NHWC -> NCHW row order of a Dense after a Flatten) and read off in torch order.

With ``perm = jax_to_torch_permutation(arch)``: ``torch_flat = jax_flat[perm]`` and
``jax_flat = torch_flat[inverse(perm)]``; a matrix M (d, d) on JAX-ordered vectors is
``M[perm][:, perm]`` on torch-ordered ones. Every function taking ``arch`` accepts an
Architecture or its dict (the first version's MLP spec dict too).
"""

from __future__ import annotations

import numpy as np

from bridge.convert import architecture, flax_to_torch, rule, torch_key, torch_shapes
from hessian_approx.errors import HessianApproxError

ORDERS = ("jax", "torch")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise HessianApproxError(f"parameter order {order!r} is not known", "use order='jax' or order='torch'")


def jax_layout(arch) -> list[tuple[str, tuple[int, ...]]]:
    """[("Conv_0/bias", (out,)), ("Conv_0/kernel", (kh, kw, in, out)), ...] in the JAX flat order."""
    tree = {p.name: p.shapes for p in architecture(arch).param_layers}
    return [(f"{name}/{leaf}", tuple(tree[name][leaf])) for name in sorted(tree) for leaf in sorted(tree[name])]


def torch_layout(arch) -> list[tuple[str, tuple[int, ...]]]:
    """[("{i}.weight", torch shape), ("{i}.bias", (out,)), ...] in the torch flat order (model.parameters())."""
    return [(torch_key(p, leaf), shape) for p in architecture(arch).param_layers
            for leaf, shape in torch_shapes(p).items()]


def _slices(layout) -> dict[str, slice]:
    slices, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        slices[name] = slice(start, start + size)
        start += size
    return slices


def param_slices(arch, order: str = "jax") -> dict[str, slice]:
    """Where each parameter leaf lies in the flat vector of the given order.

    Args:
      arch: the Architecture or its dict.
      order: "jax" -> keys "Conv_0/bias", "Conv_0/kernel", ... (Flax shapes row-major);
        "torch" -> keys "{i}.weight" (torch shapes row-major), "{i}.bias".
    Returns:
      {name: slice}, inserted in flat order; the slices tile range(d).
    """
    _check_order(order)
    return _slices(jax_layout(arch) if order == "jax" else torch_layout(arch))


def layer_slices(arch, order: str = "jax") -> dict[str, slice]:
    """{Flax name: slice} covering the layer's bias and kernel/weight, contiguous in both orders.

    Inserted in flat order (for "jax": sorted names, e.g. Conv_0, Dense_0, Dense_1, Dense_10, Dense_2).
    """
    _check_order(order)
    names = {torch_key(p, leaf): p.name for p in architecture(arch).param_layers for leaf in ("weight", "bias")}
    out: dict[str, slice] = {}
    for key, sl in param_slices(arch, order).items():
        layer = key.split("/")[0] if order == "jax" else names[key]
        prev = out.get(layer)
        out[layer] = sl if prev is None else slice(prev.start, sl.stop)
    return out


def num_params(arch) -> int:
    """d, the number of scalar parameters."""
    return architecture(arch).num_params


def jax_to_torch_permutation(arch) -> np.ndarray:
    """perm (d,) int64 with ``torch_flat = jax_flat[perm]``: perm[k] is the JAX flat index of torch entry k.

    Derived by pushing the JAX flat indices through ``bridge.convert.flax_to_torch``.
    """
    arch = architecture(arch)
    slices, shapes = param_slices(arch, "jax"), dict(jax_layout(arch))
    tree: dict[str, dict[str, np.ndarray]] = {}
    for key, sl in slices.items():  # each leaf holds its own JAX flat indices, in its Flax shape
        layer, leaf = key.split("/")
        tree.setdefault(layer, {})[leaf] = np.arange(sl.start, sl.stop, dtype=np.int64).reshape(shapes[key])
    state = flax_to_torch(tree, arch)  # network order, weight then bias: the torch flat order
    return np.concatenate([v.reshape(-1) for v in state.values()]).astype(np.int64)


def torch_to_jax_permutation(arch) -> np.ndarray:
    """inv (d,) int64 with ``jax_flat = torch_flat[inv]``: ``inverse(jax_to_torch_permutation(arch))``."""
    return inverse(jax_to_torch_permutation(arch))


def inverse(perm) -> np.ndarray:
    """The inverse permutation inv (d,): ``inv[perm] = arange(d)``, so ``x[perm][inv] == x``."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise HessianApproxError(f"the index array (shape {perm.shape}) is not a permutation of range(d)",
                                 "pass the output of jax_to_torch_permutation")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inv


def kernel_permutation(arch, name: str) -> np.ndarray:
    """perm (n,) with ``weight.ravel() = kernel.ravel()[perm]`` for the Flax layer ``name`` (n entries).

    The within-layer part of the flat permutation, from the same layout rule.
    """
    layers = {p.name: p for p in architecture(arch).param_layers}
    if name not in layers:
        raise HessianApproxError(f"layer {name!r} is not a parameter layer of the architecture",
                                 f"use one of {', '.join(layers)}")
    p = layers[name]
    shape = p.shapes["kernel"]
    return rule(p).to_torch(p, np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)).reshape(-1)


def _perm(arch_or_perm, inverse_: bool) -> np.ndarray:
    perm = arch_or_perm if isinstance(arch_or_perm, np.ndarray) else jax_to_torch_permutation(arch_or_perm)
    return inverse(perm) if inverse_ else perm


def _check_rows(what: str, v: np.ndarray, d: int, axes: int) -> None:
    if v.ndim < axes or any(v.shape[k] != d for k in range(axes)):
        raise HessianApproxError(f"{what} has shape {v.shape}, expected {'(d, d)' if axes == 2 else '(d,) or (d, k)'}"
                                 f" with d = {d}", "pass a vector or matrix over this architecture's parameters")


def to_torch_vector(v, arch) -> np.ndarray:
    """A JAX-ordered v (d,) (or (d, k), columns permuted together) in the torch order: ``v[perm]``.

    ``arch`` is the Architecture, its dict, or a precomputed ``jax_to_torch_permutation``.
    """
    perm = _perm(arch, False)
    v = np.asarray(v)
    _check_rows("the vector", v, perm.size, 1)
    return v[perm]


def to_jax_vector(v, arch) -> np.ndarray:
    """A torch-ordered v (d,) (or (d, k)) in the JAX order: ``v[inverse(perm)]``. Inverse of to_torch_vector."""
    inv = _perm(arch, True)
    v = np.asarray(v)
    _check_rows("the vector", v, inv.size, 1)
    return v[inv]


def to_torch_matrix(M, arch) -> np.ndarray:
    """A matrix (d, d) over JAX-ordered parameters (e.g. the Hessian) in the torch order: ``M[perm][:, perm]``."""
    perm = _perm(arch, False)
    M = np.asarray(M)
    _check_rows("the matrix", M, perm.size, 2)
    return M[np.ix_(perm, perm)]


def to_jax_matrix(M, arch) -> np.ndarray:
    """A matrix (d, d) over torch-ordered parameters in the JAX order. Inverse of to_torch_matrix."""
    inv = _perm(arch, True)
    M = np.asarray(M)
    _check_rows("the matrix", M, inv.size, 2)
    return M[np.ix_(inv, inv)]


def kron_block(G, A, layout: str = "torch", arch=None, name: str | None = None) -> np.ndarray:
    """The weight block of a Kronecker-factored curvature from BackPACK's factors.

    Args:
      G: (out, out), the output-side factor.
      A: (m, m), the input-side factor: m = in for a Dense, in*kh*kw for a Conv2d (torch's
        unfolded (in, kh, kw) order).
      layout: "torch" -> ``kron(G, A)`` (out*m, out*m), the block over the torch weight
        flattened row-major; "flax" -> the same block over the Flax kernel flattened row-major.
        Without ``arch`` that is ``kron(A, G)``, right for a Dense not fed by a Flatten; with
        ``arch`` and ``name`` (a Flax layer name) it is ``kron(G, A)`` moved by
        ``kernel_permutation``, right for every layer kind.
    """
    G = np.asarray(G)
    A = np.asarray(A)
    for what, f in (("G", G), ("A", A)):
        if f.ndim != 2 or f.shape[0] != f.shape[1]:
            raise HessianApproxError(f"Kronecker factor {what} has shape {f.shape}, expected a square matrix",
                                     "pass BackPACK's [G (out, out), A (in, in)]")
    if layout == "torch":
        return np.kron(G, A)
    if layout != "flax":
        raise HessianApproxError(f"Kronecker layout {layout!r} is not known", "use layout='torch' or layout='flax'")
    if arch is None:
        return np.kron(A, G)
    perm = kernel_permutation(arch, name)
    if perm.size != G.shape[0] * A.shape[0]:
        raise HessianApproxError(f"factors of sizes {G.shape[0]} and {A.shape[0]} do not cover the {perm.size} "
                                 f"kernel entries of {name}", "pass the factors of that layer")
    inv = inverse(perm)  # kernel_flat = weight_flat[inv]
    return np.kron(G, A)[np.ix_(inv, inv)]
