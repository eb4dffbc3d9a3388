"""Evaluating a causal LM: response loss and perplexity, KL to a teacher cache, exact match and ROUGE-L.

Shared by `moekd eval` and by the training stages (held-out loss). Every
function takes a loaded model in eval mode and runs without gradients.

- Loss: mean cross-entropy (nats) over response-predicting positions, the
  positions the cache and the KD loss use (`prepared.target_positions`);
  perplexity is its exp. Summed per example, so any grouping (per source,
  per split, overall) is token-weighted.
- KL: mean over the cache's stored positions of (1/M) Σ_m KL(p^(m) ‖ q), the
  sparse top-k + tail-bucket forward KL of `losses.sample_mean_divergence`
  with the default `LossConfig` (the D of default KD training). It is not exactly 0 for
  the teacher itself: float16 log-probs leave the teacher a small tail residue.
- Exact match: 1 when a generation (`generation`) equals a reference once
  both are lower-cased, their whitespace collapsed and trailing full stops
  dropped; the share of such examples is the accuracy on short-answer tasks.
- ROUGE-L: `rouge_score`'s RougeScorer(["rougeL"], use_stemmer=True), the
  F-measure, maximised over the references, as the paper's benchmark suite
  (Dolly, Self-Instruct, Vicuna, S-NI, UnNI; the MiniLLM protocol) scores
  responses; `moekd eval` reports it x100. Its tokenizer lowercases and keeps
  only [a-z0-9] runs, so text without Latin letters or digits scores 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from pipeline.cache.manifest import Manifest
from pipeline.core.errors import MoekdError
from pipeline.data.batch import Batch, collate_examples, collate_records
from pipeline.data.prepared import PreparedData, PreparedExample
from pipeline.models.loading import model_device
from pipeline.models.logprobs import chunks, target_hidden, vocab_logprobs
from pipeline.student.losses import LossConfig, sample_mean_divergence

ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def select_examples(data: PreparedData, max_examples: int | None = None) -> list[PreparedExample]:
    """Every example, or `max_examples` evenly spaced ones: rows i * n // max_examples.

    Evenly spaced rather than the first N, so that a split holding several
    data sets one after another keeps all of them; the choice depends only on
    n and max_examples.
    """
    n = len(data)
    count = n if max_examples is None else min(max_examples, n)
    wanted = np.arange(count, dtype=np.int64) * n // max(count, 1)
    examples = []
    starts = data.group_starts
    for start, stop in zip(starts[:-1], starts[1:]):  # one read per row group that holds a wanted row
        inside = wanted[(wanted >= start) & (wanted < stop)]
        if len(inside):
            rows = data.rows(int(start), int(stop))
            examples += [rows[i - start] for i in inside]
    return examples


def batch_nll(model, batch: Batch, teacher: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per target of `batch` (on the model's device): the model's cross-entropy (N,) and, with `teacher`,
    the sample-averaged sparse KL(teacher ‖ model) of the batch's cached top-k (N,); float64 on the CPU."""
    batch = batch.to(model_device(model))
    hidden = target_hidden(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
    nll, kl = [], []
    for chunk in chunks(len(hidden)):
        logprobs = vocab_logprobs(model, hidden[chunk])
        nll.append(-logprobs.gather(-1, batch.targets[chunk, None])[:, 0])
        if teacher:
            kl.append(sample_mean_divergence(logprobs, batch.teacher.chunk(chunk), LossConfig()))
    to_cpu = lambda parts: torch.cat(parts).double().cpu()  # noqa: E731
    return to_cpu(nll), to_cpu(kl) if teacher else None


def per_row(values: torch.Tensor, batch: Batch) -> list[float]:
    """Per-target values (N,) summed per row of the batch."""
    return torch.zeros(len(batch.seq_ids), dtype=values.dtype).index_add_(0, batch.rows.cpu(), values).tolist()


@torch.no_grad()
def example_losses(
    model, examples: list[PreparedExample], batch_size: int = 8, pad_id: int = 0, desc: str = "loss"
) -> list[tuple[float, int]]:
    """(summed cross-entropy in nats, number of response targets) per example, in order.

    Batches are formed from length-sorted examples (less padding); the order
    is fixed by the examples, so results do not depend on anything else.
    """
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        indices = order[start : start + batch_size]
        batch = collate_examples([examples[i] for i in indices], pad_id)
        nll, _ = batch_nll(model, batch)
        counts = torch.bincount(batch.rows, minlength=len(indices)).tolist()
        for i, total, count in zip(indices, per_row(nll, batch), counts):
            results[i] = (total, count)
    return results


def summarize(rows: list[dict]) -> dict:
    """Metrics of per-example rows ({"nll", "tokens"}, optionally "rougeL" and "exact").

    loss: token-weighted mean cross-entropy; ppl: exp(loss); rougeL and exact:
    the mean of the rows' values.
    """
    tokens = sum(r["tokens"] for r in rows)
    loss = sum(r["nll"] for r in rows) / tokens if tokens else math.nan
    summary = {"examples": len(rows), "tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 700.0))}
    for key in ("rougeL", "exact"):
        if rows and key in rows[0]:
            summary[key] = sum(r[key] for r in rows) / len(rows)
    return summary


def summarize_by_source(rows: list[dict]) -> dict[str, dict]:
    """`summarize` per value of the rows' "source", in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["source"], []).append(row)
    return {source: summarize(group) for source, group in groups.items()}


def response_loss(
    model, data: PreparedData, batch_size: int = 8, max_examples: int | None = None, pad_id: int = 0,
    desc: str = "loss",
) -> dict:
    """Held-out loss of a prepared split: `summarize` overall, plus "sources": per source."""
    examples = select_examples(data, max_examples)
    losses = example_losses(model, examples, batch_size, pad_id, desc)
    rows = [{"source": e.source, "nll": nll, "tokens": n} for e, (nll, n) in zip(examples, losses)]
    return {**summarize(rows), "sources": summarize_by_source(rows)}


@torch.no_grad()
def cache_kl(
    model, cache: str, max_rows: int | None = None, batch_size: int = 8, pad_id: int = 0,
    desc: str = "kl",
) -> dict:
    """{"kl", "tokens", "rows", "examples"}: mean over cached positions of (1/M) Σ_m KL(p^(m) ‖ q_model), and
    per row [seq_id, summed KL, positions, summed cross-entropy of the model at them] (per-example statistics;
    the cross-entropy is `example_losses`' where the cache's rows are the prepared data's).

    Reads the shards in order, one at a time, into the training batches
    (`batch.collate_records`); `max_rows` keeps the first rows (in seq_id
    order) only. A cache that is not whole (`Manifest.require`) is refused: a
    KL over the rows a partial cache happens to hold is not the KL asked for.
    """
    manifest = Manifest.load(cache, whole=True)
    if manifest.identity.encoding.sampled:
        raise MoekdError(f"{cache} is a sampled cache: the KL to a teacher needs its probabilities, which "
                         "draws only estimate; give a top-k cache of the held-out data")
    shards = [manifest.shards[i] for i in sorted(manifest.shards)]
    total_rows = sum(s.rows for s in shards) if max_rows is None else min(max_rows, sum(s.rows for s in shards))
    examples = []
    with tqdm(total=total_rows, desc=desc, unit="row") as bar:
        for shard in shards:
            count = min(shard.rows, total_rows - len(examples))
            if count <= 0:
                break
            records = manifest.read_shard(shard.index, None if count == shard.rows else list(range(count)))
            for start in range(0, count, batch_size):
                batch = collate_records(records[start : start + batch_size], pad_id)
                nll, kl = batch_nll(model, batch, teacher=True)
                counts = torch.bincount(batch.rows, minlength=len(batch.seq_ids)).tolist()
                examples += [list(row) for row in zip(batch.seq_ids, per_row(kl, batch), counts, per_row(nll, batch))]
                bar.update(len(batch.seq_ids))
    kl_sum, tokens = sum(e[1] for e in examples), sum(e[2] for e in examples)
    return {"kl": kl_sum / tokens if tokens else math.nan, "tokens": tokens, "rows": len(examples),
            "examples": examples}


def normalized_answer(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when `prediction` equals one of `references` up to case, spacing and a trailing full stop."""
    answer = normalized_answer(prediction)
    return float(any(answer == normalized_answer(reference) for reference in references))


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure in [0, 1] of `prediction`, the best over `references` (0 without any)."""
    return max((ROUGE.score(reference, prediction)["rougeL"].fmeasure for reference in references), default=0.0)

