"""Crash-safe writes (committed files get the usual mode, failures leave the target untouched) and bounded,
regular-file-only reads of what others wrote."""

import contextlib
import os
import signal
import stat

import pytest

from pipeline.core.errors import MoekdError
from pipeline.core.files import (
    FILE_MODE, MAX_JSON_DEPTH, MAX_NUMBER_CHARS, atomic_directory, atomic_write, open_regular, parse_json,
    read_confined, read_json,
)


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


# ---------------------------------------------------------------- reading what others wrote

def test_json_moekd_could_not_have_written_is_a_one_line_error():
    assert parse_json(b'{"a": [1, 2.5, null, "x"]}', "f") == {"a": [1, 2.5, None, "x"]}
    deepest = []
    for _ in range(MAX_JSON_DEPTH - 1):
        deepest = [deepest]
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "f") == deepest
    assert parse_json("1" * MAX_NUMBER_CHARS, "f") == int("1" * MAX_NUMBER_CHARS)
    cases = {
        "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1): "nested more than 64 levels",
        '{"a": ' * 200_000 + "1" + "}" * 200_000: "nested more than 64 levels",  # deeper than Python's stack
        '{"rows": ' + "9" * 5000 + "}": "holds a number of 5000 characters",  # past int()'s 4300 digits
        "[0." + "5" * 1000 + "]": "holds a number of 1002 characters",
        "{not json": "is not valid JSON",
        b"\xff\xfe": "is not valid JSON",
    }
    for text, message in cases.items():
        with pytest.raises(MoekdError, match=message) as error:
            parse_json(text, "run settings x/run.json")
        assert str(error.value).startswith("run settings x/run.json ") and "\n" not in str(error.value)


@contextlib.contextmanager
def no_hang(seconds: int = 120):
    """Fail instead of hanging: opening a FIFO for reading blocks until a writer opens it."""
    def hung(*_):
        raise TimeoutError(f"blocked for {seconds}s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused_quickly(read, message):
    """`read()` raises a one-line MoekdError matching `message`, without blocking."""
    with no_hang(10), pytest.raises(MoekdError, match=message) as error:
        read()
    assert "\n" not in str(error.value)


def test_only_regular_files_are_read_and_nothing_blocks(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "directory.json").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "plain.json")
    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / "device").symlink_to("/dev/null")
    refused_quickly(lambda: read_json(tmp_path / "fifo.json", "run settings"), r"fifo.json \(run settings\) is a FIFO")
    refused_quickly(lambda: read_json(tmp_path / "directory.json"), "is a directory, not a regular file")
    refused_quickly(lambda: read_json(tmp_path / "link.json"), "link.json is a symbolic link")
    refused_quickly(lambda: read_confined(tmp_path, "fifo.json/x", "cache file", 10), "is a symbolic link or not a")
    refused_quickly(lambda: open_regular(tmp_path / "device", "weight file"), "is a character device")
    refused_quickly(lambda: open_regular(tmp_path / "fifo.json"), "is a FIFO")
    assert read_json(tmp_path / "plain.json") == {}
    with pytest.raises(MoekdError, match="settings not found"):
        read_json(tmp_path / "absent.json", "settings")


def test_reads_are_bounded_in_size(tmp_path):
    (tmp_path / "record.json").write_bytes(b" " * 100 + b"{}")
    assert read_confined(tmp_path, "record.json", "commit record", 102) == b" " * 100 + b"{}"
    with pytest.raises(MoekdError, match=r"record.json \(commit record\) is 102 bytes, more than the 101 bytes it"):
        read_confined(tmp_path, "record.json", "commit record", 101)
    with pytest.raises(MoekdError, match="more than the 10 bytes it may have"):
        read_json(tmp_path / "record.json", limit=10)
