"""Crash-safe file handling: atomic writes, checksums, advisory locks, and reading what others wrote.

Everything moekd commits (shards, manifests, prepared data, checkpoints) goes
through `atomic_write`: the bytes land in a temporary file in the same
directory, are fsynced, and are renamed over the final name, so a reader sees
either the old file or the whole new one, never a torn write.

Everything moekd reads from a cache, run or model directory is opened here
(`open_confined`, `read_confined`, `open_regular`): regular files only (a FIFO,
device or directory in a file's place is refused before it is read, and the
open itself cannot block), no link followed below the directory moekd was
pointed at, and at most a given size. Every JSON file it reads goes through
`parse_json`, which bounds nesting and number lengths.
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
import stat
from pathlib import Path
from typing import Callable, Iterator

from pipeline.core.errors import MoekdError

TMP_SUFFIX = ".tmp"
MAX_JSON_BYTES = 256 << 20  # the largest JSON file moekd reads (a version 1-2 manifest lists every shard)
MAX_JSON_DEPTH = 64  # moekd's own JSON nests a handful of levels
MAX_NUMBER_CHARS = 100  # moekd writes no number longer; Python refuses to convert ints of over 4300 digits


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


class _LongNumber(ValueError):
    """A JSON number longer than MAX_NUMBER_CHARS, raised from inside the parser."""


def _bounded_number(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise _LongNumber(len(text))
        return kind(text)

    return parse


def parse_json(raw: bytes | str, what: str):
    """Parsed JSON, or a one-line error naming `what` when it is not JSON moekd could have written: malformed,
    nested more than MAX_JSON_DEPTH levels, or holding a number of more than MAX_NUMBER_CHARS characters."""
    try:
        value = json.loads(raw, parse_int=_bounded_number(int), parse_float=_bounded_number(float))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"{what} is not valid JSON: {e}") from None
    except _LongNumber as e:
        raise MoekdError(f"{what} holds a number of {e.args[0]} characters; moekd reads none longer than "
                         f"{MAX_NUMBER_CHARS}") from None
    except RecursionError:  # nested deeper than Python's stack: the parser stops before it overflows
        raise _too_deep(what) from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise _too_deep(what)
    return value


def _too_deep(what: str) -> MoekdError:
    return MoekdError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; moekd reads no deeper JSON")


def _deeper_than(value, limit: int) -> bool:
    """Whether lists and objects nest in `value` more than `limit` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def read_json(path: Path, what: str = "file", limit: int = MAX_JSON_BYTES):
    """Load the JSON file `path` (`read_confined` below its directory, `parse_json`); a missing, non-regular,
    oversized or malformed file is a one-line error."""
    path = Path(path)
    try:
        raw = read_confined(path.parent, path.name, what, limit)
    except FileNotFoundError:
        raise MoekdError(f"{what} not found: {path}") from None
    return parse_json(raw, f"{what} {path}")


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
    """A read-only file descriptor of the regular file `directory/relative`, opened without following any link
    below `directory` (each component with O_NOFOLLOW), so a name written by someone else cannot lead out; a
    FIFO, device or directory in its place is refused (`open_regular`'s checks)."""
    parts = confined_parts(relative, what)
    path = Path(directory) / relative
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                child = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _not_plain(path, "/".join(parts[: i + 1])) from None
                raise
            os.close(fd)
            fd = child
        return _open_regular(parts[-1], path, what, dir_fd=fd, follow=False)
    finally:
        os.close(fd)


def open_regular(path: Path, what: str = "file") -> int:
    """A read-only file descriptor of the regular file `path`, following links (a model directory from a hub
    cache is links into its blob store); a FIFO, device or directory there is refused before anything is read."""
    return _open_regular(str(path), Path(path), what, dir_fd=None, follow=True)


def _open_regular(name: str, path: Path, what: str, dir_fd: int | None, follow: bool) -> int:
    """Open `name` (in `dir_fd`) for reading if it is a regular file: checked before the open (so a device is
    never opened), opened with O_NONBLOCK (so a FIFO swapped in meanwhile cannot block it) and checked again."""
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow).st_mode
    if stat.S_ISLNK(mode):
        raise _not_plain(path, path.name)
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode, what)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode, what)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _not_plain(path: Path, component: str) -> MoekdError:
    return MoekdError(f"{path}: {component} is a symbolic link or not a directory; moekd reads only files inside "
                      "the directory itself")


def not_regular(path, mode: int, what: str) -> MoekdError:
    """The error for a `what` at `path` that is a FIFO, socket, device or directory rather than a file."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a link"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return MoekdError(f"{path} ({what}) is {kind}, not a regular file; moekd reads only plain files")


def too_large(path, size: int | None, limit: int, what: str) -> MoekdError:
    """The error for a `what` at `path` of `size` bytes (None: not known, only that it is more), more than the
    `limit` such a file may have."""
    known = f"{size} bytes, " if size is not None else ""
    return MoekdError(f"{path} ({what}) is {known}more than the {limit} bytes it may have; moekd does not read it")


def read_confined(directory: Path, relative: str, what: str, limit: int) -> bytes:
    """The bytes of `directory/relative`, opened as `open_confined` opens it, refused when over `limit` bytes."""
    with os.fdopen(open_confined(directory, relative, what), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:  # it may grow while it is read
            raise too_large(Path(directory) / relative, max(size, len(data)), limit, what)
        return data


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
