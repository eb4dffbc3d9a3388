"""Benchmark of the SAR step against an online KD step and a cached stage-two step, same models and batches.

    python bench/sar_step.py [--steps 4] [--batch-size 8] [--max-new-tokens 32] [--threads 1]

Setup: bench/train_step.py's `build` and timing (see its docstring): CPU,
float32, nothing downloaded; a Llama student and a Mixtral teacher (8 experts,
top-2) with a 49,152-token vocabulary, "repeat the words" data and the
teacher's top-64 cache (M = 1), of batch-size x (steps + 1) rows. Every
variant takes one optimizer step of one student on the same batches (the
reader's plan for seed 0); variants take turns, `--steps` times after a
warm-up round, and the median is reported.
`--threads` torch threads (1 by default, as there: steadier ratios on a
shared machine).

- cache: stage two from the top-64 cache, the student's forward and backward only;
- online KD: `moekd train` with `teacher=` (stage two, online): the teacher's
  top-2 forward and top-64 capture (`pipeline.teacher.OnlineTeacher`), then the
  same student step as from the cache;
- SAR student step: the teacher runs without gradients (every expert, SAR's
  default routing) and the student steps against its full-vocabulary
  distribution: SAR's step without its router step
  (`pipeline.teacher.AdaptedTeacher.teach` + `Trainer.step`);
- SAR: `stages.sar.Step` on the data's sequences: the student's
  log-probs (no gradients), the router step (the teacher's forward and
  backward, AdamW on the routers), the teacher again without gradients, the
  student step;
- SAR on-policy: the same on responses the student samples first (at most
  `--max-new-tokens`); its batches hold other token counts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import statistics
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

from pipeline.core.processes import Distributed  # noqa: E402
from pipeline.data.batch import collate_examples, collate_records  # noqa: E402
from pipeline.data.prepared import PreparedData  # noqa: E402
from pipeline.data.reader import CacheShards, PreparedShards  # noqa: E402
from pipeline.models.loading import load_model, load_tokenizer  # noqa: E402
from pipeline.student.generation import stop_token_ids  # noqa: E402
from pipeline.student.losses import LossConfig  # noqa: E402
from pipeline.student.sar import RouterTrainer  # noqa: E402
from pipeline.student.trainer import OptimConfig, Trainer  # noqa: E402
from pipeline.teacher.routing import RoutingConfig, RoutingHooks  # noqa: E402
from pipeline.teacher.sources import OnlineTeacher  # noqa: E402
from stages import sar  # noqa: E402
from train_step import SHARD_SIZE, build, median_step_seconds, reader  # noqa: E402


def sar_step(paths: dict[str, Path], trainer: Trainer, stack: contextlib.ExitStack, **settings) -> sar.Step:
    """The SAR stage's step around `trainer`, wired as the stage wires it (`sar.adapt`, `sar.Step`), with a fresh
    teacher (data order and checkpoints unused)."""
    config = sar.Config(output="unused", teacher=str(paths["teacher"]), student=str(paths["student"]),
                        data=str(paths["data"]), device="cpu", dtype="float32", shard_size=SHARD_SIZE, **settings)
    model = load_model(paths["teacher"], dtype="float32", device="cpu")
    routing = stack.enter_context(RoutingHooks(model, config.routing))
    routers, teacher = sar.adapt(config, model, routing, contextlib.nullcontext)
    router_trainer = RouterTrainer(model, routing, routers, config=config.router, total_steps=10_000,
                                   processes=trainer.processes)
    return sar.Step(config=config, student=trainer.model, trainer=trainer, teacher=teacher,
                    router_trainer=router_trainer, pad_id=0, autocast=contextlib.nullcontext,
                    stop_ids=stop_token_ids(load_tokenizer(paths["student"]), trainer.model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--steps", 4), ("--batch-size", 8), ("--max-new-tokens", 32), ("--threads", 1)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        report(build(Path(tmp), rows=args.batch_size * (args.steps + 1)), args)


def report(paths: dict[str, Path], args) -> None:
    steps, batch_size = args.steps, args.batch_size
    cached = list(reader(CacheShards(paths["cache1"]), batch_size, functools.partial(collate_records, pad_id=0))
                  .batches(0, 0, steps + 1))
    prepared = list(reader(PreparedShards(PreparedData(paths["data"]), SHARD_SIZE), batch_size,
                           functools.partial(collate_examples, pad_id=0)).batches(0, 0, steps + 1))
    assert all(p.seq_ids == c.seq_ids for p, c in zip(prepared, cached))  # the same batches everywhere
    student = load_model(paths["student"], dtype="float32", device="cpu").train()
    trainer = Trainer(student, optim=OptimConfig(lr=1e-5, warmup_steps=0), loss=LossConfig(alpha=0.5),
                      total_steps=10_000, processes=Distributed("cpu"))
    with contextlib.ExitStack() as stack:
        step = sar_step(paths, trainer, stack)
        on_policy = sar_step(paths, trainer, stack, sequences="student", max_new_tokens=args.max_new_tokens)
        online = OnlineTeacher(data=str(paths["data"]), shard_size=SHARD_SIZE, teacher=str(paths["teacher"]),
                               routing=RoutingConfig(), top_k=64, aggregate=False, dtype=torch.float32,
                               device=torch.device("cpu"), stack=stack)
        variants = {
            "cache": lambda i: trainer.step([cached[i]]),
            "online KD": lambda i: trainer.step([online.teach(prepared[i])]),
            "SAR student": lambda i: trainer.step([step.teacher.teach(prepared[i])]),
            "SAR": lambda i: step([prepared[i]]),
            "SAR on-policy": lambda i: on_policy([prepared[i]]),
        }
        seconds = median_step_seconds(variants, steps)

    tokens = statistics.mean(b.tokens for b in prepared)
    print(f"batch: {batch_size} sequences, {tokens:.0f} targets (data sequences); teacher routing "
          f"{step.config.routing.mode}; torch threads {torch.get_num_threads()}; median of {steps} steps")
    for name, value in seconds.items():
        print(f"  {name:<14} {value * 1000:8.0f} ms/step")
    print(f"SAR / online KD:          {seconds['SAR'] / seconds['online KD']:.2f}x")
    print(f"SAR / cache step:         {seconds['SAR'] / seconds['cache']:.2f}x")
    print(f"SAR / SAR student step:   {seconds['SAR'] / seconds['SAR student']:.2f}x  (the router step's cost)")
    print(f"online KD / cache step:   {seconds['online KD'] / seconds['cache']:.2f}x")
    print(f"SAR on-policy / SAR:      {seconds['SAR on-policy'] / seconds['SAR']:.2f}x  "
          f"(sampling up to {args.max_new_tokens} tokens per response)")


if __name__ == "__main__":
    main()
