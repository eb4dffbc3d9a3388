"""Crash-safe writes: committed files get the usual mode, failures leave the target untouched."""

import os
import stat

import pytest

from pipeline.files import FILE_MODE, atomic_directory, atomic_write


def private_file(path):
    """Write like safetensors does: a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"weights")
    os.close(fd)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_committed_files_get_the_usual_mode(tmp_path):
    assert FILE_MODE & 0o400 and not FILE_MODE & 0o111
    atomic_write(tmp_path / "routers.safetensors", private_file)
    assert mode(tmp_path / "routers.safetensors") == FILE_MODE
    with atomic_directory(tmp_path / "model") as tmp:
        private_file(tmp / "model.safetensors")
    assert mode(tmp_path / "model" / "model.safetensors") == FILE_MODE


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "final") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_replace_swaps_a_directory_only_once_the_new_one_is_complete(tmp_path):
    old = tmp_path / "teacher"
    old.mkdir()
    (old / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(old, replace=True) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("interrupted")
    assert (old / "config.json").read_text() == "old"
    with atomic_directory(old, replace=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert [p.read_text() for p in old.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
