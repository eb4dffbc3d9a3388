"""Commit and claim records: how a shard is committed, and whether moekd trusts the record that says so.

The commit protocol needs no rename and no lock, so it holds on object
stores and on file systems that ignore `flock` alike. A writer puts the shard
object whole, under a name holding its sha256 (two writers of one shard never
overwrite each other), then creates its commit record
`commits/shard-NNNNN.json` only if absent (a conditional put):

    {"cache": sha256 of the identity, "index", "file", "rows", "tokens", "bytes", "sha256"}

The first record wins; a later writer of the same shard deletes its own object
(unless it holds the same bytes), and the winner deletes objects that killed
writers of that shard left. Before computing a shard a writer creates
`claims/shard-NNNNN.json` the same way, so concurrent writers mostly take
different shards; a claim is only a hint (a killed writer's is taken over). The committed shards are exactly the commit
records moekd trusts, gathered on read; a shard object without one is not part of the
cache. `tokens` counts stored positions (sum of T). Caches of versions 1 and 2
(one manifest listing every shard, `shards/shard-NNNNN.parquet`) are read,
not resumed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from pipeline.cache.shards import SHARD_FILE, SHARDS, ShardInfo
from pipeline.cache.storage import Store
from pipeline.core.errors import MoekdError
from pipeline.core.files import parse_json

COMMITS = "commits"
CLAIMS = "claims"
CARD = "README.md"  # the cache's card (`cache.card`): derived from the rest, no part of what is committed
COMMIT_FILE = re.compile(rf"{COMMITS}/shard-(\d{{5,}})\.json")
CLAIM_FILE = re.compile(rf"{CLAIMS}/shard-(\d{{5,}})\.json")
SHARD_FIELDS = {"index": int, "file": str, "rows": int, "tokens": int, "bytes": int, "sha256": str}


class Untrusted(NamedTuple):
    """A commit record moekd does not trust, and why: malformed, another identity's, at odds with the identity's
    layout, or (`record` kept) naming a shard file found damaged. Readers refuse it; `moekd cache` replaces it."""

    reason: str
    record: ShardInfo | None = None


def commit_name(index: int) -> str:
    return f"{COMMITS}/shard-{index:05d}.json"


def claim_name(index: int) -> str:
    return f"{CLAIMS}/shard-{index:05d}.json"


def commit_index(name: str) -> int | None:
    match = COMMIT_FILE.fullmatch(name)
    return int(match[1]) if match else None


def layout_problem(info: ShardInfo, layout: list[int] | None) -> str | None:
    """How a well-formed record disagrees with the identity's layout (`Manifest.layout`), or None."""
    if layout is None:
        return None
    if info.index >= len(layout):
        return f"describes shard {info.index}, but the identity announces {len(layout)} shards"
    if info.rows != layout[info.index]:
        return f"says shard {info.index} has {info.rows} rows, but the identity's rows and shard_size give it " \
               f"{layout[info.index]}"
    if info.tokens and not info.rows:
        return f"says shard {info.index} has {info.tokens} positions in no rows"
    return None


def ranges(indices: list[int]) -> str:
    """Sorted shard indices as runs: "0, 3-5, 9"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def shard_problem(shard, where: str) -> str | None:
    """What is wrong with one shard entry (of a manifest's list, or a commit record), or None."""
    if not isinstance(shard, dict) or set(shard) != set(SHARD_FIELDS):
        return f"{where} must be an object with exactly {', '.join(SHARD_FIELDS)}"
    for key, kind in SHARD_FIELDS.items():
        if type(shard[key]) is not kind or (kind is int and shard[key] < 0):
            return f"{where}.{key} must be a {'non-negative integer' if kind is int else 'string'}"
    if not re.fullmatch(r"[0-9a-f]{64}", shard["sha256"]):
        return f"{where}.sha256 is not a sha256 hex digest"
    match = SHARD_FILE.fullmatch(shard["file"])
    if not match or int(match[1]) != shard["index"] or match[2] not in (None, shard["sha256"][:16]):
        return (f"{where}.file is {shard['file']!r}, not {SHARDS}/shard-{shard['index']:05d}-"
                f"{shard['sha256'][:16]}.parquet (a shard's file is named by its index and content, inside the "
                "cache)")
    return None


def read_record(name: str, raw: bytes, where: str, cache: str) -> ShardInfo | str:
    """The shard the commit record `name` (at `where`, holding `raw`) describes, or why moekd does not trust
    it: it must be well formed, name its own shard and carry `cache`, the hash of the cache's identity."""
    try:
        record = parse_json(raw, f"commit record {where}")
    except MoekdError as e:
        return str(e)
    if not isinstance(record, dict) or record.get("cache") != cache:
        return (f"commit record {where} does not belong to this cache (its \"cache\" is not the hash of the "
                "manifest's identity): the cache was replaced while being written, or tampered with")
    record = {key: value for key, value in record.items() if key != "cache"}
    problem = shard_problem(record, "record")
    if problem is None and commit_index(name) != record["index"]:
        problem = f"it is named for shard {commit_index(name)} but describes shard {record['index']}"
    if problem:
        return f"commit record {where} is malformed: {problem}"
    return ShardInfo(**record)


def remove_cache(store: Store, manifest: str) -> None:
    """Delete the card, the commit records, the shards and, last, the manifest (links among them are removed,
    never followed), so an interrupted removal never leaves a manifest over shards of another identity."""
    store.delete(CARD)
    for name in store.list(COMMITS) + store.list(CLAIMS):
        store.delete(name)
    for name in store.list(SHARDS):
        if SHARD_FILE.fullmatch(name):
            store.delete(name)
    store.delete(manifest)
