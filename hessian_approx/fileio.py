"""Atomic file writes (temporary file, then rename) with one-line errors; no JAX import."""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def staged_dir(path):
    """Yield a new hidden sibling folder to fill; on success it replaces ``path`` as a whole.

    On any error or interrupt (KeyboardInterrupt, SIGTERM handled as one) the staging folder
    is removed and ``path`` is left as it was, so a folder never mixes two runs.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    except OSError as err:
        raise HessianApproxError(f"cannot create a folder beside {path} ({err.strerror or err})",
                                 "choose a writable --out folder") from None
    try:
        yield stage
        os.chmod(stage, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            try:
                os.replace(stage, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, path)
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise HessianApproxError(f"cannot write {path} ({err.strerror or err})",
                                 "free disk space or choose another --out folder") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _first_existing(path: Path) -> Path:
    return next((p for p in path.parents if p.exists()), Path("."))


def _probe_writable(folder: Path, what: str, fix: str) -> None:
    """Create and remove a temporary file in ``folder``: the only test that holds for root and /proc."""
    if not folder.is_dir():
        raise HessianApproxError(f"cannot write {what}: {folder} is a file, not a folder", fix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".hessian-approx-probe.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise HessianApproxError(f"cannot write into {folder} ({err.strerror or err})", fix) from None


def check_writable_dir(path) -> None:
    """Refuse early when ``path`` cannot become a folder of results."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HessianApproxError(f"{path} exists and is not a folder", "pass a folder path to --out")
    _probe_writable(path if path.exists() else _first_existing(path), str(path), "choose a writable --out folder")


def check_writable_file(path) -> None:
    """Refuse early when ``path`` cannot be written as a file (a folder, or a parent that is a file or read-only)."""
    path = Path(path)
    if path.is_dir():
        raise HessianApproxError(f"{path} is a directory", "give a file path, e.g. result.json")
    _probe_writable(_first_existing(path), str(path), "choose a path in a writable folder")


def same_path(a, b) -> bool:
    """True when ``a`` and ``b`` name the same file (symlinks and hard links resolved)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def inside(path, folder) -> bool:
    """True when ``path`` is ``folder`` or lies below it (after resolving links)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def written_by_us(path) -> bool:
    """True when the file at ``path`` is one hessian-approx writes: a result record (JSON with a
    "command"), a checkpoint (safetensors whose metadata holds the architecture), a figure or
    report carrying the "hessian-approx" mark, or a bench CSV. Unreadable files are not ours."""
    import json

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if head[:8] and path.suffix == ".safetensors" or head[8:10] == b'{"':
        try:
            n = int.from_bytes(head[:8], "little")
            with path.open("rb") as f:
                f.seek(8)
                meta = json.loads(f.read(min(n, 1 << 24))).get("__metadata__") or {}
            return "spec" in meta
        except (ValueError, OSError, AttributeError):
            return False
    if head.lstrip()[:1] == b"{":
        try:
            obj = json.loads(path.read_text())
        except (ValueError, OSError, UnicodeDecodeError):
            return False
        return isinstance(obj, dict) and ("command" in obj or obj.get("written_by") == "hessian-approx")
    return MARK.encode() in head


MARK = "hessian-approx"  # figures (PNG "Software" text) and reports carry it


def check_output(path, flag: str, inputs: dict, force: bool = False) -> None:
    """Refuse, before any work, an output ``path`` that is one of the run's ``inputs`` ({flag: path}),
    or an existing file hessian-approx did not write (unless ``force``)."""
    path = Path(path)
    for in_flag, in_path in inputs.items():
        if in_path and Path(in_path).exists() and (same_path(path, in_path) or
                                                   (Path(in_path).is_dir() and inside(path, in_path)
                                                    and path.exists())):
            raise HessianApproxError(f"{flag} {path} would overwrite the input {in_flag} {in_path}",
                                     f"choose another {flag} path")
    if path.is_file() and not force and not written_by_us(path):
        raise HessianApproxError(f"{flag} {path} exists and was not written by hessian-approx",
                                 "choose another path, or pass --force to replace it")


def check_output_dir(path, flag: str, inputs: dict, force: bool = False) -> None:
    """Refuse an output folder that holds one of the run's ``inputs`` (the run replaces it as a whole),
    or a non-empty folder without a hessian-approx ``results.json`` (unless ``force``)."""
    path = Path(path)
    for in_flag, in_path in inputs.items():
        if in_path and inside(in_path, path):
            raise HessianApproxError(f"the input {in_flag} {in_path} lies inside {flag} {path}, which this run replaces",
                                     f"copy it elsewhere or choose another {flag} folder")
    if path.is_dir() and not force and any(path.iterdir()) and not written_by_us(path / "results.json"):
        raise HessianApproxError(f"{flag} {path} is a non-empty folder without a hessian-approx results.json",
                                 "choose a new or empty folder, or pass --force to replace it")
