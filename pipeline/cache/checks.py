"""Checking a committed shard's file against its commit record: size, sha256, schema, rows, values.

`moekd verify` runs these over every shard (`manifest.verify_cache`), and
`moekd cache verify=true` before it resumes; a reader checks size and sha256
only (`Manifest.shard_bytes`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.identity import sampled
from pipeline.cache.shards import METADATA_KEY, ShardInfo, _flat, _schema, _undeltas
from pipeline.cache.storage import Store
from pipeline.core.errors import MoekdError


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

