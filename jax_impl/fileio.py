"""Re-export of the atomic file helpers (they live in the framework-free ``hessian_approx``)."""

from hessian_approx.fileio import *  # noqa: F401,F403
from hessian_approx.fileio import atomic_write, check_writable_dir, check_writable_file  # noqa: F401
