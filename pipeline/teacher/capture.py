"""Capturing the teacher at a batch's targets: top-k log-probabilities per routing sample, or sampled tokens.

What stage one captures is a `Capture`; who captures it, a `TeacherBackend`
(the interface of stage one's backends, `teacher.backends`). The rest of this
module is the capture of the transformers forward, which the transformers
backend and an online teacher (`sources.OnlineTeacher`) share:

The teacher runs once per routing sample (M forwards for KA). Only its hidden
states at the targets are kept (`logprobs.target_hidden`), and the vocabulary
projection (`logprobs.vocab_logits`) runs over chunks of those positions, so
memory never holds more than `CAPTURE_CHUNK_TOKENS x vocab` floats, whatever
the batch. The cache stage splits the result into one record per sequence;
an online teacher attaches it to the batch as the cache's reader would.

Sampled capture (`teacher_draws`) draws, per target, tokens with replacement
from the mixture of the M samples' distributions (equivalently: a sample, then
a token from it). Sequence `seq_id` draws from its own generator (run seed,
"draws", seq_id), over its own positions in order, so its draws do not
depend on the batch, the padding or the worker that computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.cache.shards import TeacherRecord
from pipeline.core.seeding import generator
from pipeline.data.batch import Batch
from pipeline.data.prepared import PreparedExample
from pipeline.models.backend import Backend, EngineConfig, Progress, no_progress
from pipeline.models.loading import Placement
from pipeline.models.logprobs import target_hidden, vocab_logits
from pipeline.teacher.routing import RoutingConfig

# Smaller than logprobs.CHUNK_TOKENS: the (chunk, V) work stays in cache. The float rounding of the
# projection depends on the chunk, so changing it changes the bytes of every cache made from now on.
CAPTURE_CHUNK_TOKENS = 256
# The most tokens `teacher_draws` draws per target: it holds a chunk's draws at once, 8 bytes each (a few
# copies of 128 MiB at this bound), and a cache stores their counts as int32.
MAX_DRAWS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Capture:
    """What stage one captures of the teacher at every training target: the routing it runs with (M samples),
    and the top `top_k` log-probs per sample (and, with `aggregate`, of their mean) or (`storage="sampled"`)
    `draws` tokens drawn from their mixture; `batch_size` rows per forward where the backend batches."""

    routing: RoutingConfig
    storage: Literal["topk", "sampled"] = "topk"
    top_k: int = 64
    aggregate: bool = False
    draws: int = 64
    batch_size: int = 8


class TeacherBackend(Backend):
    """Stage one's teacher: `records` of a shard's prepared rows (see the module docstring)."""

    @classmethod
    def refusal(cls, capture: Capture, *, routers: str | None, engine: EngineConfig,
                placement: Placement | None = None) -> str | None:
        """Why this backend cannot capture `capture` (with a routers file, these engine settings, this placement
        of the model over devices), or None."""
        return None

    def records(self, examples: list[PreparedExample], progress: Progress = no_progress) -> list[TeacherRecord]:
        """One record per example, in seq_id order; `progress(n)` as n more targets are done."""
        raise NotImplementedError



@torch.no_grad()
def topk_from_hidden(model, hidden: torch.Tensor, k: int, aggregate: bool, chunk_tokens: int = CAPTURE_CHUNK_TOKENS):
    """Top-k (ids, log-probs) per sample from hidden (M, N, H); optionally of the sample mean.

    Log-probs are the top-k logits minus the log-partition, so no (n, V)
    log-softmax is written. The aggregate is the top-k of log((1/M) Σ_m p^(m)):
    the single target with the same forward-KL gradient as averaging the M
    per-sample losses.
    """
    num_samples, n, _ = hidden.shape
    ids, logprobs, agg_ids, agg_logprobs = [], [], [], []
    for start in range(0, n, chunk_tokens):
        total = None
        for m in range(num_samples):
            logits = vocab_logits(model, hidden[m, start : start + chunk_tokens])
            log_partition = logits.logsumexp(dim=-1, keepdim=True)
            top = logits.topk(k, dim=-1)
            ids.append(top.indices)
            logprobs.append(top.values - log_partition)
            if aggregate:
                sample = logits.sub_(log_partition)
                total = sample if total is None else torch.logaddexp(total, sample, out=total)
        if aggregate:
            top = total.topk(k, dim=-1)
            agg_ids.append(top.indices)
            agg_logprobs.append(top.values - math.log(num_samples))
    by_sample = lambda parts: torch.stack([torch.cat(parts[m::num_samples]) for m in range(num_samples)])  # noqa: E731
    result = (by_sample(ids), by_sample(logprobs))
    if aggregate:
        result += (torch.cat(agg_ids), torch.cat(agg_logprobs))
    return result


@torch.no_grad()
def teacher_topk(model, routing, batch: Batch, *, k: int, num_samples: int, aggregate: bool) -> tuple:
    """The teacher's top-k at the batch's targets: (ids, log-probs) (M, N, k), and with `aggregate` the
    top-k of the samples' mean (N, k) twice more. The batch must be on the model's device."""
    return topk_from_hidden(model, sample_hidden(model, routing, batch, num_samples), k, aggregate)


def sample_hidden(model, routing, batch: Batch, num_samples: int) -> torch.Tensor:
    """The teacher's final hidden states at the batch's targets under each routing sample: (M, N, H)."""
    hidden = []
    for sample in range(num_samples):
        with routing.sequences(batch.seq_ids, sample, batch.attention_mask):
            hidden.append(target_hidden(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols))
    return torch.stack(hidden)


def mixture_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """log((1/M) Σ_m p^(m)) over the vocabulary, for hidden states (M, n, H) of M routing samples."""
    logprobs = [torch.log_softmax(vocab_logits(model, h), dim=-1) for h in hidden]
    return torch.logsumexp(torch.stack(logprobs), dim=0) - math.log(len(hidden))


def distinct_counts(drawn: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws (T, N) as (distinct ids per position (T,), the ids ascending per position, their counts)."""
    ordered = drawn.sort(dim=-1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = new.flatten().nonzero()[:, 0]
    ends = torch.cat([starts[1:], torch.tensor([ordered.numel()])])
    row_ends = (starts // ordered.shape[1] + 1) * ordered.shape[1]  # a run never crosses its position's end
    counts = torch.minimum(ends, row_ends) - starts
    return new.sum(-1).numpy(), ordered.flatten()[starts].numpy(), counts.numpy()


@torch.no_grad()
def teacher_draws(model, routing, batch: Batch, *, num_samples: int, draws: int, seed: int) -> list[tuple]:
    """Per row of the batch, `draws` tokens per target drawn with replacement from the mixture of the M
    samples' distributions, as `distinct_counts` gives them. The batch must be on the model's device."""
    hidden = sample_hidden(model, routing, batch, num_samples)
    counts = torch.bincount(batch.rows.cpu(), minlength=len(batch.seq_ids)).tolist()
    result, start = [], 0
    for seq_id, count in zip(batch.seq_ids, counts):
        g = generator(seed, "draws", seq_id)
        parts = [distinct_counts(torch.zeros(0, draws, dtype=torch.long))]  # per chunk: only its draws are held
        for first in range(start, start + count, CAPTURE_CHUNK_TOKENS):
            chunk = hidden[:, first : min(first + CAPTURE_CHUNK_TOKENS, start + count)]
            probs = mixture_logprobs(model, chunk).exp().float().cpu()
            parts.append(distinct_counts(torch.multinomial(probs, draws, replacement=True, generator=g)))
        result.append(tuple(np.concatenate(part) for part in zip(*parts)))
        start += count
    return result


def capture_batch(model, routing, batch: Batch, *, num_samples: int, k: int | None = None, aggregate: bool = False,
                  draws: int | None = None, seed: int = 0) -> list[TeacherRecord]:
    """Run the teacher over a batch of prepared rows (`collate_examples`), once per routing sample; one record
    per row, in the batch's order: the top-`k` per sample (and of their mean with `aggregate`), or with
    `draws`, that many tokens drawn per target (`teacher_draws`, seeded by `seed`)."""
    counts = torch.bincount(batch.rows.cpu(), minlength=len(batch.seq_ids)).tolist()
    if draws is not None:
        drawn = teacher_draws(model, routing, batch, num_samples=num_samples, draws=draws, seed=seed)
        return [TeacherRecord(seq_id=example.seq_id, input_ids=example.input_ids.astype(np.int32),
                              positions=positions.numpy().astype(np.int32), sample_sizes=sizes, sample_ids=ids,
                              sample_counts=number)
                for example, positions, (sizes, ids, number) in zip(batch.examples, batch.cols.cpu().split(counts),
                                                                    drawn)]
    top = [t.cpu().numpy() for t in teacher_topk(model, routing, batch, k=k, num_samples=num_samples,
                                                   aggregate=aggregate)]
    records, start = [], 0
    for example, positions, count in zip(batch.examples, batch.cols.cpu().split(counts), counts):
        stop = start + count
        record = TeacherRecord(
            seq_id=example.seq_id,
            input_ids=example.input_ids.astype(np.int32),
            positions=positions.numpy().astype(np.int32),
            topk_ids=top[0][:, start:stop].astype(np.int64),
            topk_logprobs=top[1][:, start:stop].astype(np.float32),
        )
        if aggregate:
            record.agg_ids = top[2][start:stop].astype(np.int64)
            record.agg_logprobs = top[3][start:stop].astype(np.float32)
        records.append(record)
        start = stop
    return records
