"""Rounds: on-policy distillation from the cache: generate, cache, train, R times, each student answering the next.

Round r of R:

1. `moekd generate`: the student so far (round 1: `student`) answers the
   round's prompts of `data`: with `split_prompts` (the default) every R-th
   prompt from the (r − 1)-th, so that the R rounds together answer each prompt
   once and the teacher scores about as many tokens as one cache of the
   dataset; otherwise every prompt, every round;
2. `moekd cache`: the teacher scores those responses (any routing, KA
   included; the cache names its data's generator);
3. `moekd train`: the student so far trains on that cache (forward or reverse
   KL, JSD: `train`'s loss), from its weights; its final/ is the next round's
   student.

Each stage runs through the command line with its own settings (`generate`,
`cache`, `train`, on top of `train_config`'s file), all of them checked before
round 1 starts. Everything lands in `output`/round-<r>/{responses,cache,train};
the last round's student is `output`/round-<R>/train/final. Every stage
reuses what it finished and resumes what it started (generate by parts, cache
by shards, train from its newest checkpoint, each to the bytes of an
uninterrupted run), so a killed `moekd rounds` re-run with the same command
resumes where it stopped, and a finished round is not redone. Round r draws
with seed (`seed`, r): its responses and its training order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.core.config import as_overrides
from pipeline.core.errors import MoekdError, first_line
from pipeline.core.files import atomic_write_json
from pipeline.core.seeding import derive_seed

PATHS = ("output", "student", "model", "teacher", "data", "cache")  # what a round sets itself
TIMES_FILE = "times.json"  # seconds each stage of each round took in the run that finished it


@dataclass(kw_only=True)
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    output: str  # the rounds directory
    student: str  # round 1's student (local directory): it answers round 1's prompts and trains first
    teacher: str  # the (MoE) teacher (local directory), scoring every round's responses
    data: str  # a `moekd prepare` directory: the prompts (and, for generate.on_policy < 1, the dataset's responses)
    rounds: int = 2
    split_prompts: bool = True  # each round answers its own 1/R of the prompts (one teacher-token budget)
    seed: int = 0
    generate: dict[str, Any] = field(default_factory=dict)  # `moekd generate` settings, e.g. temperature, samples
    cache: dict[str, Any] = field(default_factory=dict)  # `moekd cache` settings, e.g. routing, top_k, dtype
    train_config: str | None = None  # a `moekd train` YAML every round takes (its paths aside)
    train: dict[str, Any] = field(default_factory=dict)  # `moekd train` settings on top, e.g. loss.divergence

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        for name in ("generate", "cache", "train"):
            given = sorted(set(getattr(self, name)) & set(PATHS))
            if given:
                raise ValueError(f"{name}.{given[0]} is set by each round; give it at the top level (student, "
                                 "teacher, data) or not at all")


def commands(config: Config, r: int) -> list[tuple[str, list[str]]]:
    """Round r's `moekd` commands (generate, cache, train), as the command line takes them."""
    here, previous = Path(config.output) / f"round-{r}", Path(config.output) / f"round-{r - 1}"
    student = config.student if r == 1 else str(previous / "train" / "final")
    seed = derive_seed("round", config.seed, r) % 2**31
    stride, offset = (config.rounds, r - 1) if config.split_prompts else (1, 0)
    trained = {}
    if config.train_config:
        if not Path(config.train_config).is_file():
            raise MoekdError(f"train_config not found: {config.train_config}")
        try:
            trained = yaml.safe_load(Path(config.train_config).read_text()) or {}
        except yaml.YAMLError as e:
            raise MoekdError(f"train_config {config.train_config} is not valid YAML: {first_line(e)}") from None
        if not isinstance(trained, dict):
            raise MoekdError(f"train_config {config.train_config} must hold a mapping of `moekd train` settings")
        trained = {k: v for k, v in trained.items() if k not in PATHS}
    return [
        ("generate", [str(here / "responses"), f"model={student}", f"data={config.data}", f"stride={stride}",
                      f"offset={offset}", f"seed={seed}", *as_overrides(config.generate)]),
        ("cache", [str(here / "cache"), f"teacher={config.teacher}", f"data={here / 'responses'}",
                   *as_overrides(config.cache)]),
        ("train", [str(here / "train"), f"student={student}", f"cache={here / 'cache'}", f"seed={seed}",
                   *as_overrides(trained), *as_overrides(config.train)]),
    ]


def run(config: Config) -> None:
    """Every round's three stages, in order; each reuses or resumes what it finds."""
    from stages.cli import configure  # the stages, as their command line runs them

    for r in range(1, config.rounds + 1):  # every setting checked before anything runs
        for name, args in commands(config, r):
            configure(name, args)
    times_file = Path(config.output) / TIMES_FILE
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    for r in range(1, config.rounds + 1):
        for name, args in commands(config, r):
            print(f"\n== round {r}/{config.rounds}: moekd {name} {' '.join(args)}", flush=True)
            stage, stage_config = configure(name, args)
            start = time.perf_counter()
            try:
                stage.run(stage_config)
            except MoekdError as e:
                raise MoekdError(f"round {r}, {name}: {e}") from None
            key = f"round-{r}/{name}"
            if key not in times:  # the run that finished the stage; a re-run finding it done adds nothing
                times[key] = time.perf_counter() - start
                atomic_write_json(times_file, times)
    final = Path(config.output) / f"round-{config.rounds}" / "train" / "final"
    print(f"\nrounds: {config.rounds} done; the student is {final}")
