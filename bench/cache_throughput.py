"""Benchmark the teacher stage: cache tokens/s against a bare teacher forward, and bytes/token/sample.

One run, one machine, same model and batches:
  forward  = `model(input_ids, attention_mask)` (full logits), once per routing sample;
  cache    = `moekd cache` end to end (routing hooks, hidden states, top-k, Parquet
             encoding, zstd, sha256, fsync, manifest), model loading excluded;
  write    = the part of `cache` spent in `write_shard` + `Manifest.commit`.
Goal (issue 2): writing costs at most 10% of the forward.

Default teacher: a random Mixtral with SmolLM2's vocabulary size (49152), so the
vocabulary projection and top-k cost what they cost for the real model; pass
`--teacher DIR --data DIR` to measure a real teacher and prepared split instead.

    python bench/cache_throughput.py [--samples 4] [--top-k 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fixtures  # noqa: E402
from pipeline.cache.manifest import Manifest  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.data.batch import collate_examples  # noqa: E402
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.models.loading import load_model  # noqa: E402
from stages import cache, prepare  # noqa: E402


def synthetic_teacher(root: Path, rows: int = 256, **overrides) -> tuple[Path, Path]:
    """A random Mixtral with SmolLM2's vocabulary (`overrides`: other config values) and `rows` prepared rows."""
    tokenizer = fixtures.make_tokenizer(root / "tokenizer")
    config = fixtures.tiny_moe_config(
        "mixtral", 49152, **{**dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8), **overrides},
    )
    teacher = fixtures.make_model(root / "teacher", config, tokenizer)
    records = fixtures.instruction_records(rows, seed=1)
    for r in records:  # longer responses, closer to real instruction data
        r["response"] = " ".join([r["response"]] * 8)
    data = fixtures.write_jsonl(root / "train.jsonl", records)
    prepare.run(load_config(prepare.Config, None, [f"inputs={data}", f"output={root / 'prepared'}", f"tokenizer={teacher}"]))
    return teacher, root / "prepared"


def time_bare_forward(teacher: Path, data: Path, batch_size: int, shard_size: int, samples: int,
                      dtype: str = "float32", device: str = "cpu") -> float:
    """Seconds for plain forwards over the cache stage's own batches, `samples` times."""
    model = load_model(teacher, dtype=dtype, device=device)
    prepared = PreparedData(data)
    pad = model.config.pad_token_id or 0
    seconds = 0.0
    with torch.no_grad():
        for start in range(0, len(prepared), shard_size):
            rows = sorted(prepared.rows(start, start + shard_size), key=lambda e: (len(e.input_ids), e.seq_id))
            for b in range(0, len(rows), batch_size):
                batch = collate_examples(rows[b : b + batch_size], pad).to(model.device)
                synchronize(model.device)
                begin = time.perf_counter()
                for _ in range(samples):
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                synchronize(model.device)
                seconds += time.perf_counter() - begin
    return seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cache_stage(teacher: Path, data: Path, output: Path, overrides: list[str]) -> tuple[dict, float]:
    """Run the cache stage, returning its stats and the seconds spent writing and committing."""
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - begin
        return wrapper

    original = (cache.write_shard, Manifest.commit)
    cache.write_shard, Manifest.commit = timed(original[0]), timed(original[1])
    try:
        config = load_config(cache.Config, None, [f"output={output}", f"teacher={teacher}", f"data={data}", *overrides])
        stats = cache.run(config)
    finally:
        cache.write_shard, Manifest.commit = original
    return stats, spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher")
    parser.add_argument("--data")
    parser.add_argument("--samples", type=int, default=4, help="KA samples M")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, data = (Path(args.teacher), Path(args.data)) if args.teacher else synthetic_teacher(root)
        routing = ["routing.mode=ka", f"routing.samples={args.samples}"] if args.samples > 1 else []
        overrides = [f"top_k={args.top_k}", f"batch_size={args.batch_size}", f"shard_size={args.shard_size}",
                     "dtype=float32", "device=cpu", *routing]
        stats, write_seconds = time_cache_stage(teacher, data, root / "cache", overrides)
        forward = time_bare_forward(teacher, data, args.batch_size, args.shard_size, args.samples)
    tokens = stats["tokens"]
    print(f"\nteacher {teacher.name}, {tokens} response tokens, M={args.samples}, k={args.top_k}, "
          f"{torch.get_num_threads()} threads")
    print(f"bare forward      {forward:7.2f} s  ({tokens * args.samples / forward:8.0f} token-samples/s)")
    print(f"cache stage       {stats['seconds']:7.2f} s  ({tokens * args.samples / stats['seconds']:8.0f} token-samples/s)")
    print(f"  of which write  {write_seconds:7.2f} s")
    print(f"cache / forward   {stats['seconds'] / forward:7.3f}x")
    print(f"write / forward   {write_seconds / forward:7.3f}  (goal <= 0.10)")
    print(f"bytes/token/sample {stats['bytes'] / (tokens * args.samples):6.1f}  (goal <= 160 at k=64)")


if __name__ == "__main__":
    main()
