"""Capturing the teacher: top-k log-probabilities at a batch's targets, per routing sample.

The teacher runs once per routing sample (M forwards for KA). Only its hidden
states at the targets are kept (`logprobs.target_hidden`), and the vocabulary
projection (`logprobs.vocab_logits`) runs over chunks of those positions, so
memory never holds more than `CAPTURE_CHUNK_TOKENS x vocab` floats, whatever
the batch. The cache stage splits the result into one record per sequence;
an online teacher attaches it to the batch as the cache's reader would.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.cache_format import TeacherRecord
from pipeline.logprobs import target_hidden, vocab_logits

# Smaller than logprobs.CHUNK_TOKENS: the (chunk, V) work stays in cache. The float rounding of the
# projection depends on the chunk, so changing it changes the bytes of every cache made from now on.
CAPTURE_CHUNK_TOKENS = 256


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
    hidden = []
    for sample in range(num_samples):
        with routing.sequences(batch.seq_ids, sample, batch.attention_mask):
            hidden.append(target_hidden(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols))
    return topk_from_hidden(model, torch.stack(hidden), k, aggregate)


def capture_batch(model, routing, batch: Batch, *, k: int, num_samples: int, aggregate: bool) -> list[TeacherRecord]:
    """Run the teacher over a batch of prepared rows (`collate_examples`), once per routing sample;
    one record per row, in the batch's order."""
    top = [t.cpu().numpy() for t in teacher_topk(model, routing, batch, k=k, num_samples=num_samples,
                                                   aggregate=aggregate)]
    counts = torch.bincount(batch.rows.cpu(), minlength=len(batch.seq_ids)).tolist()
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
