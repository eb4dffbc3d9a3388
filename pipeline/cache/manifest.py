"""A cache's manifest and commit records: what it was built from, which shards count, resume and repair.

`manifest.json` (sorted keys, no timestamps), created once by the first
writer and never changed:

    {"format": "moekd-teacher-cache", "version": 3,
     "identity": {...everything the shards depend on, including "encoding"...},
     "info": {...informative only: paths, host...}}

The commit protocol and its records are `records`'s; the identity is a
`identity.CacheIdentity`, and whether an existing cache is this one, another
(refused, or replaced with overwrite) or none is `core.outputs.judge`'s
(`Manifest.verdict`).

A cache is complete when every shard its identity announces (`rows` in
shards of `shard_size`) has a record moekd trusts: well formed, of this
identity (its hash), naming its own file, with the rows the layout gives it.
`Manifest.problems` / `Manifest.require` is the one place that says so, and
every consumer asks it through `Manifest.load`. `moekd cache` resumes
trusting no more than a reader: a shard whose record is not trusted, or whose
file is missing or not the record's size (with `verify`, fails any check of
`verify_cache`), is computed again and its record replaced (`Manifest.commit`
says why a plain put is safe there, with concurrent writers and on S3).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cache.checks import _shard_problems
from pipeline.cache.identity import CacheIdentity
from pipeline.cache.records import (
    CLAIM_FILE, CLAIMS, COMMIT_FILE, COMMITS, Untrusted, claim_name, commit_index, commit_name, layout_problem, ranges,
    read_record, remove_cache, shard_problem,
)
from pipeline.cache.shards import SHARDS, ShardInfo, TeacherRecord, _unreadable, read_shard, read_shard_index
from pipeline.cache.storage import Store, open_store
from pipeline.core.errors import MoekdError
from pipeline.core.files import MAX_JSON_BYTES, json_bytes, parse_json, writer_tag
from pipeline.core.outputs import Output, Verdict, as_json, judge

FORMAT_NAME = "moekd-teacher-cache"
FORMAT_VERSION = 3  # of the manifest and commit records; caches of versions 1-2 (one manifest listing every
READABLE_VERSIONS = (1, 2, 3)  # shard, written under locks) are read as well
COMMIT_RECORDS_VERSION = 3
MANIFEST = "manifest.json"
MANIFEST_BYTES = MAX_JSON_BYTES  # a version 1-2 manifest lists every shard
RECORD_BYTES = 64 << 10  # a commit record is a few hundred bytes
REPAIR = "`moekd cache` with the cache's settings and verify=true computes the shards at fault again"


@dataclass
class Manifest:
    """What the cache was built from, and its committed shards (gathered from their commit records).

    `shards` holds the records moekd trusts; `untrusted` the others, by shard index. Whether the cache is
    whole (every shard the identity announces has a trusted record) is `problems` / `require`: every consumer
    asks them, through `load`.
    """

    store: Store
    identity: CacheIdentity
    info: dict
    _: KW_ONLY
    shards: dict[int, ShardInfo]
    version: int = FORMAT_VERSION
    untrusted: dict[int, Untrusted] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return str(self.store)

    @classmethod
    def open(cls, location: str | Path | Store, identity: CacheIdentity, info: dict, overwrite: bool,
             verify: bool = False) -> "Manifest":
        """Resume the cache at `location`, or start one.

        `identity` is everything the shards depend on. The cache's lifecycle
        is `core.outputs.judge`'s (`verdict`): an existing cache with another
        identity is refused, naming the fields that differ, unless `overwrite`,
        which deletes its shards, commit records and manifest. A cache with the
        same identity (its teacher compared by content) is always resumed, so
        workers started together can all call this with overwrite set. `info`
        is informative: the first writer's is kept (the manifest is created
        once, with a conditional put).

        Resuming trusts no more than a reader would: a record that is not
        trusted, or whose shard file is missing or not the size it says (with
        `verify`: fails any of `moekd verify`'s checks), leaves its shard out of
        `committed()`, to be computed again and its record replaced (`commit`);
        records of shards the identity does not announce are deleted.
        """
        store = open_store(location)
        info = as_json(info)
        if overwrite and not store.remote and (Path(store.root) / SHARDS).is_symlink():
            os.unlink(Path(store.root) / SHARDS)  # the link itself goes; what it points to is left alone
        for folder in (SHARDS, COMMITS, CLAIMS):
            store.check_folder(folder)
        existing = cls._existing(store, overwrite)
        verdict = cls._judge_existing(store, existing, identity, overwrite)
        if verdict is Verdict.SAME:
            if existing.version < COMMIT_RECORDS_VERSION:
                raise MoekdError(f"{store} was written by an earlier moekd (cache format version "
                                 f"{existing.version}, one manifest listing every shard); it can be read but not "
                                 "resumed. Finish it with that version, or set overwrite=true to rebuild it.")
            existing._distrust_damaged_files(verify)
            for index, untrusted in existing.untrusted.items():
                print(f"cache: shard {index} is computed again: {untrusted.reason}", flush=True)
            return existing
        if overwrite:
            remove_cache(store, MANIFEST)
        manifest = cls(store, identity, info, shards={})
        if not store.create(MANIFEST, json_bytes({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                                   "identity": identity.json, "info": info})):
            return cls.open(store, identity, info, overwrite=False, verify=verify)  # another writer started it
        return manifest

    @classmethod
    def verdict(cls, location: str | Path | Store, identity: CacheIdentity, overwrite: bool) -> Verdict:
        """What `open` will do at `location`, read-only: make a cache (`NEW`: none there, or one that cannot be
        read), resume this one (`SAME`) or replace another (`REPLACE`, with `overwrite`); another cache without
        `overwrite` is refused here as there."""
        store = open_store(location)
        try:
            existing = cls._existing(store, overwrite=False)
        except MoekdError:  # unreadable: replaced with overwrite, refused by `open` without
            return Verdict.NEW
        return cls._judge_existing(store, existing, identity, overwrite)

    @classmethod
    def _existing(cls, store: Store, overwrite: bool) -> "Manifest | None":
        """The cache at `store` (None: none, or, with `overwrite`, one whose manifest cannot be read)."""
        try:
            return cls.load(store, refuse=False) if store.exists(MANIFEST) else None
        except MoekdError:
            if not overwrite:
                raise
            return None

    @staticmethod
    def _judge_existing(store: Store, existing: "Manifest | None", identity: CacheIdentity,
                        overwrite: bool) -> Verdict:
        where = Output(store, holds="holds a teacher cache built with different settings", side="the cache")
        recorded = None if existing is None else existing.identity.comparable()
        return judge(where, recorded, identity.comparable(), overwrite)

    @classmethod
    def load(cls, location: str | Path | Store, with_shards: bool = True, whole: bool = False,
             refuse: bool = True) -> "Manifest":
        """Read the manifest at `location` and (unless not `with_shards`: identity only) gather the commit
        records, each checked field by field and against the identity: a missing or malformed manifest is a
        one-line error. A shard's file must be `shards/shard-NNNNN[-<sha256 prefix>].parquet` for its own index,
        so no entry can point elsewhere.

        A cache holding a record moekd does not trust is refused in one line (`require`), and with `whole` (what
        reads the whole cache: `eval`'s KL, training) one with shards missing too; not `refuse` refuses neither
        (`moekd verify` and the writer list or repair what is wrong)."""
        store = open_store(location)
        where = store.url(MANIFEST)
        try:
            raw = store.read(MANIFEST, MANIFEST_BYTES)
        except FileNotFoundError:
            raise MoekdError(f"teacher-cache manifest not found: {where}") from None
        data = parse_json(raw, f"teacher-cache manifest {where}")
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise MoekdError(f"{where} is not a moekd teacher-cache manifest (format must be {FORMAT_NAME!r})")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise MoekdError(f"{where} has cache format version {version!r}; this moekd reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}. Rebuild the cache (overwrite=true).")
        problem = _manifest_problem(data, listed=version < COMMIT_RECORDS_VERSION)
        if problem:
            raise MoekdError(f"{where} is malformed: {problem}")
        manifest = cls(store, CacheIdentity(data["identity"]), data["info"], shards={}, version=version)
        if version < COMMIT_RECORDS_VERSION:
            for i, shard in enumerate(data["shards"]):
                manifest._take(shard["index"], ShardInfo(**shard), f"{where}'s shards[{i}]")
        elif with_shards:
            manifest.gather()
        if with_shards and refuse:
            manifest.require(whole)
        return manifest

    @functools.cached_property
    def layout(self) -> list[int] | None:
        """Rows of each shard the identity announces, by index (`CacheIdentity.layout`; None: it does not say)."""
        return self.identity.layout

    def gather(self) -> None:
        """Add the shards committed since this manifest last looked (other processes may be writing), and note
        the records it does not trust (`untrusted`); one whose file was found damaged stays so until replaced."""
        if self.version < COMMIT_RECORDS_VERSION:
            return
        names = [n for n in self.store.list(COMMITS) if COMMIT_FILE.fullmatch(n)]
        for index in set(self.untrusted) - {commit_index(n) for n in names}:  # removed since
            del self.untrusted[index]
        new = [n for n in names if commit_index(n) not in self.shards]
        with ThreadPoolExecutor(16 if self.store.remote else 1) as pool:  # a remote read is a round trip
            for name, fetched in zip(new, pool.map(self._fetch, new)):
                if fetched is not None:
                    judged = fetched if isinstance(fetched, str) else self._read_record(name, fetched)
                    self._take(commit_index(name), judged, f"commit record {self.store.url(name)}")
        self.shards = dict(sorted(self.shards.items()))

    def _fetch(self, name: str) -> bytes | str | None:
        """A commit record's bytes; why it cannot be read (a FIFO, a link, too large) as a string; None if it is
        gone since it was listed."""
        try:
            return self.store.read(name, RECORD_BYTES)
        except FileNotFoundError:
            return None
        except MoekdError as e:
            return f"commit record {e}"

    def _read_record(self, name: str, raw: bytes) -> ShardInfo | str:
        """The shard a commit record describes, or why moekd does not trust the record (`records.read_record`)."""
        return read_record(name, raw, self.store.url(name), self.identity.hash)

    def _take(self, index: int, judged: ShardInfo | str, where: str) -> None:
        """File shard `index`'s judged record (described as `where`) as trusted or not: a well-formed record
        must also agree with the identity's layout, and one whose file was found damaged stays untrusted."""
        if isinstance(judged, ShardInfo):
            earlier = self.untrusted.get(index)
            if earlier is not None and earlier.record == judged:
                return
            problem = layout_problem(judged, self.layout)
            if problem is None:
                self.shards[index] = judged
                self.untrusted.pop(index, None)
                return
            judged = f"{where} {problem}"
        self.shards.pop(index, None)
        self.untrusted[index] = Untrusted(judged)

    def committed(self) -> set[int]:
        """The shards whose records moekd trusts."""
        return set(self.shards)

    def missing(self) -> list[int]:
        """The shards the identity announces that have no commit record at all (see `untrusted` for the rest)."""
        announced = range(len(self.layout)) if self.layout is not None else ()
        return [index for index in announced if index not in self.shards and index not in self.untrusted]

    def problems(self, whole: bool = True) -> list[str]:
        """Why this cache is not whole, one line each ([] if it is): every record moekd does not trust, then
        (with `whole`; not for a cache still being written) the shards the identity announces that have no
        commit record. The one place that says whether a cache is complete."""
        lines = [self.untrusted[index].reason for index in sorted(self.untrusted)]
        missing = self.missing()
        if missing and whole:
            lines.append(f"{len(missing)} of the {len(self.layout)} shards the identity announces have no commit "
                         f"record: {ranges(missing)}")
        return lines

    def require(self, whole: bool = True,
                remedy: str = "finish it with `moekd cache` (the same command resumes it)") -> "Manifest":
        """This manifest if every record it holds is trusted and (with `whole`) no shard is missing, else a
        one-line error naming the first untrusted record, or how many shards are missing and `remedy`."""
        if self.untrusted:
            first = self.untrusted[min(self.untrusted)].reason
            more = f" (and {len(self.untrusted) - 1} more records not trusted)" if len(self.untrusted) > 1 else ""
            raise MoekdError(f"teacher cache {self.location}: {first}{more}. `moekd verify {self.location}` lists "
                             f"the damage; {REPAIR}")
        missing = self.missing()
        if missing and whole:
            raise MoekdError(f"teacher cache {self.location} is incomplete: {len(self.shards)} of {len(self.layout)} "
                             f"shards committed; {len(missing)} missing ({ranges(missing)}): {remedy}")
        return self

    def _distrust_damaged_files(self, verify: bool) -> None:
        """The writer's check on resume: distrust each record whose shard file is missing, not a regular file or
        not the size it says (from one listing), or, with `verify`, fails any of `moekd verify`'s checks; delete
        records of shards the identity does not announce (no writer of this cache made them)."""
        for index in [i for i in self.untrusted if self.layout is not None and i >= len(self.layout)]:
            self.store.delete(commit_name(index))
            del self.untrusted[index]
        sizes = self.store.sizes(SHARDS)
        for index, info in list(self.shards.items()):
            size = sizes.get(info.file)
            if info.file not in sizes:
                problem = f"its file {info.file} is missing"
            elif size is None:
                problem = f"its file {info.file} is not a regular file"
            elif size != info.bytes:
                problem = f"its file {info.file} is {size} bytes, not the {info.bytes} its commit record says"
            else:
                problem = "; ".join(_shard_problems(self.store, info, self.identity.encoding.spec)) if verify else ""
            if problem:
                del self.shards[index]
                self.untrusted[index] = Untrusted(problem, info)

    def claim(self, index: int) -> bool:
        """Announce that this process computes shard `index`, unless another did (a conditional put). A claim is a
        hint that spares concurrent writers duplicate work; only commit records count, so a claim a killed
        writer left is simply taken over (`moekd cache` computes claimed shards last)."""
        return self.store.create(claim_name(index), json_bytes({"writer": writer_tag()}))

    def commit(self, info: ShardInfo) -> bool:
        """Commit a written shard; returns whether the record now in place is this call's.

        The record is created only if absent (a conditional put): the first writer wins, and the loser's shard
        object is deleted unless it is the winner's (same bytes, same name); the winner deletes what killed
        writers of the shard left. A record there that moekd does not trust (`untrusted`, or not trusted now:
        malformed, another identity's, at odds with the layout, or naming a missing or wrong-sized file) is
        replaced by a plain put instead. Writers repairing one shard at once may each put theirs: the last put
        stays, and each names an object its writer put whole before it, so whichever stays is whole. A repairing
        writer therefore deletes no objects: the damaged one is overwritten when the shard's bytes come out the
        same (the same name), else left behind, unnamed by any record, like a killed writer's."""
        current = parse_json(self.store.read(MANIFEST, MANIFEST_BYTES), "teacher-cache manifest")
        if not isinstance(current, dict) or current.get("identity") != self.identity.json:
            raise MoekdError(f"{self.store.url(MANIFEST)} was replaced by a run with different settings while "
                             f"this one was writing shard {info.index}")
        name = commit_name(info.index)
        record = json_bytes({"cache": self.identity.hash, **dataclasses.asdict(info)})
        repairing = info.index in self.untrusted
        won = self.store.create(name, record)
        self.store.delete(claim_name(info.index))  # a writer killed just before this leaves it: drop_stale_claims
        if won and not repairing:
            for other in self.store.list(SHARDS):
                if other.startswith(f"{SHARDS}/shard-{info.index:05d}-") and other.endswith(".parquet") \
                        and other != info.file:
                    self.store.delete(other)
        if not won:
            there = self._record_now(name)
            if isinstance(there, ShardInfo) and not (repairing and there == info):
                if there.file != info.file and not repairing:
                    self.store.delete(info.file)
                self.shards[info.index] = there
                self.untrusted.pop(info.index, None)
                return False
            if (there.record if isinstance(there, Untrusted) else there) != info:  # else: its file was rewritten
                self.store.put(name, record)
        self.shards[info.index] = info
        self.untrusted.pop(info.index, None)
        return True

    def _record_now(self, name: str) -> ShardInfo | Untrusted:
        """The commit record at `name` as it is now, trusted (well formed, of this identity and layout, naming
        a file of its size that this manifest has not found damaged) or not."""
        fetched = self._fetch(name)
        if fetched is None:
            return Untrusted(f"commit record {self.store.url(name)} is gone")
        judged = fetched if isinstance(fetched, str) else self._read_record(name, fetched)
        if isinstance(judged, str):
            return Untrusted(judged)
        earlier = self.untrusted.get(judged.index)
        problem = layout_problem(judged, self.layout)
        if problem or (earlier is not None and earlier.record == judged):
            return Untrusted(problem or earlier.reason, judged)
        try:
            size = self.store.size(judged.file)
        except (FileNotFoundError, MoekdError):
            size = None
        return judged if size == judged.bytes else Untrusted(f"its file {judged.file} is damaged", judged)

    def drop_stale_claims(self) -> None:
        """Delete the claims of committed shards (a writer killed between its commit and deleting its claim
        leaves one)."""
        self.gather()
        for name in self.store.list(CLAIMS):
            match = CLAIM_FILE.fullmatch(name)
            if match and int(match[1]) in self.shards:
                self.store.delete(name)

    def shard_bytes(self, index: int) -> bytes:
        """Shard `index` as committed, refused unless its size and sha256 are the commit record's (it may have
        changed since it was committed). Local files are read without following links below the cache."""
        info = self.shards[index]
        try:
            data = self.store.read(info.file, info.bytes)
        except FileNotFoundError:
            raise MoekdError(f"teacher-cache shard {self.store.url(info.file)} is missing; `moekd verify "
                             f"{self.store}` lists the damage") from None
        if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            raise MoekdError(f"teacher-cache shard {self.store.url(info.file)} does not match its commit record "
                             f"(size or sha256): it changed after it was committed. `moekd verify {self.store}` "
                             f"lists the damage; {REPAIR}")
        return data

    def read_shard(self, index: int, rows: list[int] | None = None) -> list[TeacherRecord]:
        """The records of shard `index` (or of its `rows`), from bytes checked against the commit record."""
        try:
            records = read_shard(pa.BufferReader(self.shard_bytes(index)), rows)
        except IndexError as e:  # rows the record promised but the shard lacks
            raise _unreadable(self.store.url(self.shards[index].file), e) from None
        if rows is None:
            self._check_counts(index, len(records), sum(len(r.positions) for r in records))
        return records

    def read_shard_index(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(seq_ids, T) of shard `index` from its small columns (only they are fetched from a remote store), its
        size checked (the whole file is hashed when `read_shard` reads it)."""
        info = self.shards[index]
        if self.store.size(info.file) != info.bytes:
            raise MoekdError(f"teacher-cache shard {self.store.url(info.file)} is not the size its commit record "
                             f"says ({info.bytes} bytes); run `moekd verify {self.store}`")
        with self.store.open(info.file) as f:
            seq_ids, counts = read_shard_index(f)
        self._check_counts(index, len(seq_ids), int(counts.sum()))
        return seq_ids, counts

    def _check_counts(self, index: int, rows: int, tokens: int) -> None:
        """Refuse a shard whose rows or stored positions are not its commit record's."""
        info = self.shards[index]
        if (rows, tokens) != (info.rows, info.tokens):
            raise MoekdError(f"teacher-cache shard {self.store.url(info.file)} holds {rows} rows and {tokens} "
                             f"positions but its commit record says {info.rows} and {info.tokens}; run "
                             f"`moekd verify {self.store}`")

    def reload(self) -> "Manifest":
        """The cache as it is now (other processes may have committed since)."""
        return Manifest.load(self.store)


def _manifest_problem(data: dict, listed: bool) -> str | None:
    """What is wrong with a parsed manifest (format and version checked), or None. `listed`: a version 1-2
    manifest, which lists its shards."""
    for key, kind in (("identity", dict), ("info", dict)) + ((("shards", list),) if listed else ()):
        if not isinstance(data.get(key), kind):
            return f"{key} must be a JSON {'object' if kind is dict else 'list'}"
    problem = CacheIdentity.problem(data["identity"])
    if problem:
        return problem
    seen = set()
    for i, shard in enumerate(data["shards"] if listed else ()):
        problem = shard_problem(shard, f"shards[{i}]")
        if problem is None and shard["index"] in seen:
            problem = f"shards[{i}] repeats shard index {shard['index']}"
        if problem:
            return problem
        seen.add(shard["index"])
    return None


def verify_cache(location: str | Path | Store, whole: bool = True) -> list[str]:
    """Everything that keeps the cache from being whole and sound, one line per problem ([] if it is): the
    records moekd does not trust and (with `whole`; not for a cache still being written) the shards without
    one (`Manifest.problems`), then every committed shard checked against its commit record (size, sha256,
    schema, rows, positions, values)."""
    manifest = Manifest.load(location, refuse=False)
    spec = manifest.identity.encoding.spec
    problems = manifest.problems(whole)
    for index in sorted(manifest.shards):
        info = manifest.shards[index]
        problems += [f"shard {index} ({info.file}): {p}" for p in _shard_problems(manifest.store, info, spec)]
    return problems

