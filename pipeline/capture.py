"""Capturing the teacher: top-k log-probabilities at response positions, per routing sample.

The teacher runs once per routing sample (M forwards for KA). Only the hidden
states at response-predicting positions are kept, and the vocabulary
projection + log-softmax run over chunks of those tokens, so memory never holds
more than `chunk_tokens x vocab` floats, whatever the batch.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from pipeline.cache_format import TeacherRecord
from pipeline.data import PreparedExample, padded, target_positions


def response_hidden_states(model, input_ids, attention_mask, positions: list[np.ndarray]) -> torch.Tensor:
    """Final hidden states (N, H) at the given positions of each row, rows concatenated."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(positions)])
    cols = torch.from_numpy(np.concatenate(positions)).long()
    return hidden[rows.to(hidden.device), cols.to(hidden.device)]


def vocab_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits over the full vocabulary for hidden states (n, H), softcapped where the family does."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def vocab_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the full vocabulary (float32) for hidden states (n, H)."""
    return torch.log_softmax(vocab_logits(model, hidden), dim=-1)


@torch.no_grad()
def topk_from_hidden(model, hidden: torch.Tensor, k: int, aggregate: bool, chunk_tokens: int = 256):
    """Top-k (ids, log-probs) per sample from hidden (M, N, H); optionally of the sample mean.

    Log-probs are the top-k logits minus the log-partition, so no (n, V)
    log-softmax is written. The aggregate is the top-k of log((1/M) Σ_m p^(m)):
    the single target with the same forward-KL gradient as averaging the M
    per-sample losses. Small chunks keep the (chunk, V) work in cache.
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
def capture_batch(
    model,
    routing,
    examples: list[PreparedExample],
    *,
    k: int,
    num_samples: int,
    aggregate: bool,
    pad_id: int,
) -> list[TeacherRecord]:
    """Run the teacher over one batch, once per routing sample, and return one record per example."""
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in padded([e.input_ids for e in examples], pad_id))
    positions = [target_positions(e.response_mask) for e in examples]
    seq_ids = [e.seq_id for e in examples]
    hidden = []
    for sample in range(num_samples):
        with routing.sequences(seq_ids, sample, attention_mask):
            hidden.append(response_hidden_states(model, input_ids, attention_mask, positions))
    top = topk_from_hidden(model, torch.stack(hidden), k, aggregate)
    return split_records(examples, positions, [t.cpu().numpy() for t in top])


def split_records(examples, positions, top) -> list[TeacherRecord]:
    """Cut the concatenated (M, N, k) arrays back into one record per example."""
    ids, logprobs = top[0], top[1]
    records, start = [], 0
    for example, pos in zip(examples, positions):
        stop = start + len(pos)
        record = TeacherRecord(
            seq_id=example.seq_id,
            input_ids=example.input_ids.astype(np.int32),
            positions=pos.astype(np.int32),
            topk_ids=ids[:, start:stop].astype(np.int64),
            topk_logprobs=logprobs[:, start:stop].astype(np.float32),
        )
        if len(top) == 4:
            record.agg_ids = top[2][start:stop].astype(np.int64)
            record.agg_logprobs = top[3][start:stop].astype(np.float32)
        records.append(record)
        start = stop
    return records
