"""Train the dense student: from the teacher-logit cache, with the teacher in the loop, or on data alone (SFT).

Loss over response tokens: (1 − α)·CE + α·D(teacher ‖ student) (`loss`), where
D over the teacher's M KA samples is their average (`ka_samples: mean`, the
paper's rule), one sample per sequence drawn from (seed, step, seq_id) (`one`),
or the cache's stored aggregate (`aggregate`). Exactly one source:

- `cache`: a `moekd cache` directory (offline KD). It must be complete and is
  verified (every shard hashed) whenever a run starts; the student must have
  the teacher's tokenizer and vocabulary size.
- `data` + `teacher`: online KD. The teacher runs on every batch with
  `routing`, keeping `top_k` log-probs per token: the records (and KA seeds)
  a cache made with those settings holds. With the cache's `shard_size`, the
  batches are also those of the offline run.
- `data` alone: SFT (set `loss.alpha=0`).

Batches come from `pipeline.reader`: a seeded shuffle over windows of
`shuffle_shards` shards, grouped by length, decoded ahead in a thread.
Training lasts `max_steps` optimizer steps, or `epochs` passes. Under torchrun
each rank trains on its own shards with DDP; all take the same number of
steps, and rank 0 writes everything.

Writes to `output`: run.json (the settings), metrics.jsonl (per step: loss,
ce, kd, lr, grad_norm, tokens so far, tokens_per_s; and eval_loss, eval_ppl,
eval_kl where evaluated), checkpoints/step-NNNNNNNN/ (the newest
`keep_checkpoints`) and final/: the student (safetensors) and its tokenizer,
for AutoModelForCausalLM. Re-running the same command resumes from the newest
checkpoint and gives the losses of an uninterrupted run; once final/ exists it
does nothing. Other settings in a used `output` are refused unless `overwrite`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal

import torch

from pipeline.cache_format import Manifest, verify_cache
from pipeline.capture import capture_batch
from pipeline.data import PreparedData
from pipeline.errors import MoekdError
from pipeline.evaluation import cache_kl, response_loss
from pipeline.losses import LossConfig
from pipeline.models import load_model, load_tokenizer, pad_token_id, resolve_dtype, save_model, tokenizer_fingerprint
from pipeline.reader import (
    Batch, CacheShards, PreparedShards, Reader, collate_examples, collate_records, one_sample_per_sequence,
)
from pipeline.routing import RoutingConfig, RoutingHooks
from pipeline.training import (
    CHECKPOINTS, FINAL, FINISHED, METRICS_FILE, Distributed, MetricsLog, OptimConfig, Trainer,
    autocast_dtype, open_run, resume, run_steps, save_run_checkpoint, start_output, step_batches, step_plan,
)

# Settings that change neither the losses nor the weights: a run may resume with other values.
RESUMABLE_WITH_CHANGES = ("overwrite", "save_every", "keep_checkpoints", "prefetch")


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    output: str  # the run directory
    student: str  # local Hugging Face directory of the dense student (model and tokenizer)
    cache: str | None = None  # offline KD: a `moekd cache` directory
    data: str | None = None  # a `moekd prepare` directory: SFT, or online KD with `teacher`
    teacher: str | None = None  # online KD: local directory of the teacher, run on every batch
    loss: LossConfig = field(default_factory=LossConfig)
    ka_samples: Literal["mean", "one", "aggregate"] = "mean"  # how the M teacher samples enter D
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # online KD: the teacher's routing
    top_k: int = 64  # online KD: teacher log-probs kept per token and sample
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 8  # sequences per micro-batch, per rank
    max_steps: int | None = None  # optimizer steps (epochs repeat as needed); null: `epochs` passes
    epochs: int = 1
    shuffle_shards: int = 4  # shards per shuffle window (decoded together)
    shard_size: int = 256  # data without a cache: rows per pseudo-shard
    prefetch: int = 8  # batches the reader thread prepares ahead
    seed: int = 0  # data order and KA sample draws
    eval_data: str | None = None  # a held-out `moekd prepare` directory: eval_loss, eval_ppl
    eval_cache: str | None = None  # a teacher cache of held-out data: eval_kl (mean KL(teacher ‖ student))
    eval_every: int = 0  # steps between evaluations; 0: at the end only
    eval_max_examples: int | None = 256  # held-out rows evaluated (evenly spaced; the cache's first); null: all
    save_every: int = 500  # steps between checkpoints; 0: at the end only
    keep_checkpoints: int = 2
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    device: str = "auto"
    overwrite: bool = False  # replace a run made with other settings

    def __post_init__(self):
        positive = ("batch_size", "epochs", "shuffle_shards", "shard_size", "prefetch", "keep_checkpoints", "top_k")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_max_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 or null, got {getattr(self, name)}")
        if self.eval_every < 0 or self.save_every < 0:
            raise ValueError("eval_every and save_every must be >= 0 (0: at the end only)")
        if (self.cache is None) == (self.data is None):
            raise ValueError("give exactly one of cache (offline KD) or data (SFT, or online KD with teacher)")
        if self.teacher is not None and self.data is None:
            raise ValueError("teacher (online KD) runs on prepared data: give data instead of cache")
        if self.loss.alpha > 0 and self.cache is None and self.teacher is None:
            raise ValueError(f"loss.alpha={self.loss.alpha} needs a teacher: give cache or teacher, "
                             "or set loss.alpha=0 for SFT")
        if self.ka_samples != "mean" and self.cache is None and self.teacher is None:
            raise ValueError(f"ka_samples={self.ka_samples} picks teacher samples: it needs cache or teacher")
        if self.teacher is None and (self.routing != RoutingConfig() or self.top_k != Config.top_k):
            raise ValueError("routing and top_k apply to online KD (teacher=...) only; a cache keeps its own")
        if self.teacher is not None and self.ka_samples == "aggregate" and self.routing.mode != "ka":
            raise ValueError("ka_samples=aggregate averages KA samples: it needs routing.mode=ka")
        if self.eval_every and self.eval_data is None and self.eval_cache is None:
            raise ValueError("eval_every needs eval_data or eval_cache")


def run(config: Config) -> dict:
    """Train (or resume, or find finished) the run in `config.output`; the last step's metrics ({}: nothing to do)."""
    with Distributed(config.device) as processes:
        return train(config, processes)


