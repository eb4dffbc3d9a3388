"""A teacher-cache shard: its records, and their Parquet encoding (written once, read back checked).

A cache (a local directory or an object-store prefix, `pipeline.cache.storage`)
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
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache.identity import (
    COLUMN_ENCODINGS, SAMPLED_FORMAT, TOPK_FORMAT, ZSTD_LEVEL, _column_names, encoding_spec, sampled,
)
from pipeline.cache.storage import Store, open_store
from pipeline.core.errors import MoekdError
from pipeline.core.files import parse_json

SHARDS = "shards"
ROW_GROUP_ROWS = 64  # rows read together by `read_shard(rows=...)`
METADATA_KEY = b"moekd"
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
    _: KW_ONLY
    topk_ids: np.ndarray | None = None  # int64 (M, T, k)
    topk_logprobs: np.ndarray | None = None  # float32 (M, T, k), normalised over the full vocabulary
    agg_ids: np.ndarray | None = None  # (T, k): top-k of log mean_m p^(m)
    agg_logprobs: np.ndarray | None = None
    # a sampled cache's: per position t, sample_sizes[t] distinct ids (ascending) and how often each was drawn
    sample_sizes: np.ndarray | None = None  # int64 (T,)
    sample_ids: np.ndarray | None = None  # int64 (sum(sizes),)
    sample_counts: np.ndarray | None = None  # int64 (sum(sizes),), summing to `draws` per position


@dataclass(kw_only=True)
class ShardInfo:
    """A committed shard as the manifest lists it."""

    index: int
    file: str  # relative to the cache directory
    rows: int
    tokens: int  # stored positions, summed over rows
    bytes: int
    sha256: str


def shard_name(index: int, sha256: str) -> str:
    """Where shard `index` with these contents lives: named by its index and the start of its sha256, so two
    writers of one shard never overwrite each other's object."""
    return f"{SHARDS}/shard-{index:05d}-{sha256[:16]}.parquet"


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


SHARD_FILE = re.compile(rf"{SHARDS}/shard-(\d{{5,}})(?:-([0-9a-f]{{16}}))?\.parquet")

