"""Teacher log-probs in the formats other tools publish, to and from moekd's sequences (`moekd convert`).

Each format module turns `Sequence`s (one prepared row: its tokens, the
positions whose next token has a teacher distribution, and that distribution's
top-k ids and log-probs) into its own table rows, and back: `topk_logprobs`
(per-token top-k log-prob lists, as axolotl's KD datasets hold them) and
`distillkit` (DistillKit's compressed log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Sequence:
    """One sequence's teacher distributions (one routing sample)."""

    input_ids: np.ndarray  # int (L,)
    positions: np.ndarray  # int (T,): the distribution at positions[t] predicts input_ids[positions[t] + 1]
    ids: np.ndarray  # int64 (T, k)
    logprobs: np.ndarray  # float32 (T, k), over the whole vocabulary


def nested_list(rows: list[np.ndarray], dtype) -> pa.ListArray:
    """A list<list<dtype>> column of 2-D arrays (one per table row; each of its rows a list)."""
    lengths = [len(r) for r in rows]
    inner = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum([r.shape[1] for r in rows for _ in range(len(r))], dtype=np.int64)])
                 .astype(np.int32)),
        pa.array(np.concatenate([r.reshape(-1) for r in rows]).astype(dtype) if rows else np.zeros(0, dtype)))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), inner)


def checked_distributions(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, where: str) -> None:
    """Refuse, in one line, top-k entries that are not distributions over a vocabulary of `vocab_size`: ids
    out of range or repeated within a position, log-probs not finite, above 0, or summing above 1 (logits)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise_at(where, f"token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} is outside the "
                        f"vocabulary of {vocab_size}")
    if not np.isfinite(logprobs).all():
        raise_at(where, "a log-prob is not finite (a missing entry?)")
    if logprobs.size and logprobs.max() > 1e-3:
        raise_at(where, f"a log-prob is {float(logprobs.max()):.3g} > 0: these are logits, not log-probs")
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    if mass.size and mass.max() > 1.01:
        raise_at(where, f"a position's probabilities sum to {float(mass.max()):.3f} > 1: not log-probs "
                        "normalised over the vocabulary")
    ordered = np.sort(ids, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise_at(where, "a token id repeats within a position")


def raise_at(where: str, problem: str):
    from pipeline.core.errors import MoekdError

    raise MoekdError(f"{where}: {problem}")
