"""Crash-safe file handling: atomic writes, checksums, and advisory locks.

Everything moekd commits (shards, manifests, prepared data, checkpoints) goes
through `atomic_write`: the bytes land in a temporary file in the same
directory, are fsynced, and are renamed over the final name, so a reader sees
either the old file or the whole new one, never a torn write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

from pipeline.errors import MoekdError

TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Some writers (safetensors) create files readable by their owner only; what
# moekd commits gets the mode any new file gets here, so caches, teachers and
# students can be shared.
FILE_MODE = _file_mode()


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`.

    On any error the temporary file is removed and `path` is untouched. A full
    disk is reported as a `MoekdError` naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(path) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def writer_tag() -> str:
    """host-pid: which process on which machine wrote something."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temporary_path(path: Path) -> Path:
    """Where a write of `path` goes first: beside it, tagged with its writer, so that `remove_dead_temporaries`
    can tell a dead writer's leftovers from a live one's."""
    return path.with_name(f"{path.name}.{writer_tag()}{TMP_SUFFIX}")


def remove_dead_temporaries(directory: Path) -> None:
    """Delete the temporary files in `directory` that writers on this host left when they were killed."""
    tag = f".{socket.gethostname()}-"
    for tmp in Path(directory).glob(f"*{TMP_SUFFIX}") if Path(directory).is_dir() else ():
        writer = tmp.name.removesuffix(TMP_SUFFIX)
        if tag in writer and not _alive(writer.rsplit("-", 1)[-1]):
            tmp.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def disk_full(path: Path) -> MoekdError:
    return MoekdError(f"disk full while writing {path}; everything committed before it is kept, "
                      "free some space and re-run the same command to resume")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def json_bytes(obj) -> bytes:
    """`obj` as stable, human-readable JSON (sorted keys, trailing newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, obj) -> None:
    """Write `obj` as `json_bytes`."""
    atomic_write_bytes(path, json_bytes(obj))


def parse_json(raw: bytes, what: str):
    """Parsed JSON, or a clear error naming `what` when it is not JSON."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"{what} is not valid JSON: {e}") from None


def read_json(path: Path, what: str = "file"):
    """Load JSON, turning a missing or malformed file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"{what} not found: {path}")
    return parse_json(path.read_bytes(), f"{what} {path}")


def remove_stale_temporaries(directory: Path, name: str = "*") -> None:
    """Delete temporary files an interrupted atomic write of `directory/name` left behind."""
    for tmp in Path(directory).glob(f"{name}.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def confined_parts(relative: str, what: str) -> tuple[str, ...]:
    """The components of a relative path another party wrote, refused if it could leave its directory."""
    parts = Path(relative).parts if isinstance(relative, str) else ()
    if not parts or Path(relative).is_absolute() or any(p in ("..", ".") for p in parts):
        raise MoekdError(f"{what} {relative!r} is not a plain relative path inside its directory")
    return parts


def open_confined(directory: Path, relative: str, what: str = "path") -> int:
    """A read-only file descriptor of `directory/relative`, opened without following any link below
    `directory` (each component with O_NOFOLLOW), so a name written by someone else cannot lead out."""
    parts = confined_parts(relative, what)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if i < len(parts) - 1 else 0)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise MoekdError(f"{Path(directory) / relative}: {'/'.join(parts[: i + 1])} is a symbolic link "
                                     "or not a directory; moekd reads only files inside the directory itself") from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_confined(directory: Path, relative: str, what: str = "path") -> bytes:
    """The bytes of `directory/relative`, read as `open_confined` opens it."""
    with os.fdopen(open_confined(directory, relative, what), "rb") as f:
        return f.read()


def plain_directory(path: Path, what: str) -> Path:
    """`path` as a directory moekd may write and delete in: refused if it is a symbolic link."""
    if Path(path).is_symlink():
        raise MoekdError(f"{path} ({what}) is a symbolic link; moekd writes and deletes only in plain directories")
    return Path(path)


class FileLock:
    """An exclusive advisory lock (flock) on `path`, released when the process dies.

    Because the kernel drops flock locks of a killed process, a crash never leaves
    a lock behind. `try_acquire` returns False when another process holds it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def acquire(self) -> None:
        self.fd = self._open()
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def _open(self) -> int:
        # O_NOFOLLOW: a lock file someone replaced by a link must not create or touch the link's target.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise MoekdError(f"{self.path} is a symbolic link; moekd's lock files must be plain files") from None
            raise

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def atomic_directory(path: Path, replace: bool = False):
    """Yield a temporary directory to fill; then fsync its files and rename it to `path`.

    `path` must be absent, unless `replace`: then an existing `path` is removed
    only once the new directory is complete, so a failure keeps the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
                file.chmod(FILE_MODE)
        fsync_dir(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_directories(directory: Path) -> None:
    """Delete what interrupted `atomic_directory` writes in `directory` left behind."""
    for tmp in Path(directory).glob(f"*{TMP_SUFFIX}"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
