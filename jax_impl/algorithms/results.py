"""Result containers of the matrix-free algorithms: small frozen dataclasses that are pytrees."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _floats(x) -> Any:
    """A JSON-ready python float or (nested) list of floats; NaN and Inf become None."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    if a.ndim > 1:
        return [_floats(row) for row in a]
    return [float(v) if math.isfinite(v) else None for v in a.tolist()]


def _ints(x) -> Any:
    a = np.asarray(x)
    return int(a) if a.ndim == 0 else [int(v) for v in a.tolist()]


@dataclasses.dataclass(frozen=True)
class EigResult:
    """Approximate eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` eigenvalue estimates. The order is the algorithm's
            own: descending for ``lanczos``, PyHessian's discovery order for
            ``power_iteration`` (use :meth:`sorted` for descending).
        eigenvectors: ``(k, dim)`` the matching unit-norm eigenvector estimates, one
            per row.
        residuals: ``(k,)`` residual norms ``||A y - theta y||`` or the algorithm's
            cheap estimate of them (see the producing function's docstring).
        matvecs: ``()`` int, operator applications used in total.
        matvecs_per_pair: ``(k,)`` int or None; operator applications spent on each
            eigenpair (power iteration only).
        converged: ``(k,)`` bool or None; whether each eigenpair met its stopping
            rule before the iteration limit (power iteration; certified, adaptive and
            block Lanczos: explicit residual within the tolerance).
        error_bounds: ``(k,)`` or None; a bound on the distance from each eigenvalue
            estimate to the nearest eigenvalue of the operator (certified, adaptive and
            block Lanczos; see :mod:`jax_impl.algorithms.certified` for which bound and
            when it holds).
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residuals: jax.Array
    matvecs: jax.Array
    matvecs_per_pair: Optional[jax.Array] = None
    converged: Optional[jax.Array] = None
    error_bounds: Optional[jax.Array] = None

    def sorted(self) -> "EigResult":
        """The same eigenpairs reordered by descending eigenvalue (jittable)."""
        order = jnp.argsort(-self.eigenvalues)

        def take(x):
            return None if x is None else jnp.take(x, order, axis=0)

        return EigResult(
                eigenvalues=take(self.eigenvalues),
                eigenvectors=take(self.eigenvectors),
                residuals=take(self.residuals),
                matvecs=self.matvecs,
                matvecs_per_pair=take(self.matvecs_per_pair),
                converged=take(self.converged),
                error_bounds=take(self.error_bounds),
        )

    def to_dict(self, include_eigenvectors: bool = False) -> dict:
        """JSON-serializable python lists/floats/ints (non-finite floats become None).

        Args:
            include_eigenvectors: also emit ``eigenvectors`` as a ``k x dim`` nested
                list (off by default: the result record keeps only the eigenvalues).
        """
        out = {
                "eigenvalues": _floats(self.eigenvalues),
                "residuals": _floats(self.residuals),
                "matvecs": _ints(self.matvecs),
        }
        if self.matvecs_per_pair is not None:
            out["matvecs_per_pair"] = _ints(self.matvecs_per_pair)
        if self.converged is not None:
            out["converged"] = [bool(c) for c in np.asarray(self.converged).tolist()]
        if self.error_bounds is not None:
            out["error_bounds"] = _floats(self.error_bounds)
        if include_eigenvectors:
            out["eigenvectors"] = _floats(self.eigenvectors)
        return out


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate with its sample history.

    Attributes:
        trace: ``()`` the estimate, the mean of the used per-probe estimates.
        stderr: ``()`` its standard error ``std(ddof=1) / sqrt(n)`` (NaN if n = 1).
        estimates: ``(n_max,)`` per-probe estimates ``v_i^T A v_i``; only the first
            ``matvecs`` entries were used (the rest are NaN padding, which happens
            only for ``trace_pyhessian`` stopping early).
        running_mean: ``(n_max,)`` mean of the first ``i + 1`` estimates.
        running_stderr: ``(n_max,)`` standard error of the first ``i + 1``
            estimates (``ddof=1``; the first entry is NaN).
        matvecs: ``()`` int, number of probes used (one operator application each).
    """

    trace: jax.Array
    stderr: jax.Array
    estimates: jax.Array
    running_mean: jax.Array
    running_stderr: jax.Array
    matvecs: jax.Array

    def to_dict(self) -> dict:
        """JSON-serializable python lists/floats/ints, arrays cut to the used probes.

        Non-finite floats (the NaN standard error of a single probe) become None.
        """
        n = _ints(self.matvecs)
        return {
                "trace": _floats(self.trace),
                "stderr": _floats(self.stderr),
                "matvecs": n,
                "estimates": _floats(np.asarray(self.estimates)[:n]),
                "running_mean": _floats(np.asarray(self.running_mean)[:n]),
                "running_stderr": _floats(np.asarray(self.running_stderr)[:n]),
        }


jax.tree_util.register_dataclass(
        EigResult,
        data_fields=[f.name for f in dataclasses.fields(EigResult)],
        meta_fields=[],
)
jax.tree_util.register_dataclass(
        TraceResult,
        data_fields=[f.name for f in dataclasses.fields(TraceResult)],
        meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class DiagonalResult:
    """An estimate of an operator's diagonal with per-entry standard errors.

    Attributes:
        diagonal: ``(dim,)`` the estimate.
        stderr: ``(dim,)`` standard error of each entry (zeros for an exact diagonal;
            NaN for a single probe).
        matvecs: ``()`` int, operator applications used.
    """

    diagonal: jax.Array
    stderr: jax.Array
    matvecs: jax.Array

    def to_dict(self, include_diagonal: bool = False) -> dict:
        """JSON-ready summary: the diagonal's sum (a trace estimate), mean stderr, matvecs."""
        out = {"trace": _floats(jnp.sum(self.diagonal)), "mean_stderr": _floats(jnp.mean(self.stderr)),
               "matvecs": _ints(self.matvecs)}
        if include_diagonal:
            out["diagonal"] = _floats(self.diagonal)
        return out


jax.tree_util.register_dataclass(
        DiagonalResult,
        data_fields=[f.name for f in dataclasses.fields(DiagonalResult)],
        meta_fields=[],
)
