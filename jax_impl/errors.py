"""Re-export of the shared one-line error type (it lives in the framework-free ``hessian_approx``)."""

from hessian_approx.errors import HessianApproxError, check_finite

__all__ = ["HessianApproxError", "check_finite"]
