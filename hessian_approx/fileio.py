"""Atomic file writes (temporary file, then rename) with one-line errors; no JAX import."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hessian_approx.errors import HessianApproxError


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: no partial file is ever left.

    An OSError (unwritable folder, a directory in the way, disk full) becomes a
    HessianApproxError naming the path.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise HessianApproxError(f"cannot write {path} ({err.strerror or err})",
                                 "choose a writable path that is not a directory") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; result files are readable like any other
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise HessianApproxError(f"cannot write {path} ({err.strerror or err})",
                                 "free disk space or choose another path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_dir(path) -> None:
    """Refuse early when ``path`` cannot become a folder of results."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HessianApproxError(f"{path} exists and is not a folder", "pass a folder path to --out")
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise HessianApproxError(f"cannot write into {probe}", "choose a writable --out folder")


def check_writable_file(path) -> None:
    """Refuse early when ``path`` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise HessianApproxError(f"{path} is a directory", "give a file path, e.g. result.json")
    probe = next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise HessianApproxError(f"cannot write into {probe}", "choose a writable path")
