"""Per-layer curvature: diagonal blocks Pᵀ A P of the Hessian, GGN or Fisher over parameter subsets, matrix-free."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl import algorithms, materialize, operators
from jax_impl.algorithms.operator import Operator
from jax_impl.errors import HessianApproxError
from jax_impl.operators import Problem, chunk_sum, live

__all__ = ["EXACT_MAX_DIM", "TRACE_EXACT_MAX_DIM", "block_operator", "block_slices", "block_spectra",
           "param_paths", "select"]

EXACT_MAX_DIM = 2000
"""Largest block that ``method="exact"`` builds densely (2000² float64 is 32 MB; b matvecs)."""

TRACE_EXACT_MAX_DIM = 2000
"""Blocks up to this size get the exact trace (b matvecs, from the exact diagonal); larger
blocks a Hutchinson estimate (``num_samples`` matvecs, with its standard error)."""

_SUBSET_MATRICES = ("hessian", "ggn")

Spec = Union[str, Sequence[str], Callable[[str], bool], dict]


def _key_str(k) -> str:
    """One path component as text: a dict key, an attribute name or a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaves(params) -> tuple[list[str], list, object]:
    """(paths, leaves, treedef) of ``params`` in ``ravel_pytree`` order (jax's flatten order)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = ["/".join(_key_str(k) for k in p) for p, _ in with_path]
    if len(set(paths)) != len(paths):
        raise HessianApproxError("two parameters have the same path name",
                                 "give every parameter a distinct name (no '/' inside keys)")
    return paths, [leaf for _, leaf in with_path], treedef


def param_paths(params) -> list[str]:
    """The path of every parameter leaf ("Dense_0/kernel", "Block_0/Dense_1/bias"), in flat order.

    The order is ``jax.tree_util.tree_flatten``'s, which is the order of
    ``jax.flatten_util.ravel_pytree(params)`` (dict keys sorted, so "Dense_10" comes before
    "Dense_2"); sequence entries are named by their index.
    """
    return _leaves(params)[0]


def block_slices(params) -> dict[str, slice]:
    """{path: slice} of each leaf's entries in the flat (d,) vector of ``ravel_pytree(params)``."""
    paths, leaves, _ = _leaves(params)
    out, start = {}, 0
    for path, leaf in zip(paths, leaves):
        size = int(np.size(leaf))
        out[path] = slice(start, start + size)
        start += size
    return out


def _top(path: str) -> str:
    return path.split("/", 1)[0]


def _unknown(name: str, paths: list[str]) -> HessianApproxError:
    layers = list(dict.fromkeys(_top(p) for p in paths))
    shown = ", ".join(paths[:20]) + (", ..." if len(paths) > 20 else "")
    return HessianApproxError(f"{name!r} is not a layer or parameter of the model",
                              f"use one of the layers {', '.join(layers)} or the paths {shown}")


def _match(entry, paths: list[str]) -> list[str]:
    """The paths an entry selects: a layer (or any path prefix), a leaf path, a list of those, or a filter."""
    if callable(entry):
        return [p for p in paths if entry(p)]
    if isinstance(entry, str):
        name = entry.strip("/")
        hit = [p for p in paths if p == name or p.startswith(name + "/")]
        if not hit:
            raise _unknown(entry, paths)
        return hit
    if isinstance(entry, (list, tuple)):
        chosen = {p for e in entry for p in _match(e, paths)}
        return [p for p in paths if p in chosen]
    raise HessianApproxError(f"a block is given as {type(entry).__name__}",
                             "name a block by a layer name, a parameter path, a list of them, "
                             "or a filter f(path) -> bool")