def train(config: Config, processes: Distributed) -> dict:
    output = Path(config.output)
    identity, latest = open_run(config, processes, RESUMABLE_WITH_CHANGES)
    if latest == FINISHED:
        processes.say(f"train: {output / FINAL} exists, the run is finished; nothing to do")
        return {}
    tokenizer = load_tokenizer(config.student)
    model = load_model(latest or config.student, dtype="float32", device=processes.device).train()
    check_student(config, tokenizer, model)
    if config.cache:
        processes.on_rank0(lambda: verify(config.cache))
    processes.on_rank0(lambda: start_output(output, identity, latest))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    reader = make_reader(config, processes, pad_token_id(tokenizer))
    steps_in, total_steps = step_plan(reader, config.optim.grad_accum, config.max_steps, config.epochs)
    trainer = Trainer(model, config.optim, config.loss, total_steps, processes,
                      autocast_dtype(config.dtype, processes.device))
    position, tokens = resume(latest, processes, config.seed, {"trainer": trainer})
    processes.say(f"train: {describe(config)}; {total_steps} steps of {config.optim.grad_accum} x "
                  f"{config.batch_size} sequences x {processes.world_size} ranks"
                  + (f"; resuming after step {trainer.steps_done}" if latest else ""))
    with contextlib.ExitStack() as stack:
        teach = online_teacher(config, model, pad_token_id(tokenizer), processes.device, stack) if config.teacher else None
        last = Loop(config, processes, reader, trainer, tokenizer, teach, steps_in).run(position, tokens)
    if processes.rank == 0:
        save_model(output / FINAL, model, tokenizer)
        print(f"train: {trainer.steps_done} steps done; the student is in {output / FINAL}")
    return last


