"""Structured curvature approximations (diagonal, Kronecker-factored blocks) in the JAX flat order.

Every structure answers the same questions as a dense matrix would, without building it
unless asked: ``eigenvalues(k)`` (descending), ``trace()``, ``matvec(v)`` on flat (d,)
vectors, ``dense()`` (d, d) and ``to_dict()`` (a JSON-friendly summary).

The JAX flat order is ``jax.flatten_util.ravel_pytree(params)``: layers in sorted key
order (``"Conv_0" < "Dense_0" < "Dense_1" < ... < "Dense_10" < "Dense_2"``, string order),
within a layer ``bias`` (out,) before ``kernel`` (Dense (in, out), Conv2d (kh, kw, in, out)),
each leaf row-major.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.errors import HessianApproxError


def _summary(eigs, trace, k: int | None) -> dict:
    eigs = np.asarray(eigs, dtype=np.float64)
    if k is not None:
        eigs = eigs[:k]
    return {"eigenvalues": [float(e) for e in eigs], "trace": float(trace)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Diagonal:
    """A diagonal curvature approximation diag(d).

    Attributes:
      diag: (d,) the diagonal, in the JAX flat parameter order.
    """

    diag: jax.Array

    @property
    def dim(self) -> int:
        return int(self.diag.shape[0])

    def eigenvalues(self, k: int | None = None) -> jax.Array:
        """The top-``k`` eigenvalues (all when None), descending: (k,)."""
        e = -jnp.sort(-self.diag)
        return e if k is None else e[:k]

    def trace(self) -> jax.Array:
        """Σ_i diag_i (a scalar)."""
        return jnp.sum(self.diag)

    def matvec(self, v) -> jax.Array:
        """diag ⊙ v: (d,) -> (d,)."""
        return self.diag * jnp.asarray(v, self.diag.dtype)

    def dense(self) -> jax.Array:
        """The (d, d) matrix."""
        return jnp.diag(self.diag)

    def to_dict(self, k: int | None = 20) -> dict:
        """{"eigenvalues": top-k, descending, "trace": float}."""
        return _summary(self.eigenvalues(k), self.trace(), None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerBlocks:
    """A block-diagonal curvature approximation with Kronecker-factored kernel blocks.

    One entry per parameter layer (Dense or Conv2d), in network order (``names[l]``, e.g.
    ``"Conv_0"``, ``"Dense_0"``):

    - ``G[l]`` (O, O): the output-side factor, BackPACK's first factor (for a mean-reduced
      loss already scaled by the weights w_n = 1/N, so the block is G ⊗ A with A a batch
      *mean*); O = the layer's output features (channels).
    - ``A[l]`` (J, J): the input-side factor of the layer input (Dense: J = in) or of its
      input patches (Conv2d: J = kh·kw·in, patch entries in the kernel's (kh, kw, in) order);
      for convolutions its scaling depends on the convention (``jax_impl.approx.kronecker``).

    BackPACK treats weight and bias as separate blocks (no weight-bias cross terms, no
    cross-layer terms), so the matrix is block-diagonal with, per layer:

    - the bias block ``G[l]``, on the flat indices of ``<name>/bias`` (O,);
    - the kernel block ``kron(A[l], G[l])``, on the flat indices of the Flax kernel
      (Dense (in, out), Conv2d (kh, kw, in, out)) flattened row-major, i.e. as the matrix
      (J, O) (index ``j*O + o``): entry ((j, o), (k, p)) = A[j, k] G[o, p]. (The torch
      weight (out, in[, kh, kw]) puts O first, so in torch's row-major order the same
      block is kron(G, A), which is why BackPACK lists the factors as [G, A]; torch's
      patch order (in, kh, kw) differs too: the bridge permutes.)

    Blocks are placed in the JAX flat order (see the module docstring).
    """

    G: tuple
    A: tuple
    names: tuple = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        if not (len(self.G) == len(self.A) == len(self.names)):
            raise HessianApproxError(
                f"KroneckerBlocks got {len(self.G)} G, {len(self.A)} A factors and {len(self.names)} names",
                "give one G, one A and one name per layer",
            )

    # ---- layout ---------------------------------------------------------------
    def layout(self) -> list[tuple[str, str, int, int]]:
        """[(layer name, "bias" | "kernel", start, stop)] in the JAX flat order."""
        out, start = [], 0
        for l in sorted(range(len(self.names)), key=lambda i: self.names[i]):
            n_out, n_in = self.G[l].shape[0], self.A[l].shape[0]
            out.append((self.names[l], "bias", start, start + n_out))
            start += n_out
            out.append((self.names[l], "kernel", start, start + n_in * n_out))
            start += n_in * n_out
        return out

    @property
    def dim(self) -> int:
        return sum(g.shape[0] * (1 + a.shape[0]) for g, a in zip(self.G, self.A))

    def _index(self, name: str) -> int:
        return self.names.index(name)

    def block(self, name: str, leaf: str) -> jax.Array:
        """The dense block of ``name``/``leaf``: "bias" G (O, O), "kernel" kron(A, G) (J·O, J·O)."""
        l = self._index(name)
        return self.G[l] if leaf == "bias" else jnp.kron(self.A[l], self.G[l])

    # ---- the common interface --------------------------------------------------
    def eigenvalues(self, k: int | None = None) -> jax.Array:
        """Top-``k`` eigenvalues, descending, from the factors' eigenvalues only.

        Bias block: eig(G); kernel block: {α_i γ_j} (eigenvalues of A ⊗ G).
        """
        parts = []
        for g, a in zip(self.G, self.A):
            eg = jnp.linalg.eigvalsh(g)
            ea = jnp.linalg.eigvalsh(a)
            parts += [eg, jnp.outer(ea, eg).ravel()]
        e = -jnp.sort(-jnp.concatenate(parts))
        return e if k is None else e[:k]

    def trace(self) -> jax.Array:
        """Σ_l tr(G_l) (1 + tr(A_l))."""
        return sum(jnp.trace(g) * (1 + jnp.trace(a)) for g, a in zip(self.G, self.A))

    def matvec(self, v) -> jax.Array:
        """Block products: bias part G v_b, kernel part A V Gᵀ with V (J, O). (d,) -> (d,)."""
        v = jnp.asarray(v, self.G[0].dtype)
        out = []
        for name, leaf, start, stop in self.layout():
            l = self._index(name)
            g, a = self.G[l], self.A[l]
            if leaf == "bias":
                out.append(g @ v[start:stop])
            else:
                vk = v[start:stop].reshape(a.shape[0], g.shape[0])
                out.append((a @ vk @ g.T).ravel())
        return jnp.concatenate(out)

    def dense(self) -> jax.Array:
        """The (d, d) block-diagonal matrix."""
        return jax.scipy.linalg.block_diag(*[self.block(n, leaf) for n, leaf, _, _ in self.layout()])

    def to_dict(self, k: int | None = 20) -> dict:
        """{"eigenvalues": top-k, descending, "trace": float, "factor_shapes": {...}}."""
        d = _summary(self.eigenvalues(k), self.trace(), None)
        d["factor_shapes"] = {n: {"G": list(g.shape), "A": list(a.shape)}
                              for n, g, a in zip(self.names, self.G, self.A)}
        return d
