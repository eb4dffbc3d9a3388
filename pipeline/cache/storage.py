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
from pathlib import Path
from typing import BinaryIO

from pipeline.cache.hub import HubStore
from pipeline.cache.remote import RemoteStore
from pipeline.core.errors import MoekdError
from pipeline.core.files import (
    FILE_MODE, atomic_write_bytes, confined_parts, disk_full, fsync_dir, open_confined, plain_directory, read_confined,
    remove_dead_temporaries, temporary_path,
)


def open_store(location) -> "Store":
    """The store at `location`: a local directory for plain paths and file:// URIs, else an fsspec store (a
    store is returned as it is)."""
    if isinstance(location, (LocalStore, RemoteStore)):
        return location
    text = str(location)
    if "://" not in text or text.startswith("file://"):
        return LocalStore(Path(text.removeprefix("file://")))
    if text.startswith("hf://"):
        return HubStore(text)
    return RemoteStore.at(text)


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


def _directory_in_the_way(path: Path) -> MoekdError:
    return MoekdError(f"{path} is a directory where the cache keeps a file; moekd does not remove directories it "
                      "did not make: remove it and re-run")


Store = LocalStore | RemoteStore  # a HubStore is a RemoteStore
