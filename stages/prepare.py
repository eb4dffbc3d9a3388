"""Tokenize instruction data with the teacher's tokenizer into the prepared format.

Reads JSONL / JSON / Parquet files (or anything `datasets` reads locally: CSV,
a directory of data files, a `save_to_disk` directory), renders each record
with the prompt template, tokenizes, fits each example into max_length tokens
(`truncation`: by default the prompt loses its first tokens, so the response
and the end of the prompt stay; see `template.fit_length`), and writes
data.parquet then meta.json. Unusable records are skipped and counted by
reason; truncated ones are counted too. Re-running with the same inputs and
settings is a no-op.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.core.config import config_hash, to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write_json, remove_stale_temporaries, sha256_file
from pipeline.core.outputs import Output, Verdict, judge, recorded_in
from pipeline.data.prepared import DATA_FILE, FORMAT, META_FILE, VERSION, write_prepared_data
from pipeline.data.records import MAX_RECORD_BYTES, read_records
from pipeline.data.template import RecordFields, Template, Truncation, example_from_record
from pipeline.models.identity import tokenizer_fingerprint
from pipeline.models.loading import honours_remote_code, load_tokenizer


@dataclass
class Config:
    """Settings of `moekd prepare` (inputs, output and tokenizer are required)."""

    inputs: list[str]  # data files or dataset directories, read in this order
    output: str  # the prepared-data directory to write
    tokenizer: str  # local tokenizer directory (the teacher's)
    instruction_field: str = "instruction"
    context_field: str = "context"  # optional per record
    response_field: str = "response"
    references_field: str = "references"  # optional extra references (for ROUGE)
    source_field: str = "source"  # optional; defaults to the input's file stem
    template: str = "chat"  # "chat", or a format string of {instruction} and {context}
    max_length: int = 512
    truncation: Truncation = "left"  # over-long examples: left = drop the prompt's start; skip = drop the example
    select: dict[str, list[str]] | None = None  # keep only records whose field holds one of these values
    limit: int | None = None  # stop after this many prepared rows
    max_record_bytes: int = MAX_RECORD_BYTES  # a record with more text is skipped before it is tokenized
    overwrite: bool = False
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one data file or directory")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a prompt and a response token), got {self.max_length}")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be positive, got {self.max_record_bytes}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of rows or null, got {self.limit}")
        for name, values in (self.select or {}).items():
            if not values:
                raise ValueError(f"select.{name} is empty: give the values of {name} to keep")


@honours_remote_code
def run(config: Config) -> None:
    """Prepare `config.inputs` into `config.output`, or do nothing if it already holds this preparation."""
    inputs = check(config)
    tokenizer = load_tokenizer(config.tokenizer)
    template = Template(tokenizer, config.template)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    fingerprint = prepared_fingerprint(config, inputs, tokenizer_fp, template.text)
    output = Path(config.output)
    if prepared(output, fingerprint, config.overwrite):
        print(f"prepare: {output} is up to date (fingerprint {fingerprint[:12]}); nothing to do")
        return
    if output.is_dir():
        remove_stale_temporaries(output)
    # meta.json goes first and comes back last: without it the directory reads as incomplete.
    (output / META_FILE).unlink(missing_ok=True)
    counts = collections.Counter()
    skipped = collections.Counter()
    rows = tqdm(examples(config, inputs, template, counts, skipped), desc="prepare", unit=" rows")
    write_prepared_data(output / DATA_FILE, rows)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer_fp,
        "rows": counts["rows"],
        "tokens": counts["tokens"],
        "response_tokens": counts["response_tokens"],
        "skipped": dict(skipped),
        "not_selected": counts["not_selected"],
        "truncated": {reason: counts[reason] for reason in ("prompt_truncated", "response_truncated")},
        "config": to_dict(config),
    }
    atomic_write_json(output / META_FILE, meta)
    print(
        f"prepare: {meta['rows']} rows, {meta['tokens']} tokens, {meta['response_tokens']} response tokens "
        f"-> {output}; truncated: {describe(meta['truncated'])}; skipped: {describe(skipped)}"
    )


def check(config: Config) -> list[Path]:
    """The input paths, refused unless each exists."""
    inputs = [Path(p) for p in config.inputs]
    for path in inputs:
        if not path.exists():
            raise MoekdError(f"input not found: {path}")
    return inputs


def prepared(output: Path, fingerprint: str, overwrite: bool) -> bool:
    """Whether `output` already holds this exact preparation (`core.outputs.judge`: a different one is refused
    unless overwriting; a directory without meta.json is incomplete, and prepared again)."""
    meta = recorded_in(output, META_FILE, unrecorded=None)
    recorded = None if meta is None else {"fingerprint": meta.get("fingerprint")}
    where = Output(output, holds="already holds prepared data from different inputs or settings")
    return judge(where, recorded, {"fingerprint": fingerprint}, overwrite) is Verdict.SAME


def input_hash(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents)."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return config_hash([[str(p.relative_to(path)), sha256_file(p)] for p in files])


def prepared_fingerprint(config: Config, inputs: list[Path], tokenizer_fp: str, template_text: str) -> str:
    """sha256 over everything that decides the prepared rows."""
    return config_hash({
        "version": VERSION,
        "tokenizer": tokenizer_fp,
        # The stem is the default source name, so it shapes the output too.
        "inputs": [[path.stem, input_hash(path)] for path in inputs],
        "template": template_text,
        "max_length": config.max_length,
        "truncation": config.truncation,
        "max_record_bytes": config.max_record_bytes,
        "fields": [config.instruction_field, config.context_field, config.response_field,
                   config.references_field, config.source_field],
        "limit": config.limit,
        **({"select": {k: sorted(v) for k, v in config.select.items()}} if config.select else {}),
    })


def examples(config: Config, inputs: list[Path], template: Template, counts, skipped):
    """Prepared rows from every input in order, counting rows and tokens and skips by reason."""
    fields = RecordFields(instruction=config.instruction_field, context=config.context_field,
                          response=config.response_field, references=config.references_field,
                          source=config.source_field)
    for path in inputs:
        for record in read_records(path, config.max_record_bytes):
            if config.select and isinstance(record, dict) and not selected(record, config.select):
                counts["not_selected"] += 1
                continue
            row = record if isinstance(record, str) else example_from_record(
                record, fields, template, config.max_length, path.stem, config.truncation, config.max_record_bytes
            )
            if isinstance(row, str):
                skipped[row] += 1
                continue
            counts.update(row.pop("cut"))
            counts["rows"] += 1
            counts["tokens"] += len(row["input_ids"])
            counts["response_tokens"] += len(row["input_ids"]) - row["prompt_length"]
            yield row
            if counts["rows"] == config.limit:
                return
    if not counts["rows"]:
        raise MoekdError(
            f"no usable records in {', '.join(config.inputs)} (skipped: {describe(skipped)}; not selected: "
            f"{counts['not_selected']}); check the field names ({fields.instruction}, {fields.response}), "
            "`select` and the files"
        )


def selected(record: dict, select: dict[str, list[str]]) -> bool:
    """Whether every field named in `select` holds one of its values."""
    return all(record.get(field) in values for field, values in select.items())


def describe(counts: dict) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in sorted(counts.items()) if n) or "none"
