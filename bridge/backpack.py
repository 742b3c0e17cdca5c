"""BackPACK's per-parameter results (torch_ref.backpack_runner) as JAX structures in the JAX flat order.

The torch twin has one module per architecture layer, so parameter layer ``p`` (a
``ParamLayer``) has its results under ``"{p.index}.weight"`` and ``"{p.index}.bias"``.

Orders. A layer's weight has "output" and "input rows":

- Conv2d: torch weight (out, in, kh, kw) (OIHW), rows in (in, kh, kw) order; Flax kernel
  (kh, kw, in, out) (HWIO), rows in (kh, kw, in) order.
- Dense: torch weight (out, in), Flax kernel (in, out). After a Flatten of an (H, W, C)
  image torch's rows are in NCHW (c, h, w) order, Flax's in NHWC (h, w, c) order;
  otherwise both are the same.

``kernel_rows(p)`` is the index array ``perm`` with Flax row r = torch row ``perm[r]``, derived
from the layer's layout rule in ``bridge.convert`` (so a new layer kind needs no entry here).

What BackPACK 1.7.1 returns (read from ``backpack/extensions/secondorder/hbp/{linear,convnd}.py``
and checked by tests/bridge/test_backpack*.py):

- Diagonal methods (DiagGGNExact, DiagGGNMC, DiagHessian): an array of the parameter's
  shape: conv weight (out, in, kh, kw), dense weight (out, in), bias (out,). Converted to
  the Flax kernel layout and raveled with ``ravel_pytree`` (layers in sorted name order,
  bias before kernel, row-major).
- Kronecker methods (KFAC, KFLR, KFRA): weight [G (out, out), A (rows, rows)] whose
  kron(G, A) is the weight block in torch's row-major order; bias [G].
  A = (1/N) Σ_n Σ_t u_{n,t} u_{n,t}ᵀ over the layer input u (dense: the input vector, t a
  single position; conv: the unfolded, zero-padded input patch (in·kh·kw,) at output
  location t, *summed* over locations, divided by N only).
  G: for KFLR/KFAC G = Σ_{n,v} s̄_{n,v} s̄_{n,v}ᵀ with s̄ (out,) the loss-Hessian square root
  backpropagated to the layer output and *summed over output locations* (the 1/√N of the
  mean is inside s); for KFRA G = the batch-averaged output Hessian proxy (out·T, out·T)
  with its (T, T) location blocks summed. Hence for conv the weight's G is exactly
  BackPACK's bias factor, and for KFLR it is the exact GGN bias block (the bias Jacobian
  sums over locations). The bias factor is computed from the same backpropagated quantity
  by the same function, so it equals the weight's G; ``to_kronecker`` checks that and stores
  G once (``KroneckerBlocks``: bias block G, kernel block kron(A, G) in the Flax order).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bridge.convert import architecture, rule, torch_shapes
from hessian_approx.architecture import ParamLayer
from hessian_approx.errors import HessianApproxError
from jax_impl.approx.structures import Diagonal, KroneckerBlocks

KRONECKER_METHODS = ("kfac", "kflr", "kfra")
DIAGONAL_METHODS = ("diag-ggn", "diag-ggn-mc", "diag-h")


def kernel_rows(p: ParamLayer) -> np.ndarray:
    """(rows,) int: Flax kernel row r is torch weight row-index ``perm[r]`` (see module doc).

    Derived, not assumed: torch row indices in the weight's shape are pushed through the
    layer's layout rule (``bridge.convert.rule(p).to_flax``) and read off the kernel.
    """
    shape = torch_shapes(p)["weight"]
    rows = int(np.prod(shape[1:]))
    index = np.broadcast_to(np.arange(rows).reshape(1, *shape[1:]), shape).copy()
    return rule(p).to_flax(p, index).reshape(rows, shape[0])[:, 0].copy()


def weight_to_kernel(w, p: ParamLayer) -> np.ndarray:
    """A torch-weight-shaped array (conv (out, in, kh, kw), dense (out, in)) in the Flax kernel
    layout (conv (kh, kw, in, out), dense (in, out), rows permuted after a Flatten)."""
    return rule(p).to_flax(p, np.asarray(w))


def input_factor_to_flax(a, p: ParamLayer) -> np.ndarray:
    """BackPACK's input factor A (rows, rows) in torch's row order -> the Flax kernel row order."""
    perm = kernel_rows(p)
    return np.ascontiguousarray(np.asarray(a)[np.ix_(perm, perm)])


def _get(result: dict, key: str):
    if key not in result:
        raise HessianApproxError(
            f"the BackPACK result lacks {key!r} (has {sorted(k for k in result if k != 'seconds')})",
            "run torch_ref.backpack_runner.run_backpack on the twin of this architecture",
        )
    return result[key]


def _check_shape(what: str, value: np.ndarray, expected: tuple) -> None:
    if tuple(value.shape) != tuple(expected):
        raise HessianApproxError(f"BackPACK's {what} has shape {tuple(value.shape)}, the architecture expects "
                                 f"{tuple(expected)}", "pass the architecture of the model BackPACK ran on")


def _dtype(dtype, like: np.ndarray):
    return like.dtype if dtype is None else dtype


def to_diagonal(result: dict, arch, dtype=None) -> Diagonal:
    """A BackPACK diagonal result as a ``Diagonal`` in the JAX flat order.

    Args:
      result: ``run_backpack`` output for diag-ggn, diag-ggn-mc or diag-h:
        {"{i}.weight": conv (out, in, kh, kw) | dense (out, in), "{i}.bias": (out,), ...}.
      arch: the Architecture (or its dict).
      dtype: dtype of the result (default: BackPACK's).
    Returns:
      Diagonal with diag (d,).
    """
    arch, tree = architecture(arch), {}
    for p in arch.param_layers:
        w = np.asarray(_get(result, f"{p.index}.weight"))
        b = np.asarray(_get(result, f"{p.index}.bias"))
        _check_shape(f"{p.index}.weight ({p.name})", w, torch_shapes(p)["weight"])
        _check_shape(f"{p.index}.bias ({p.name})", b, p.shapes["bias"])
        dt = _dtype(dtype, w)
        tree[p.name] = {"bias": jnp.asarray(b, dt), "kernel": jnp.asarray(weight_to_kernel(w, p), dt)}
    return Diagonal(ravel_pytree(tree)[0])


def _factors(result: dict, p: ParamLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G (out, out), A (rows, rows) torch order, bias G (out, out)) of one layer, shapes checked."""
    wf, bf = _get(result, f"{p.index}.weight"), _get(result, f"{p.index}.bias")
    if not isinstance(wf, (list, tuple)) or len(wf) != 2 or not isinstance(bf, (list, tuple)) or len(bf) != 1:
        raise HessianApproxError(f"BackPACK layer {p.index} ({p.name}) is not [G, A] for the weight and [G] "
                                 "for the bias", "run a Kronecker method (kfac, kflr, kfra)")
    g, a, gb = (np.asarray(f) for f in (*wf, bf[0]))
    out, rows = p.shapes["kernel"][-1], int(np.prod(p.shapes["kernel"][:-1]))
    _check_shape(f"weight factor G of {p.name}", g, (out, out))
    _check_shape(f"weight factor A of {p.name}", a, (rows, rows))
    _check_shape(f"bias factor of {p.name}", gb, (out, out))
    return g, a, gb


def to_kronecker(result: dict, arch, dtype=None, rtol: float = 1e-6) -> KroneckerBlocks:
    """A BackPACK Kronecker result as ``KroneckerBlocks`` (the BackPACK convention).

    Args:
      result: ``run_backpack`` output for kfac, kflr or kfra:
        {"{i}.weight": [G (out, out), A (rows, rows)], "{i}.bias": [G (out, out)], ...}
        with rows = in (dense) or in·kh·kw (conv), in torch's order.
      arch: the Architecture (or its dict).
      dtype: dtype of the factors (default: BackPACK's).
      rtol: the bias factor must equal the weight's G to this tolerance (relative to max |G|).
    Returns:
      KroneckerBlocks: per parameter layer in network order G (out, out) and A over the Flax
      kernel rows ((kh, kw, in) for conv, NHWC order after a Flatten), names the Flax names.
    """
    arch, gs, as_ = architecture(arch), [], []
    for p in arch.param_layers:
        g, a, gb = _factors(result, p)
        scale = max(float(np.max(np.abs(g))), np.finfo(np.float64).tiny)
        if float(np.max(np.abs(g - gb))) > rtol * scale:
            raise HessianApproxError(f"BackPACK's bias factor of layer {p.index} ({p.name}) differs from its "
                                     "weight's G", "report it: KroneckerBlocks stores one G per layer")
        dt = _dtype(dtype, g)
        gs.append(jnp.asarray(g, dt))
        as_.append(jnp.asarray(input_factor_to_flax(a, p), dt))
    return KroneckerBlocks(tuple(gs), tuple(as_), arch.layer_names)


def to_structure(result: dict, arch, method: str, dtype=None):
    """``to_diagonal`` or ``to_kronecker`` by the BackPACK ``method`` name."""
    if method in DIAGONAL_METHODS:
        return to_diagonal(result, arch, dtype)
    if method in KRONECKER_METHODS:
        return to_kronecker(result, arch, dtype)
    raise HessianApproxError(f"BackPACK method {method!r} is not known",
                             f"choose one of {', '.join(DIAGONAL_METHODS + KRONECKER_METHODS)}")
