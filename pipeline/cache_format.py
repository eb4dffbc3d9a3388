"""The teacher-logit cache: Parquet shards, the manifest, commit records, and verification.

A cache (a local directory or an object-store prefix, `pipeline.storage`)
holds `manifest.json`, `shards/shard-NNNNN-<sha256[:16]>.parquet` and
`commits/shard-NNNNN.json`. Each shard row is one prepared sequence; its teacher distributions are the top-`k`
entries of `M` samples at the `T` positions whose next token is a training
target.

Physical schema of a shard (Parquet, zstd level 3, no dictionaries, no
statistics; one row per sequence, rows in `seq_id` order):

    column          type            values per row  encoding
    seq_id          int64           1               PLAIN
    input_ids       list<int32>     L               PLAIN
    positions       list<int32>     T               DELTA_BINARY_PACKED
    topk_ids        list<int32>     M * T * k       BYTE_STREAM_SPLIT
    topk_logprobs   list<float32>   M * T * k       BYTE_STREAM_SPLIT
    agg_ids         list<int32>     T * k           BYTE_STREAM_SPLIT  (only if aggregate)
    agg_logprobs    list<float32>   T * k           BYTE_STREAM_SPLIT  (only if aggregate)

- `positions[t]` is an index into `input_ids`; the distribution stored for it
  predicts `input_ids[positions[t] + 1]`.
- The flat lists are in (sample, position, rank) order: reshape them to
  `(M, T, k)` (the aggregate to `(T, k)`).
- Within each (sample, position) the `k` entries are sorted by token id,
  ascending, and `topk_ids` holds them delta-coded: the first id, then the
  differences to the previous id. Decode with a cumulative sum over the last
  axis: `ids = np.cumsum(flat.reshape(M, T, k), axis=-1)`. (Sorted ids as
  deltas compress to about half the size of raw ids.)
- `topk_logprobs` are log-probabilities normalised over the full vocabulary,
  aligned with the decoded ids; the tail mass outside the top-k is
  `1 - exp(logprobs).sum(-1)`. They are float16 values stored as float32
  (float16 precision, but every Parquet reader reads float32): the relative
  error against the teacher's exact value is at most 2**-11 (absolute at most
  2**-25 for |logprob| < 2**-14), so the tail mass is off by at most
  2**-11 * (entropy of the top-k part), below 2e-3 at k = 64.
- `M`, `k` and the vocabulary size are in the Parquet key-value metadata under
  `moekd` (JSON, the `encoding_spec`); the manifest repeats it in
  `identity.encoding`.

Reading one row with nothing but pyarrow and numpy:

    record = json.load(open("commits/shard-00000.json"))  # shard 0 as committed
    table = pyarrow.parquet.read_table(record["file"])
    spec = json.loads(table.schema.metadata[b"moekd"])
    M, k = spec["num_samples"], spec["k"]
    T = len(table["positions"][0])
    ids = np.cumsum(np.asarray(table["topk_ids"][0].values).reshape(M, T, k), axis=-1)
    logprobs = np.asarray(table["topk_logprobs"][0].values).reshape(M, T, k)

A `sampled` cache (encoding `storage: sampled`, shard format 2) stores, per
position, `draws` tokens drawn with replacement from the teacher's
distribution over the full vocabulary (with M > 1 routing samples: from their
mixture, a sample then a token), as the distinct ids drawn and their counts:

    column          type            values per row  encoding
    seq_id, input_ids, positions    as above
    sample_sizes    list<int32>     T               DELTA_BINARY_PACKED  distinct ids per position
    sample_ids      list<int32>     sum(sizes)      BYTE_STREAM_SPLIT    ascending per position, delta-coded
    sample_counts   list<int32>     sum(sizes)      DELTA_BINARY_PACKED  draws of each id; they sum to `draws`

The counts divided by `draws` are an unbiased estimate of the teacher's
distribution (of the mean of the M samples' distributions).

`manifest.json` (sorted keys, no timestamps), created once by the first
writer and never changed:

    {"format": "moekd-teacher-cache", "version": 3,
     "identity": {...everything the shards depend on, including "encoding"...},
     "info": {...informative only: paths, host...}}

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
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import MoekdError
from pipeline.config import config_hash
from pipeline.files import MAX_JSON_BYTES, json_bytes, parse_json, writer_tag
from pipeline.storage import Store, open_store

FORMAT_NAME = "moekd-teacher-cache"
FORMAT_VERSION = 3  # of the manifest and commit records; caches of versions 1-2 (one manifest listing every
READABLE_VERSIONS = (1, 2, 3)  # shard, written under locks) are read as well
COMMIT_RECORDS_VERSION = 3
TOPK_FORMAT, SAMPLED_FORMAT = 1, 2  # of a shard's layout, by storage
MANIFEST = "manifest.json"
SHARDS = "shards"
COMMITS = "commits"
CLAIMS = "claims"
MANIFEST_BYTES = MAX_JSON_BYTES  # a version 1-2 manifest lists every shard
RECORD_BYTES = 64 << 10  # a commit record is a few hundred bytes
REPAIR = "`moekd cache` with the cache's settings and verify=true computes the shards at fault again"
ZSTD_LEVEL = 3  # on real top-64 shards level 9 saves ~2% at 3-5x the write time, 19 saves 4-8% at 30-40x
ROW_GROUP_ROWS = 64  # rows read together by `read_shard(rows=...)`
METADATA_KEY = b"moekd"
COLUMN_ENCODINGS = {
    "seq_id": "PLAIN",
    "input_ids": "PLAIN",
    "positions": "DELTA_BINARY_PACKED",
    "topk_ids": "BYTE_STREAM_SPLIT",
    "topk_logprobs": "BYTE_STREAM_SPLIT",
    "agg_ids": "BYTE_STREAM_SPLIT",
    "agg_logprobs": "BYTE_STREAM_SPLIT",
    "sample_sizes": "DELTA_BINARY_PACKED",
    "sample_ids": "BYTE_STREAM_SPLIT",
    "sample_counts": "DELTA_BINARY_PACKED",
}
LIST_COLUMNS = {
    "input_ids": pa.int32(),
    "positions": pa.int32(),
    "topk_ids": pa.int32(),
    "topk_logprobs": pa.float32(),
    "agg_ids": pa.int32(),
    "agg_logprobs": pa.float32(),
    "sample_sizes": pa.int32(),
    "sample_ids": pa.int32(),
    "sample_counts": pa.int32(),
}


@dataclass
class TeacherRecord:
    """One sequence's teacher distributions.

    Ids in a record read back from a shard are ascending within each
    (sample, position); the order the writer gave is not kept.
    """

    seq_id: int
    input_ids: np.ndarray  # int32 (L,)
    positions: np.ndarray  # int32 (T,): distributions at t predict input_ids[t + 1]
    topk_ids: np.ndarray | None = None  # int64 (M, T, k)
    topk_logprobs: np.ndarray | None = None  # float32 (M, T, k), normalised over the full vocabulary
    agg_ids: np.ndarray | None = None  # (T, k): top-k of log mean_m p^(m)
    agg_logprobs: np.ndarray | None = None
    # a sampled cache's: per position t, sample_sizes[t] distinct ids (ascending) and how often each was drawn
    sample_sizes: np.ndarray | None = None  # int64 (T,)
    sample_ids: np.ndarray | None = None  # int64 (sum(sizes),)
    sample_counts: np.ndarray | None = None  # int64 (sum(sizes),), summing to `draws` per position


@dataclass
class ShardInfo:
    """A committed shard as the manifest lists it."""

    index: int
    file: str  # relative to the cache directory
    rows: int
    tokens: int  # stored positions, summed over rows
    bytes: int
    sha256: str


def encoding_spec(*, vocab_size: int, num_samples: int, k: int | None = None, with_aggregate: bool = False,
                  draws: int | None = None) -> dict:
    """The shard encoding, for the manifest identity and each shard's metadata: top-k (`k`) or sampled
    (`draws` per position, then `k` and `with_aggregate` do not apply).

    Any change here changes the identity, so an old cache is never resumed
    with a different encoding.
    """
    if draws is not None:
        return {
            "format_version": SAMPLED_FORMAT,
            "storage": "sampled",
            "vocab_size": vocab_size,
            "num_samples": num_samples,
            "draws": draws,
            "ids": "int32 distinct and ascending per position, delta-coded: first id, then differences",
            "counts": "int32 draws of each id, summing to `draws` per position",
            "compression": f"zstd level {ZSTD_LEVEL}",
            "encodings": {name: COLUMN_ENCODINGS[name] for name in _column_names({"storage": "sampled"})},
        }
    return {
        "format_version": TOPK_FORMAT,
        "vocab_size": vocab_size,
        "k": k,
        "num_samples": num_samples,
        "aggregate": with_aggregate,
        "order": "sample, position, rank",
        "ids": "int32 ascending per (sample, position), delta-coded: first id, then differences",
        "logprobs": "float16 values stored as float32, aligned with the ids",
        "compression": f"zstd level {ZSTD_LEVEL}",
        "encodings": {name: COLUMN_ENCODINGS[name] for name in _column_names({"aggregate": with_aggregate})},
    }


def shard_name(index: int, sha256: str) -> str:
    """Where shard `index` with these contents lives: named by its index and the start of its sha256, so two
    writers of one shard never overwrite each other's object."""
    return f"{SHARDS}/shard-{index:05d}-{sha256[:16]}.parquet"


