"""Reading instruction records: JSONL, JSON, Parquet, or anything `datasets` reads locally.

A record that cannot be used is returned as the reason (a string), which
`moekd prepare` counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import MoekdError, first_line

MAX_RECORD_BYTES = 1 << 20  # a record's text beyond this is refused before it is tokenized


def read_records(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict | str]:
    """The records of one input; a string in place of a record is the reason it was unreadable.

    JSONL lines are decoded one by one, so one bad line is skipped, not the file;
    a line longer than `max_record_bytes` is skipped unparsed.
    """
    if path.is_dir():
        yield from read_with_datasets(path)
    elif path.suffix in (".jsonl", ".ndjson"):
        yield from read_jsonl(path, max_record_bytes)
    elif path.suffix == ".json":
        yield from read_json_records(path)
    elif path.suffix == ".parquet":
        yield from read_parquet(path)
    else:
        yield from read_with_datasets(path)


def read_jsonl(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict | str]:
    with open(path, "rb") as f:
        for line in f:
            if len(line) > max_record_bytes:
                yield "record_too_large"
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield "invalid_utf8"
                continue
            if text.strip():
                yield parse_json_record(text)


def parse_json_record(text: str) -> dict | str:
    try:
        record = json.loads(text)
    # RecursionError: nested deeper than Python's stack; ValueError: an integer past Python's 4,300 digits
    except (json.JSONDecodeError, RecursionError, ValueError):
        return "malformed_json"
    return record if isinstance(record, dict) else "not_a_record"


def read_json_records(path: Path) -> Iterator[dict | str]:
    """A JSON list of records or {"data": [...]}; a .json file that is really JSON Lines is read as such."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoekdError(f"{path} is not valid UTF-8: {e}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        yield from read_jsonl(path)
        return
    except RecursionError:
        raise MoekdError(f"{path} is nested too deeply to read as JSON") from None
    records = document.get("data") if isinstance(document, dict) else document
    if not isinstance(records, list):
        raise MoekdError(f"{path} must hold a JSON list of records or an object with a \"data\" list")
    for record in records:
        yield record if isinstance(record, dict) else "not_a_record"


def read_parquet(path: Path) -> Iterator[dict]:
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    except pa.ArrowException as e:
        raise MoekdError(f"{path} is not a readable Parquet file: {e}") from None


def read_with_datasets(path: Path) -> Iterator[dict]:
    """A `save_to_disk` directory, or data files the `datasets` library reads (CSV, a directory of files)."""
    import datasets  # slow to import; only these inputs need it

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), streaming=True)
        else:
            # Streaming reads the file lazily instead of converting it into the HF cache first.
            loaded = datasets.load_dataset(str(path.parent), data_files=path.name, streaming=True)
        yield from single_split(loaded, path)
    except (OSError, ValueError, RuntimeError) as e:  # FileNotFoundError, UnicodeDecodeError; a loading script
        raise MoekdError(f"cannot read {path} with the datasets library: {first_line(e)}") from None


def single_split(loaded, path: Path):
    """The one split of a loaded dataset; several splits are ambiguous, so name them."""
    if not isinstance(loaded, dict):
        return loaded
    if len(loaded) != 1:
        raise MoekdError(
            f"{path} holds several splits ({', '.join(loaded)}); give the file or directory of one split"
        )
    return next(iter(loaded.values()))

