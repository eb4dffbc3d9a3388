"""Where a teacher cache lives: a local directory or an object store, behind one small interface.

`open_store(location)` takes a plain path, a `file://` URI, or any fsspec URI
(`s3://bucket/prefix`, `gs://...`, `hf://datasets/...` for reading). Objects
are named by relative paths checked by the caller (`confined_parts`), so
nothing a cache names can lead outside `location`.

What the cache's commit protocol (`pipeline.cache_format`) needs of a store,
and nothing more: read an object (whole or through a seekable file), list a
folder, write an object whole, and *create* one only if absent (`create`),
atomically. Object stores do that with a conditional put (S3: `If-None-Match:
*`); a local directory with a hard link of a complete temporary file, which
fails if the name exists. Neither needs a rename over an existing name or a
lock, so a cache on a network file system that ignores `flock` is as safe as
one on local disk.

Credentials and endpoints come from the environment, as fsspec and the cloud
SDKs read them (for S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, or fsspec's `FSSPEC_S3='{"key": ..., "client_kwargs":
{"endpoint_url": ...}}'`), never from a config file that might be shared.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from pipeline.errors import MoekdError, first_line
from pipeline.files import (
    FILE_MODE, atomic_write_bytes, confined_parts, disk_full, fsync_dir, open_confined, plain_directory,
    read_confined, remove_dead_temporaries, temporary_path,
)

T = TypeVar("T")
RETRIES = 4  # attempts of a remote call that failed transiently (connection reset, timeout, 5xx)


def open_store(location) -> "Store":
    """The store at `location`: a local directory for plain paths and file:// URIs, else an fsspec store (a
    store is returned as it is)."""
    if isinstance(location, (LocalStore, RemoteStore)):
        return location
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        return LocalStore(Path(text.removeprefix("file://")))
    import fsspec  # a dependency of datasets; the protocol's own package (s3fs, gcsfs) is imported by fsspec

    try:
        # No listing cache: other writers add objects, and a cached listing would hide them from reads too.
        fs, root = fsspec.url_to_fs(text, use_listings_cache=False)
    except ImportError as e:
        raise MoekdError(f"{text}: reading or writing this kind of location needs a package that is not "
                         f"installed ({e}); for s3:// install s3fs (pip install 'moekd[s3]')") from None
    except ValueError as e:
        raise MoekdError(f"{text} is not a location moekd can use: {e}") from None
    return RemoteStore(fs, root.rstrip("/"), text.rstrip("/"))


class LocalStore:
    """A cache directory on a local or network file system."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.remote = False

    def __str__(self) -> str:
        return str(self.root)

    def url(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> bytes:
        return read_confined(self.root, name, "cache file")

    def open(self, name: str) -> BinaryIO:
        """A seekable read-only file (for reading a few columns of a shard)."""
        return os.fdopen(open_confined(self.root, name, "cache file"), "rb")

    def size(self, name: str) -> int:
        with self.open(name) as f:
            return os.fstat(f.fileno()).st_size

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def list(self, folder: str) -> list[str]:
        """Names (relative to the root) of the files in `folder`; [] if it does not exist."""
        directory = self.root / folder
        if not directory.is_dir():
            return []
        return sorted(f"{folder}/{p.name}" for p in plain_directory(directory, "a cache folder").iterdir()
                      if p.is_file() and not p.is_symlink())

    def put(self, name: str, data: bytes) -> None:
        """Write `name` whole (replacing it atomically if it exists)."""
        atomic_write_bytes(self._writable(name), data)

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist; False if it does. Readers never see a partial file."""
        path = self._writable(name)
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            try:
                os.link(tmp, path)  # atomic, and fails on an existing name: the commit point
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise MoekdError(f"{self.root}: this file system does not support hard links, which moekd "
                                     "needs to commit a shard without locks; write the cache to another file system "
                                     "or to an object store (s3://...)") from None
                raise
            fsync_dir(path.parent)
            return True
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(path) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        path = self.root / Path(*confined_parts(name, "cache file"))
        plain_directory(path.parent, "a cache folder")
        path.unlink(missing_ok=True)

    def check_folder(self, folder: str) -> None:
        """Refuse a `folder` that is a symbolic link: moekd writes and deletes only in plain directories."""
        plain_directory(self.root / folder, f"the cache's {folder} folder")

    def remove_dead_temporaries(self, folder: str) -> None:
        """Delete the temporary files that writers on this host killed before they finished left in `folder`."""
        remove_dead_temporaries(self.root / folder)

    def _writable(self, name: str) -> Path:
        path = self.root / Path(*confined_parts(name, "cache file"))
        path.parent.mkdir(parents=True, exist_ok=True)
        plain_directory(path.parent, "a cache folder")
        return path


class RemoteStore:
    """A cache under an fsspec URI (an object store prefix, usually)."""

    def __init__(self, fs, root: str, location: str):
        self.fs, self.root, self.location = fs, root, location
        self.remote = True
        self.protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def __str__(self) -> str:
        return self.location

    def url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def path(self, name: str) -> str:
        return f"{self.root}/{'/'.join(confined_parts(name, 'cache file'))}"

    def read(self, name: str) -> bytes:
        return self._call(name, lambda: self.fs.cat_file(self.path(name)))

    def open(self, name: str) -> BinaryIO:
        """A seekable file that fetches what is read in small blocks (a shard's index columns, not all of it)."""
        return self._call(name, lambda: self.fs.open(self.path(name), "rb", block_size=1 << 18))

    def size(self, name: str) -> int:
        return self._call(name, lambda: self.fs.size(self.path(name)))

    def exists(self, name: str) -> bool:
        return self._call(name, lambda: self.fs.exists(self.path(name)))

    def list(self, folder: str) -> list[str]:
        path = self.path(folder)

        def listing():
            try:
                return self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []

        return sorted(f"{folder}/{p.rstrip('/').rsplit('/', 1)[-1]}" for p in self._call(folder, listing))

    def put(self, name: str, data: bytes) -> None:
        self._call(name, lambda: self.fs.pipe_file(self.path(name), data))  # an object put is atomic

    def create(self, name: str, data: bytes) -> bool:
        def conditional_put() -> bool:
            try:
                self.fs.pipe_file(self.path(name), data, mode="create")
            except OSError as e:
                if isinstance(e, FileExistsError) or _precondition_failed(e):
                    return False
                raise
            return True

        try:
            return self._call(name, conditional_put)
        except NotImplementedError:
            raise MoekdError(f"{self.url(name)}: {self.protocol}:// offers no conditional put here, which moekd "
                             "needs to commit shards without locks; write the cache to s3:// or a local "
                             "directory and copy it") from None

    def delete(self, name: str) -> None:
        def remove():
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

        self._call(name, remove)

    def check_folder(self, folder: str) -> None:
        """An object store has no links."""

    def remove_dead_temporaries(self, folder: str) -> None:
        """An object store writes objects whole: nothing temporary is ever left."""

    def _call(self, name: str, call: Callable[[], T]) -> T:
        """`call()`, retried with backoff on transient errors (the store's client retries first); the rest
        become one clear `MoekdError`. A missing object stays `FileNotFoundError`, for the caller to name."""
        for attempt in range(RETRIES):
            try:
                return call()
            except (FileExistsError, NotImplementedError, MoekdError):
                raise
            except FileNotFoundError as e:
                if "bucket" in str(e).lower():
                    raise MoekdError(f"{self.url(name)}: {first_line(e)}; create it, or check the location") from None
                raise
            except PermissionError as e:
                raise MoekdError(f"{self.url(name)}: access denied ({first_line(e)}); check the credentials "
                                 "(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or FSSPEC_S3)") from None
            except (OSError, TimeoutError) as e:  # s3fs: 5xx, throttling, resets, after its own retries
                if attempt == RETRIES - 1:
                    raise MoekdError(f"{self.url(name)}: {first_line(e)} (after {RETRIES} attempts)") from None
                time.sleep(0.5 * 2**attempt)
            except Exception as e:  # noqa: BLE001 - the client's own errors (botocore: endpoint unreachable, ...)
                raise MoekdError(f"{self.url(name)}: {type(e).__name__}: {first_line(e)}; check the endpoint "
                                 "(for S3: AWS_ENDPOINT_URL, or FSSPEC_S3)") from None
        raise AssertionError("unreachable")


def _precondition_failed(error: OSError) -> bool:
    """Whether an S3 error is a failed `If-None-Match: *` (s3fs names it FileExistsError only when the server
    says which condition failed, as AWS does; SeaweedFS and others do not)."""
    response = getattr(error.__cause__, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "PreconditionFailed"


Store = LocalStore | RemoteStore
