"""A teacher cache in a dataset repository on the Hugging Face Hub (`hf://datasets/ORG/NAME[@BRANCH][/FOLDER]`).

`storage.open_store` opens one for an `hf://` location; `HubStore`'s docstring
says how the Hub's commit API gives the commit protocol its atomic create.
"""

from __future__ import annotations

import errno
import io
import os
import random
import re
import time
from typing import BinaryIO, Callable, TypeVar
from urllib.parse import quote

from pipeline.cache.remote import RemoteStore, described, http_status
from pipeline.core.errors import MoekdError, first_line
from pipeline.core.files import confined_parts, too_large

T = TypeVar("T")
HUB_COMMIT_ATTEMPTS = 12  # commits to a Hub branch refused (412) because another writer's commit landed first


class HubStore(RemoteStore):
    """A cache in a dataset repository on the Hugging Face Hub: `hf://datasets/ORG/NAME[@BRANCH][/FOLDER]`
    (the branch defaults to main; the cache may sit in a folder of the repository).

    Every write is one commit through the Hub's commit API (`HfApi.create_commit`): `put` and `create` add a
    file, `delete` deletes one. `create` is an atomic create-only-if-absent, a compare-and-swap on the branch
    head: it reads the head commit, checks that the name is absent at that very commit, and commits with
    `parent_commit` set to it. The Hub applies a commit only if its parent is still the branch's head and
    refuses it otherwise (412 Precondition Failed), so the commit lands only if no other commit landed since
    the check, in particular none that created the name: of concurrent creators of one name, exactly one
    commit lands. A refused `create` reads the head again and re-checks: the name there now means another
    writer won (False); else some unrelated commit moved the head, and it tries again, up to
    `HUB_COMMIT_ATTEMPTS` times with jittered backoff. (huggingface_hub drops from a commit a file the Hub
    already holds with the same bytes and then commits nothing: the name appeared after the head was read,
    so that too is False.) `put` and `delete` commit with no parent, yet the Hub may still refuse one that
    races another writer's commit: they try again the same way. A shard object's name holds its content's
    hash and every other object is written by the commit protocol's rules (`pipeline.cache.records`), so a
    put that lands after another writer's is as safe as on S3.

    Reads bypass every client-side cache (HfFileSystem keeps listings and resolved revisions): a read is a
    ranged GET of the file at the branch (at most the bytes asked for are fetched), a listing asks the Hub's
    tree API, a size or existence its paths-info API, so a reader sees what other processes committed the
    moment it is on the branch. Each commit costs the Hub some work and the Hub limits commits per repository
    and hour: fewer, larger shards (`shard_size`) suit it better than many small ones.

    The repository must exist: moekd does not create it (the Hub would make it public unless told
    otherwise), and names the `hf repos create` command that does. The endpoint is `HF_ENDPOINT`, read when
    the store is opened (default: huggingface.co); the token is `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`), as
    huggingface_hub reads it from the environment, and never a token file saved by `hf auth login`: without
    one, requests are anonymous (public repositories can be read, none written). A location naming a commit
    id (`@<40 hex digits>`) is read-only.
    """

    CREDENTIALS = "HF_TOKEN: a token that can read the repository, and write to it for `moekd cache`"
    ENDPOINT = "HF_ENDPOINT"

    def __init__(self, location: str):
        from huggingface_hub import HfApi, constants
        from huggingface_hub.utils import parse_hf_uri

        location = location.rstrip("/")
        try:
            uri = parse_hf_uri(location)
        except ValueError as e:
            raise MoekdError(f"{location} is not a location moekd can use: {first_line(e)}") from None
        if uri.type != "dataset":
            raise MoekdError(f"{location}: moekd keeps caches on the Hub in dataset repositories: "
                             "hf://datasets/ORG/NAME[@BRANCH][/FOLDER]")
        folder = uri.path_in_repo.strip("/")
        parts = confined_parts(folder, f"{location}: the folder") if folder else ()
        if any(part in (".git", ".cache") for part in parts):
            raise MoekdError(f"{location}: the Hub keeps no files under a .git or .cache folder")
        self.fs, self.root, self.location = None, "/".join(parts), location  # no fsspec filesystem: see above
        self.remote, self.protocol = True, "hf"
        self.repo_id, self.revision = uri.id, uri.revision or constants.DEFAULT_REVISION
        self.endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        token = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
        self.token: str | bool = token or False  # False: anonymous, not huggingface_hub's saved-token lookup
        self.api = HfApi(endpoint=self.endpoint, token=self.token)

    def path(self, name: str) -> str:
        """`name`'s path in the repository."""
        return "/".join(((self.root,) if self.root else ()) + confined_parts(name, "cache file"))

    # ------------------------------------------------------------- reads

    def read(self, name: str, limit: int) -> bytes:
        """The bytes of `name`, refused (one line) when over `limit` bytes: no more than `limit` + 1 bytes are
        fetched (a ranged read)."""
        path = self.path(name)
        data = self._call(name, lambda: self._fetch(path, 0, limit))
        if len(data) > limit:
            raise too_large(self.url(name), None, limit, "cache file")
        return data

    def open(self, name: str) -> BinaryIO:
        """A seekable file that fetches what is read in ranged GETs of 256 KiB or more."""
        return io.BufferedReader(_HubFile(self, name, self.size(name)), buffer_size=1 << 18)

    def size(self, name: str) -> int:
        from huggingface_hub.hf_api import RepoFile

        found = self._paths_info(name)
        if not found:
            raise FileNotFoundError(errno.ENOENT, "no such file in the repository")
        if not isinstance(found[0], RepoFile):
            raise MoekdError(f"{self.url(name)} is a folder where the cache keeps a file; moekd does not remove "
                             "folders it did not make: remove it and re-run")
        return found[0].size

    def exists(self, name: str) -> bool:
        return bool(self._paths_info(name))

    def sizes(self, folder: str) -> dict[str, int | None]:
        """The files in `folder` by name, with their sizes in bytes (None: a folder), from one listing (the tree
        API's pages)."""
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.hf_api import RepoFile

        path = self.path(folder)

        def listing():
            try:
                return list(self.api.list_repo_tree(self.repo_id, path, revision=self.revision, repo_type="dataset"))
            except EntryNotFoundError:  # no such folder (yet)
                return []

        return {f"{folder}/{entry.path.rsplit('/', 1)[-1]}": entry.size if isinstance(entry, RepoFile) else None
                for entry in self._call(folder, listing)}

    def _paths_info(self, name: str, revision: str | None = None) -> list:
        """What is at `name` (at the branch, or `revision`): [] if nothing, else one RepoFile or RepoFolder."""
        path = self.path(name)
        return self._call(name, lambda: self.api.get_paths_info(self.repo_id, [path], revision=revision or
                                                                self.revision, repo_type="dataset"))

    def _fetch(self, path: str, first: int, last: int) -> bytes:
        """Bytes `first`..`last` (inclusive; fewer at the file's end) of `path` at the branch: a ranged GET whose
        answer is read no further than asked, even from a server that ignores the range."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = f"{self.endpoint}/datasets/{self.repo_id}/resolve/{quote(self.revision, safe='')}/{quote(path)}"
        headers = build_hf_headers(token=self.token) | {"Range": f"bytes={first}-{last}",
                                                          "Accept-Encoding": "identity"}
        with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            if response.status_code == 416:  # a range starting at or past the end: nothing there to read
                return b""
            if response.status_code >= 400:
                response.read()
            hf_raise_for_status(response)
            skip = first if response.status_code == 200 else 0  # the whole file, not the range
            wanted, data = last - first + 1, bytearray()
            for chunk in response.iter_bytes():
                if skip:
                    chunk, skip = chunk[skip:], max(skip - len(chunk), 0)
                data += chunk
                if len(data) >= wanted:
                    break
            return bytes(data[:wanted])

    # ------------------------------------------------------------- writes: one commit each

    def put(self, name: str, data: bytes) -> None:
        """Write `name` whole (a commit; one that leaves the file as it was commits nothing)."""
        from huggingface_hub import CommitOperationAdd

        path = self._writable(name)
        for attempt in range(HUB_COMMIT_ATTEMPTS):
            if self._commit(name, CommitOperationAdd(path, data), f"moekd: write {path}") is not None:
                return
            self._backoff(attempt)
        raise self._busy(name)

    def create(self, name: str, data: bytes) -> bool:
        """Commit `name` only if absent, on the head where it was found absent; False if it is there (see the
        class docstring for why this is atomic)."""
        from huggingface_hub import CommitOperationAdd

        path = self._writable(name)
        for attempt in range(HUB_COMMIT_ATTEMPTS):
            head = self._call(name, self._head)
            if self._paths_info(name, revision=head):
                return False
            addition = CommitOperationAdd(path, data)
            if self._commit(name, addition, f"moekd: create {path}", parent=head) is not None:
                # Committed, unless the Hub's preupload answer named the file with these very bytes (then
                # create_commit sent nothing): another writer created it after `head`.
                return getattr(addition, "_remote_oid", None) is None
            self._backoff(attempt)  # the head moved: another writer committed something first
        raise self._busy(name)

    def delete(self, name: str) -> None:
        """Remove the file `name` (a commit; nothing if it is not there)."""
        from huggingface_hub import CommitOperationDelete

        path = self._writable(name)
        for attempt in range(HUB_COMMIT_ATTEMPTS):
            try:
                if self._commit(name, CommitOperationDelete(path, is_folder=False), f"moekd: delete {path}") \
                        is not None:
                    return
            except FileNotFoundError:  # the Hub's answer to deleting a file that is not there
                return
            self._backoff(attempt)
        raise self._busy(name)

    def _writable(self, name: str) -> str:
        if re.fullmatch(r"[0-9a-f]{40}", self.revision):
            raise MoekdError(f"{self.location} names commit {self.revision}: a cache there can be read, not "
                             "written; name a branch (hf://datasets/ORG/NAME@BRANCH/...)")
        return self.path(name)

    def _head(self) -> str:
        """The commit at the head of the branch now."""
        return self.api.dataset_info(self.repo_id, revision=self.revision, expand=["sha"]).sha

    def _commit(self, name: str, operation, message: str, parent: str | None = None):
        """Commit `operation` on the branch (with `parent`: only if the branch's head is still `parent`); None
        if the Hub refused it because another commit landed first (HTTP 412)."""
        from huggingface_hub.errors import HfHubHTTPError

        def commit():
            try:
                return self.api.create_commit(self.repo_id, [operation], commit_message=message,
                                              repo_type="dataset", revision=self.revision, parent_commit=parent)
            except HfHubHTTPError as e:
                if http_status(e) == 412:
                    return None
                raise

        return self._call(name, commit)

    @staticmethod
    def _backoff(attempt: int) -> None:
        """Wait before committing again: writers that collided wake at different times."""
        time.sleep(min(0.05 * 2**attempt, 5.0) * random.uniform(0.5, 1.5))

    def _busy(self, name: str) -> MoekdError:
        return MoekdError(f"{self.url(name)}: each of {HUB_COMMIT_ATTEMPTS} commits to branch {self.revision} of "
                          f"{self.repo_id} was refused because another writer's commit landed first; run again, or "
                          "with fewer concurrent writers")

    def _call(self, name: str, call: Callable[[], T]) -> T:
        """`RemoteStore._call` with the Hub's errors made the store's: a missing repository or branch is one
        line saying how to make it, a missing file `FileNotFoundError`, 401/403 access denied, offline mode
        one line at once, and the HTTP client's network failures transient."""
        from huggingface_hub.errors import (
            EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
        )

        def translated() -> T:
            try:
                return call()
            except OfflineModeIsEnabled:
                raise MoekdError(f"{self.url(name)}: offline mode is enabled (HF_HUB_OFFLINE=1); unset it to reach "
                                 "the Hub") from None
            except RepositoryNotFoundError:  # also what the Hub answers a token that cannot see a private one
                raise MoekdError(f"{self.url(name)}: dataset repository {self.repo_id} not found at {self.endpoint}"
                                 f", or HF_TOKEN cannot see it; create it (hf repos create {self.repo_id} --type "
                                 "dataset --private) or check the location and HF_TOKEN") from None
            except RevisionNotFoundError:
                raise MoekdError(f"{self.url(name)}: {self.repo_id} has no branch {self.revision!r}; create it (hf "
                                 f"repos branch create {self.repo_id} {self.revision} --type dataset) or check the "
                                 "location") from None
            except EntryNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "no such file in the repository") from None
            except HfHubHTTPError as e:
                if http_status(e) in (401, 403):
                    raise PermissionError(described(e, self.ENDPOINT)) from None
                raise

        return super()._call(name, translated)


class _HubFile(io.RawIOBase):
    """A file of a `HubStore`, read in ranged GETs (for `io.BufferedReader`)."""

    def __init__(self, store: HubStore, name: str, size: int):
        super().__init__()
        self.store, self.name, self.size, self.position = store, name, size, 0
        self._path = store.path(name)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self.size - self.position)
        if wanted <= 0:
            return 0
        first = self.position
        data = self.store._call(self.name, lambda: self.store._fetch(self._path, first, first + wanted - 1))
        if not data:
            raise MoekdError(f"{self.store.url(self.name)} is shorter than the {self.size} bytes the Hub listed: "
                             "it changed while it was read")
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)
