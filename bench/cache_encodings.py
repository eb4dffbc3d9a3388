"""What other encodings of a top-k cache would cost, re-encoded from a real one: bytes per position and
what each keeps of the teacher.

For every (sample, position) of a top-k cache (k = 64 in the demo's), with the
cache's own Parquet settings (`pipeline.cache.shards.write_parquet`):
  top-k'   the k' most probable of the cached ids (k' <= k), log-probs as stored (float16 precision);
  top-p    the fewest most probable ids whose mass reaches p, at most k (one size per position,
           the ids and their log-probs);
  8-bit    log-probs rounded to a step of 1/16 nat and stored as one byte (0 .. -15.9 nats; lower
           ones clamp), top-k' ids as above, plus each group's tail mass at float16 precision: rounding
           the large entries up by up to 3% can use up a small tail (1 - sum), which the bucket loss
           then reads as the teacher giving every other token probability 0; with the tail stored, the
           entries are rescaled to hold 1 - tail.
Reported per encoding: ids per position, the teacher mass they hold (the rest is the tail the loss
lumps into one outcome), the KL from the float16 target to the encoded one over the k + 1 outcomes
(top-k plus tail, so the error the encoding itself adds; 0 for the float16 ones), and bytes per
position of the teacher columns (all M samples together). Every cache also stores its rows'
input_ids and positions: their bytes per position are printed once per cache.
A sampled cache (`storage=sampled`) cannot be derived from a top-k one: bench/quality.py's
cache study measures it.

    python bench/cache_encodings.py runs/demo/cache/kd runs/demo/cache/ka
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.cache.manifest import Manifest  # noqa: E402
from pipeline.cache.shards import TeacherRecord, write_parquet  # noqa: E402

LOGPROB_STEP = 1 / 16  # nats per 8-bit level
ENCODINGS = {"sizes": "DELTA_BINARY_PACKED", "ids": "BYTE_STREAM_SPLIT", "logprobs": "BYTE_STREAM_SPLIT",
             "logprob_levels": "PLAIN", "tail": "BYTE_STREAM_SPLIT", "input_ids": "PLAIN", "positions": "DELTA_BINARY_PACKED"}


def parquet_bytes(columns: dict[str, list[np.ndarray]]) -> int:
    """Bytes of one Parquet file holding `columns` (one list per row each), written as a shard is."""
    arrays = {name: pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)),
        np.concatenate(values)) for name, values in columns.items()}
    sink = io.BytesIO()
    write_parquet(pa.table(arrays), sink, ENCODINGS)
    return sink.tell()


def kept(logprobs: np.ndarray, p: float | None, k: int | None) -> np.ndarray:
    """(..., k_cache) log-probs, sorted descending -> how many entries each group keeps: the top k', or the
    fewest whose mass reaches p (all of them when it never does)."""
    if k is not None:
        return np.full(logprobs.shape[:-1], min(k, logprobs.shape[-1]))
    mass = np.cumsum(np.exp(logprobs.astype(np.float64)), -1)
    return np.minimum((mass < p).sum(-1) + 1, logprobs.shape[-1])


def quantized(logprobs: np.ndarray) -> np.ndarray:
    """8-bit levels of log-probs (0 = log-prob 0, 255 = -15.94 and below)."""
    return np.clip(np.rint(-logprobs / LOGPROB_STEP), 0, 255).astype(np.uint8)


def with_tail(logprobs: np.ndarray, mask: np.ndarray, tail: np.ndarray | None = None) -> np.ndarray:
    """Probabilities of the kept entries (0 elsewhere) plus their tail as one more outcome: 1 - their sum,
    or `tail` (..., 1) with the entries rescaled to hold the rest."""
    probs = np.where(mask, np.exp(logprobs.astype(np.float64)), 0.0)
    if tail is None:
        return np.concatenate([probs, np.clip(1.0 - probs.sum(-1, keepdims=True), 0.0, None)], -1)
    return np.concatenate([probs * (1.0 - tail) / probs.sum(-1, keepdims=True), tail], -1)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) over the last axis (both renormalised, as the loss does at a clamped tail)."""
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0)
    return terms.sum(-1)