def select(params, spec: Spec = "per-layer") -> dict[str, list[str]]:
    """Which parameter leaves form each block: {block name: [paths in flat order]}.

    Args:
      params: the parameter pytree.
      spec: "per-layer" (one block per top-level layer, all its leaves: "Dense_0" ->
        ["Dense_0/bias", "Dense_0/kernel"]); "per-leaf" (one block per leaf); a list of layer
        names or paths, one block each (a name also selects everything nested under it, as
        "Block_0" does "Block_0/Dense_0/kernel"); a filter ``f(path) -> bool``, one block of
        the leaves it accepts (named by the function, "selected" for a lambda); or a dict
        {block name: a name, a list of names/paths, or a filter} for blocks of your own.
    Returns:
      dict of non-empty path lists, in the order of the spec.
    Raises:
      HessianApproxError: a name that is no layer or path (one line listing the available
        ones), or a filter or group that selects nothing.
    """
    paths = param_paths(params)
    if isinstance(spec, str) and spec == "per-layer":
        out: dict[str, list[str]] = {}
        for p in paths:
            out.setdefault(_top(p), []).append(p)
        return out
    if isinstance(spec, str) and spec == "per-leaf":
        return {p: [p] for p in paths}
    if isinstance(spec, str):
        spec = [spec]
    if callable(spec):
        name = getattr(spec, "__name__", "selected")
        spec = {"selected" if name == "<lambda>" else name: spec}
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(e, str) for e in spec):
            raise HessianApproxError("a list of blocks holds something other than names",
                                     "pass layer names or paths (strings), or a dict {block name: filter}")
        spec = {e.strip("/"): e for e in spec}
    if not isinstance(spec, dict):
        raise HessianApproxError(f"blocks given as {type(spec).__name__}",
                                 "pass 'per-layer', 'per-leaf', a list of layer names or paths, a filter "
                                 "f(path) -> bool, or a dict {block name: names or filter}")
    out = {}
    for name, entry in spec.items():
        hit = _match(entry, paths)
        if not hit:
            raise HessianApproxError(f"block {name!r} selects no parameter",
                                     f"check its filter against the paths {', '.join(paths[:20])}")
        out[str(name)] = hit
    return out


def _describe(chosen: list[str], paths: list[str]) -> str:
    """A short name for a set of paths: whole layers by their name, other leaves by path, joined by '+'."""
    parts, seen = [], set()
    for p in chosen:
        top = _top(p)
        if top in seen:
            continue
        layer = [q for q in paths if _top(q) == top]
        if all(q in chosen for q in layer):
            parts.append(top)
            seen.add(top)
        else:
            parts.append(p)
    return "+".join(parts)


def _subset(problem: Problem, chosen: list[str]):
    """(sub0 (b,), merge(sub (b,), leaves) -> params, leaves) for the chosen leaves in flat order."""
    paths, leaves, treedef = _leaves(problem.params)
    wanted = set(chosen)
    idx = [i for i, p in enumerate(paths) if p in wanted]
    shapes = [jnp.shape(leaves[i]) for i in idx]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    dtype = problem.dtype
    sub0 = jnp.concatenate([jnp.ravel(jnp.asarray(leaves[i], dtype)) for i in idx])

    def merge(sub, base):
        new = list(base)
        for j, i in enumerate(idx):
            new[i] = sub[offsets[j]:offsets[j + 1]].reshape(shapes[j])
        return jax.tree_util.tree_unflatten(treedef, new)

    return sub0, merge, [jnp.asarray(leaf) for leaf in leaves]


def _subset_hvp(problem: Problem, chosen: list[str]) -> Callable:
    """v (b,) -> H_SS v (b,): jvp of the gradient w.r.t. the subset only, the rest closed over."""
    sub0, merge, leaves = _subset(problem, chosen)

    def chunk_loss(sub, base, c):
        return jnp.sum(c.w * problem.ell(problem.apply(merge(sub, base), c.x), c.y))

    g = jax.grad(chunk_loss)

    def matvec(v):
        s0, base = live((sub0, leaves))
        one = lambda c: jax.jvp(lambda s: g(s, base, c), (s0,), (v,))[1]
        return chunk_sum(one, problem.batches, jnp.zeros_like(v))

    return matvec


