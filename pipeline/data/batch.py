"""A training batch: right-padded sequences, their targets, and what the teacher says at them.

One batch type for every source of teacher knowledge: a cache's records
(`collate_records`: a top-k or sampled signal), prepared rows
(`collate_examples`, no teacher yet: SFT, or a teacher run on the batch,
`pipeline.teacher.sources`). The teacher is a typed signal
(`pipeline.data.signals`). Training, SAR and evaluation all read targets
from it, so they agree on which position predicts which token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pipeline.cache.shards import TeacherRecord
from pipeline.core.seeding import generator
from pipeline.data.prepared import PreparedExample, padded, target_positions
from pipeline.data.signals import NoTeacher, Sampled, Signal, TopK

TENSORS = ("input_ids", "attention_mask", "rows", "cols", "targets")


@dataclass(kw_only=True)
class Batch:
    """Right-padded sequences, their training targets and the teacher's signal at them.

    Target j is row `rows[j]`, position `cols[j]`: the logits there predict
    `targets[j] = input_ids[rows[j], cols[j] + 1]`. `teacher` is indexed by
    target on its second axis (`signals`): none (SFT), a top-k, dense or
    sampled teacher.
    """

    seq_ids: list[int]
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    rows: torch.Tensor  # (N,) long
    cols: torch.Tensor  # (N,) long
    targets: torch.Tensor  # (N,) long
    teacher: Signal = field(default_factory=NoTeacher)
    examples: list[PreparedExample] | None = None  # prepared rows, for a teacher in the loop

    @property
    def tokens(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device) -> "Batch":
        tensors = {name: getattr(self, name).to(device, non_blocking=True) for name in TENSORS}
        return replace(self, **tensors, teacher=self.teacher.to(device))


@dataclass(kw_only=True)
class Packed:
    """A batch's rows packed into fewer sequences, for the student's forward: each row keeps its own
    positions (0, 1, ...) so attention stays within it, and `rows`/`cols` say where each target went."""

    input_ids: torch.Tensor  # (P, L') long
    position_ids: torch.Tensor  # (P, L') long: restarting at 0 where a row (or the padding at the end) starts
    rows: torch.Tensor  # (N,) long: the packed sequence of target j
    cols: torch.Tensor  # (N,) long: its position there


def pack(batch: Batch, pack_length: int) -> Packed:
    """Pack `batch`'s right-padded rows first-fit, longest first, into sequences of at most `pack_length`
    tokens (a longer row gets one of its own); the packs are padded to the longest."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    capacity = max(pack_length, max(lengths, default=0))
    fills, members = [], []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        pack_index = next((p for p, fill in enumerate(fills) if fill + lengths[row] <= capacity), len(fills))
        if pack_index == len(fills):
            fills.append(0)
            members.append([])
        members[pack_index].append(row)
        fills[pack_index] += lengths[row]
    device, width = batch.input_ids.device, max(fills, default=0)
    input_ids = torch.zeros((len(fills), width), dtype=torch.long, device=device)
    position_ids = torch.zeros_like(input_ids)
    pack_of = torch.zeros(len(lengths), dtype=torch.long)
    offset = torch.zeros(len(lengths), dtype=torch.long)
    for p, rows in enumerate(members):
        start = 0
        for row in rows:
            n = lengths[row]
            input_ids[p, start : start + n] = batch.input_ids[row, :n]
            position_ids[p, start : start + n] = torch.arange(n, device=device)
            pack_of[row], offset[row] = p, start
            start += n
        position_ids[p, start:] = torch.arange(width - start, device=device)  # the padding: a row of its own
    pack_of, offset = pack_of.to(device), offset.to(device)
    return Packed(input_ids=input_ids, position_ids=position_ids, rows=pack_of[batch.rows],
                  cols=batch.cols + offset[batch.rows])