def measure(records: list[TeacherRecord], name: str, p: float | None, k: int | None, eight_bit: bool) -> dict:
    """One encoding over every record: ids per position, mass held, KL added by rounding, bytes per position."""
    sizes, ids, lps, held, added, tails = [], [], [], [], [], []
    positions = 0
    for r in records:
        order = np.argsort(-r.topk_logprobs, -1, kind="stable")  # (M, T, k_cache), most probable first
        top_ids = np.take_along_axis(r.topk_ids, order, -1)
        top_lps = np.take_along_axis(r.topk_logprobs, order, -1)
        n = kept(top_lps, p, k)
        mask = np.arange(top_lps.shape[-1]) < n[..., None]
        exact = with_tail(top_lps, mask)
        held.append(exact[..., :-1].sum(-1).ravel())
        stored = top_lps
        if eight_bit:
            stored = -quantized(top_lps).astype(np.float32) * LOGPROB_STEP
            tail = exact[..., -1:].astype(np.float16).astype(np.float64)
            added.append(kl(exact, with_tail(stored, mask, tail)).ravel())
            tails.append(tail.ravel().astype(np.float32))
        # per group: the kept ids ascending (delta-coded, as the cache stores them) with their values
        row_sizes, row_ids, row_lps = [], [], []
        for group_ids, group_lps, size in zip(top_ids.reshape(-1, top_ids.shape[-1]),
                                              stored.reshape(-1, stored.shape[-1]), n.ravel()):
            asc = np.argsort(group_ids[:size])
            row_ids.append(np.diff(group_ids[:size][asc], prepend=0))
            row_lps.append(group_lps[:size][asc])
            row_sizes.append(size)
        sizes.append(np.asarray(row_sizes, np.int32))
        ids.append(np.concatenate(row_ids).astype(np.int32))
        values = np.concatenate(row_lps)
        lps.append(quantized(values) if eight_bit else values.astype(np.float16).astype(np.float32))
        positions += len(r.positions)
    columns = {"ids": ids, ("logprob_levels" if eight_bit else "logprobs"): lps}
    if eight_bit:
        columns["tail"] = tails
    if k is None:  # fixed-size groups need no sizes
        columns["sizes"] = sizes
    M = records[0].topk_ids.shape[0]
    return {"encoding": name, "ids": float(np.concatenate(sizes).mean()) * M,
            "mass": float(np.concatenate(held).mean()),
            "kl": float(np.concatenate(added).mean()) if added else 0.0,
            "bytes": parquet_bytes(columns) / positions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", nargs="+", type=Path, help="top-k cache directories")
    parser.add_argument("--shards", type=int, default=2, help="shards of each cache to re-encode")
    args = parser.parse_args(argv)
    for cache in args.caches:
        manifest = Manifest.load(cache)
        encoding = manifest.identity.encoding
        if encoding.storage != "topk":
            raise SystemExit(f"{cache}: not a top-k cache")
        records = [r for index in sorted(manifest.shards)[:args.shards] for r in manifest.read_shard(index)]
        k, M = encoding.k, encoding.num_samples
        rows = parquet_bytes({"input_ids": [r.input_ids for r in records],
                              "positions": [r.positions for r in records]}) / sum(len(r.positions) for r in records)
        print(f"\n{cache}: top-{k}, M = {M}, {len(records)} rows; the rows' input_ids and positions: "
              f"{rows:.1f} bytes per position")
        print("| encoding | ids per position | teacher mass held | KL added by rounding (nats) | bytes per position |")
        print("|---|---:|---:|---:|---:|")
        variants = [(f"top-{kk}", None, kk, False) for kk in (k, 32, 16, 8) if kk <= k]
        variants += [(f"top-p {p}", p, None, False) for p in (0.8, 0.9, 0.95, 0.99)]
        variants += [(f"top-{kk} 8-bit", None, kk, True) for kk in (k, 16) if kk <= k]
        for name, p, kk, eight in variants:
            m = measure(records, name, p, kk, eight)
            print(f"| {m['encoding']} | {m['ids']:.1f} | {m['mass']:.4f} | {m['kl']:.2e} | {m['bytes']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