# ---------------------------------------------------------------- writing


def encode_shard(records: list[TeacherRecord], **encoding) -> bytes:
    """The Parquet bytes of a shard of `records` (`encoding`: `encoding_spec`'s arguments); the same records
    give the same bytes."""
    spec = encoding_spec(**encoding)
    for record in records:
        _check_record(record, spec)
    if any(a.seq_id >= b.seq_id for a, b in zip(records, records[1:])):
        raise ValueError("a shard's records must be in ascending seq_id order")
    sink = pa.BufferOutputStream()
    write_parquet(_encode(records, spec), sink)
    return sink.getvalue().to_pybytes()


def write_shard(location: str | Path | Store, index: int, records: list[TeacherRecord], **encoding) -> ShardInfo:
    """Write shard `index` of `records` as an immutable object; it counts once `Manifest.commit` commits it."""
    data = encode_shard(records, **encoding)
    sha256 = hashlib.sha256(data).hexdigest()
    info = ShardInfo(index=index, file=shard_name(index, sha256), rows=len(records),
                     tokens=sum(len(r.positions) for r in records), bytes=len(data), sha256=sha256)
    open_store(location).put(info.file, data)  # an object of this name can only hold these bytes
    return info


def write_parquet(table: pa.Table, where, encodings: dict[str, str] = COLUMN_ENCODINGS) -> None:
    """Write `table` (to a path or file object) with a shard's Parquet settings; `encodings` maps each
    column to its Parquet encoding."""
    # Parquet names a list's values `<column>.list.element`.
    encoding = {name if pa.types.is_primitive(table.schema.field(name).type) else f"{name}.list.element":
                encodings[name] for name in table.column_names}
    pq.write_table(table, where, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                   write_statistics=False, row_group_size=ROW_GROUP_ROWS, column_encoding=encoding)


