"""From a causal LM's final hidden states at target positions to log-probabilities over its vocabulary.

The one path every model's distribution takes: the teacher's when it is
cached or run online, the student's in training, SAR's on both sides, and
evaluation's. It applies what the model's own head does (the output
embeddings, then the family's logit scale and final-logit soft-capping, e.g.
Gemma 2's `tanh(logits / cap) * cap`), in float32, and no temperature (the losses apply
theirs). Callers project a bounded number of positions at a time
(`CHUNK_TOKENS`), so no (batch, length, vocabulary) tensor is ever made.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_TOKENS = 1024  # positions projected to the vocabulary at once: bounds memory at CHUNK_TOKENS x vocab floats


def decoder(model):
    """The causal LM's decoder stack, without its head: `get_decoder()`, or the `model` attribute where
    that finds none (Llama 4's causal LM names its base model otherwise)."""
    stack = model.get_decoder()
    return model.model if stack is model and hasattr(model, "model") else stack


def target_hidden(model, input_ids: Tensor, attention_mask: Tensor | None, rows: Tensor, cols: Tensor,
                  position_ids: Tensor | None = None) -> Tensor:
    """The final hidden states (N, H) at positions (rows[j], cols[j]) of a right-padded batch, or of packed
    rows (`batch.pack`: no attention mask; `position_ids` restart where a row starts, which confines
    attention to each row)."""
    hidden = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
    return hidden.last_hidden_state[rows.to(input_ids.device), cols.to(input_ids.device)]


def vocab_logits(model, hidden: Tensor) -> Tensor:
    """Logits (at least float32) over the vocabulary for hidden states (n, H), scaled, soft-capped and cut
    where the family's head does (Inkling's `logits_mup_width_multiplier` and `unpadded_vocab_size`, Cohere's
    `logit_scale`, Granite's `logits_scaling`, Gemma 2's soft cap)."""
    config = model.config
    if getattr(config, "logits_mup_width_multiplier", None):
        hidden = hidden / config.logits_mup_width_multiplier
    logits = model.get_output_embeddings()(hidden)[..., : vocab_size(model)]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def vocab_size(model) -> int:
    """The number of ids the model's distributions range over: its output embeddings' rows, or fewer where
    the family pads them (`unpadded_vocab_size`)."""
    rows = model.get_output_embeddings().weight.shape[0]
    return min(rows, getattr(model.config, "unpadded_vocab_size", None) or rows)


def config_vocab_size(config) -> int:
    """`vocab_size` from a model's config alone (for a teacher another engine loads)."""
    rows = config.get_text_config().vocab_size
    return min(rows, getattr(config, "unpadded_vocab_size", None) or rows)


def vocab_logprobs(model, hidden: Tensor) -> Tensor:
    """Log-probabilities over the vocabulary (at least float32) for hidden states (n, H)."""
    return torch.log_softmax(vocab_logits(model, hidden), dim=-1)


def chunks(n: int, chunk_tokens: int = CHUNK_TOKENS) -> list[slice]:
    """Slices covering range(n) in pieces of `chunk_tokens` (one empty slice for n = 0)."""
    return [slice(start, start + chunk_tokens) for start in range(0, max(n, 1), chunk_tokens)]


def target_logprobs(model, batch) -> Tensor:
    """Log-probabilities (N, V) of `model` at a `Batch`'s targets, all at once (SAR needs both full
    distributions; everything else goes through `chunks`)."""
    return vocab_logprobs(model, target_hidden(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols))
