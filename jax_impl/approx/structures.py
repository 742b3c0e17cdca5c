"""Structured curvature approximations (diagonal, Kronecker-factored blocks) in the JAX flat order.

Every structure answers the same questions as a dense matrix would, without building it
unless asked: ``eigenvalues(k)`` (descending), ``eigh(k)`` / ``eigenvectors(k)`` (the top-k
eigenpairs, eigenvectors as (k, d) rows, from the structure: indexing for a diagonal, the
factors' eigendecompositions for Kronecker blocks), ``trace()``, ``matvec(v)`` on flat (d,)
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


def _top_count(k: int | None, dim: int) -> int:
    """How many eigenpairs ``k`` asks for: all ``dim`` when None, else min(k, dim) (as slicing)."""
    if k is None:
        return dim
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise HessianApproxError(f"k={k!r} is not a non-negative integer", "pass k >= 0 or None for all")
    return min(int(k), dim)


def _host(x) -> np.ndarray:
    """x as a host numpy array; half precisions (float16, bfloat16) widened to float32 for LAPACK."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.itemsize < 4 else x


def _descending_order(values: np.ndarray, k: int) -> np.ndarray:
    """Indices (k,) of the k largest ``values``, descending; ties keep their order in ``values``."""
    return np.argsort(-values, kind="stable")[:k]


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

    def eigh(self, k: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The top-``k`` eigenpairs (all when None; k > d gives d), by indexing, no matrix.

        The eigenvectors of diag(d) are the unit vectors e_i; the top-k are those of the k
        largest entries (ties in the order of the flat index: among equal entries any choice
        spans the same eigenspace only when all of them are taken).

        Computed on the host (numpy; not traceable under ``jit``).

        Returns:
          (eigenvalues (k,) descending, eigenvectors (k, d): row r is e_{i_r}, the unit
          vector of the r-th largest entry i_r, in the JAX flat order), in ``diag``'s dtype.
        """
        k = _top_count(k, self.dim)
        diag = _host(self.diag)
        idx = _descending_order(diag, k)
        vecs = np.zeros((k, self.dim), diag.dtype)
        vecs[np.arange(k), idx] = 1
        dtype = self.diag.dtype
        return jnp.asarray(diag[idx], dtype), jnp.asarray(vecs, dtype)

    def eigenvectors(self, k: int | None = None) -> jax.Array:
        """The top-``k`` unit eigenvectors as rows: (k, d) (``eigh(k)[1]``)."""
        return self.eigh(k)[1]

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

    def eigh(self, k: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The top-``k`` eigenpairs (all when None; k > d gives d) from the factors, no (d, d) matrix.

        Per layer with G = V diag(γ) Vᵀ (O, O) and A = U diag(α) Uᵀ (J, J): the bias block G has
        eigenpairs (γ_j, v_j) on the bias slice; the kernel block kron(A, G) has (α_i γ_j,
        kron(u_i, v_j)) on the kernel slice, the kernel's (J, O) row-major order (entry
        j·O + o is u_i[j] v_j[o]), as in ``matvec`` and ``dense``. All candidates of all
        layers are ranked together and the k largest embedded, zero elsewhere, in the JAX
        flat order (``layout()``). Cost: one eigh per factor plus O(k·d) for the vectors.
        Ties (repeated products) are broken by the order of ``layout()`` and the factors'
        ascending eigh order; any orthonormal basis of a tied eigenspace is as valid.
        Computed on the host (numpy; not traceable under ``jit``); k = None builds (d, d).

        Returns:
          (eigenvalues (k,) descending, eigenvectors (k, d) orthonormal rows), in the
          factors' dtype; eigenvalues equal ``eigenvalues(k)`` up to rounding.
        """
        k = _top_count(k, self.dim)
        layout = self.layout()
        factors = {}  # layer index -> (γ (O,), V (O, O), α (J,), U (J, J)), host numpy
        values, where = [], []  # candidate eigenvalues; (slot in layout, i (A's; -1: bias), j (G's))
        for slot, (name, leaf, _, _) in enumerate(layout):
            l = self._index(name)
            if l not in factors:  # numpy: small host eighs, no per-shape compilation
                factors[l] = (*np.linalg.eigh(_host(self.G[l])), *np.linalg.eigh(_host(self.A[l])))
            eg, _, ea, _ = factors[l]
            if leaf == "bias":
                values.append(eg)
                where.append(np.stack([np.full(eg.size, slot), np.full(eg.size, -1), np.arange(eg.size)], 1))
            else:
                values.append(np.outer(ea, eg).ravel())
                ii, jj = np.meshgrid(np.arange(ea.size), np.arange(eg.size), indexing="ij")
                where.append(np.stack([np.full(ii.size, slot), ii.ravel(), jj.ravel()], 1))
        values, where = np.concatenate(values), np.concatenate(where)
        order = _descending_order(values, k)
        vecs = np.zeros((k, self.dim), values.dtype)
        for slot in np.unique(where[order, 0]):
            rows = np.nonzero(where[order, 0] == slot)[0]
            name, leaf, start, stop = layout[slot]
            _, vg, _, ua = factors[self._index(name)]
            i, j = where[order[rows], 1], where[order[rows], 2]
            if leaf == "bias":
                vecs[rows, start:stop] = vg[:, j].T  # (m, O)
            else:  # kron(u_i, v_j) for each selected pair: (m, J, O) -> (m, J·O)
                vecs[rows, start:stop] = (ua[:, i].T[:, :, None] * vg[:, j].T[:, None, :]).reshape(rows.size, -1)
        dtype = self.G[0].dtype
        return jnp.asarray(values[order], dtype), jnp.asarray(vecs, dtype)

    def eigenvectors(self, k: int | None = None) -> jax.Array:
        """The top-``k`` orthonormal eigenvectors as rows: (k, d) (``eigh(k)[1]``)."""
        return self.eigh(k)[1]

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
