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


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path):
    from jax_impl.fileio import staged_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as stage:
            (stage / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and [p.name for p in out.iterdir()] == ["old.txt"]
    with staged_dir(out) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and [p.name for p in out.iterdir()] == ["new.txt"]
    assert (out.stat().st_mode & 0o777) == 0o755


def test_written_by_us_recognizes_our_files_only(tmp_path):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from jax_impl.fileio import written_by_us

    (tmp_path / "r.json").write_text(json.dumps({"command": "eigs", "results": {}}))
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "ours.safetensors"), metadata={"spec": "{}"})
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "torch.safetensors"))
    (tmp_path / "notes.txt").write_text("notes")
    assert written_by_us(tmp_path / "r.json") and written_by_us(tmp_path / "ours.safetensors")
    for name in ("other.json", "torch.safetensors", "notes.txt", "missing.json"):
        assert not written_by_us(tmp_path / name), name


def test_check_output_same_file_through_links(tmp_path):
    from jax_impl.fileio import check_output

    src = tmp_path / "in.npz"
    src.write_bytes(b"data")
    (tmp_path / "hard.json").hardlink_to(src)
    for out in (src, tmp_path / "hard.json", tmp_path / "sub" / ".." / "in.npz"):
        with pytest.raises(HessianApproxError, match="would overwrite the input --data"):
            check_output(out, "--json", {"--data": str(src)})
    check_output(tmp_path / "fresh.json", "--json", {"--data": str(src)})