def _check_record(record: TeacherRecord, spec: dict) -> None:
    """Shape and range checks; a failure is a bug in the caller, not a user mistake."""
    T = len(record.positions)
    if T and (record.positions.min() < 0 or record.positions.max() >= len(record.input_ids) - 1):
        raise ValueError(f"seq {record.seq_id}: positions must index input_ids[:-1]")
    if sampled(spec):
        sizes, ids, counts = record.sample_sizes, record.sample_ids, record.sample_counts
        if sizes is None or len(sizes) != T or len(ids) != len(counts) or len(ids) != sizes.sum():
            raise ValueError(f"seq {record.seq_id}: sample_sizes must give the ids of each of {T} positions")
        if len(ids) and (ids.min() < 0 or ids.max() >= spec["vocab_size"] or counts.min() < 1):
            raise ValueError(f"seq {record.seq_id}: sample ids outside [0, {spec['vocab_size']}) or counts < 1")
        ends = np.cumsum(sizes)
        if not np.array_equal(np.add.reduceat(counts, ends - sizes) if len(ids) else counts, np.full(T, spec["draws"])):
            raise ValueError(f"seq {record.seq_id}: the counts of each position must sum to {spec['draws']}")
        return
    M, k = spec["num_samples"], spec["k"]
    shapes = {"topk_ids": (M, T, k), "topk_logprobs": (M, T, k)}
    if spec["aggregate"]:
        shapes |= {"agg_ids": (T, k), "agg_logprobs": (T, k)}
    elif record.agg_ids is not None or record.agg_logprobs is not None:
        raise ValueError(f"seq {record.seq_id}: aggregate given but the encoding stores none")
    for name, shape in shapes.items():
        value = getattr(record, name)
        if value is None or value.shape != shape:
            raise ValueError(f"seq {record.seq_id}: {name} must have shape {shape}, got "
                             f"{None if value is None else value.shape}")
    for name in ("topk_ids", "agg_ids") if spec["aggregate"] else ("topk_ids",):
        ids = getattr(record, name)
        if ids.size and (ids.min() < 0 or ids.max() >= spec["vocab_size"]):
            raise ValueError(f"seq {record.seq_id}: {name} outside [0, {spec['vocab_size']})")


def sampled(spec: dict) -> bool:
    """Whether an encoding spec is a sampled cache's (a top-k spec has no "storage")."""
    return spec.get("storage") == "sampled"


def _column_names(spec: dict) -> list[str]:
    names = ["seq_id", "input_ids", "positions"]
    if sampled(spec):
        return names + ["sample_sizes", "sample_ids", "sample_counts"]
    names += ["topk_ids", "topk_logprobs"]
    return names + ["agg_ids", "agg_logprobs"] if spec["aggregate"] else names


def _schema(spec: dict) -> pa.Schema:
    fields = [pa.field("seq_id", pa.int64())] + [
        pa.field(name, pa.list_(LIST_COLUMNS[name])) for name in _column_names(spec)[1:]
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(spec, sort_keys=True)})