def describe(config: Config) -> str:
    if config.cache:
        return f"offline KD from {config.cache} (alpha={config.loss.alpha}, ka_samples={config.ka_samples})"
    if config.teacher:
        return (f"online KD from {config.teacher} on {config.data} (alpha={config.loss.alpha}, "
                f"routing={config.routing.mode}, ka_samples={config.ka_samples})")
    return f"SFT on {config.data}"


# ---------------------------------------------------------------- checks

def check_student(config: Config, tokenizer, model) -> None:
    """Refuse a student whose tokenizer or vocabulary is not the one the caches / data were made with."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    made_with = {}
    for path in (config.cache, config.eval_cache):
        if path:
            manifest = Manifest.load(Path(path))
            made_with[path] = (manifest.identity.get("tokenizer_fingerprint"), manifest.identity["encoding"]["vocab_size"])
            check_cache(path, manifest, config.ka_samples if path == config.cache else "mean")
    for path in (config.data, config.eval_data):
        if path:
            made_with[path] = (PreparedData(path).tokenizer_fingerprint, None)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    for path, (expected, teacher_vocab) in made_with.items():
        if fingerprint != expected:
            raise MoekdError(
                f"the student's tokenizer ({config.student}, fingerprint {fingerprint[:12]}) is not the one {path} "
                f"was made with ({str(expected)[:12]}): the student must share the teacher's tokenizer"
            )
        if teacher_vocab is not None and teacher_vocab != vocab_size:
            raise MoekdError(f"the student ({config.student}) has a vocabulary of {vocab_size} but the teacher "
                             f"of {path} has {teacher_vocab}; they must match")


def check_cache(path: str, manifest: Manifest, ka_samples: str) -> None:
    expected = manifest.identity.get("num_shards")
    if expected is not None and len(manifest.shards) != expected:
        raise MoekdError(f"teacher cache {path} is incomplete: {len(manifest.shards)} of {expected} shards "
                         "committed; finish it with `moekd cache` first")
    if ka_samples == "aggregate" and not manifest.identity["encoding"]["aggregate"]:
        raise MoekdError(f"ka_samples=aggregate but teacher cache {path} stores no aggregate "
                         "(build it with aggregate=true, or use ka_samples=mean)")


def verify(cache: str) -> None:
    """Hash and check every shard; refuse a cache that fails."""
    start = time.perf_counter()
    problems = verify_cache(Path(cache))
    if problems:
        raise MoekdError(f"teacher cache {cache} failed verification ({len(problems)} problems, e.g. {problems[0]}); "
                         f"`moekd verify {cache}` lists them. Rebuild the damaged shards with `moekd cache`.")
    size = sum(s.bytes for s in Manifest.load(Path(cache)).shards.values())
    print(f"train: verified {cache} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")


# ---------------------------------------------------------------- batches and teachers

def make_reader(config: Config, processes: Distributed, pad_id: int) -> Reader:
    if config.cache:
        shards = CacheShards(config.cache)
        collate = functools.partial(collate_records, pad_id=pad_id, aggregate=config.ka_samples == "aggregate")
    else:
        shards = PreparedShards(PreparedData(config.data), config.shard_size)
        collate = functools.partial(collate_examples, pad_id=pad_id)
    return Reader(shards, batch_size=config.batch_size, shuffle_shards=config.shuffle_shards, seed=config.seed,
                  collate=collate, rank=processes.rank, world_size=processes.world_size, prefetch=config.prefetch)


def online_teacher(config: Config, student, pad_id: int, device, stack: contextlib.ExitStack) -> Callable:
    """batch -> the batch with its teacher records, computed now as the cache stage would."""
    data = PreparedData(config.data)
    if tokenizer_fingerprint(load_tokenizer(config.teacher)) != data.tokenizer_fingerprint:
        raise MoekdError(f"the teacher's tokenizer ({config.teacher}) is not the one {config.data} was prepared with")
    teacher = load_model(config.teacher, dtype=resolve_dtype(config.dtype, device), device=device)
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    if vocab_size != student.get_output_embeddings().weight.shape[0] or config.top_k > vocab_size:
        raise MoekdError(f"the teacher ({config.teacher}) has a vocabulary of {vocab_size}: the student's must be "
                         f"the same and top_k={config.top_k} no larger")
    routing = stack.enter_context(RoutingHooks(teacher, config.routing))
    num_samples = config.routing.samples if config.routing.mode == "ka" else 1
    aggregate = config.ka_samples == "aggregate"

    def teach(batch: Batch) -> Batch:
        records = capture_batch(teacher, routing, batch.examples, k=config.top_k, num_samples=num_samples,
                                aggregate=aggregate, pad_id=pad_id)
        return collate_records(records, pad_id, aggregate)

    return teach


# ---------------------------------------------------------------- the loop

class Loop:
    """The optimizer steps of a set-up run, with metrics, evaluations and checkpoints."""

    def __init__(self, config: Config, processes: Distributed, reader: Reader, trainer: Trainer, tokenizer,
                 teach: Callable | None, steps_in: Callable[[int], int]):
        self.config, self.processes, self.reader, self.trainer = config, processes, reader, trainer
        self.tokenizer, self.teach, self.steps_in = tokenizer, teach, steps_in
        self.eval_data = PreparedData(config.eval_data) if config.eval_data else None
        self.log = MetricsLog(Path(config.output) / METRICS_FILE)

    def run(self, position: tuple[int, int], tokens: int) -> dict:
        """Steps from `position` (epoch, next batch) to the last step; the last step's record."""
        trainer = self.trainer
        walk = step_batches(self.reader, self.steps_in, self.config.optim.grad_accum, trainer.steps_done,
                            trainer.total_steps, position)

        def step(batches: list[Batch]) -> dict:
            return trainer.step([self.with_teacher(batch) for batch in batches])

        return run_steps(walk, step, self.after_step, trainer, tokens, self.processes, "train",
                         ("loss", "tokens_per_s"))

    def with_teacher(self, batch: Batch) -> Batch:
        batch = (self.teach(batch) if self.teach else batch).to(self.processes.device)
        if self.config.ka_samples == "one":
            batch = one_sample_per_sequence(batch, self.config.seed, self.trainer.steps_done)
        return batch

    def after_step(self, record: dict, position: tuple[int, int]) -> None:
        """Evaluate, log and save as due; `position` is the reader's next (epoch, batch)."""
        step, config, rank0 = record["step"], self.config, self.processes.rank == 0
        if rank0 and (self.eval_data or config.eval_cache) and self.due(config.eval_every, step):
            record |= self.evaluate()
        if rank0:
            self.log.append(record)
        if self.due(config.save_every, step):
            self.save(position, record["tokens"])

    def due(self, every: int, step: int) -> bool:
        return step == self.trainer.total_steps or bool(every and step % every == 0)

    def evaluate(self) -> dict:
        """Held-out eval_loss / eval_ppl (eval_data) and eval_kl (eval_cache) of the student."""
        model, config, autocast = self.trainer.model, self.config, self.trainer.autocast
        pad_id, metrics = pad_token_id(self.tokenizer), {}
        model.eval()
        try:
            with torch.autocast(model.device.type, autocast, enabled=autocast is not None):
                if self.eval_data is not None:
                    result = response_loss(model, self.eval_data, config.batch_size, config.eval_max_examples,
                                           pad_id, "eval")
                    metrics |= {"eval_loss": result["loss"], "eval_ppl": result["ppl"]}
                if config.eval_cache:
                    result = cache_kl(model, config.eval_cache, config.eval_max_examples, config.batch_size,
                                      pad_id, "eval kl")
                    metrics["eval_kl"] = result["kl"]
        finally:
            model.train()
        return metrics

    def save(self, position: tuple[int, int], tokens: int) -> None:
        """A checkpoint of the step just taken (every rank calls this: the RNG states are gathered)."""
        save_run_checkpoint(Path(self.config.output) / CHECKPOINTS, self.processes, self.trainer.model,
                            self.tokenizer, self.config.keep_checkpoints, {"trainer": self.trainer}, position, tokens)
