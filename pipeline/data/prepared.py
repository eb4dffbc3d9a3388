"""The prepared format: what `moekd prepare` writes and every later stage reads.

A prepared directory holds `data.parquet` (one row per example, row index =
seq_id; see docs/design.md) and `meta.json`, written last, so a directory with
`meta.json` is complete. `PreparedData` reads it back a slice at a time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write, read_json

FORMAT = "moekd-prepared"
VERSION = 1
DATA_FILE = "data.parquet"
META_FILE = "meta.json"
ROW_GROUP_SIZE = 1024
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("response_mask", pa.list_(pa.bool_())),
    ("prompt_length", pa.int32()),
    ("references", pa.list_(pa.string())),
    ("source", pa.string()),
])


def write_prepared_data(path: Path, rows: Iterable[dict]) -> None:
    """Write rows to `path` atomically, ROW_GROUP_SIZE rows per row group (what readers fetch at once)."""
    rows = iter(rows)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            while batch := list(itertools.islice(rows, ROW_GROUP_SIZE)):
                writer.write_table(pa.Table.from_pylist(batch, SCHEMA))

    atomic_write(path, write)


@dataclass(kw_only=True)
class PreparedExample:
    seq_id: int
    input_ids: np.ndarray  # int32 (L,)
    response_mask: np.ndarray  # bool (L,)
    prompt_length: int
    references: list[str]
    source: str


class PreparedData:
    """A `moekd prepare` output directory, read a slice of row groups at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise MoekdError(f"prepared data not found: {self.directory} (run moekd prepare)")
        if not (self.directory / META_FILE).is_file():
            raise MoekdError(
                f"prepared data {self.directory} is incomplete (no {META_FILE}); re-run moekd prepare"
            )
        self.meta = read_json(self.directory / META_FILE, "prepared data meta")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise MoekdError(f"{self.directory / META_FILE} is not moekd prepared data (format must be {FORMAT!r})")
        if self.meta.get("version") != VERSION:
            raise MoekdError(
                f"{self.directory} is prepared data version {self.meta.get('version')}, this moekd reads "
                f"version {VERSION}; re-run moekd prepare"
            )
        missing = [k for k in ("fingerprint", "tokenizer_fingerprint", "rows") if k not in self.meta]
        if missing:
            raise MoekdError(f"{self.directory / META_FILE} lacks {', '.join(missing)}; re-run moekd prepare")
        self.fingerprint: str = self.meta["fingerprint"]
        self.tokenizer_fingerprint: str = self.meta["tokenizer_fingerprint"]
        generator = self.meta.get("generator")  # `moekd generate`'s responses: what made them
        self.generator: dict | None = generator if isinstance(generator, dict) else None
        data_path = self.directory / DATA_FILE
        if not data_path.is_file():
            raise MoekdError(f"prepared data {self.directory} has no {DATA_FILE}; re-run moekd prepare")
        self.file = pq.ParquetFile(data_path)
        if self.file.metadata.num_rows != self.meta["rows"]:
            raise MoekdError(
                f"{data_path} has {self.file.metadata.num_rows} rows but {META_FILE} says {self.meta['rows']}; "
                "re-run moekd prepare with --overwrite"
            )
        group_rows = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_starts = np.cumsum([0, *group_rows])

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def target_counts(self) -> np.ndarray:
        """Training targets T per row (response_mask[1:] set), reading only that column."""
        counts = []
        for group in range(self.file.num_row_groups):
            masks = list_column(self.file.read_row_group(group, ["response_mask"]), "response_mask")
            counts += [int(mask[1:].sum()) for mask in masks]
        return np.array(counts, dtype=np.int64)

    def rows(self, start: int, stop: int) -> list[PreparedExample]:
        """Examples with seq_id in [start, stop) (stop is clipped to the end)."""
        stop = min(stop, len(self))
        if not 0 <= start <= stop:
            raise IndexError(f"rows({start}, {stop}) is outside 0..{len(self)}")
        if start == stop:
            return []
        first = int(np.searchsorted(self.group_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.group_starts, stop, side="left")) - 1
        table = self.file.read_row_groups(list(range(first, last + 1)))
        table = table.slice(start - int(self.group_starts[first]), stop - start)
        input_ids = list_column(table, "input_ids")
        masks = list_column(table, "response_mask")
        return [
            PreparedExample(seq_id=start + i, input_ids=ids, response_mask=mask, prompt_length=prompt_length,
                            references=references, source=source)
            for i, (ids, mask, prompt_length, references, source) in enumerate(zip(
                input_ids, masks, table["prompt_length"].to_pylist(),
                table["references"].to_pylist(), table["source"].to_pylist(),
            ))
        ]


def list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<…> column as one numpy array per row, without going through Python lists."""
    array = table[name].combine_chunks()
    offsets = array.offsets.to_numpy()  # into array.values, which ignores the slice
    values = array.values.to_numpy(zero_copy_only=False)
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def target_positions(response_mask: np.ndarray) -> np.ndarray:
    """Positions t whose logits predict a response token (response_mask[t + 1])."""
    return np.flatnonzero(np.asarray(response_mask)[1:])


def padded(sequences: list, pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of int sequences padded to the longest, on the right or the left."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[i, cols] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        attention_mask[i, cols] = 1
    return input_ids, attention_mask