def _encode(records: list[TeacherRecord], spec: dict) -> pa.Table:
    columns = {
        "seq_id": pa.array([r.seq_id for r in records], pa.int64()),
        "input_ids": _list_array([r.input_ids for r in records], np.int32),
        "positions": _list_array([r.positions for r in records], np.int32),
    }
    if sampled(spec):
        columns["sample_sizes"] = _list_array([r.sample_sizes for r in records], np.int32)
        columns["sample_ids"] = _list_array([_deltas(r.sample_ids, r.sample_sizes) for r in records], np.int32)
        columns["sample_counts"] = _list_array([r.sample_counts for r in records], np.int32)
        return pa.table(columns, schema=_schema(spec))
    k = spec["k"]
    columns["topk_ids"], columns["topk_logprobs"] = _encode_topk(
        [r.topk_ids for r in records], [r.topk_logprobs for r in records], k)
    if spec["aggregate"]:
        columns["agg_ids"], columns["agg_logprobs"] = _encode_topk(
            [r.agg_ids for r in records], [r.agg_logprobs for r in records], k)
    return pa.table(columns, schema=_schema(spec))


def _encode_topk(ids: list[np.ndarray], logprobs: list[np.ndarray], k: int) -> tuple[pa.Array, pa.Array]:
    """Sort each group of k by id, delta-code the ids, round log-probs to float16 precision."""
    flat_ids = np.concatenate([a.reshape(-1, k) for a in ids]) if ids else np.zeros((0, k), np.int64)
    flat_lps = np.concatenate([a.reshape(-1, k) for a in logprobs]) if ids else np.zeros((0, k), np.float32)
    order = np.argsort(flat_ids, axis=-1, kind="stable")
    sorted_ids = np.take_along_axis(flat_ids, order, -1)
    deltas = np.diff(sorted_ids, axis=-1, prepend=0).astype(np.int32)
    lps = np.take_along_axis(flat_lps, order, -1).astype(np.float16).astype(np.float32)
    offsets = _offsets([a.size for a in ids])
    return (pa.ListArray.from_arrays(offsets, deltas.reshape(-1)),
            pa.ListArray.from_arrays(offsets, lps.reshape(-1)))


