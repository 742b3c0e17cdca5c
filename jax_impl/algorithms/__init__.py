"""Matrix-free algorithms on an Operator: power iteration, Lanczos (plain, certified, adaptive, block), Hutchinson, Hutch++, XTrace, XNysTrace, XDiag, SLQ, dense eigh."""

from jax_impl.algorithms.dense import eigh_descending, eigvalsh_descending
from jax_impl.algorithms.hutchinson import hutchinson, hutchinson_diagonal, rademacher_probe, trace_pyhessian
from jax_impl.algorithms.operator import Operator, as_operator
from jax_impl.algorithms.lanczos import default_num_steps, lanczos, lanczos_tridiag, tridiagonal
from jax_impl.algorithms.certified import adaptive_lanczos, certified_lanczos, certify
from jax_impl.algorithms.eigsh import eigsh_reference
from jax_impl.algorithms.block_lanczos import block_lanczos, block_lanczos_tridiag
from jax_impl.algorithms.power import power_iteration, pyhessian_normalize
from jax_impl.algorithms.results import DiagonalResult, EigResult, TraceResult
from jax_impl.algorithms.slq import slq, spectral_density
from jax_impl.algorithms.sketch_diag import xdiag
from jax_impl.algorithms.sketch_trace import SketchTraceResult, hutchpp, sphere_probe, xnystrace, xtrace

__all__ = [
    "DiagonalResult",
    "EigResult",
    "SketchTraceResult",
    "Operator",
    "TraceResult",
    "adaptive_lanczos",
    "as_operator",
    "block_lanczos",
    "block_lanczos_tridiag",
    "certified_lanczos",
    "certify",
    "default_num_steps",
    "eigh_descending",
    "eigsh_reference",
    "eigvalsh_descending",
    "hutchinson",
    "hutchinson_diagonal",
    "hutchpp",
    "lanczos",
    "lanczos_tridiag",
    "power_iteration",
    "pyhessian_normalize",
    "rademacher_probe",
    "slq",
    "spectral_density",
    "sphere_probe",
    "trace_pyhessian",
    "tridiagonal",
    "xdiag",
    "xnystrace",
    "xtrace",
]
