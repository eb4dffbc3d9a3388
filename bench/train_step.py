"""Benchmark of the training step: from the cache vs SFT vs the teacher in the loop; reader vs trainer throughput.

    python bench/train_step.py [--steps 6] [--batch-size 8] [--rows 64] [--threads 1]

Setup (CPU; everything is built in a temporary directory, nothing downloaded):
- tokenizer: the tests' byte-level BPE (384 tokens). Both models have a
  vocabulary of 49,152 (SmolLM2's): the data only uses the first 384 ids, but
  every vocabulary projection and log-softmax runs over all 49,152, which is
  what dominates a small student's step;
- student: Llama, hidden 256, 4 layers, 4 heads, MLP 688, tied embeddings
  (about 16M parameters, 12.6M of them the embedding; printed);
- teacher: Mixtral, hidden 256, 4 layers, 8 experts of MLP 512, top-2,
  untied (about 38M parameters; printed);
- data: `--rows` "repeat the words" records of 15-35 words (about half of
  each sequence is response tokens; the batch's size is printed);
- caches (`moekd cache`): top-64 with M = 1 (top-k routing) and M = 4 (KA,
  λ = 0.05);
- every variant trains on the same batches (the reader's plan for seed 0,
  `--batch-size` sequences, float32) with one student; each timed step is
  one optimizer step (AdamW); variants take turns, `--steps` times after one
  warm-up round, and the median is reported. `--threads` torch threads (1 by
  default: on a small machine shared with other work, one thread keeps the
  ratios steady where two threads' synchronisation makes them erratic).

Variants: SFT (α = 0, no teacher: the plain step), KD from the cache (α = 0.5,
sparse top-64 + tail, the M samples averaged), online KD (the teacher's M
forwards + top-k capture, then the same KD step). The reader is timed alone,
decoding and collating every batch of READER_EPOCHS epochs from the M = 4
cache (background thread included), against the tokens/s the KD step consumes.
Also printed: the time `verify_cache` takes (sha256 + decoding every shard),
per MB of cache.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fixtures  # noqa: E402
from pipeline.cache.manifest import Manifest, verify_cache  # noqa: E402
from pipeline.core.processes import Distributed  # noqa: E402
from pipeline.data.batch import collate_examples, collate_records  # noqa: E402
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.data.reader import CacheShards, PreparedShards, Reader  # noqa: E402
from pipeline.models.loading import load_model  # noqa: E402
from pipeline.student.losses import LossConfig  # noqa: E402
from pipeline.student.trainer import OptimConfig, Trainer  # noqa: E402
from pipeline.teacher.routing import RoutingConfig  # noqa: E402
from pipeline.teacher.sources import OnlineTeacher  # noqa: E402
from stages import cache, prepare  # noqa: E402

VOCAB = 49_152
SHARD_SIZE = 16
READER_EPOCHS = 5
ROUTINGS = {1: RoutingConfig(), 4: RoutingConfig(mode="ka", samples=4, lam=0.05)}


def build(root: Path, rows: int) -> dict[str, Path]:
    """Tokenizer, student, teacher, prepared data and the two caches."""
    from transformers import LlamaConfig

    tokenizer = fixtures.make_tokenizer(root / "tokenizer")
    student = fixtures.make_model(root / "student", LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
    ), tokenizer)
    teacher = fixtures.make_model(root / "teacher", fixtures.tiny_moe_config(
        "mixtral", VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_local_experts=8,
        max_position_embeddings=1024,
    ), tokenizer)
    rng = random.Random(0)
    records = []
    for _ in range(rows):
        words = " ".join(rng.choice(fixtures.WORDS) for _ in range(rng.randint(15, 35)))
        records.append({"instruction": "Repeat the words exactly.", "context": words, "response": words})
    jsonl = fixtures.write_jsonl(root / "train.jsonl", records)
    paths = {"student": student, "teacher": teacher, "data": root / "data"}
    prepare.run(prepare.Config(inputs=[str(jsonl)], output=str(paths["data"]), tokenizer=str(tokenizer)))
    for samples, routing in ROUTINGS.items():
        paths[f"cache{samples}"] = root / f"cache{samples}"
        cache.run(cache.Config(output=str(paths[f"cache{samples}"]), teacher=str(teacher), data=str(paths["data"]),
                               routing=routing, top_k=64, shard_size=SHARD_SIZE, batch_size=8, device="cpu"))
    return paths


def reader(shards, batch_size: int, collate) -> Reader:
    return Reader(shards, batch_size=batch_size, shuffle_shards=2, seed=0, collate=collate)


def median_step_seconds(variants: dict, steps: int) -> dict[str, float]:
    """Each variant's median seconds per call, the variants taking turns (so machine load hits all alike)."""
    times = {name: [] for name in variants}
    for round_ in range(steps + 1):
        for name, step in variants.items():
            start = time.perf_counter()
            step(round_)
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        paths = build(Path(tmp), args.rows)
        report(paths, args)


