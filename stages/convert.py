"""Bring teacher log-probs other tools wrote into a moekd cache, or take a moekd cache out to their formats.

    moekd convert CACHE OUT format=topk_logprobs              # export (CACHE holds manifest.json)
    moekd convert IN CACHE format=distillkit tokenizer=DIR    # import (IN: a Parquet file or a folder of them)

Formats (`pipeline.formats`): `topk_logprobs`, per-token top-k log-prob lists
as axolotl's KD datasets hold them, and `distillkit`, DistillKit's compressed
log-probs (its `compression_config.yaml` beside the data). Both hold one
top-k distribution per token: a cache of several routing samples (KA, M > 1)
or of sampled tokens (`storage: sampled`) is refused with the reason, not
flattened.

Export writes `data/train-NNNNN-of-NNNNN.parquet`, one per cache shard (and,
for DistillKit, the lossless `compression_config.yaml`), records what it
exported in `convert.json` first, and resumes at the first missing file; the
values are the cache's float16-rounded log-probs, unchanged.

Import reads the input's Parquet files in name order, a row per sequence
(a packed DistillKit row per document), one file in memory at a time: a
first pass checks every distribution (ids in the vocabulary of `tokenizer`,
log-probs that sum to at most 1: logits are refused) and counts the rows,
so bad input writes nothing; the second writes a moekd cache with the usual
commit protocol (resumable, card included), whose identity names the source
format and the sha256 of its files. The log-probs are stored as moekd stores them (float16-rounded).
Nothing in the input is executed; paths it might hold are not followed.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from pipeline.cache.card import write_card
from pipeline.cache.identity import CacheIdentity, encoding_spec
from pipeline.cache.manifest import MANIFEST, Manifest
from pipeline.cache.shards import TeacherRecord, write_shard
from pipeline.cache.storage import open_store
from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write_bytes, atomic_write_json, read_confined, sha256_file
from pipeline.core.outputs import Output, Verdict, judge, recorded_in
from pipeline.formats import Sequence, distillkit, topk_logprobs
from pipeline.models.identity import tokenizer_fingerprint
from pipeline.models.loading import honours_remote_code, load_config, load_tokenizer
from pipeline.models.logprobs import config_vocab_size

REPORT = "convert.json"
DATA = "data"
CONFIG_BYTES = 1 << 20


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("input", "output")
    input: str  # a moekd cache (export), or a Parquet file or folder of them in `format` (import)
    output: str  # the exported folder (local), or the moekd cache to write (a directory or fsspec URI)
    format: Literal["topk_logprobs", "distillkit"]
    tokenizer: str | None = None  # import: the teacher's model directory (its tokenizer; config.json's vocab_size)
    compression_config: str | None = None  # import distillkit: its compression_config.yaml (default: the input's)
    teacher_name: str | None = None  # import: the teacher's name in the cache (default: the input's name)
    shard_size: int = 256  # import: sequences per shard
    license: str | None = None  # import: the cache card's license (a Hub identifier)
    overwrite: bool = False  # replace an output made from something else
    trust_remote_code: bool = False  # let the tokenizer directory run its own Python code (off: never)

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")


@honours_remote_code
def run(config: Config) -> None:
    if open_store(config.input).exists(MANIFEST):
        export(config)
    else:
        import_files(config)


def export(config: Config) -> None:
    """The cache at `config.input` as `config.format` files in `config.output`."""
    manifest = Manifest.load(config.input, whole=True)
    encoding, output = manifest.identity.encoding, Path(config.output)
    if encoding.sampled:
        raise MoekdError(f"{config.input} stores tokens drawn from the teacher (storage: sampled), not log-probs; "
                         f"{config.format} holds top-k log-probs: export a top-k cache")
    if encoding.num_samples > 1:
        raise MoekdError(f"{config.input} holds M={encoding.num_samples} routing samples per token (KA); "
                         f"{config.format} holds one distribution per token: export a cache of the teacher's own "
                         "routing (routing.mode=topk)")
    codec = distillkit.lossless(encoding.vocab_size, encoding.k)
    wanted = {"format": config.format, "cache": manifest.identity.hash}
    where = Output(output, holds="holds another export", side="the export",
                   unrecorded="holds files that no export recorded")
    verdict = judge(where, recorded_in(output, REPORT), wanted, config.overwrite)
    if verdict is Verdict.REPLACE:  # what an export writes, nothing else
        shutil.rmtree(output / DATA, ignore_errors=True)
        for name in (REPORT, distillkit.CONFIG_FILE):
            (output / name).unlink(missing_ok=True)
    (output / DATA).mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / REPORT, wanted)
    if config.format == distillkit.NAME:
        atomic_write_bytes(output / distillkit.CONFIG_FILE, yaml.safe_dump(codec.as_mapping(), sort_keys=False).encode())
    shards = sorted(manifest.shards)
    for index in tqdm(shards, desc="export", unit="shard", dynamic_ncols=True):
        path = output / DATA / f"train-{index:05d}-of-{len(shards):05d}.parquet"
        if path.is_file():  # written whole (atomically) by this export before
            continue
        sequences = [Sequence(r.input_ids, r.positions, r.topk_ids[0], r.topk_logprobs[0])
                     for r in manifest.read_shard(index)]
        table = topk_logprobs.to_table(sequences) if config.format == topk_logprobs.NAME \
            else distillkit.to_table(sequences, codec)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
    print(f"convert: {config.input} exported as {config.format} to {output} ({len(shards)} files)")


def import_files(config: Config) -> None:
    """The `config.format` files at `config.input` as a moekd cache at `config.output`."""
    if config.tokenizer is None:
        raise MoekdError("importing needs tokenizer=<the teacher's model directory>: its tokenizer is the one the "
                         "ids are in, and its vocab_size the distributions'")
    files = input_files(Path(config.input))
    tokenizer = load_tokenizer(config.tokenizer)
    vocab_size = config_vocab_size(load_config(config.tokenizer))
    codec = compression(config) if config.format == distillkit.NAME else None
    rows, widths = 0, set()  # a first pass checks everything, so that bad input writes nothing
    for seq in tqdm(read_sequences(files, codec, vocab_size), desc="check", unit="seq", dynamic_ncols=True):
        rows += 1
        widths |= {seq.ids.shape[1]} if len(seq.positions) else set()
    if len(widths) != 1:
        held = f"distributions of {', '.join(map(str, sorted(widths)))} entries" if widths else "no distributions"
        raise MoekdError(f"{config.input} holds {held}; a moekd cache needs one k")
    k = widths.pop()
    sources = hashlib.sha256("".join(f"{p.name}:{sha256_file(p)};" for p in files).encode()).hexdigest()
    teacher = {"name": config.teacher_name or Path(config.input).name,
               "imported": {"format": config.format, "sha256": sources}
               | ({"compression": codec.as_mapping()} if codec else {})}
    spec = dict(vocab_size=vocab_size, num_samples=1, k=k)
    identity = CacheIdentity.imported(
        teacher=teacher, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), data_fingerprint=sources,
        rows=rows, shard_size=config.shard_size, encoding=encoding_spec(**spec))
    info = {"teacher_path": None, "data_path": config.input, "license": config.license}
    manifest = Manifest.open(config.output, identity, info, config.overwrite)
    todo = {s for s in range(identity.num_shards) if s not in manifest.committed()}
    records = []  # the shard being gathered; the second pass holds one shard at a time
    for seq_id, seq in enumerate(tqdm(read_sequences(files, codec, vocab_size), total=rows, desc="cache",
                                      unit="seq", dynamic_ncols=True)):
        index = seq_id // config.shard_size
        if index in todo:
            records.append(TeacherRecord(seq_id, seq.input_ids.astype(np.int32), seq.positions.astype(np.int32),
                                         topk_ids=seq.ids.reshape(1, -1, k), topk_logprobs=seq.logprobs.reshape(1, -1, k)))
        if records and (seq_id + 1 == rows or (seq_id + 1) % config.shard_size == 0):
            manifest.commit(write_shard(manifest.store, index, records, **spec))
            records = []
    write_card(manifest)
    print(f"convert: {len(files)} {config.format} files imported into {config.output} ({rows} sequences, k={k}, "
          f"{len(todo)} shards written)")


def read_sequences(files: list[Path], codec: distillkit.CompressionConfig | None, vocab_size: int
                   ) -> Iterator[Sequence]:
    """The sequences of the input files in order, checked, one file in memory at a time."""
    for path in files:
        table = read_table(path)
        yield from (topk_logprobs.from_table(table, vocab_size, str(path)) if codec is None
                    else distillkit.from_table(table, codec, vocab_size, str(path)))


def input_files(path: Path) -> list[Path]:
    """The Parquet files to import: `path` itself, or those under the folder `path`, in name order."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.is_symlink()) if path.is_dir() else []
    if not files:
        raise MoekdError(f"{path}: no Parquet files to import")
    return files


def read_table(path: Path) -> pa.Table:
    """A Parquet file someone handed over, or its one-line refusal."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise MoekdError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None


def compression(config: Config) -> distillkit.CompressionConfig:
    """The DistillKit compression settings the input was written with (safe YAML, checked)."""
    path = Path(config.compression_config) if config.compression_config else Path(config.input) / distillkit.CONFIG_FILE
    if not path.is_file():
        raise MoekdError(f"importing DistillKit data needs its {distillkit.CONFIG_FILE} (the settings are not in the "
                         f"data): none at {path}; give compression_config=PATH")
    try:
        data = yaml.safe_load(read_confined(path.parent, path.name, "compression config", CONFIG_BYTES))
    except yaml.YAMLError as e:
        raise MoekdError(f"{path} is not YAML ({str(e).splitlines()[0]})") from None
    return distillkit.CompressionConfig.from_mapping(data, str(path))
