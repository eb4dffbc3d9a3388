"""Benchmark of sequence packing: the student's training step on packed rows vs rows padded to the longest
of their micro-batch, on a real length distribution.

    python bench/packing.py runs/demo/prepared/train runs/demo/material/model \
        [--batch-size 8] [--steps 4] [--pack-lengths 512 2048] [--threads 1]

The data is a `moekd prepare` directory (the demo's: 400 Natural Instructions
rows, ~234 tokens each, ~12 of them response tokens); the student any causal LM
directory (the demo's SmolLM2-135M). Every variant takes the same micro-batches
(the reader's plan for seed 0: shuffled windows, rows grouped by length as in
training) with the same student, SFT steps (α = 0: packing changes only the
student's forward), float32. Variants take turns, `--steps` rounds after one
warm-up round; the median seconds per step is reported, with response tokens
(what training learns from) and all tokens per second, as ratios to padding.
Also printed: how much of a padded micro-batch is padding, and the packed
sequences per micro-batch.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.processes import Distributed  # noqa: E402
from pipeline.data.batch import collate_examples, pack  # noqa: E402
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.data.reader import PreparedShards, Reader  # noqa: E402
from pipeline.models.loading import load_model, load_tokenizer, pad_token_id  # noqa: E402
from pipeline.student.losses import LossConfig  # noqa: E402
from pipeline.student.trainer import OptimConfig, Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("student")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pack-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pad_id = pad_token_id(load_tokenizer(args.student))
    reader = Reader(PreparedShards(PreparedData(args.data), 256), batch_size=args.batch_size, shuffle_shards=4,
                    seed=0, collate=functools.partial(collate_examples, pad_id=pad_id))
    batches = list(reader.batches(0, 0, args.steps + 1))
    model = load_model(args.student, dtype="float32", device="cpu").train()
    variants = {"padded": None} | {f"packed {n}": n for n in args.pack_lengths}
    trainers = {name: Trainer(model, optim=OptimConfig(lr=1e-12, warmup_steps=0), loss=LossConfig(alpha=0.0),
                              total_steps=10_000, processes=Distributed("cpu"), pack_length=n)
                for name, n in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step, batch in enumerate(batches):  # the first round warms up
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step([batch])
            if step:
                times[name].append(time.perf_counter() - start)
    timed = batches[1:]
    response = sum(b.tokens for b in timed) / len(timed)
    real = sum(int(b.attention_mask.sum()) for b in timed) / len(timed)
    padded = sum(b.input_ids.numel() for b in timed) / len(timed)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    print(f"student {args.student}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; "
          f"{len(timed)} micro-batches of {args.batch_size} rows; torch threads {torch.get_num_threads()}")
    print(f"per micro-batch: {real:.0f} real tokens, {response:.1f} response tokens; padded to {padded:.0f} "
          f"({100 * (1 - real / padded):.1f}% padding)")
    print("| variant | sequences per micro-batch | s/step | response tokens/s | all tokens/s | vs padded |")
    print("|---|---|---|---|---|---|")
    for name, n in variants.items():
        sequences = len(timed[0].input_ids) if n is None else statistics.mean(len(pack(b, n).input_ids)
                                                                                for b in timed)
        print(f"| {name} | {sequences:.1f} | {seconds[name]:.3f} | {response / seconds[name]:.1f} | "
              f"{real / seconds[name]:.0f} | {seconds['padded'] / seconds[name]:.2f}x |")


if __name__ == "__main__":
    main()