def _subset_ggn_vp(problem: Problem, chosen: list[str]) -> Callable:
    """v (b,) -> J_Sᵀ H_ell J_S v (b,), J_S the Jacobian of the outputs w.r.t. the subset only."""
    sub0, merge, leaves = _subset(problem, chosen)

    def one(c, v, s0, base):
        f = lambda s: problem.apply(merge(s, base), c.x)
        logits, jv = jax.jvp(f, (s0,), (v,))
        ell_w = lambda z: jnp.sum(c.w * problem.ell(z, c.y))
        hjv = jax.jvp(jax.grad(ell_w), (logits,), (jv,))[1]
        return jax.vjp(f, s0)[1](hjv)[0]

    def matvec(v):
        s0, base = live((sub0, leaves))
        return chunk_sum(lambda c: one(c, v, s0, base), problem.batches, jnp.zeros_like(v))

    return matvec


def _embed_vp(full: Operator, index: np.ndarray) -> Callable:
    """v (b,) -> (A P v)[index] (b,) with P v the zero (d,) vector holding v at ``index``."""
    index = jnp.asarray(index)

    def matvec(v):
        return full.matvec(jnp.zeros((full.dim,), v.dtype).at[index].set(v))[index]

    return matvec


def block_operator(problem: Problem, paths: Union[str, Sequence[str]], matrix: Union[str, Operator] = "hessian",
                   how: Optional[str] = None, name: Optional[str] = None) -> Operator:
    """The diagonal block Pᵀ A P (b, b) of a curvature matrix A over a parameter subset, as an Operator.

    Vectors are flat (b,): the chosen leaves' entries in ``ravel_pytree(params)`` order, i.e.
    ``v_full[index]`` with ``index`` the concatenated ``block_slices`` of the chosen leaves (in
    flat order, whatever order ``paths`` lists them in).

    Two ways, equal to rounding:
      "subset" (default for "hessian" and "ggn"): differentiate only w.r.t. the subset,
        closing over the other parameters: the Hessian block is the jvp of the subset gradient,
        the GGN block J_Sᵀ H_ell J_S. One matvec is one forward-over-reverse pass of the model
        (as for the full matrix: the backward pass still runs down to the lowest chosen layer)
        with b-sized tangents and no weight gradients for the other layers.
      "embed" (any matrix, also a full-model Operator): put v into a zero (d,) vector, apply
        the full (d,) matvec, keep the subset: one full matvec.

    Args:
      problem: the operators.Problem.
      paths: leaf paths or layer names (see :func:`select`; everything they name is one block).
      matrix: "hessian", "ggn", "empirical_fisher", or a full (d,)-dimensional Operator of the
        problem (embed only).
      how: "subset" or "embed"; default "subset" where available, else "embed".
      name: the block's name in the operator's name, default the layers it covers.
    Returns:
      Operator of dim b, the parameters' dtype, the parent's psd flag, named "hessian[Dense_0]".
    """
    all_paths = param_paths(problem.params)
    chosen = _match(list(paths) if isinstance(paths, (list, tuple)) else paths, all_paths)
    slices = block_slices(problem.params)
    if isinstance(matrix, Operator):
        full = matrix
        if full.dim != problem.dim:
            raise HessianApproxError(f"operator {full.name!r} has dim {full.dim} but the model has {problem.dim} "
                                     "parameters", "pass the full-model operator of this problem")
    elif isinstance(matrix, str) and matrix in operators.OPERATORS:
        full = operators.OPERATORS[matrix](problem)
    else:
        raise HessianApproxError(f"matrix {matrix!r} is not known",
                                 f"use one of {', '.join(operators.OPERATORS)} or a full-model Operator")
    if how is None:
        how = "subset" if isinstance(matrix, str) and matrix in _SUBSET_MATRICES else "embed"
    if how == "subset":
        if not (isinstance(matrix, str) and matrix in _SUBSET_MATRICES):
            raise HessianApproxError(f"the subset-differentiating block exists for {' and '.join(_SUBSET_MATRICES)}, "
                                     f"not {getattr(matrix, 'name', matrix)!r}", "use how='embed'")
        matvec = (_subset_hvp if matrix == "hessian" else _subset_ggn_vp)(problem, chosen)
    elif how == "embed":
        index = np.concatenate([np.arange(slices[p].start, slices[p].stop) for p in chosen])
        matvec = _embed_vp(full, index)
    else:
        raise HessianApproxError(f"block product {how!r} is not known", "use how='subset' or how='embed'")
    dim = sum(slices[p].stop - slices[p].start for p in chosen)
    label = name if name is not None else _describe(chosen, all_paths)
    return Operator(matvec, dim, problem.dtype, psd=full.psd, name=f"{full.name}[{label}]")


