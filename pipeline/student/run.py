"""A training run from its directory to final/: the settings and the lifecycle `train` and `sar` share.

Each stage opens a `Run`, gives it its teacher (`pipeline.teacher.sources`)
and its step, and the run does the rest: this process's place among
torchrun's (`core.processes`), the run directory (`rundir`), the reader and
the plan of steps, held-out evaluation, metrics, checkpoints (`checkpoints`)
and the final save. The optimizer step is `trainer.Trainer`.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from tqdm import tqdm

from pipeline.cache.identity import CacheIdentity
from pipeline.cache.manifest import Manifest
from pipeline.core.errors import MoekdError
from pipeline.core.files import FileLock, read_json
from pipeline.core.outputs import differences
from pipeline.core.processes import Distributed
from pipeline.data.batch import Batch
from pipeline.data.prepared import PreparedData
from pipeline.data.reader import Reader
from pipeline.models.identity import MadeWith, check_tokenizer, content_identity
from pipeline.models.loading import load_config, load_model, load_tokenizer, pad_token_id, save_model
from pipeline.models.logprobs import vocab_size
from pipeline.student.checkpoints import Position, resume, save_run_checkpoint
from pipeline.student.evaluation import cache_kl, response_loss
from pipeline.student.losses import LossConfig
from pipeline.student.reporting import Reporters, check_report_to
from pipeline.student.rundir import (
    CHECKPOINTS, FINAL, FINISHED, METRICS_FILE, RESUMABLE_WITH_CHANGES, RUN_FILE, RUN_LOCK, MetricsLog, inspect_output,
    run_identity, start_output,
)
from pipeline.student.trainer import OptimConfig, Trainer, autocast_dtype, check_packing


@dataclass(kw_only=True)
class RunConfig:
    """The settings every training stage shares: the student and its loss and optimiser, how rows are read
    and batched, how long the run lasts, held-out evaluation, checkpoints. A stage's Config extends it with
    its teacher's settings; the keys stay flat (`batch_size=8`, not `run.batch_size=8`)."""

    output: str  # the run directory
    student: str  # local Hugging Face directory of the dense student (model and tokenizer)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # reading: a seeded shuffle over windows of shards, batches grouped by length, decoded ahead in a thread
    batch_size: int = 8  # sequences per micro-batch, per rank
    shuffle_shards: int = 4  # shards per shuffle window (decoded together)
    shard_size: int = 256  # prepared data without a cache: rows per pseudo-shard
    prefetch: int = 8  # batches the reader thread prepares ahead
    # the student's forward: a micro-batch's rows packed into sequences of up to this many tokens, each row
    # attending within itself (null: rows padded to the longest); checked on the student when a run starts
    pack_length: int | None = None
    # the student's attention implementation (transformers' attn_implementation: sdpa, eager, flex_attention,
    # flash_attention_2, ...); null: transformers' default. Packing pays where it skips other rows' blocks
    attention: str | None = None
    # several ranks (torchrun): each holds the whole student (ddp), or a shard of it per decoder layer (fsdp,
    # FSDP2: about 16 bytes per parameter divided among the ranks); checkpoints hold the whole state either way
    parallel: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 0  # data order and every draw the run makes (KA samples, on-policy responses)
    # the run
    max_steps: int | None = None  # optimizer steps (epochs repeat as needed); null: `epochs` passes
    epochs: int = 1
    eval_data: str | None = None  # a held-out `moekd prepare` directory: eval_loss, eval_ppl
    eval_cache: str | None = None  # a teacher cache of held-out data: eval_kl (mean KL(teacher ‖ student))
    eval_every: int = 0  # steps between evaluations; 0: at the end only
    eval_max_examples: int | None = 256  # held-out rows evaluated (evenly spaced; the cache's first); null: all
    save_every: int = 500  # steps between checkpoints; 0: at the end only
    keep_checkpoints: int = 2
    keep_checkpoints_at_end: bool = False  # once final/ is written the checkpoints (for resuming only) go; true: stay
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False  # the student: recompute activations in backward (less memory)
    device: str = "auto"
    overwrite: bool = False  # replace a run made with other settings
    report_to: tuple[str, ...] = ()  # besides metrics.jsonl: tensorboard (<output>/tensorboard), wandb
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        check_report_to(self.report_to)
        for name in ("batch_size", "epochs", "shuffle_shards", "shard_size", "prefetch", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_max_examples", "pack_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 or null, got {getattr(self, name)}")
        if self.eval_every < 0 or self.save_every < 0:
            raise ValueError("eval_every and save_every must be >= 0 (0: at the end only)")
        if self.eval_every and self.eval_data is None and self.eval_cache is None:
            raise ValueError("eval_every needs eval_data or eval_cache")


def steps_in_epoch(reader: Reader, epoch: int, grad_accum: int, history: tuple = ()) -> int:
    """Optimizer steps in `epoch`: every rank's batches, trimmed to the fewest, in groups of grad_accum."""
    steps = reader.num_batches(epoch, history) // grad_accum
    if steps == 0:
        raise MoekdError(f"epoch {epoch} holds fewer than optim.grad_accum={grad_accum} batches of "
                         f"batch_size={reader.batch_size} per rank: use smaller batches or fewer ranks")
    return steps


def step_plan(reader: Reader, grad_accum: int, max_steps: int | None, epochs: int) -> tuple[Callable[..., int], int]:
    """(optimizer steps in epoch e (after the `history` of rank changes in it), cached; the run's total steps:
    `max_steps`, else `epochs` whole epochs)."""
    steps_in = functools.cache(lambda epoch, history=(): steps_in_epoch(reader, epoch, grad_accum, history))
    return steps_in, max_steps or sum(steps_in(epoch) for epoch in range(epochs))


def step_batches(reader: Reader, steps_in: Callable[..., int], grad_accum: int, steps_done: int,
                 total_steps: int, position: Position) -> Iterator[tuple[int, list, Position]]:
    """(epoch, micro-batches, the reader's next position) per step left, from `position`."""
    epoch, first, history = position
    while steps_done < total_steps:
        count = min(steps_in(epoch, history) - first // grad_accum, total_steps - steps_done)
        with contextlib.closing(reader.batches(epoch, first, first + count * grad_accum, history)) as stream:
            for _ in range(count):
                batches = [next(stream) for _ in range(grad_accum)]
                first, steps_done, this_epoch = first + grad_accum, steps_done + 1, epoch
                if first == steps_in(epoch, history) * grad_accum:
                    epoch, first, history = epoch + 1, 0, ()
                yield this_epoch, batches, (epoch, first, history)


def run_steps(walk: Iterator, step: Callable[[list], dict], after_step: Callable[[dict, Position], None],
              trainer: Trainer, tokens: int, processes: Distributed, desc: str, show: tuple[str, ...]) -> dict:
    """Take the steps of `walk` (`step_batches`) with a tqdm bar; the last step's record ({}: none left).

    `step(batches)` takes one step and returns its metrics (with "tokens");
    the record adds step, epoch, the tokens so far and tokens_per_s, and goes
    to `after_step(record, the reader's next position)` (logging, saving),
    which may add to it; the bar shows the record's `show` keys.
    """
    record = {}
    with contextlib.closing(walk), tqdm(total=trainer.total_steps, initial=trainer.steps_done, desc=desc,
                                        unit="step", dynamic_ncols=True, disable=processes.rank != 0) as bar:
        start = time.perf_counter()  # a step's time counts its wait for batches, not what after_step does
        for epoch, batches, position in walk:
            result = step(batches)
            tokens += result["tokens"]
            record = {"step": trainer.steps_done, "epoch": epoch, **result, "tokens": tokens,
                      "tokens_per_s": result["tokens"] / (time.perf_counter() - start)}
            after_step(record, position)
            bar.update()
            bar.set_postfix({key: f"{record[key]:.4g}" for key in show})
            start = time.perf_counter()
    return record


class Run:
    """One run of a training stage, from its directory to final/: the lifecycle `train` and `sar` share.

    A stage opens the run (this process's place among torchrun's, and what the
    output directory holds: nothing, a run to resume, a finished run, or
    another run, refused), loads the student, `begin`s with its teacher
    (checks, the reader, the step plan, the student's Trainer), `resume`s
    (with any other stateful parts, e.g. SAR's router trainer), takes its
    `steps` with its own step function and `finish`es. Around every step the
    run evaluates on held-out data, logs metrics.jsonl and checkpoints, as due.
    """

    def __init__(self, config: RunConfig, name: str, also_clear: tuple[str, ...] = ()):
        self.config, self.name, self.also_clear = config, name, also_clear
        self.output = Path(config.output)
        self.identity = run_identity(config, RESUMABLE_WITH_CHANGES)
        self.lock: FileLock | None = None
        self.trainer: Trainer | None = None
        self.reporters: Reporters | None = None  # opened when the run knows its first step (`resume`)
        self.processes = Distributed(config.device)
        try:
            self.latest = self.processes.on_rank0(self.open_directory)
        except BaseException:  # no __exit__ follows a failed __init__: release the lock and leave the group here
            self.__exit__()
            raise
        self.autocast_dtype = autocast_dtype(config.dtype, self.processes.device)
        self.log = MetricsLog(self.output / METRICS_FILE)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.trainer is not None:
            self.trainer.close()
        if self.reporters is not None:
            self.reporters.close()
        self.processes.stop()

    def open_directory(self) -> str | None:
        """Rank 0: what the output holds (`inspect_output`: FINISHED, the checkpoint to resume from, or None).
        A run directory's lock is taken first, so that nothing changes it from here on (its checkpoints are
        checked once, here); a directory that holds no run yet is taken in `take_directory`."""
        if (self.output / RUN_FILE).is_file():
            self.hold_lock()
        return inspect_output(self.output, self.identity, self.config.overwrite, self.warn)

    def hold_lock(self) -> None:
        """Rank 0: hold the run directory's lock for the run's life; a second process on it is refused."""
        lock = FileLock(self.output / RUN_LOCK)
        if not lock.try_acquire():
            raise MoekdError(f"{self.output} is in use by another moekd process (it holds {lock.path}); wait for "
                             "it to end, or choose another output")
        self.lock = lock

    def warn(self, message: str) -> None:
        """One line on stderr (rank 0 calls it)."""
        print(f"moekd {self.name}: warning: {message}", file=sys.stderr)

    @property
    def finished(self) -> bool:
        """True (and said) when the output already holds this run's final student."""
        if self.latest == FINISHED:
            self.processes.say(f"{self.name}: {self.output / FINAL} exists, the run is finished; nothing to do")
        return self.latest == FINISHED

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision (bfloat16 autocast, or none)."""
        dtype = self.autocast_dtype
        return torch.autocast(self.processes.device.type, dtype, enabled=dtype is not None)

    def load_student(self):
        """(the student in training mode, its tokenizer): the newest checkpoint's when resuming."""
        self.tokenizer = load_tokenizer(self.config.student)
        self.student = load_model(self.latest or self.config.student, dtype="float32",
                                  device=self.processes.device, attention=self.config.attention).train()
        if self.config.gradient_checkpointing:
            self.student.activation_checkpointing_enable({"use_reentrant": False})
        return self.student, self.tokenizer

    def held_out(self) -> MadeWith:
        """What the held-out data and cache were made with."""
        made_with = self.eval_cache_identity().made_with(self.config.eval_cache) if self.config.eval_cache else {}
        if self.config.eval_data:
            made_with[self.config.eval_data] = (PreparedData(self.config.eval_data).tokenizer_fingerprint, None)
        return made_with

    def eval_cache_identity(self) -> CacheIdentity:
        return Manifest.load(self.config.eval_cache, with_shards=False).identity

    def begin(self, teacher, about: str | None = None) -> None:
        """Check the student against `teacher` and the held-out data, verify the teacher (rank 0), record
        the settings, then plan the steps and make the student's Trainer. `about` says what the run does (by
        default, the teacher's description)."""
        config, processes = self.config, self.processes
        check_tokenizer("the student", config.student, self.tokenizer, vocab_size(self.student),
                        teacher.made_with | self.held_out())
        processes.on_rank0(teacher.verify)
        processes.on_rank0(lambda: self.take_directory(self.inputs(teacher)))
        self.teacher, self.pad_id, self.about = teacher, pad_token_id(self.tokenizer), about or teacher.description
        self.reader = Reader(teacher.shards(), batch_size=config.batch_size, shuffle_shards=config.shuffle_shards,
                             seed=config.seed, collate=functools.partial(teacher.collate, pad_id=self.pad_id),
                             rank=processes.rank, world_size=processes.world_size, prefetch=config.prefetch)
        self.steps_in, self.total_steps = step_plan(self.reader, config.optim.grad_accum, config.max_steps,
                                                    config.epochs)
        if config.pack_length:
            check_packing(self.student)
        self.trainer = Trainer(self.student, optim=config.optim, loss=config.loss, total_steps=self.total_steps,
                               processes=processes, autocast=self.autocast_dtype, pack_length=config.pack_length,
                               parallel=config.parallel)
        self.eval_data = PreparedData(config.eval_data) if config.eval_data else None

    def inputs(self, teacher) -> dict:
        """What the run learns from, by content: the teacher's inputs, the starting student, held-out data."""
        config = self.config
        inputs = dict(teacher.inputs)
        inputs["student"] = content_identity(config.student, load_config(config.student))
        if config.eval_data:
            inputs["eval_data"] = PreparedData(config.eval_data).fingerprint
        if config.eval_cache:
            inputs["eval_cache"] = self.eval_cache_identity().hash
        return inputs

    def take_directory(self, inputs: dict) -> None:
        """Rank 0: hold the run directory's lock (if `open_directory` did not), refuse to resume against other
        inputs than the run's, record the settings and inputs and take the run back to its checkpoint."""
        if self.lock is None:  # no run was there when it opened: one may have started since
            self.output.mkdir(parents=True, exist_ok=True)
            self.hold_lock()
            if inspect_output(self.output, self.identity, self.config.overwrite, self.warn) != self.latest:
                raise MoekdError(f"{self.output} changed while this run was starting; re-run the command")
        if self.latest is not None:
            recorded = read_json(self.output / RUN_FILE, "run settings").get("inputs")
            changed = differences(recorded if isinstance(recorded, dict) else {}, inputs, "the run")
            if changed:
                raise MoekdError(f"{self.output} holds a run of other inputs than these: {'; '.join(changed)}. "
                                 "A run never resumes against another teacher, student or data: restore them, "
                                 "or choose another output")
        start_output(self.output, self.identity | {"inputs": inputs, "world_size": self.processes.world_size},
                     self.latest, self.warn, self.also_clear)

    def resume(self, **parts) -> None:
        """Load the newest checkpoint's states into the trainer and `parts` (or seed a new run), then say
        what the run will do."""
        self.parts = {"trainer": self.trainer, **parts}
        self.position, self.tokens = resume(self.latest, self.processes, self.config.seed, self.parts)
        if self.position[2] and self.config.max_steps is None:
            raise MoekdError(f"{self.latest} was saved by {self.position[2][-1][0]} ranks, and this run has "
                             f"{self.processes.world_size}: a run of `epochs` resumes on the same number of ranks "
                             "only (its length in steps depends on it); set max_steps to resume on others")
        c = self.config
        if self.processes.rank == 0:
            self.reporters = Reporters(c.report_to, output=self.output, steps_done=self.trainer.steps_done,
                                       settings=self.identity["config"])
        self.processes.say(f"{self.name}: {self.about}; {self.total_steps} steps of "
                           f"{c.optim.grad_accum} x {c.batch_size} sequences x {self.processes.world_size} ranks"
                           + (f"; resuming after step {self.trainer.steps_done}" if self.latest else ""))

    def batch(self, batch: Batch) -> Batch:
        """A batch as read, on this process's device, with what the teacher says at its targets."""
        return self.teacher.teach(batch.to(self.processes.device))

    def steps(self, step: Callable[[list[Batch]], dict], show: tuple[str, ...]) -> dict:
        """Take the remaining steps with `step(micro-batches as read) -> metrics`; the last step's record."""
        walk = step_batches(self.reader, self.steps_in, self.config.optim.grad_accum, self.trainer.steps_done,
                            self.total_steps, self.position)
        return run_steps(walk, step, self.after_step, self.trainer, self.tokens, self.processes, self.name, show)

    def after_step(self, record: dict, position: Position) -> None:
        """Evaluate, log and checkpoint as due; `position` is the reader's next."""
        step, config, rank0 = record["step"], self.config, self.processes.rank == 0
        evaluating = (self.eval_data or config.eval_cache) and self.due(config.eval_every, step)
        if evaluating and (rank0 or self.trainer.sharded):  # a sharded student evaluates on every rank
            metrics = self.trainer.with_whole_student(self.evaluate)
            if rank0:
                record |= metrics
        if rank0:
            self.log.append(record)
            self.reporters.log(record)
        if self.due(config.save_every, step):  # every rank: the RNG states are gathered
            save_run_checkpoint(self.output / CHECKPOINTS, self.processes, self.student, self.tokenizer,
                                config.keep_checkpoints, self.parts, position, record["tokens"])

    def due(self, every: int, step: int) -> bool:
        return step == self.total_steps or bool(every and step % every == 0)

    def evaluate(self) -> dict:
        """Held-out eval_loss / eval_ppl (eval_data) and eval_kl (eval_cache) of the student."""
        model, config, metrics = self.student, self.config, {}
        model.eval()
        try:
            with self.autocast():
                if self.eval_data is not None:
                    result = response_loss(model, self.eval_data, config.batch_size, config.eval_max_examples,
                                           self.pad_id, "eval")
                    metrics |= {"eval_loss": result["loss"], "eval_ppl": result["ppl"]}
                if config.eval_cache:
                    result = cache_kl(model, config.eval_cache, config.eval_max_examples, config.batch_size,
                                      self.pad_id, "eval kl")
                    metrics["eval_kl"] = result["kl"]
        finally:
            model.train()
        return metrics

    def finish(self, save_more: Callable[[], str] | None = None) -> None:
        """Rank 0: write `save_more()`'s outputs, then final/ (the student and its tokenizer)."""
        weights = self.trainer.student_weights()  # every rank: a sharded student is gathered
        if self.processes.rank == 0:
            more = save_more() if save_more else ""
            save_model(self.output / FINAL, self.student, self.tokenizer, state_dict=weights)
            if not self.config.keep_checkpoints_at_end:  # a finished run is never resumed: they are dead weight
                shutil.rmtree(self.output / CHECKPOINTS, ignore_errors=True)
            print(f"{self.name}: {self.trainer.steps_done} steps done; the student is in {self.output / FINAL}{more}")

