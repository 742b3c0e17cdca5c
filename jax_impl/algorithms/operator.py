"""The Operator record every algorithm takes: a symmetric matvec with its dimension, dtype and PSD flag."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.errors import HessianApproxError


def check_float_dtype(dtype, what: str) -> np.dtype:
    """``dtype`` as a numpy floating dtype that JAX can hold right now, else a one-line error.

    float64 without 64-bit JAX would silently become float32 in every jnp call; that is
    refused here, with the fix.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise HessianApproxError(f"{what} has dtype {dtype!r}, not a floating-point dtype",
                                 "use float32 or float64") from None
    if dt.kind != "f":
        raise HessianApproxError(f"{what} has dtype {dt.name}, not a floating-point dtype",
                                 "use float32 or float64 parameters")
    if dt.itemsize > 4 and not jax.config.jax_enable_x64:
        raise HessianApproxError(
            f"{what} is {dt.name} but 64-bit JAX is off, so it would silently compute in float32",
            "call jax.config.update('jax_enable_x64', True) first (or use `with jax.enable_x64(True):`)")
    return dt


@dataclasses.dataclass(frozen=True, eq=False)
class Operator:
    """A symmetric linear operator ``v (dim,) -> A v (dim,)`` and what algorithms need to know of it.

    Hashable by identity, so an Operator can be a static argument of ``jax.jit``.

    Attributes:
      matvec: ``(dim,) -> (dim,)`` of dtype ``dtype``; vmappable and jittable.
      dim: the dimension d.
      dtype: the floating dtype of the vectors it takes and returns (numpy dtype).
      psd: whether A is known to be positive semidefinite (the GGN, Fisher); the
        Hessian is not. Estimators that need PSD (XNysTrace) read it.
      name: what A is, for messages and records ("hessian", "ggn", ...).
    """

    matvec: Callable[[jax.Array], jax.Array]
    dim: int
    dtype: np.dtype
    psd: bool = False
    name: str = "operator"

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
            raise HessianApproxError(f"operator {self.name!r} has dim {self.dim!r}", "pass a positive integer dim")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "dtype", check_float_dtype(self.dtype, f"operator {self.name!r}"))
        object.__setattr__(self, "psd", bool(self.psd))

    def __call__(self, v: jax.Array) -> jax.Array:
        """A v for ``v`` (dim,) of the operator's dtype; other shapes or dtypes are a one-line error.

        Checked at trace time (shapes and dtypes are static), so it costs nothing under jit.
        """
        given = np.dtype(getattr(v, "dtype", self.dtype))  # before jnp.asarray, which may truncate float64
        v = jnp.asarray(v)
        if v.shape != (self.dim,):
            raise HessianApproxError(f"operator {self.name!r} got a vector of shape {v.shape}",
                                     f"pass a flat ({self.dim},) vector (vmap for several)")
        if given != self.dtype or v.dtype != self.dtype:
            raise HessianApproxError(
                f"operator {self.name!r} is {self.dtype.name} but got a {given.name} vector",
                f"cast the vector to {self.dtype.name} (a mix of dtypes is never cast silently)")
        out = self.matvec(v) if isinstance(v, jax.core.Tracer) else self._compiled(v)
        if getattr(out, "shape", None) != (self.dim,) or out.dtype != self.dtype:
            raise HessianApproxError(
                f"operator {self.name!r} returned {getattr(out, 'dtype', type(out))} "
                f"{getattr(out, 'shape', '')} for a {self.dtype.name} ({self.dim},) vector",
                f"make its matvec return a {self.dtype.name} ({self.dim},) vector")
        return out

    @functools.cached_property
    def _compiled(self) -> Callable[[jax.Array], jax.Array]:
        """The matvec for a concrete vector (a call outside any trace), compiled once per operator.

        Called op by op, each call would trace the matvec anew, and its chunk scan would compile
        again (0.8-1 s a call for a small CNN on 2 cores). The closed-over arrays (weights,
        data: the constants of its jaxpr) are passed as arguments, not embedded in the program as
        constants. With several processes the plain matvec runs: a compiled program may not
        capture an array that spans other processes' devices.
        """
        if jax.process_count() > 1:
            return self.matvec
        closed = jax.make_jaxpr(self.matvec)(jax.ShapeDtypeStruct((self.dim,), self.dtype))
        consts = tuple(closed.consts)
        compiled = jax.jit(lambda v, *c: jax.core.eval_jaxpr(closed.jaxpr, c, v)[0])
        call = lambda v: compiled(v, *consts)
        call.jitted, call.consts = compiled, consts  # for inspection (tests)
        return call

    def jit(self) -> "Operator":
        """The same operator with a jitted matvec (one compilation, reused by every call)."""
        return dataclasses.replace(self, matvec=jax.jit(self.matvec))

    def zeros(self) -> jax.Array:
        """A zero (dim,) vector of the operator's dtype."""
        return jnp.zeros((self.dim,), self.dtype)


