"""Fills the method table: JAX methods always, PyTorch methods only when torch imports."""

from __future__ import annotations

import functools

from benchmarks.table import TABLE
from jax_impl.errors import HessianApproxError


def is_torch_method(name: str) -> bool:
    return TABLE[name].framework == "torch" if name in TABLE else False


@functools.lru_cache(maxsize=None)
def torch_available() -> str | None:
    """None when torch, BackPACK and PyHessian import; else the reason they do not."""
    try:
        import backpack  # noqa: F401
        import pyhessian  # noqa: F401
        import torch  # noqa: F401
    except Exception as err:  # ImportError, or a broken binary install
        return f"{type(err).__name__}: {err}"
    return None


@functools.lru_cache(maxsize=None)
def load() -> dict:
    """Import the method modules; returns the method table."""
    import benchmarks.methods as m

    import benchmarks.methods_approx  # noqa: F401
    import benchmarks.methods_estimators  # noqa: F401
    if torch_available() is None:
        import benchmarks.methods_torch  # noqa: F401
    missing = [n for n, e in TABLE.items() if n not in m.METHODS
               and (e.framework == "jax" or torch_available() is None)]
    assert not missing, f"method-table entries without an implementation: {missing}"
    return m.METHODS


def resolve(names, missing_torch: str = "error") -> tuple[list[str], dict]:
    """Split requested method names into runnable ones and {name: reason} not run.

    Unknown names raise; torch methods without torch raise (``missing_torch='error'``)
    or are returned as not run (``'skip'``).
    """
    table = load()
    run, skipped = [], {}
    for name in names:
        if is_torch_method(name) and torch_available() is not None:
            reason = "the torch extra is not installed (pip install 'hessian-approx[torch]')"
            if missing_torch == "error":
                raise HessianApproxError(f"method {name} needs PyTorch, but {reason.split(' (')[0]}",
                                         "pip install 'hessian-approx[torch]' in this environment")
            skipped[name] = reason
        elif name in table:
            run.append(name)
        else:
            raise HessianApproxError(f"unknown method {name!r}", f"choose from {', '.join(TABLE)}")
    return run, skipped
