"""BackPACK's per-parameter results (torch_ref.backpack_runner) as JAX structures in the JAX flat order.

The torch twin has Dense layer i (Flax ``Dense_i``) as ``nn.Linear`` at Sequential index
2*i, so its results are keyed "2i.weight" (torch (out, in) = Flax kernelᵀ) and "2i.bias".

- Diagonal methods: the weight diagonal (out, in) is transposed to the Flax kernel
  layout (in, out); the flat vector is assembled with ``ravel_pytree`` (layers in sorted
  key order, bias before kernel, row-major).
- Kronecker methods: BackPACK's weight factors [G, A] (kron(G, A) in torch's
  row-major (out, in) order) become ``KroneckerBlocks`` G_l = G, A_l = A (whose kernel
  block is kron(A, G) in the Flax (in, out) order: the same matrix, permuted). The bias
  factor [G] is the same matrix as the weight's G in KFAC, KFLR and KFRA (both come
  from the same backpropagated quantity); it is checked and not stored twice.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jax_impl.approx.structures import Diagonal, KroneckerBlocks
from jax_impl.errors import HessianApproxError
from jax_impl.models import ModelSpec


def _spec(spec) -> ModelSpec:
    return spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(dict(spec))


def _get(result: dict, key: str):
    if key not in result:
        raise HessianApproxError(
            f"the BackPACK result lacks {key!r} (has {sorted(k for k in result if k != 'seconds')})",
            "run torch_ref.backpack_runner.run_backpack on the twin of this spec",
        )
    return result[key]


def to_diagonal(result: dict, spec, dtype=jnp.float64) -> Diagonal:
    """A BackPACK diagonal result ({"0.weight": (out, in), "0.bias": (out,), ...}) as a Diagonal.

    Args:
      result: from ``run_backpack`` with method diag-ggn, diag-ggn-mc or diag-h.
      spec: the ModelSpec (or its dict).
      dtype: dtype of the result.
    Returns:
      Diagonal with diag (d,) in the JAX flat order.
    """
    spec = _spec(spec)
    tree = {}
    for i, (a, b) in enumerate(zip(spec.widths[:-1], spec.widths[1:])):
        w = np.asarray(_get(result, f"{2 * i}.weight"))
        bias = np.asarray(_get(result, f"{2 * i}.bias"))
        if w.shape != (b, a) or bias.shape != (b,):
            raise HessianApproxError(
                f"BackPACK layer {2 * i} has shapes {w.shape} and {bias.shape}, the spec expects {(b, a)} and {(b,)}",
                "pass the spec of the model BackPACK ran on",
            )
        tree[f"Dense_{i}"] = {"bias": jnp.asarray(bias, dtype), "kernel": jnp.asarray(w.T, dtype)}
    return Diagonal(ravel_pytree(tree)[0])


def to_kronecker(result: dict, spec, dtype=jnp.float64, rtol: float = 1e-6) -> KroneckerBlocks:
    """A BackPACK Kronecker result ({"0.weight": [G, A], "0.bias": [G], ...}) as KroneckerBlocks.

    Args:
      result: from ``run_backpack`` with method kfac, kflr or kfra.
      spec: the ModelSpec (or its dict).
      dtype: dtype of the factors.
      rtol: the bias factor must equal the weight's G to this relative tolerance.
    """
    spec = _spec(spec)
    gs, as_ = [], []
    for i, (a, b) in enumerate(zip(spec.widths[:-1], spec.widths[1:])):
        wf = _get(result, f"{2 * i}.weight")
        bf = _get(result, f"{2 * i}.bias")
        if len(wf) != 2 or len(bf) != 1:
            raise HessianApproxError(
                f"BackPACK layer {2 * i} has {len(wf)} weight and {len(bf)} bias factors, expected 2 and 1",
                "run a Kronecker method (kfac, kflr, kfra)",
            )
        g, a_f = (np.asarray(f) for f in wf)
        gb = np.asarray(bf[0])
        if g.shape != (b, b) or a_f.shape != (a, a) or gb.shape != (b, b):
            raise HessianApproxError(
                f"BackPACK layer {2 * i} factors have shapes {g.shape}, {a_f.shape}, {gb.shape}; "
                f"the spec expects {(b, b)}, {(a, a)}, {(b, b)}",
                "pass the spec of the model BackPACK ran on",
            )
        scale = max(float(np.max(np.abs(g))), np.finfo(np.float64).tiny)
        if float(np.max(np.abs(g - gb))) > rtol * scale:
            raise HessianApproxError(
                f"BackPACK's bias factor of layer {2 * i} differs from its weight's G",
                "report it: KroneckerBlocks assumes they are equal",
            )
        gs.append(jnp.asarray(g, dtype))
        as_.append(jnp.asarray(a_f, dtype))
    return KroneckerBlocks(tuple(gs), tuple(as_), spec.layer_names)