def as_operator(a, dim: Optional[int] = None, dtype=None, psd: bool = False,
                name: Optional[str] = None) -> Operator:
    """An Operator from an Operator (returned as is), a square matrix, or a matvec function.

    Args:
      a: an :class:`Operator`; a symmetric (d, d) array (its dtype is the operator's); or a
        function ``v (d,) -> (d,)``, which needs ``dim``.
      dim: the dimension of a function (checked against a matrix).
      dtype: the dtype of a function; default: its output dtype for a float32 input, read by
        ``jax.eval_shape`` (a function that casts to float64 declares float64).
      psd: whether the matrix or function is positive semidefinite.
      name: a name for messages.
    Returns:
      Operator.
    """
    if isinstance(a, Operator):
        if dim is not None and int(dim) != a.dim:
            raise HessianApproxError(f"operator {a.name!r} has dim {a.dim}, not {dim}", "leave out dim")
        if dtype is not None and np.dtype(dtype) != a.dtype:
            raise HessianApproxError(f"operator {a.name!r} is {a.dtype.name}, not {np.dtype(dtype).name}",
                                     "leave out dtype (an operator's dtype follows its parameters)")
        return a
    if callable(a):
        if dim is None:
            raise HessianApproxError("a matvec function was given without its dimension",
                                     "pass dim= (the length of the vectors it takes)")
        if dtype is None:
            try:
                dtype = jax.eval_shape(a, jax.ShapeDtypeStruct((int(dim),), jnp.float32)).dtype
            except Exception as err:  # e.g. a jvp at float64 parameters refuses a float32 tangent
                raise HessianApproxError(
                    f"the dtype of the matvec could not be read by calling it on a float32 vector "
                    f"({type(err).__name__})", "pass dtype= (the dtype of the vectors it takes)") from None
        return Operator(a, int(dim), dtype, psd, name or getattr(a, "__name__", "operator"))
    m = jnp.asarray(a)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HessianApproxError(f"a matrix of shape {m.shape} is not square",
                                 "pass a symmetric (d, d) array or a matvec function with dim=")
    if dim is not None and int(dim) != m.shape[0]:
        raise HessianApproxError(f"the matrix is {m.shape[0]}x{m.shape[0]}, not dim {dim}", "leave out dim")
    if dtype is not None and np.dtype(dtype) != m.dtype:
        raise HessianApproxError(f"the matrix is {m.dtype}, not {np.dtype(dtype).name}",
                                 "cast the matrix, or leave out dtype")
    return Operator(lambda v: m @ v, m.shape[0], m.dtype, psd, name or "matrix")


def require_operator(op, fn: str) -> Operator:
    """``op`` if it is an Operator, else a one-line error telling how to make one."""
    if not isinstance(op, Operator):
        raise HessianApproxError(
            f"{fn} takes an Operator, got {type(op).__name__}",
            "wrap it: jax_impl.algorithms.as_operator(matvec, dim=d) or as_operator(matrix)")
    return op


def check_start(op: Operator, v0, shape: tuple, what: str = "v0") -> jax.Array:
    """A start vector (or block) of ``shape`` in the operator's dtype, else a one-line error."""
    v0 = jnp.asarray(v0)
    if v0.shape != shape:
        raise HessianApproxError(f"{what} has shape {v0.shape}, expected {shape}", f"pass {what} of shape {shape}")
    if v0.dtype != op.dtype:
        raise HessianApproxError(f"{what} is {v0.dtype.name} but operator {op.name!r} is {op.dtype.name}",
                                 f"cast {what} to {op.dtype.name}")
    return v0