def report(paths: dict[str, Path], args) -> None:
    batch_size, steps = args.batch_size, args.steps
    collate = functools.partial(collate_records, pad_id=0)
    cached = {m: list(reader(CacheShards(paths[f"cache{m}"]), batch_size, collate).batches(0, 0, steps + 1))
              for m in ROUTINGS}
    prepared = list(reader(PreparedShards(PreparedData(paths["data"]), SHARD_SIZE), batch_size,
                           functools.partial(collate_examples, pad_id=0)).batches(0, 0, steps + 1))
    assert all(p.seq_ids == c.seq_ids for p, c in zip(prepared, cached[1]))  # the same batches everywhere
    plain = [collate_examples(b.examples, 0) for b in prepared]
    tokens = statistics.mean(b.tokens for b in plain)
    length = statistics.mean(b.input_ids.shape[1] for b in plain)

    model = load_model(paths["student"], dtype="float32", device="cpu").train()
    trainer = Trainer(model, optim=OptimConfig(lr=1e-5, warmup_steps=0), loss=LossConfig(alpha=0.5), total_steps=10_000,
                      processes=Distributed("cpu"))
    variants = {
        "SFT": lambda i: trainer.step([plain[i]]),
        "cache M=1": lambda i: trainer.step([cached[1][i]]),
        "cache M=4": lambda i: trainer.step([cached[4][i]]),
    }
    with contextlib.ExitStack() as stack:
        for m, routing in ROUTINGS.items():
            teacher = OnlineTeacher(data=str(paths["data"]), shard_size=SHARD_SIZE, teacher=str(paths["teacher"]),
                                    routing=routing, top_k=64, aggregate=False, dtype=torch.float32,
                                    device=torch.device("cpu"), stack=stack)
            variants[f"online M={m}"] = lambda i, teacher=teacher: trainer.step([teacher.teach(prepared[i])])
        seconds = median_step_seconds(variants, steps)

    shards = CacheShards(paths["cache4"])
    start = time.perf_counter()
    epochs = [reader(shards, batch_size, collate).batches(epoch) for epoch in range(READER_EPOCHS)]
    read_tokens = sum(b.tokens for batches in epochs for b in batches)
    read_seconds = time.perf_counter() - start
    start = time.perf_counter()
    assert verify_cache(paths["cache4"]) == []
    verify_seconds = time.perf_counter() - start
    cache_mb = sum(s.bytes for s in Manifest.load(paths["cache4"]).shards.values()) / 1e6

    teacher_params = sum(p.numel() for p in load_model(paths["teacher"], dtype="float32", device="cpu").parameters())
    print(f"student {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, teacher "
          f"{teacher_params / 1e6:.1f}M; batch: {batch_size} sequences, {length:.0f} tokens padded, {tokens:.0f} targets; "
          f"vocabulary {VOCAB}; torch threads {torch.get_num_threads()}; median of {steps} steps")
    for name, value in seconds.items():
        print(f"  {name:<12} {value * 1000:8.0f} ms/step  {tokens / value:8.0f} tokens/s")
    for m in ROUTINGS:
        print(f"cache step / SFT step, M={m}:        {seconds[f'cache M={m}'] / seconds['SFT']:.2f}x (goal <= 1.15x)")
    for m in ROUTINGS:
        print(f"online KD / cache step, M={m}:       {seconds[f'online M={m}'] / seconds[f'cache M={m}']:.2f}x "
              "(the cache's speed-up)")
    consumed = tokens / seconds["cache M=4"]
    print(f"reader (M=4 cache): {read_tokens / read_seconds:.0f} tokens/s decoded vs {consumed:.0f} tokens/s "
          f"trained: {read_tokens / read_seconds / consumed:.0f}x headroom")
    print(f"verify_cache: {verify_seconds:.2f}s for {cache_mb:.1f} MB = {verify_seconds / cache_mb * 1000:.0f} s/GB")


if __name__ == "__main__":
    main()
