"""A teacher cache under an fsspec URI (an object store prefix: s3://, gs://, ...), for `storage.open_store`.

A conditional put (S3: `If-None-Match: *`) is the atomic create the commit
protocol needs. A remote call is retried only when its failure is transient
(a timeout, a dropped connection, HTTP 408, 429, 500, 502, 503, 504); a
permanent one (any other status, missing credentials, offline mode) is one
clear error at once. `hub.HubStore` builds on this for the Hugging Face Hub.
"""

from __future__ import annotations

import time
from typing import BinaryIO, Callable, TypeVar

from pipeline.core.errors import MoekdError, first_line
from pipeline.core.files import confined_parts, too_large

T = TypeVar("T")
RETRIES = 4  # attempts of a remote call that failed transiently (connection reset, timeout, 5xx)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)  # timeouts, throttling, a server's passing failure


class RemoteStore:
    """A cache under an fsspec URI (an object store prefix, usually)."""

    CREDENTIALS = "for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or FSSPEC_S3"  # where a user sets them
    ENDPOINT = "for S3: AWS_ENDPOINT_URL, or FSSPEC_S3"

    @classmethod
    def at(cls, location: str) -> "RemoteStore":
        """The store at fsspec URI `location` (its protocol's package, e.g. s3fs, imported by fsspec)."""
        import fsspec  # a dependency of datasets

        try:
            # No listing cache: other writers add objects, and a cached listing would hide them from reads too.
            fs, root = fsspec.url_to_fs(location, use_listings_cache=False)
        except ImportError as e:
            raise MoekdError(f"{location}: reading or writing this kind of location needs a package that is not "
                             f"installed ({e}); for s3:// install s3fs (pip install 'moekd[s3]')") from None
        except ValueError as e:
            raise MoekdError(f"{location} is not a location moekd can use: {e}") from None
        return cls(fs, root.rstrip("/"), location.rstrip("/"))

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
                if http_status(e) == 416 and self.fs.size(path) == 0:  # S3 answers a range of an empty object so
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
                    raise MoekdError(f"{self.url(name)}: {described(e, self.ENDPOINT)}") from None
                if attempt == RETRIES - 1:
                    raise MoekdError(f"{self.url(name)}: {described(e, self.ENDPOINT)} (after {RETRIES} "
                                     "attempts)") from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


def http_status(error: Exception) -> int | None:
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
    status = http_status(error)
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


def described(error: Exception, endpoint: str) -> str:
    """A failed call in a few words (a Hub error: the server's own message); a client's own error (not an
    OSError: the endpoint unreachable, ...) hints at the `endpoint` setting."""
    if isinstance(error, OSError):
        status = http_status(error)
        text = getattr(error, "server_message", None) or error.strerror or str(error)
        return first_line(Exception(text)) + (f" (HTTP {status})" if status else "")
    return f"{type(error).__name__}: {first_line(error)}; check the endpoint ({endpoint})"


def _precondition_failed(error: OSError) -> bool:
    """Whether an S3 error is a failed `If-None-Match: *` (s3fs names it FileExistsError only when the server
    says which condition failed, as AWS does; SeaweedFS and others do not)."""
    response = getattr(error.__cause__, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") == "PreconditionFailed"
