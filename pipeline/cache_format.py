"""The teacher-logit cache on disk: Parquet shards, the manifest, and verification.

A cache directory holds `manifest.json` and `shards/shard-NNNNN.parquet`. Each
shard row is one prepared sequence; its teacher distributions are the top-`k`
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

    table = pyarrow.parquet.read_table("shards/shard-00000.parquet")
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

`manifest.json` (sorted keys, no timestamps):

    {"format": "moekd-teacher-cache", "version": 2,
     "identity": {...everything the shards depend on, including "encoding"...},
     "info": {...informative only: paths, host...},
     "shards": [{"index", "file", "rows", "tokens", "bytes", "sha256"}, ...]}

`tokens` counts stored positions (sum of T). A shard enters the manifest only
after its file is complete, so the manifest lists exactly the finished shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import MoekdError
from pipeline.files import (
    FileLock, atomic_write, atomic_write_json, open_confined, plain_directory, read_confined, read_json, sha256_file,
)

FORMAT_NAME = "moekd-teacher-cache"
FORMAT_VERSION = 2  # of the manifest; version 1 manifests (top-k caches only) are read as well
READABLE_VERSIONS = (1, 2)
TOPK_FORMAT, SAMPLED_FORMAT = 1, 2  # of a shard's layout, by storage
MANIFEST = "manifest.json"
SHARDS = "shards"
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


def shard_path(cache_dir: Path, index: int) -> Path:
    return Path(cache_dir) / SHARDS / f"shard-{index:05d}.parquet"


def shard_lock(cache_dir: Path, index: int) -> FileLock:
    """The lock a process holds while it computes and writes shard `index`."""
    return FileLock(Path(cache_dir) / SHARDS / f"shard-{index:05d}.lock")


# ---------------------------------------------------------------- writing


def write_shard(cache_dir: Path, index: int, records: list[TeacherRecord], **encoding) -> ShardInfo:
    """Encode `records` into shard `index` atomically (`encoding`: `encoding_spec`'s arguments); the same
    records give the same bytes."""
    spec = encoding_spec(**encoding)
    for record in records:
        _check_record(record, spec)
    if any(a.seq_id >= b.seq_id for a, b in zip(records, records[1:])):
        raise ValueError(f"shard {index}: records must be in ascending seq_id order")
    table = _encode(records, spec)
    path = shard_path(cache_dir, index)
    atomic_write(path, lambda tmp: write_parquet(table, tmp))
    return ShardInfo(
        index=index, file=f"{SHARDS}/{path.name}", rows=len(records),
        tokens=sum(len(r.positions) for r in records), bytes=path.stat().st_size, sha256=sha256_file(path),
    )


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
    spec = json.loads(metadata[METADATA_KEY])
    if spec.get("format_version") not in (TOPK_FORMAT, SAMPLED_FORMAT):
        raise MoekdError(f"{path} has shard format version {spec.get('format_version')}; "
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


# ---------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """The list of committed shards plus what the cache was built from."""

    directory: Path
    identity: dict
    info: dict
    shards: dict[int, ShardInfo]

    @classmethod
    def open(cls, cache_dir: Path, identity: dict, info: dict, overwrite: bool) -> "Manifest":
        """Resume the cache in `cache_dir`, or start one.

        `identity` (which must hold "encoding": `encoding_spec(...)`) is
        everything the shards depend on; an existing cache with a different
        identity is refused, naming the fields that differ, unless `overwrite`,
        which deletes its shards and manifest. A cache with the same identity is
        always resumed, so workers started together can all call this with
        overwrite set. `info` is informative: the first writer's is kept.
        """
        cache_dir = Path(cache_dir)
        if "encoding" not in identity:
            raise ValueError("identity must include 'encoding' (see encoding_spec)")
        identity, info = _as_json(identity), _as_json(info)
        if overwrite and (cache_dir / SHARDS).is_symlink():
            os.unlink(cache_dir / SHARDS)  # the link itself goes; what it points to is left alone
        plain_directory(cache_dir / SHARDS, "the cache's shard directory")
        with _manifest_lock(cache_dir):
            if (cache_dir / MANIFEST).exists():
                try:
                    existing = cls.load(cache_dir)
                except MoekdError:
                    if not overwrite:
                        raise
                    existing = None
                if existing is not None:
                    differences = _differences(existing.identity, identity)
                    if not differences:
                        return existing
                    if not overwrite:
                        raise MoekdError(
                            f"{cache_dir} holds a teacher cache built with different settings: "
                            + "; ".join(differences)
                            + ". Set overwrite=true to replace it, or choose another output directory."
                        )
                _remove_cache(cache_dir)
            manifest = cls(cache_dir, identity, info, {})
            manifest._write()
        return manifest

    @classmethod
    def load(cls, cache_dir: Path) -> "Manifest":
        """Read `cache_dir/manifest.json`, checked field by field: a missing, malformed or foreign manifest is
        a one-line error. Each shard's file must be `shards/shard-NNNNN.parquet` for its own index, so no
        entry can point outside the cache."""
        cache_dir = Path(cache_dir)
        path = cache_dir / MANIFEST
        if path.is_symlink():
            raise MoekdError(f"{path} is a symbolic link; a cache's manifest must be its own file")
        data = read_json(path, "teacher-cache manifest")
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise MoekdError(f"{path} is not a moekd teacher-cache manifest (format must be {FORMAT_NAME!r})")
        if data.get("version") not in READABLE_VERSIONS:
            raise MoekdError(f"{path} has cache format version {data.get('version')!r}; this moekd "
                             f"reads versions {', '.join(map(str, READABLE_VERSIONS))}. Rebuild the cache "
                             "(overwrite=true).")
        problem = _manifest_problem(data)
        if problem:
            raise MoekdError(f"{path} is malformed: {problem}")
        shards = {s["index"]: ShardInfo(**s) for s in data["shards"]}
        return cls(cache_dir, data["identity"], data["info"], shards)

    def shard_bytes(self, index: int) -> bytes:
        """Shard `index` as committed: read without following links below the cache directory, and refused
        unless its size and sha256 are the manifest's (it may have changed since it was committed)."""
        info = self.shards[index]
        data = read_confined(self.directory, info.file, "shard file")
        if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            raise MoekdError(f"teacher-cache shard {self.directory / info.file} does not match its manifest entry "
                             f"(size or sha256): it changed after it was committed. `moekd verify "
                             f"{self.directory}` lists the damage; rebuild those shards with `moekd cache`.")
        return data

    def read_shard(self, index: int, rows: list[int] | None = None) -> list[TeacherRecord]:
        """The records of shard `index` (or of its `rows`), from bytes checked against the manifest."""
        try:
            return read_shard(pa.BufferReader(self.shard_bytes(index)), rows)
        except IndexError as e:  # rows the manifest promised but the shard lacks
            raise _unreadable(self.directory / self.shards[index].file, e) from None

    def read_shard_index(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(seq_ids, T) of shard `index` from its small columns, opened confined and its size checked (the
        whole file is hashed when `read_shard` reads it)."""
        info = self.shards[index]
        with os.fdopen(open_confined(self.directory, info.file, "shard file"), "rb") as f:
            if os.fstat(f.fileno()).st_size != info.bytes:
                raise MoekdError(f"teacher-cache shard {self.directory / info.file} is not the size its manifest "
                                 f"entry says ({info.bytes} bytes); run `moekd verify {self.directory}`")
            return read_shard_index(f)

    def reload(self) -> "Manifest":
        """The manifest as it is on disk now (other processes may have committed since)."""
        return Manifest.load(self.directory)

    def committed(self) -> set[int]:
        return set(self.shards)

    def commit(self, info: ShardInfo) -> None:
        """Add a written shard; safe when several processes commit into one manifest."""
        with _manifest_lock(self.directory):
            current = self.reload()
            if current.identity != self.identity:
                raise MoekdError(f"{self.directory / MANIFEST} was replaced by a run with different "
                                 f"settings while this one was writing shard {info.index}")
            current.shards[info.index] = info
            current._write()
        self.shards = current.shards

    def _write(self) -> None:
        atomic_write_json(self.directory / MANIFEST, {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "identity": self.identity,
            "info": self.info,
            "shards": [dataclasses.asdict(self.shards[i]) for i in sorted(self.shards)],
        })


def _manifest_lock(cache_dir: Path) -> FileLock:
    return FileLock(Path(cache_dir) / "manifest.lock")


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


def _remove_cache(cache_dir: Path) -> None:
    """Delete the shards and the manifest (links among them are removed, never followed)."""
    for path in plain_directory(cache_dir / SHARDS, "the cache's shard directory").glob("shard-*.parquet"):
        path.unlink()
    (cache_dir / MANIFEST).unlink(missing_ok=True)


SHARD_FILE = re.compile(rf"{SHARDS}/shard-(\d{{5,}})\.parquet")
SHARD_FIELDS = {"index": int, "file": str, "rows": int, "tokens": int, "bytes": int, "sha256": str}
ENCODING_FIELDS = {"topk": {"vocab_size": int, "k": int, "num_samples": int, "aggregate": bool},
                   "sampled": {"vocab_size": int, "num_samples": int, "draws": int}}


def _manifest_problem(data: dict) -> str | None:
    """What is wrong with a parsed manifest (format and version checked), or None."""
    for key, kind in (("identity", dict), ("info", dict), ("shards", list)):
        if not isinstance(data.get(key), kind):
            return f"{key} must be a JSON {'object' if kind is dict else 'list'}"
    encoding = data["identity"].get("encoding")
    if not isinstance(encoding, dict):
        return "identity.encoding must be an object"
    for key, kind in ENCODING_FIELDS["sampled" if sampled(encoding) else "topk"].items():
        value = encoding.get(key)
        if type(value) is not kind or (kind is int and value < 1):
            return f"identity.encoding.{key} must be a {'positive integer' if kind is int else kind.__name__}"
    for key, kind in (("num_shards", int), ("tokenizer_fingerprint", str), ("data_fingerprint", str)):
        if key in data["identity"] and type(data["identity"][key]) is not kind:
            return f"identity.{key} must be a {kind.__name__}"
    seen = set()
    for i, shard in enumerate(data["shards"]):
        if not isinstance(shard, dict) or set(shard) != set(SHARD_FIELDS):
            return f"shards[{i}] must be an object with exactly {', '.join(SHARD_FIELDS)}"
        for key, kind in SHARD_FIELDS.items():
            if type(shard[key]) is not kind or (kind is int and shard[key] < 0):
                return f"shards[{i}].{key} must be a {'non-negative integer' if kind is int else 'string'}"
        match = SHARD_FILE.fullmatch(shard["file"])
        if not match or int(match[1]) != shard["index"]:
            return (f"shards[{i}].file is {shard['file']!r}, not {SHARDS}/shard-{shard['index']:05d}.parquet "
                    "(a shard's file is named by its index, inside the cache)")
        if not re.fullmatch(r"[0-9a-f]{64}", shard["sha256"]):
            return f"shards[{i}].sha256 is not a sha256 hex digest"
        if shard["index"] in seen:
            return f"shards[{i}] repeats shard index {shard['index']}"
        seen.add(shard["index"])
    return None


# ---------------------------------------------------------------- verification


def verify_cache(cache_dir: Path) -> list[str]:
    """Check every committed shard against the manifest; one line per problem, [] if all good."""
    manifest = Manifest.load(cache_dir)
    spec = manifest.identity["encoding"]
    problems = []
    for index in sorted(manifest.shards):
        info = manifest.shards[index]
        problems += [f"shard {index} ({info.file}): {p}" for p in _shard_problems(Path(cache_dir), info, spec)]
    return problems


def _shard_problems(cache_dir: Path, info: ShardInfo, spec: dict) -> list[str]:
    try:
        data = read_confined(cache_dir, info.file, "shard file")
    except FileNotFoundError:
        return ["file is missing"]
    except (MoekdError, OSError) as e:
        return [f"cannot be read: {e}"]
    problems = []
    if len(data) != info.bytes:
        problems.append(f"size is {len(data)} bytes but the manifest says {info.bytes}")
    elif hashlib.sha256(data).hexdigest() != info.sha256:
        problems.append("sha256 differs from the manifest (the file changed after it was committed)")
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
        problems.append(f"has {table.num_rows} rows but the manifest says {info.rows}")
    _, pos_bounds = _flat(table["positions"])
    if pos_bounds[-1] != info.tokens:
        problems.append(f"has {pos_bounds[-1]} positions but the manifest says {info.tokens} tokens")
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