def block_spectra(problem: Problem, spec: Spec = "per-layer", k: int = 10, key: Optional[jax.Array] = None,
                  matrix: Union[str, Operator] = "hessian", method: str = "lanczos",
                  num_samples: int = 100, trace_exact_max_dim: int = TRACE_EXACT_MAX_DIM) -> dict[str, dict]:
    """Top-k eigenvalues and the trace of each diagonal block.

    Per block of size b, in matvecs of the block operator (each about one Hvp of the model):
      method "lanczos": ``min(b, max(8 k, 80))`` Lanczos steps (full reorthogonalization),
        plus the trace: exact (b matvecs, the exact diagonal) for b <= ``trace_exact_max_dim``
        (default 2000), else Hutchinson with ``num_samples`` Rademacher probes.
      method "exact" (b <= 2000): the dense block (b matvecs) and its eigvalsh; trace from it.

    Args:
      problem: the operators.Problem.
      spec: the blocks, as :func:`select` takes them (default one per top-level layer).
      k: eigenvalues per block (fewer for a block smaller than k).
      key: PRNG key (default PRNGKey(0)); block i uses ``fold_in(key, i)``.
      matrix: "hessian", "ggn", "empirical_fisher" or a full-model Operator (see block_operator).
      method: "lanczos" or "exact".
      num_samples: Hutchinson probes for the trace of a large block.
      trace_exact_max_dim: the largest block whose trace is computed exactly.
    Returns:
      {block name: {"eigenvalues": numpy (min(k, b),) descending, "residuals": numpy
      (min(k, b),) (Lanczos residual norms; zeros for exact), "trace": float, "trace_stderr":
      float (0 for an exact trace), "trace_method": "exact" or "hutchinson", "dim": b,
      "matvecs": int (eigenvalues and trace together), "paths": [leaf paths]}}.
    """
    if method not in ("lanczos", "exact"):
        raise HessianApproxError(f"block eigenvalue method {method!r} is not known", "use lanczos or exact")
    if k < 1:
        raise HessianApproxError(f"k={k} eigenvalues per block", "ask for k >= 1")
    key = jax.random.PRNGKey(0) if key is None else key
    out = {}
    for i, (name, chosen) in enumerate(select(problem.params, spec).items()):
        op = block_operator(problem, chosen, matrix, name=name)
        b, kk = op.dim, min(int(k), op.dim)
        bkey = jax.random.fold_in(key, i)
        if method == "exact":
            if b > EXACT_MAX_DIM:
                raise HessianApproxError(f"block {name!r} has {b} parameters, too many for the exact method "
                                         f"(at most {EXACT_MAX_DIM})", "use method='lanczos'")
            m = materialize.dense(op)
            evals = np.asarray(algorithms.eigvalsh_descending(m))[:kk]
            res = np.zeros(kk, op.dtype)
            trace, stderr, how, matvecs = float(np.trace(m)), 0.0, "exact", b
        else:
            steps = min(b, max(8 * int(k), 80))
            r = jax.jit(algorithms.lanczos, static_argnames=("op", "k", "num_steps"))(op, bkey, k=kk, num_steps=steps)
            evals, res, matvecs = np.asarray(r.eigenvalues), np.asarray(r.residuals), int(r.matvecs)
            if b <= trace_exact_max_dim:
                trace, stderr, how = float(np.sum(materialize.diagonal(op))), 0.0, "exact"
                matvecs += b
            else:
                t = jax.jit(algorithms.hutchinson, static_argnames=("op", "num_samples"))(
                    op, jax.random.fold_in(bkey, 1), num_samples=num_samples)
                trace, stderr, how = float(t.trace), float(t.stderr), "hutchinson"
                matvecs += int(t.matvecs)
        out[name] = {"eigenvalues": evals, "residuals": res, "trace": trace, "trace_stderr": stderr,
                     "trace_method": how, "dim": b, "matvecs": matvecs, "paths": list(chosen)}
    return out