def make_batch(seq_ids: list[int], sequences: list[np.ndarray], positions: list[np.ndarray], pad_id: int) -> Batch:
    """The batch of right-padded `sequences` whose targets follow `positions` (per sequence)."""
    input_ids, attention_mask = padded(sequences, pad_id)
    rows = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor([len(p) for p in positions]))
    cols = torch.from_numpy(np.concatenate(positions).astype(np.int64))
    return Batch(seq_ids=seq_ids, input_ids=input_ids, attention_mask=attention_mask, rows=rows, cols=cols,
                 targets=input_ids[rows, cols + 1])


def collate_records(records: list[TeacherRecord], pad_id: int, aggregate: bool = False,
                    top_k: int | None = None) -> Batch:
    """A batch with the records' teacher: all M samples (`TopK`, (M, N, k)), their stored aggregate (`TopK`,
    (1, N, k)), or a sampled cache's draws (`Sampled`, (1, N, K) with K the most distinct ids at one target).
    `top_k` keeps the most probable `top_k` of a top-k cache's k entries."""
    batch = make_batch([r.seq_id for r in records], [r.input_ids for r in records],
                       [r.positions for r in records], pad_id)
    if records and records[0].sample_ids is not None:
        sizes = np.concatenate([r.sample_sizes for r in records])
        ids = np.concatenate([r.sample_ids for r in records])
        counts = np.concatenate([r.sample_counts for r in records]).astype(np.float32)
        target = np.repeat(np.arange(len(sizes)), sizes)
        slot = np.arange(len(ids)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        width = int(sizes.max(initial=1))
        drawn = torch.zeros((1, len(sizes), width), dtype=torch.long)
        weights = torch.zeros((1, len(sizes), width), dtype=torch.float32)
        drawn[0, target, slot] = torch.from_numpy(ids.astype(np.int64))
        draws = np.repeat(np.add.reduceat(counts, np.cumsum(sizes) - sizes) if len(ids) else counts, sizes)
        weights[0, target, slot] = torch.from_numpy(counts / draws)
        return replace(batch, teacher=Sampled(ids=drawn, weights=weights))
    if aggregate:
        ids = np.concatenate([r.agg_ids for r in records])[None]
        logprobs = np.concatenate([r.agg_logprobs for r in records])[None]
    else:
        ids = np.concatenate([r.topk_ids for r in records], axis=1)
        logprobs = np.concatenate([r.topk_logprobs for r in records], axis=1)
    if top_k is not None and top_k < ids.shape[-1]:
        keep = np.sort(np.argsort(-logprobs, axis=-1, kind="stable")[..., :top_k], axis=-1)  # in the stored order
        ids, logprobs = np.take_along_axis(ids, keep, -1), np.take_along_axis(logprobs, keep, -1)
    return replace(batch, teacher=TopK(ids=torch.from_numpy(ids.astype(np.int64)),
                                       logprobs=torch.from_numpy(logprobs.astype(np.float32))))


def collate_examples(examples: list[PreparedExample], pad_id: int) -> Batch:
    """A batch of prepared rows without a teacher (SFT, or a teacher run later); keeps the examples."""
    batch = make_batch([e.seq_id for e in examples], [e.input_ids for e in examples],
                       [target_positions(e.response_mask) for e in examples], pad_id)
    batch.examples = examples
    return batch


def one_sample_per_sequence(batch: Batch, seed: int, step: int) -> Batch:
    """Keep one of the M samples of a top-k teacher per sequence, drawn from (seed, step, seq_id)."""
    teacher = batch.teacher
    num_samples = teacher.samples
    picks = torch.tensor([
        int(torch.randint(num_samples, (), generator=generator(seed, "ka sample", step, seq_id)))
        for seq_id in batch.seq_ids
    ], device=batch.rows.device)
    sample, token = picks[batch.rows], torch.arange(batch.tokens, device=batch.rows.device)
    return replace(batch, teacher=TopK(ids=teacher.ids[sample, token][None],
                                       logprobs=teacher.logprobs[sample, token][None]))
