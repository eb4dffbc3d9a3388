"""Summarise a teacher-logit cache and show the teacher's top tokens for one sequence.

A cache may come from another team: the summary shows '?' for whatever its
manifest does not say, the sequence view reads its shard checked against the
manifest, and no path written in the manifest is followed (the tokenizer is
given on the command line). A cache still being written is summarised, its
missing shards named; one holding a record moekd does not trust is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.cache.card import said, summary
from pipeline.cache.manifest import Manifest
from pipeline.core.errors import MoekdError
from pipeline.models.loading import honours_remote_code, load_tokenizer


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("cache",)
    cache: str  # the cache: a directory or an fsspec URI (s3://bucket/prefix, ...)
    seq: int | None = None  # a sequence (prepared row) to show; None = summary only
    top: int = 5  # tokens shown per position and sample
    max_positions: int = 16  # positions shown
    tokenizer: str | None = None  # the teacher's tokenizer directory: decodes the sequence view
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)


@honours_remote_code
def run(config: Config) -> None:
    manifest = Manifest.load(config.cache)
    print(summary(manifest))
    if config.seq is not None:
        print(sequence_view(manifest, config))


def sequence_view(manifest: Manifest, config: Config) -> str:
    shard_size, rows = manifest.identity.shard_size, manifest.identity.rows
    if manifest.layout is None:
        raise MoekdError(f"{manifest.location}'s manifest does not say how its rows are sharded "
                         "(identity.shard_size and identity.rows); it was not written by `moekd cache`")
    if config.tokenizer is None:
        raise MoekdError(f"showing a sequence needs tokenizer=<the teacher's tokenizer directory> (the manifest "
                         f"records teacher_path {said(manifest.info, 'teacher_path')!r}; moekd does not follow "
                         "paths a cache names)")
    shard = config.seq // shard_size
    if not 0 <= config.seq < rows:
        raise MoekdError(f"seq {config.seq} is out of range (the cache covers {rows} sequences)")
    if shard not in manifest.committed():
        raise MoekdError(f"seq {config.seq} is in shard {shard}, which is not written yet")
    record = manifest.read_shard(shard, rows=[config.seq - shard * shard_size])[0]
    tokenizer = load_tokenizer(config.tokenizer)
    show = lambda i: repr(tokenizer.decode([int(i)]))  # noqa: E731 - repr makes spaces and newlines visible
    lines = [f"\nsequence {config.seq}: {len(record.input_ids)} tokens, {len(record.positions)} stored positions"]
    starts = None if record.sample_sizes is None else np.cumsum(record.sample_sizes) - record.sample_sizes
    for t, position in enumerate(record.positions[: config.max_positions]):
        target = record.input_ids[position + 1]
        lines.append(f"  pos {position:4d} -> target {show(target)}")
        if starts is not None:  # a sampled cache: the ids drawn most often
            ids = record.sample_ids[starts[t] : starts[t] + record.sample_sizes[t]]
            counts = record.sample_counts[starts[t] : starts[t] + record.sample_sizes[t]]
            order = np.argsort(-counts, kind="stable")[: config.top]
            lines.append("    drawn: " + ", ".join(f"{show(ids[i])} x{counts[i]}" for i in order))
            continue
        for m in range(record.topk_ids.shape[0]):
            order = np.argsort(-record.topk_logprobs[m, t])[: config.top]
            ranked = ", ".join(
                f"{show(record.topk_ids[m, t, i])} {np.exp(record.topk_logprobs[m, t, i]):.3f}" for i in order
            )
            tail = 1.0 - np.exp(record.topk_logprobs[m, t]).sum()
            lines.append(f"    sample {m}: {ranked}  (tail {max(tail, 0.0):.3f})")
    return "\n".join(lines)
