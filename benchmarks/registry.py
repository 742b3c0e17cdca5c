"""Fills the method table: JAX methods always, PyTorch methods only when torch imports."""

from __future__ import annotations

import functools

from jax_impl.errors import HessianApproxError

TORCH_PREFIXES = ("torch:", "pyhessian", "backpack:")


def is_torch_method(name: str) -> bool:
    return name.startswith(TORCH_PREFIXES)


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

    try:
        import benchmarks.methods_approx  # noqa: F401
    except ImportError:  # pragma: no cover - while the approximations are absent
        pass
    if torch_available() is None:
        import benchmarks.methods_torch  # noqa: F401
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
            raise HessianApproxError(f"unknown method {name!r}", f"choose from {', '.join(table)}")
    return run, skipped
