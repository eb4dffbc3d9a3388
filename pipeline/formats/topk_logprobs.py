"""Per-token top-k log-prob lists: the tokenized KD datasets axolotl trains from (and the shape TRL-style tools
export), one table row per sequence:

    input_ids         list<int32>          L
    labels            list<int32>          L     -100 where the token is not a training target
    attention_mask    list<int8>           L     all 1
    target_token_ids  list<list<int32>>    L x K  row t: the teacher's top K ids, by descending log-prob
    target_logprobs   list<list<float32>>  L x K  natural-log probabilities over the whole vocabulary
    target_mask       list<list<int8>>     L x K  1 where row t holds a teacher distribution

Row t is the distribution computed at token t, predicting `input_ids[t + 1]`
(axolotl's current loss pairs row t with the student's logits at t), so
`labels[t + 1]` is a target exactly where `target_mask[t]` is 1. Rows without
a distribution hold ids 0..K-1, log-probs -inf and mask 0, as axolotl pads.

Reading, a row's positions are its rows with `target_mask` set (without
`target_mask`: those whose next label is not -100; without either: every
row); the last token's row is dropped (what it predicts is not in the
sequence). Every selected row must hold K entries: ids in the vocabulary,
distinct, and log-probs that sum to at most 1. A dataset whose log-probs were
renormalised over the top K (axolotl's prepared data) reads as a teacher
with no mass outside them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.formats import Sequence, checked_distributions, nested_list, raise_at

NAME = "topk_logprobs"
IGNORE = -100


def to_table(sequences: list[Sequence]) -> pa.Table:
    """The table of `sequences` (each with K entries per position)."""
    columns = {name: [] for name in ("input_ids", "labels", "attention_mask", "target_token_ids",
                                     "target_logprobs", "target_mask")}
    for seq in sequences:
        L, k = len(seq.input_ids), seq.ids.shape[1]
        labels = np.full(L, IGNORE, np.int32)
        labels[seq.positions + 1] = seq.input_ids[seq.positions + 1]
        ids = np.tile(np.arange(k, dtype=np.int32), (L, 1))
        logprobs = np.full((L, k), -np.inf, np.float32)
        mask = np.zeros((L, k), np.int8)
        order = np.lexsort((seq.ids, -seq.logprobs), axis=-1)
        ids[seq.positions] = np.take_along_axis(seq.ids, order, -1)
        logprobs[seq.positions] = np.take_along_axis(seq.logprobs, order, -1)
        mask[seq.positions] = 1
        for name, value in (("input_ids", seq.input_ids.astype(np.int32)), ("labels", labels),
                            ("attention_mask", np.ones(L, np.int8)), ("target_token_ids", ids),
                            ("target_logprobs", logprobs), ("target_mask", mask)):
            columns[name].append(value)
    return pa.table({
        "input_ids": pa.array(columns["input_ids"], pa.list_(pa.int32())),
        "labels": pa.array(columns["labels"], pa.list_(pa.int32())),
        "attention_mask": pa.array(columns["attention_mask"], pa.list_(pa.int8())),
        "target_token_ids": nested_list(columns["target_token_ids"], np.int32),
        "target_logprobs": nested_list(columns["target_logprobs"], np.float32),
        "target_mask": nested_list(columns["target_mask"], np.int8),
    })


def from_table(table: pa.Table, vocab_size: int, where: str) -> list[Sequence]:
    """The sequences of a table in this format, checked (one-line errors naming the row)."""
    missing = [c for c in ("input_ids", "target_token_ids", "target_logprobs") if c not in table.column_names]
    if missing:
        raise_at(where, f"no column {', '.join(missing)}: not a table of per-token top-k log-probs "
                        "(input_ids, target_token_ids, target_logprobs[, target_mask, labels])")
    data = {name: table[name].to_pylist() for name in
            ("input_ids", "target_token_ids", "target_logprobs", "target_mask", "labels") if name in table.column_names}
    sequences = []
    for i, tokens in enumerate(data["input_ids"]):
        at = f"{where} row {i}"
        L, ids, logprobs = len(tokens), data["target_token_ids"][i], data["target_logprobs"][i]
        if len(ids) != L or len(logprobs) != L:
            raise_at(at, f"{len(ids)} rows of ids and {len(logprobs)} of log-probs for {L} tokens: moekd reads "
                         "the tokenized shape, one row per token")
        if "target_mask" in data:
            chosen = [t for t, m in enumerate(data["target_mask"][i][: L - 1]) if any(m)]
        elif "labels" in data:
            chosen = [t for t in range(L - 1) if data["labels"][i][t + 1] != IGNORE]
        else:
            chosen = list(range(L - 1))
        widths = {len(ids[t]) for t in chosen} | {len(logprobs[t]) for t in chosen}
        if len(widths) > 1:
            raise_at(at, f"positions hold different numbers of entries ({sorted(widths)}); moekd needs one k")
        k = widths.pop() if widths else 1
        top_ids = np.asarray([ids[t] for t in chosen], np.int64).reshape(len(chosen), k)
        top_logprobs = np.asarray([logprobs[t] for t in chosen], np.float32).reshape(len(chosen), k)
        checked_distributions(top_ids, top_logprobs, vocab_size, at)
        sequences.append(Sequence(np.asarray(tokens, np.int64), np.asarray(chosen, np.int64), top_ids, top_logprobs))
    return sequences
