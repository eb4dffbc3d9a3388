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

The three are the teachers of `pipeline.teacher.sources`; the run around them
(reading, steps, evaluation, checkpoints, resume) is `pipeline.student.run.Run`,
shared with `moekd sar`. Batches come from `pipeline.data.reader`: a seeded shuffle over
windows of `shuffle_shards` shards, grouped by length, decoded ahead in a
thread. Training lasts `max_steps` optimizer steps, or `epochs` passes. Under
torchrun each rank trains on its own shards, with the student replicated
(`parallel: ddp`) or sharded (`fsdp`); all take the same number of steps, and
rank 0 writes everything. A run resumes on another number of ranks too.

Writes to `output`: run.json (the settings), metrics.jsonl (per step: loss,
ce, kd, lr, grad_norm, response tokens trained on so far and per second
(tokens, tokens_per_s), each rank's peak memory (peak_memory_mib); and eval_loss, eval_ppl,
eval_kl where evaluated), checkpoints/step-NNNNNNNN/ (the newest
`keep_checkpoints`) and final/: the student (safetensors) and its tokenizer,
for AutoModelForCausalLM. Re-running the same command resumes from the newest
checkpoint and gives the losses of an uninterrupted run; once final/ exists it
does nothing. Other settings in a used `output` are refused unless `overwrite`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pipeline.core.errors import MoekdError
from pipeline.data.batch import Batch, one_sample_per_sequence
from pipeline.models.loading import honours_remote_code, resolve_dtype
from pipeline.student.run import Run, RunConfig
from pipeline.teacher.routing import RoutingConfig
from pipeline.teacher.sources import CachedTeacher, Labels, OnlineTeacher


@dataclass(kw_only=True)
class Config(RunConfig):
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    cache: str | None = None  # offline KD: a `moekd cache` directory or URI (s3://bucket/prefix, ...)
    data: str | None = None  # a `moekd prepare` directory: SFT, or online KD with `teacher`
    teacher: str | None = None  # online KD: local directory of the teacher, run on every batch
    ka_samples: Literal["mean", "one", "aggregate"] = "mean"  # how the M teacher samples enter D
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # online KD: the teacher's routing
    top_k: int = 64  # online KD: teacher log-probs kept per token and sample
    cache_top_k: int | None = None  # offline KD: use the most probable this many of the cache's k (null: all)
    cache_shards: list[int] | None = None  # offline KD: train on these shards of the cache only (null: all)
    follow: bool = False  # offline KD: start on a cache still being written, take shards as they are committed
    follow_timeout: float = 3600.0  # follow: seconds without a new shard before giving up (re-run to resume)

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
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
        if self.cache is None and (self.cache_top_k is not None or self.cache_shards is not None or self.follow):
            raise ValueError("cache_top_k, cache_shards and follow read a cache: they need cache")
        if self.follow_timeout <= 0:
            raise ValueError(f"follow_timeout must be positive, got {self.follow_timeout}")
        if self.cache_top_k is not None and self.cache_top_k < 1:
            raise ValueError(f"cache_top_k must be at least 1 (or null), got {self.cache_top_k}")
        if self.cache_shards is not None and (not self.cache_shards or len(set(self.cache_shards))
                                              != len(self.cache_shards)):
            raise ValueError(f"cache_shards must be distinct shard indices, at least one, got {self.cache_shards}")
        if self.teacher is not None and self.ka_samples == "aggregate" and self.routing.mode != "ka":
            raise ValueError("ka_samples=aggregate averages KA samples: it needs routing.mode=ka")


@honours_remote_code
def run(config: Config) -> dict:
    """Train (or resume, or find finished) the run in `config.output`; the last step's metrics ({}: nothing to do)."""
    with Run(config, "train") as run, contextlib.ExitStack() as stack:
        if run.finished:
            return {}
        run.load_student()
        teacher = make_teacher(config, run, stack)
        run.begin(teacher, about=teacher.description + (
            f" (alpha={config.loss.alpha}, ka_samples={config.ka_samples})" if config.loss.alpha else ""))
        run.resume()

        def step(batches: list[Batch]) -> dict:
            return run.trainer.step([samples(config, run.batch(batch), run.trainer.steps_done) for batch in batches])

        last = run.steps(step, show=("loss", "tokens_per_s"))
        stack.close()  # an online teacher's memory goes before the final save
        run.finish()
    return last


def make_teacher(config: Config, run: Run, stack: contextlib.ExitStack):
    """The run's teacher: the cache, the teacher model in the loop, or none (SFT)."""
    aggregate = config.ka_samples == "aggregate"
    if config.cache:
        teacher = CachedTeacher(config.cache, aggregate=aggregate, top_k=config.cache_top_k, shards=config.cache_shards,
                                follow=config.follow_timeout if config.follow else None)
        loss = config.loss
        if teacher.sampled and (loss.divergence != "forward_kl" or loss.temperature != 1 or config.ka_samples != "mean"):
            raise MoekdError(
                f"{config.cache} is a sampled cache: its draws estimate the teacher's distribution without its "
                "probabilities, which is exact (in expectation) for forward KL at temperature 1 only, and they "
                "already mix the KA samples. Use loss.divergence=forward_kl, loss.temperature=1 and "
                f"ka_samples=mean (got {loss.divergence}, {loss.temperature}, {config.ka_samples}), or a top-k cache")
    elif config.teacher:
        device = run.processes.device
        teacher = OnlineTeacher(data=config.data, shard_size=config.shard_size, teacher=config.teacher,
                                routing=config.routing, top_k=config.top_k, aggregate=aggregate,
                                dtype=resolve_dtype(config.dtype, device), device=device, stack=stack)
    else:
        teacher = Labels(config.data, config.shard_size)
    return teacher


def samples(config: Config, batch: Batch, step: int) -> Batch:
    """The batch with the teacher samples D averages: all of them, or one per sequence (`ka_samples: one`)."""
    return one_sample_per_sequence(batch, config.seed, step) if config.ka_samples == "one" else batch
