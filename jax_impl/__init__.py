"""hessian-approx in JAX: curvature of neural-network losses (``import jax_impl as ha; ha.hessian(...)``).

The front door (:mod:`jax_impl.api`) is loaded on first use, so ``import jax_impl.errors``
stays light.
"""

_API = {"hessian", "ggn", "curvature", "Curvature"}
_ALGORITHMS = {"Operator", "as_operator"}

__all__ = sorted(_API | _ALGORITHMS)


def __getattr__(name):
    import importlib

    if name in _API:
        return getattr(importlib.import_module("jax_impl.api"), name)
    if name in _ALGORITHMS:
        return getattr(importlib.import_module("jax_impl.algorithms"), name)
    raise AttributeError(f"module 'jax_impl' has no attribute {name!r}")