def _deltas(ids: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Ascending ids per position (`sizes` of them each) as first id, then differences, per position."""
    deltas = np.diff(ids, prepend=0)
    starts = np.cumsum(sizes) - sizes
    deltas[starts[sizes > 0]] = ids[starts[sizes > 0]]
    return deltas


def _undeltas(deltas: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """`_deltas` undone: a cumulative sum restarted at each position."""
    total = np.cumsum(deltas, dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    before = np.repeat(np.concatenate([[0], total])[starts], sizes)  # the sum before each position began
    return total - before


def _list_array(arrays: list[np.ndarray], dtype) -> pa.ListArray:
    values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(_offsets([len(a) for a in arrays]), values)


def _offsets(lengths: list[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


# ---------------------------------------------------------------- reading


def read_shard(path, rows: list[int] | None = None) -> list[TeacherRecord]:
    """Decode a shard file you trust (or the rows at the given row indices, in that order).

    `path` is a local path or any pyarrow source (e.g. a `pa.BufferReader`).
    Readers of a cache someone handed you use `Manifest.read_shard`, which
    first checks the bytes against the manifest.
    """
    source = path
    path = path if isinstance(path, (str, Path)) else "<bytes>"
    try:
        file = pq.ParquetFile(source)
        spec = _file_spec(file, path)
        table = file.read() if rows is None else _read_rows(file, rows, path)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from None
    return _decode(table, spec)


def read_shard_index(path) -> tuple[np.ndarray, np.ndarray]:
    """(seq_ids, number of stored positions T) per row, reading only the small columns (any pyarrow source)."""
    try:
        table = pq.read_table(path, columns=["seq_id", "positions"])
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from None
    lengths = pc.list_value_length(table["positions"]).to_numpy(zero_copy_only=False)
    return table["seq_id"].to_numpy().astype(np.int64), lengths.astype(np.int64)


def _unreadable(path: Path, error: Exception) -> MoekdError:
    return MoekdError(f"cannot read teacher-cache shard {path}: {error} (check the cache with `moekd verify`)")


def _file_spec(file: pq.ParquetFile, path: Path) -> dict:
    metadata = file.schema_arrow.metadata or {}
    if METADATA_KEY not in metadata:
        raise MoekdError(f"{path} is not a moekd teacher-cache shard (no '{METADATA_KEY.decode()}' metadata)")
    spec = parse_json(metadata[METADATA_KEY], f"{path}'s '{METADATA_KEY.decode()}' metadata")
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if version not in (TOPK_FORMAT, SAMPLED_FORMAT):
        raise MoekdError(f"{path} has shard format version {version}; "
                         f"this moekd reads versions {TOPK_FORMAT} and {SAMPLED_FORMAT}")
    return spec


def _read_rows(file: pq.ParquetFile, rows: list[int], path: Path) -> pa.Table:
    """Read only the row groups holding `rows`, then pick the rows in the order asked."""
    sizes = np.array([file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= starts[-1]):
        raise IndexError(f"{path} has {starts[-1]} rows; asked for rows {rows.tolist()}")
    group = np.searchsorted(starts, rows, side="right") - 1
    needed = np.unique(group)
    table = file.read_row_groups(needed.tolist())
    begins = np.concatenate([[0], np.cumsum(sizes[needed])])[:-1]  # of each needed group in `table`
    return table.take(begins[np.searchsorted(needed, group)] + rows - starts[group])


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values as one writable numpy array, plus row boundaries."""
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    values = array.flatten().to_numpy(zero_copy_only=False, writable=True)
    return values, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _decode(table: pa.Table, spec: dict) -> list[TeacherRecord]:
    """Vectorised over the whole table; the only Python loop is per row."""
    seq_ids = table["seq_id"].to_numpy()
    input_ids, input_bounds = _flat(table["input_ids"])
    positions, pos_bounds = _flat(table["positions"])
    if sampled(spec):
        sizes = _flat(table["sample_sizes"])[0].astype(np.int64)
        ids = _undeltas(_flat(table["sample_ids"])[0], sizes)
        counts = _flat(table["sample_counts"])[0].astype(np.int64)
        id_bounds = np.concatenate([[0], np.cumsum(sizes)])[pos_bounds]
        return [TeacherRecord(
            seq_id=int(seq_ids[i]), input_ids=input_ids[input_bounds[i]:input_bounds[i + 1]],
            positions=positions[pos_bounds[i]:pos_bounds[i + 1]], sample_sizes=sizes[pos_bounds[i]:pos_bounds[i + 1]],
            sample_ids=ids[id_bounds[i]:id_bounds[i + 1]], sample_counts=counts[id_bounds[i]:id_bounds[i + 1]],
        ) for i in range(table.num_rows)]
    M, k = spec["num_samples"], spec["k"]
    ids = np.cumsum(_flat(table["topk_ids"])[0].reshape(-1, k), axis=-1, dtype=np.int64)
    lps = _flat(table["topk_logprobs"])[0].reshape(-1, k)
    if spec["aggregate"]:
        agg_ids = np.cumsum(_flat(table["agg_ids"])[0].reshape(-1, k), axis=-1, dtype=np.int64)
        agg_lps = _flat(table["agg_logprobs"])[0].reshape(-1, k)
    records = []
    for i in range(table.num_rows):
        p0, p1 = pos_bounds[i], pos_bounds[i + 1]
        T = p1 - p0
        record = TeacherRecord(
            seq_id=int(seq_ids[i]),
            input_ids=input_ids[input_bounds[i]:input_bounds[i + 1]],
            positions=positions[p0:p1],
            topk_ids=ids[M * p0:M * p1].reshape(M, T, k),
            topk_logprobs=lps[M * p0:M * p1].reshape(M, T, k),
        )
        if spec["aggregate"]:
            record.agg_ids, record.agg_logprobs = agg_ids[p0:p1], agg_lps[p0:p1]
        records.append(record)
    return records


# ---------------------------------------------------------------- manifest and commits


class Untrusted(NamedTuple):
    """A commit record moekd does not trust, and why: malformed, another identity's, at odds with the identity's
    layout, or (`record` kept) naming a shard file found damaged. Readers refuse it; `moekd cache` replaces it."""

    reason: str
    record: ShardInfo | None = None


@dataclass
class Manifest:
    """What the cache was built from, and its committed shards (gathered from their commit records).

    `shards` holds the records moekd trusts; `untrusted` the others, by shard index. Whether the cache is
    whole (every shard the identity announces has a trusted record) is `problems` / `require`: every consumer
    asks them, through `load`.
    """

    store: Store
    identity: dict
    info: dict
    shards: dict[int, ShardInfo]
    version: int = FORMAT_VERSION
    untrusted: dict[int, Untrusted] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return str(self.store)

    @classmethod
    def open(cls, location: str | Path | Store, identity: dict, info: dict, overwrite: bool,
             verify: bool = False) -> "Manifest":
        """Resume the cache at `location`, or start one.

        `identity` (which must hold "encoding": `encoding_spec(...)`) is
        everything the shards depend on; an existing cache with a different
        identity is refused, naming the fields that differ, unless `overwrite`,
        which deletes its shards, commit records and manifest. A cache with the
        same identity is always resumed, so workers started together can all
        call this with overwrite set. `info` is informative: the first writer's
        is kept (the manifest is created once, with a conditional put).

        Resuming trusts no more than a reader would: a record that is not
        trusted, or whose shard file is missing or not the size it says (with
        `verify`: fails any of `moekd verify`'s checks), leaves its shard out of
        `committed()`, to be computed again and its record replaced (`commit`);
        records of shards the identity does not announce are deleted.
        """
        store = open_store(location)
        if "encoding" not in identity:
            raise ValueError("identity must include 'encoding' (see encoding_spec)")
        identity, info = _as_json(identity), _as_json(info)
        if overwrite and not store.remote and (Path(store.root) / SHARDS).is_symlink():
            os.unlink(Path(store.root) / SHARDS)  # the link itself goes; what it points to is left alone
        for folder in (SHARDS, COMMITS, CLAIMS):
            store.check_folder(folder)
        try:
            existing = cls.load(store, refuse=False) if store.exists(MANIFEST) else None
        except MoekdError:
            if not overwrite:
                raise
            existing = None
        if existing is not None:
            differences = _differences(existing.identity, identity)
            if not differences and existing.version < COMMIT_RECORDS_VERSION:
                raise MoekdError(f"{store} was written by an earlier moekd (cache format version "
                                 f"{existing.version}, one manifest listing every shard); it can be read but not "
                                 "resumed. Finish it with that version, or set overwrite=true to rebuild it.")
            if not differences:
                existing._distrust_damaged_files(verify)
                for index, untrusted in existing.untrusted.items():
                    print(f"cache: shard {index} is computed again: {untrusted.reason}", flush=True)
                return existing
            if not overwrite:
                raise MoekdError(f"{store} holds a teacher cache built with different settings: "
                                 + "; ".join(differences)
                                 + ". Set overwrite=true to replace it, or choose another output location.")
        if overwrite:
            _remove_cache(store)
        manifest = cls(store, identity, info, {})
        if not store.create(MANIFEST, json_bytes({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                                   "identity": identity, "info": info})):
            return cls.open(store, identity, info, overwrite=False, verify=verify)  # another writer started it
        return manifest

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
        manifest = cls(store, data["identity"], data["info"], {}, version)
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
        """Rows of each shard the identity announces, by index (shard s holds prepared rows [s * shard_size,
        (s + 1) * shard_size) of `rows`); None where the identity does not say (a foreign cache: its records are
        then all there is to it)."""
        rows, size = self.identity.get("rows"), self.identity.get("shard_size")  # types checked on load
        if rows is None or size is None:
            return None
        return [min(size, rows - start) for start in range(0, rows, size)]

    def gather(self) -> None:
        """Add the shards committed since this manifest last looked (other processes may be writing), and note
        the records it does not trust (`untrusted`); one whose file was found damaged stays so until replaced."""
        if self.version < COMMIT_RECORDS_VERSION:
            return
        names = [n for n in self.store.list(COMMITS) if COMMIT_FILE.fullmatch(n)]
        for index in set(self.untrusted) - {_commit_index(n) for n in names}:  # removed since
            del self.untrusted[index]
        new = [n for n in names if _commit_index(n) not in self.shards]
        with ThreadPoolExecutor(16 if self.store.remote else 1) as pool:  # a remote read is a round trip
            for name, fetched in zip(new, pool.map(self._fetch, new)):
                if fetched is not None:
                    judged = fetched if isinstance(fetched, str) else self._judge(name, fetched)
                    self._take(_commit_index(name), judged, f"commit record {self.store.url(name)}")
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

    def _judge(self, name: str, raw: bytes) -> ShardInfo | str:
        """The shard a commit record describes, or why moekd does not trust the record."""
        where = self.store.url(name)
        try:
            record = parse_json(raw, f"commit record {where}")
        except MoekdError as e:
            return str(e)
        if not isinstance(record, dict) or record.get("cache") != config_hash(self.identity):
            return (f"commit record {where} does not belong to this cache (its \"cache\" is not the hash of the "
                    "manifest's identity): the cache was replaced while being written, or tampered with")
        record = {key: value for key, value in record.items() if key != "cache"}
        problem = _shard_problem(record, "record")
        if problem is None and _commit_index(name) != record["index"]:
            problem = f"it is named for shard {_commit_index(name)} but describes shard {record['index']}"
        if problem:
            return f"commit record {where} is malformed: {problem}"
        return ShardInfo(**record)

    def _take(self, index: int, judged: ShardInfo | str, where: str) -> None:
        """File shard `index`'s judged record (described as `where`) as trusted or not: a well-formed record
        must also agree with the identity's layout, and one whose file was found damaged stays untrusted."""
        if isinstance(judged, ShardInfo):
            earlier = self.untrusted.get(index)
            if earlier is not None and earlier.record == judged:
                return
            problem = _layout_problem(judged, self.layout)
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
                         f"record: {_ranges(missing)}")
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
                             f"shards committed; {len(missing)} missing ({_ranges(missing)}): {remedy}")
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
                problem = "; ".join(_shard_problems(self.store, info, self.identity["encoding"])) if verify else ""
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
        if not isinstance(current, dict) or current.get("identity") != self.identity:
            raise MoekdError(f"{self.store.url(MANIFEST)} was replaced by a run with different settings while "
                             f"this one was writing shard {info.index}")
        name = commit_name(info.index)
        record = json_bytes({"cache": config_hash(self.identity), **dataclasses.asdict(info)})
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
        judged = fetched if isinstance(fetched, str) else self._judge(name, fetched)
        if isinstance(judged, str):
            return Untrusted(judged)
        earlier = self.untrusted.get(judged.index)
        problem = _layout_problem(judged, self.layout)
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


