"""Where a teacher cache lives: a local directory or an object store, behind one small interface.

`open_store(location)` takes a plain path, a `file://` URI, a dataset
repository on the Hugging Face Hub (`hf://datasets/ORG/NAME[@BRANCH][/FOLDER]`,
read and written through the Hub's commit API: `HubStore`), or any other fsspec
URI (`s3://bucket/prefix`, `gs://...`). Objects are named by relative paths
checked by the caller (`confined_parts`), so nothing a cache names can lead
outside `location`.

What the cache's commit protocol (`pipeline.cache.manifest`) needs of a store,
and nothing more: read an object (whole, at most a given size, or through a
seekable file), list a folder (with sizes), write an object whole, and
*create* one only if absent (`create`), atomically. Object stores do that
with a conditional put (S3: `If-None-Match: *`); the Hub with a commit whose
parent must still be the branch's head (`HubStore`); a local directory with a
hard link of a complete temporary file, which fails if the name exists.
Neither needs a rename over an existing name or a lock, so a cache on a
network file system that ignores `flock` is as safe as one on local disk.
(Replacing a record moekd does not trust is a plain `put`: see
`Manifest.commit`.)

Credentials and endpoints come from the environment, as fsspec and the cloud
SDKs read them (for S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, or fsspec's `FSSPEC_S3='{"key": ..., "client_kwargs":
{"endpoint_url": ...}}'`; for the Hub: `HF_TOKEN`, `HF_ENDPOINT`), never from a
config file that might be shared.

A local store reads regular files only, without following links
(`files.open_confined`). A remote call is retried only when its failure is
transient (a timeout, a dropped connection, HTTP 408, 429, 500, 502, 503,
504); a permanent one (any other status, missing credentials, offline mode)
is one clear error at once.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from pipeline.core.errors import MoekdError, first_line
from pipeline.core.files import (
    FILE_MODE, atomic_write_bytes, confined_parts, disk_full, fsync_dir, open_confined, plain_directory, read_confined,
    remove_dead_temporaries, temporary_path, too_large,
)

T = TypeVar("T")
RETRIES = 4  # attempts of a remote call that failed transiently (connection reset, timeout, 5xx)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)  # timeouts, throttling, a server's passing failure


def open_store(location) -> "Store":
    """The store at `location`: a local directory for plain paths and file:// URIs, else an fsspec store (a
    store is returned as it is)."""
    if isinstance(location, (LocalStore, RemoteStore)):
        return location
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        return LocalStore(Path(text.removeprefix("file://")))
    if text.startswith("hf://"):
        from pipeline.cache.hub import HubStore  # huggingface_hub, imported only for the Hub

        return HubStore(text)
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

    def read(self, name: str, limit: int) -> bytes:
        """The bytes of the regular file `name`, refused (one line) when over `limit` bytes."""
        return read_confined(self.root, name, "cache file", limit)

    def open(self, name: str) -> BinaryIO:
        """A seekable read-only file (for reading a few columns of a shard)."""
        return os.fdopen(open_confined(self.root, name, "cache file"), "rb")

    def size(self, name: str) -> int:
        with self.open(name) as f:
            return os.fstat(f.fileno()).st_size

    def exists(self, name: str) -> bool:
        """Whether anything (a link included, never followed) is at `name`."""
        return os.path.lexists(self.root / name)

    def list(self, folder: str) -> list[str]:
        """Names (relative to the root) of what is in `folder`, whatever it is (a link, a FIFO, ... is listed, for
        its reader to refuse); [] if it does not exist."""
        directory = self.root / folder
        if not directory.is_dir():
            return []
        return sorted(f"{folder}/{name}" for name in os.listdir(plain_directory(directory, "a cache folder")))

    def sizes(self, folder: str) -> dict[str, int | None]:
        """`list(folder)` with each entry's size in bytes (None: not a regular file), from one listing."""
        sizes = {}
        for name in self.list(folder):
            try:
                info = os.lstat(self.root / name)
            except FileNotFoundError:  # deleted since it was listed
                continue
            sizes[name] = info.st_size if stat.S_ISREG(info.st_mode) else None
        return sizes

    def put(self, name: str, data: bytes) -> None:
        """Write `name` whole (replacing it atomically if it exists)."""
        path = self._writable(name)
        try:
            atomic_write_bytes(path, data)
        except IsADirectoryError:
            raise _directory_in_the_way(path) from None

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
        """Remove `name` (a link itself, never what it points to); a directory there is refused, not removed."""
        path = self.root / Path(*confined_parts(name, "cache file"))
        plain_directory(path.parent, "a cache folder")
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            raise _directory_in_the_way(path) from None

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

    CREDENTIALS = "for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or FSSPEC_S3"  # where a user sets them
    ENDPOINT = "for S3: AWS_ENDPOINT_URL, or FSSPEC_S3"

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

    def read(self, name: str, limit: int) -> bytes:
        """The bytes of object `name`, refused (one line) when over `limit` bytes: no more than `limit` + 1 bytes
        are fetched (a ranged read)."""
        path = self.path(name)

        def ranged() -> bytes:
            try:
                return self.fs.cat_file(path, start=0, end=limit + 1)
            except OSError as e:
                if _status(e) == 416 and self.fs.size(path) == 0:  # S3 answers a range of an empty object so
                    return b""
                raise

        data = self._call(name, ranged)
        if len(data) > limit:
            raise too_large(self.url(name), None, limit, "cache file")  # only `limit` + 1 bytes were fetched
        return data

    def open(self, name: str) -> BinaryIO:
        """A seekable file that fetches what is read in small blocks (a shard's index columns, not all of it)."""
        return self._call(name, lambda: self.fs.open(self.path(name), "rb", block_size=1 << 18))

    def size(self, name: str) -> int:
        return self._call(name, lambda: self.fs.size(self.path(name)))

    def exists(self, name: str) -> bool:
        return self._call(name, lambda: self.fs.exists(self.path(name)))

    def list(self, folder: str) -> list[str]:
        return sorted(self.sizes(folder))

    def sizes(self, folder: str) -> dict[str, int | None]:
        """The objects in `folder` by name, with their sizes in bytes (None: a "directory"), from one listing."""
        path = self.path(folder)

        def listing():
            try:
                return self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return []

        return {f"{folder}/{entry['name'].rstrip('/').rsplit('/', 1)[-1]}":
                entry.get("size") if entry.get("type") == "file" else None for entry in self._call(folder, listing)}

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
        """`call()`, retried with backoff while it fails transiently (the store's client retries first); the rest
        become one clear `MoekdError` at once. A missing object stays `FileNotFoundError`, for the caller to name."""
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
                                 f"({self.CREDENTIALS})") from None
            except Exception as e:  # noqa: BLE001 - s3fs's OSErrors (HTTP errors), the clients' own errors
                if _missing_credentials(e):
                    raise MoekdError(f"{self.url(name)}: no credentials found ({first_line(e)}); set them in the "
                                     "environment (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or key and "
                                     "secret in FSSPEC_S3)") from None
                if not _transient(e):
                    raise MoekdError(f"{self.url(name)}: {_described(e, self.ENDPOINT)}") from None
                if attempt == RETRIES - 1:
                    raise MoekdError(f"{self.url(name)}: {_described(e, self.ENDPOINT)} (after {RETRIES} "
                                     "attempts)") from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


