"""Atomic writes: nothing partial on failure, one-line errors for unwritable paths."""

import pytest

from jax_impl.errors import HessianApproxError
from jax_impl.fileio import atomic_write, check_writable_dir, check_writable_file


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "out.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_targets_are_one_line_errors(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(HessianApproxError, match="is a directory"):
        atomic_write(tmp_path / "adir", lambda tmp: None)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HessianApproxError, match="cannot write"):
        atomic_write(tmp_path / "afile" / "inside.json", lambda tmp: None)
    with pytest.raises(HessianApproxError, match="not a folder"):
        check_writable_dir(tmp_path / "afile")
    with pytest.raises(HessianApproxError, match="is a directory"):
        check_writable_file(tmp_path / "adir")
    check_writable_dir(tmp_path / "new" / "deeper")
    check_writable_file(tmp_path / "new" / "r.json")


def test_written_files_are_readable_by_others(tmp_path):
    """The temporary file is private (0600); the result is not."""
    atomic_write(tmp_path / "r.json", lambda tmp: open(tmp, "w").write("{}"))
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