def commit_name(index: int) -> str:
    return f"{COMMITS}/shard-{index:05d}.json"


def claim_name(index: int) -> str:
    return f"{CLAIMS}/shard-{index:05d}.json"


def _commit_index(name: str) -> int | None:
    match = COMMIT_FILE.fullmatch(name)
    return int(match[1]) if match else None


def _layout_problem(info: ShardInfo, layout: list[int] | None) -> str | None:
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


def _ranges(indices: list[int]) -> str:
    """Sorted shard indices as runs: "0, 3-5, 9"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _as_json(data: dict) -> dict:
    """`data` as it reads back from JSON (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(data, sort_keys=True))


def _differences(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")]
    if old == new:
        return []
    return [f"{prefix.rstrip('.')} is {old!r} in the cache but {new!r} now"]


def _remove_cache(store: Store) -> None:
    """Delete the commit records, the shards and, last, the manifest (links among them are removed, never
    followed), so an interrupted removal never leaves a manifest over shards of another identity."""
    for name in store.list(COMMITS) + store.list(CLAIMS):
        store.delete(name)
    for name in store.list(SHARDS):
        if SHARD_FILE.fullmatch(name):
            store.delete(name)
    store.delete(MANIFEST)


SHARD_FILE = re.compile(rf"{SHARDS}/shard-(\d{{5,}})(?:-([0-9a-f]{{16}}))?\.parquet")
COMMIT_FILE = re.compile(rf"{COMMITS}/shard-(\d{{5,}})\.json")
CLAIM_FILE = re.compile(rf"{CLAIMS}/shard-(\d{{5,}})\.json")
SHARD_FIELDS = {"index": int, "file": str, "rows": int, "tokens": int, "bytes": int, "sha256": str}
ENCODING_FIELDS = {"topk": {"vocab_size": int, "k": int, "num_samples": int, "aggregate": bool},
                   "sampled": {"vocab_size": int, "num_samples": int, "draws": int}}


def _manifest_problem(data: dict, listed: bool) -> str | None:
    """What is wrong with a parsed manifest (format and version checked), or None. `listed`: a version 1-2
    manifest, which lists its shards."""
    for key, kind in (("identity", dict), ("info", dict)) + ((("shards", list),) if listed else ()):
        if not isinstance(data.get(key), kind):
            return f"{key} must be a JSON {'object' if kind is dict else 'list'}"
    encoding = data["identity"].get("encoding")
    if not isinstance(encoding, dict):
        return "identity.encoding must be an object"
    for key, kind in ENCODING_FIELDS["sampled" if sampled(encoding) else "topk"].items():
        value = encoding.get(key)
        if type(value) is not kind or (kind is int and value < 1):
            return f"identity.encoding.{key} must be a {'positive integer' if kind is int else kind.__name__}"
    identity = data["identity"]
    for key, kind in (("num_shards", int), ("tokenizer_fingerprint", str), ("data_fingerprint", str)):
        if key in identity and type(identity[key]) is not kind:
            return f"identity.{key} must be a {kind.__name__}"
    for key, least in (("rows", 0), ("shard_size", 1)):  # the layout: shard s holds rows [s * shard_size, ...)
        if key in identity and not (type(identity[key]) is int and identity[key] >= least):
            return f"identity.{key} must be an integer of at least {least}"
    if {"rows", "shard_size", "num_shards"} <= set(identity) \
            and identity["num_shards"] != -(-identity["rows"] // identity["shard_size"]):
        return (f"identity.num_shards is {identity['num_shards']}, but {identity['rows']} rows in shards of "
                f"{identity['shard_size']} make {-(-identity['rows'] // identity['shard_size'])}")
    seen = set()
    for i, shard in enumerate(data["shards"] if listed else ()):
        problem = _shard_problem(shard, f"shards[{i}]")
        if problem is None and shard["index"] in seen:
            problem = f"shards[{i}] repeats shard index {shard['index']}"
        if problem:
            return problem
        seen.add(shard["index"])
    return None


def _shard_problem(shard, where: str) -> str | None:
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


# ---------------------------------------------------------------- verification


def verify_cache(location: str | Path | Store, whole: bool = True) -> list[str]:
    """Everything that keeps the cache from being whole and sound, one line per problem ([] if it is): the
    records moekd does not trust and (with `whole`; not for a cache still being written) the shards without
    one (`Manifest.problems`), then every committed shard checked against its commit record (size, sha256,
    schema, rows, positions, values)."""
    manifest = Manifest.load(location, refuse=False)
    spec = manifest.identity["encoding"]
    problems = manifest.problems(whole)
    for index in sorted(manifest.shards):
        info = manifest.shards[index]
        problems += [f"shard {index} ({info.file}): {p}" for p in _shard_problems(manifest.store, info, spec)]
    return problems


def _shard_problems(store: Store, info: ShardInfo, spec: dict) -> list[str]:
    """What is wrong with a committed shard's file, against its record. A file larger than its record says is
    not read (nothing moekd reads is larger than it may be)."""
    try:
        size = store.size(info.file)
        if size > info.bytes:
            return [f"size is {size} bytes but the commit record says {info.bytes}"]
        data = store.read(info.file, info.bytes)
    except FileNotFoundError:
        return ["file is missing"]
    except (MoekdError, OSError) as e:
        return [f"cannot be read: {e}"]
    problems = []
    if len(data) != info.bytes:
        problems.append(f"size is {len(data)} bytes but the commit record says {info.bytes}")
    elif hashlib.sha256(data).hexdigest() != info.sha256:
        problems.append("sha256 differs from the commit record (the file changed after it was committed)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        return problems + [f"unreadable Parquet file: {e}"]
    return problems + _content_problems(table, info, spec)


def _content_problems(table: pa.Table, info: ShardInfo, spec: dict) -> list[str]:
    expected = _schema(spec)
    if not table.schema.equals(expected, check_metadata=False):
        return [f"schema is ({table.schema.to_string(show_schema_metadata=False)}) "
                f"but the encoding needs ({expected.to_string(show_schema_metadata=False)})"]
    if table.schema.metadata.get(METADATA_KEY) != expected.metadata[METADATA_KEY]:
        return ["encoding metadata differs from the manifest's identity.encoding"]
    problems = []
    if table.num_rows != info.rows:
        problems.append(f"has {table.num_rows} rows but the commit record says {info.rows}")
    _, pos_bounds = _flat(table["positions"])
    if pos_bounds[-1] != info.tokens:
        problems.append(f"has {pos_bounds[-1]} positions but the commit record says {info.tokens} tokens")
    if sampled(spec):
        return problems + _sample_problems(table, pos_bounds, spec)
    M, k, T = spec["num_samples"], spec["k"], np.diff(pos_bounds)
    groups = {"topk": M * T * k, "agg": T * k} if spec["aggregate"] else {"topk": M * T * k}
    for prefix, sizes in groups.items():
        ids, id_bounds = _flat(table[f"{prefix}_ids"])
        lps, lp_bounds = _flat(table[f"{prefix}_logprobs"])
        if not (np.array_equal(np.diff(id_bounds), sizes) and np.array_equal(np.diff(lp_bounds), sizes)):
            problems.append(f"{prefix}_ids/{prefix}_logprobs lengths do not match the positions (k = {k})")
            continue
        problems += _value_problems(prefix, ids.reshape(-1, k), lps.reshape(-1, k), spec["vocab_size"])
    return problems


def _sample_problems(table: pa.Table, pos_bounds: np.ndarray, spec: dict) -> list[str]:
    sizes, size_bounds = _flat(table["sample_sizes"])
    deltas, id_bounds = _flat(table["sample_ids"])
    counts, count_bounds = _flat(table["sample_counts"])
    if not (np.array_equal(size_bounds, pos_bounds) and np.array_equal(id_bounds, count_bounds)
            and sizes.min(initial=1) >= 1 and sizes.sum() == len(deltas)):
        return ["sample_sizes/sample_ids/sample_counts lengths do not match the positions"]
    if not len(deltas):
        return []
    starts = np.cumsum(sizes) - sizes
    ids = _undeltas(deltas, sizes)
    steps = np.delete(deltas, starts)  # differences inside a position: ascending, distinct
    if deltas[starts].min() < 0 or steps.min(initial=1) < 1 or ids.max() >= spec["vocab_size"]:
        return [f"sample_ids are not distinct ids in [0, {spec['vocab_size']})"]
    if counts.min() < 1 or not (np.add.reduceat(counts, starts) == spec["draws"]).all():
        return [f"sample_counts are not positive counts summing to {spec['draws']} per position"]
    return []


def _value_problems(prefix: str, deltas: np.ndarray, lps: np.ndarray, vocab_size: int) -> list[str]:
    problems = []
    ids = np.cumsum(deltas, axis=-1, dtype=np.int64)
    if ids.size and (deltas[:, 0].min() < 0 or deltas[:, 1:].min(initial=1) < 1 or ids.max() >= vocab_size):
        problems.append(f"{prefix}_ids are not distinct ids in [0, {vocab_size})")
    # float16 rounding lifts a sum of probabilities by at most 2**-11 * ln(k) (2e-3 at k = 64).
    if lps.size and (np.isnan(lps).any() or np.exp(lps).sum(-1).max() > 1 + 1e-2):
        problems.append(f"{prefix}_logprobs are not normalised log-probabilities")
    return problems