def _status(error: Exception) -> int | None:
    """The HTTP status of a failed request, where the error carries the response (s3fs: botocore's, as its
    cause; huggingface_hub: its HTTP client's)."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _transient(error: Exception) -> bool:
    """Whether another try may succeed: a timeout, a dropped connection, or a server that timed out, throttles
    or failed in passing (`TRANSIENT_STATUS`); not a request the server refused (any other 4xx, 501 not
    implemented) nor a client that will not go online (offline mode)."""
    if isinstance(error, TimeoutError):  # s3fs's for S3's RequestTimeout, though S3 answers it with a 400
        return True
    status = _status(error)
    if status is not None:
        return status in TRANSIENT_STATUS
    if type(error).__name__ == "OfflineModeIsEnabled":  # huggingface_hub's, a ConnectionError that stays one
        return False
    return isinstance(error, ConnectionError) or _network_error(error)


def _network_error(error: Exception) -> bool:
    """Whether huggingface_hub's HTTP client (httpx2) failed to reach the server, timed out or lost the
    connection (what huggingface_hub itself retries), rather than being refused."""
    try:
        import httpx2
    except ImportError:
        return False
    return isinstance(error, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))


def _missing_credentials(error: Exception) -> bool:
    """Whether the client found no (or only part of its) credentials: botocore's NoCredentialsError and kin."""
    return type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError")


def _described(error: Exception, endpoint: str) -> str:
    """A failed call in a few words (a Hub error: the server's own message); a client's own error (not an
    OSError: the endpoint unreachable, ...) hints at the `endpoint` setting."""
    if isinstance(error, OSError):
        status = _status(error)
        text = getattr(error, "server_message", None) or error.strerror or str(error)
        return first_line(Exception(text)) + (f" (HTTP {status})" if status else "")
    return f"{type(error).__name__}: {first_line(error)}; check the endpoint ({endpoint})"


def _directory_in_the_way(path: Path) -> MoekdError:
    return MoekdError(f"{path} is a directory where the cache keeps a file; moekd does not remove directories it "
                      "did not make: remove it and re-run")


def _precondition_failed(error: OSError) -> bool:
    """Whether an S3 error is a failed `If-None-Match: *` (s3fs names it FileExistsError only when the server
    says which condition failed, as AWS does; SeaweedFS and others do not)."""
    response = getattr(error.__cause__, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "PreconditionFailed"


Store = LocalStore | RemoteStore  # a HubStore is a RemoteStore
