"""Instruction records in, prepared token data out: reading, prompt templates, the prepared format.

A prepared directory holds `data.parquet` (one row per example, row index =
seq_id; see docs/design.md) and `meta.json`, written last, so a directory with
`meta.json` is complete. `PreparedData` reads it back a slice at a time.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import MoekdError, first_line
from pipeline.files import atomic_write, read_json

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
# Used when template="chat" but the tokenizer has no chat template.
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PLAIN_TEMPLATE_NO_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"


# ---------------------------------------------------------------- reading records

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


# ---------------------------------------------------------------- prompt templates

@dataclass
class RecordFields:
    """Which record keys hold what (context, references and source are optional)."""

    instruction: str
    context: str
    response: str
    references: str
    source: str


class Template:
    """Turns (instruction, context, response) into token ids and the prompt length.

    "chat" renders the tokenizer's chat template (user turn, then the assistant
    turn up to and including its end-of-turn token) and falls back to
    PLAIN_TEMPLATE without one; any other value is a format string with
    {instruction} and {context} giving the prompt, then response + eos.
    """

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.chat = template == "chat" and bool(tokenizer.chat_template)
        if self.chat:
            self.text = json.dumps(tokenizer.chat_template, sort_keys=True)
            self.end_tokens = set(tokenizer.all_special_tokens) | {
                str(t) for t in tokenizer.added_tokens_decoder.values() if t.special
            }
            return
        if template == "chat":
            self.formats = (PLAIN_TEMPLATE, PLAIN_TEMPLATE_NO_CONTEXT)
        else:
            check_format_string(template)
            self.formats = (template, template)
        self.text = "\n".join(self.formats)
        if tokenizer.eos_token_id is None:
            raise MoekdError("the tokenizer has no eos_token, which ends every response in a non-chat template")

    def encode(self, instruction: str, context: str, response: str) -> tuple[list[int], int]:
        """(prompt + response token ids, number of prompt tokens)."""
        if self.chat:
            prompt, reply = self.render_chat(instruction, context, response)
            suffix, special = [], False  # the template writes bos/eos itself
        else:
            prompt = self.formats[0 if context else 1].format(instruction=instruction, context=context)
            reply, suffix, special = response, [self.tokenizer.eos_token_id], True
        prompt_ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        ids = self.tokenizer(prompt + reply, add_special_tokens=special)["input_ids"] + suffix
        return ids, common_prefix_length(prompt_ids, ids)

    def render_chat(self, instruction: str, context: str, response: str) -> tuple[str, str]:
        """(generation prompt text, assistant reply text ending with the end-of-turn token)."""
        user = [{"role": "user", "content": f"{instruction}\n\n{context}" if context else instruction}]
        apply = self.tokenizer.apply_chat_template
        prompt = apply(user, add_generation_prompt=True, tokenize=False)
        full = apply(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise MoekdError(
                "the tokenizer's chat template renders a conversation that does not start with its "
                "generation prompt; set template to a format string instead"
            )
        reply = full[len(prompt):]
        content = reply.find(response.strip())
        if content < 0:
            raise MoekdError("the tokenizer's chat template changes the response text; set template to a format string")
        content += len(response.strip())
        ends = [(i, t) for t in self.end_tokens if (i := reply.find(t, content)) >= 0]
        if not ends:
            raise MoekdError(
                "the tokenizer's chat template does not end the assistant turn with a special token; "
                "set template to a format string"
            )
        i, token = min(ends)
        return prompt, reply[: i + len(token)]


def check_format_string(template: str) -> None:
    if "{instruction}" not in template:
        raise MoekdError(f"template {template!r} is neither \"chat\" nor a format string with {{instruction}}")
    try:
        template.format(instruction="", context="")
    except (KeyError, IndexError, ValueError) as e:
        raise MoekdError(
            f"template {template!r} must be a format string of only {{instruction}} and {{context}}: {e!r}"
        ) from None


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens the prompt shares with the full sequence (less than the prompt only if BPE merged across the boundary)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


Truncation = Literal["left", "skip"]


def fit_length(ids: list[int], prompt_length: int, max_length: int, truncation: Truncation) -> tuple[list[int], int] | str:
    """(ids, prompt length) cut to `max_length` tokens, or the reason the example is skipped.

    `left` keeps the response and the end of the prompt: the prompt loses its
    first tokens, keeping at least min(its length, max_length // 2), and only a
    response too long for the rest is cut on the right. `skip` cuts on the
    right and skips an example whose prompt alone fills `max_length`.
    """
    if len(ids) <= max_length:
        return ids, prompt_length
    if truncation == "skip":
        return (ids[:max_length], prompt_length) if prompt_length < max_length else "prompt_too_long"
    response_length = len(ids) - prompt_length
    keep = min(prompt_length, max(max_length - response_length, max_length // 2))
    return ids[prompt_length - keep : prompt_length - keep + max_length], keep


def example_from_record(
    record: dict, fields: RecordFields, template: Template, max_length: int, default_source: str,
    truncation: Truncation = "left", max_record_bytes: int = MAX_RECORD_BYTES,
) -> dict | str:
    """A prepared row (SCHEMA's columns, and "cut": what truncation removed) from one record, or the reason
    it is skipped (`fit_length`)."""
    instruction, response = record.get(fields.instruction), record.get(fields.response)
    if instruction is None or response is None:  # absent, or null in a table
        return "missing_field"
    context = record.get(fields.context) or ""
    source = record.get(fields.source) or default_source
    references = record.get(fields.references) or []
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list):
        return "not_string"
    texts = [instruction, response, context, source, *references]
    if not all(isinstance(t, str) for t in texts):
        return "not_string"
    try:
        size = sum(len(t.encode("utf-8")) for t in texts)
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): not text a tokenizer takes
        return "invalid_text"
    if size > max_record_bytes:
        return "record_too_large"
    if not instruction.strip() or not response.strip():
        return "empty_field"
    full_ids, full_prompt_length = template.encode(instruction, context, response)
    fitted = fit_length(full_ids, full_prompt_length, max_length, truncation)
    if isinstance(fitted, str):
        return fitted
    ids, prompt_length = fitted
    cut = {"prompt_truncated": prompt_length < full_prompt_length,
           "response_truncated": len(ids) - prompt_length < len(full_ids) - full_prompt_length}
    return {
        "cut": [reason for reason, happened in cut.items() if happened],  # not stored: counted by `prepare`
        "input_ids": ids,
        "response_mask": [t >= prompt_length for t in range(len(ids))],
        "prompt_length": prompt_length,
        "references": [response] + [r for r in references if r != response],
        "source": source,
    }


def calibration_ids(path: Path, tokenizer, tokens: int, sequence_length: int) -> torch.Tensor:
    """(B, sequence_length) token ids: instruction records of `path` in file order, chat-formatted and
    packed end to end, at most `tokens` in all (what upcycling and width pruning measure activations on)."""
    return labelled_calibration_ids(path, tokenizer, tokens, sequence_length)[0]


def labelled_calibration_ids(path: Path, tokenizer, tokens: int, sequence_length: int,
                             label_field: str | None = None) -> tuple[torch.Tensor, list]:
    """`calibration_ids`, and each token's label: the value of its record's `label_field` (None without one),
    a list of B * sequence_length in the ids' order (what a router fitted per domain learns from)."""
    if tokens < sequence_length:
        raise MoekdError(f"calibration_tokens {tokens} is less than sequence_length {sequence_length}: "
                         "not even one calibration sequence")
    if not Path(path).is_file():
        raise MoekdError(f"calibration data not found: {path}")
    template = Template(tokenizer, "chat")
    fields = RecordFields("instruction", "context", "response", "references", "source")
    ids: list[int] = []
    labels: list = []
    for record in read_records(Path(path)):
        example = example_from_record(record, fields, template, 1 << 30, "") if isinstance(record, dict) else record
        if isinstance(example, dict):  # a string is the reason a record is unusable: skip it
            label = record.get(label_field) if label_field else None
            if label_field and not isinstance(label, str):
                raise MoekdError(f"calibration data {path}: a record has no text field {label_field!r}")
            ids += example["input_ids"]
            labels += [label] * len(example["input_ids"])
        if len(ids) >= tokens:
            break
    rows = min(len(ids), tokens) // sequence_length
    if rows < 1:
        raise MoekdError(f"calibration data {path} holds {len(ids)} tokens, fewer than one sequence of "
                         f"{sequence_length}")
    kept = rows * sequence_length
    return torch.tensor(ids[:kept]).view(rows, sequence_length), labels[:kept]


def write_prepared_data(path: Path, rows: Iterable[dict]) -> None:
    """Write rows to `path` atomically, ROW_GROUP_SIZE rows per row group (what readers fetch at once)."""
    rows = iter(rows)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            while batch := list(itertools.islice(rows, ROW_GROUP_SIZE)):
                writer.write_table(pa.Table.from_pylist(batch, SCHEMA))

    atomic_write(path, write)


# ---------------------------------------------------------------- reading prepared data

@dataclass
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
            PreparedExample(start + i, ids, mask, prompt_length, references, source)
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
