"""Distil with the teacher in the loop while adapting its routers to the student (Student-Aware Router).

Every optimizer step runs, on the same batch (METHOD, section SAR; the pieces
are in pipeline/sar.py):

1. router step: the teacher, frozen except its routers, runs with gradients
   under `routing` (every expert by default); the routers take an AdamW step
   (`router.optim`) on D_r(p, q.detach()) + router.balance · L_balance, with q
   the student's distribution at the batch's targets;
2. student step: the teacher runs again without gradients, with the updated
   routers, and the student takes the train stage's step (`training.Trainer`)
   on (1 − α)·CE + α·D(p ‖ q) (`loss`, `optim`) against the teacher's
   full-vocabulary distribution.

Sequences: `data` trains on the prepared responses; `student` (on-policy, as
the authors ran SAR) replaces each response by one the student samples from
the prompt (`sample_temperature`, `sample_top_p`, `max_new_tokens`, seeded by
(seed, step, seq_id)); both steps then train on those generated tokens. The
teacher and the student must share the tokenizer the data was prepared with.

Writes to `output`: run.json (the settings), metrics.jsonl (per step: the
student's loss, ce, kd, lr, grad_norm; the routers' router_loss,
router_divergence, balance, router_lr, router_grad_norm; kl, the forward
KL(teacher ‖ student) before the router step; per MoE layer, over the batch's
real tokens: router_entropy, topk_load (share of tokens whose router's own
top-k holds each expert: in `all` mode every expert is used, so this is the
router's choice, not the routed set) and router_prob (mean softmax router
probability per expert); tokens, tokens_per_s), checkpoints/step-NNNNNNNN/
(the student, and in trainer.pt both optimizers, the router parameters, the
reader position and RNG states), routers.safetensors (the adapted routers and
the teacher's identity: `pipeline.sar.apply_routers` loads them into the
original teacher, and `moekd cache routers=...` caches that adapted teacher)
and final/, the student for AutoModelForCausalLM.
Re-running the same command resumes from the newest checkpoint and gives the
losses of an uninterrupted run; once final/ exists it does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from pipeline.data import PreparedData
from pipeline.errors import MoekdError
from pipeline.evaluation import stop_token_ids
from pipeline.losses import LossConfig
from pipeline.models import (
    load_model, load_tokenizer, model_identity, pad_token_id, resolve_dtype, save_model, tokenizer_fingerprint,
)
from pipeline.reader import Batch, PreparedShards, Reader, collate_examples
from pipeline.routing import RoutingHooks
from pipeline.sar import (
    RouterConfig, RouterTrainer, SarRoutingConfig, checkpoint_teacher_layers, on_policy_examples, save_routers,
    target_logprobs, train_routers_only,
)
from pipeline.training import (
    CHECKPOINTS, FINAL, FINISHED, METRICS_FILE, Distributed, MetricsLog, OptimConfig, Trainer, autocast_dtype,
    open_run, resume, run_steps, save_run_checkpoint, start_output, step_batches, step_plan,
)

ROUTERS_FILE = "routers.safetensors"
# Settings that change neither the losses nor the weights: a run may resume with other values.
RESUMABLE_WITH_CHANGES = ("overwrite", "save_every", "keep_checkpoints", "prefetch")


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    output: str  # the run directory
    teacher: str  # local Hugging Face directory of the MoE teacher
    student: str  # local Hugging Face directory of the dense student (model and tokenizer)
    data: str  # a `moekd prepare` directory, made with the teacher's tokenizer
    routing: SarRoutingConfig = field(default_factory=SarRoutingConfig)  # the teacher's routing in both steps
    router: RouterConfig = field(default_factory=RouterConfig)  # the router step: D_r, balance, its optimiser
    loss: LossConfig = field(default_factory=LossConfig)  # the student step, as in `moekd train`
    optim: OptimConfig = field(default_factory=OptimConfig)  # the student's optimiser
    sequences: Literal["data", "student"] = "data"  # student: on-policy, responses sampled by the student
    max_new_tokens: int = 256  # student sequences: longest sampled response
    sample_temperature: float = 1.0  # student sequences
    sample_top_p: float = 1.0  # student sequences: nucleus mass kept
    batch_size: int = 8  # sequences per micro-batch, per rank
    max_steps: int | None = None  # optimizer steps (epochs repeat as needed); null: `epochs` passes
    epochs: int = 1
    shuffle_shards: int = 4  # pseudo-shards per shuffle window
    shard_size: int = 256  # rows per pseudo-shard of the prepared data
    prefetch: int = 8  # batches the reader thread prepares ahead
    seed: int = 0  # data order, KA draws and on-policy samples
    save_every: int = 500  # steps between checkpoints; 0: at the end only
    keep_checkpoints: int = 2
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False  # the student: recompute activations in backward
    teacher_gradient_checkpointing: bool = False  # the teacher in the router step, likewise
    device: str = "auto"
    overwrite: bool = False  # replace a run made with other settings

    def __post_init__(self):
        positive = ("max_new_tokens", "batch_size", "epochs", "shuffle_shards", "shard_size", "prefetch",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 or null, got {self.max_steps}")
        if self.save_every < 0:
            raise ValueError("save_every must be >= 0 (0: at the end only)")
        if not (self.sample_temperature > 0 and 0 < self.sample_top_p <= 1):
            raise ValueError(f"sampling needs sample_temperature > 0 and 0 < sample_top_p <= 1, got "
                             f"{self.sample_temperature} and {self.sample_top_p}")
        if self.routing.samples != 1:
            raise ValueError(f"routing.samples={self.routing.samples}: SAR runs one teacher sample per step")


def run(config: Config) -> dict:
    """Run (or resume, or find finished) the SAR run in `config.output`; the last step's metrics."""
    with Distributed(config.device) as processes:
        return sar(config, processes)


def sar(config: Config, processes: Distributed) -> dict:
    """Set the run up (models, checks, resume), take its steps, write the routers and the student."""
    output, device = Path(config.output), processes.device
    identity, latest = open_run(config, processes, RESUMABLE_WITH_CHANGES)
    if latest == FINISHED:
        processes.say(f"sar: {output / FINAL} exists, the run is finished; nothing to do")
        return {}
    data = PreparedData(config.data)
    tokenizer = load_tokenizer(config.student)
    check_tokenizers(config, data, tokenizer)
    autocast = autocast_dtype(config.dtype, device)
    teacher = load_model(config.teacher, dtype=resolve_dtype(config.dtype, device), device=device)
    teacher_identity = model_identity(config.teacher, teacher)
    with RoutingHooks(teacher, config.routing) as routing:  # refuses a dense teacher
        routers = train_routers_only(teacher, routing.routers)
        student = load_model(latest or config.student, dtype="float32", device=device).train()
        check_vocabularies(config, teacher, student)
        processes.on_rank0(lambda: start_output(output, identity, latest, also_clear=(ROUTERS_FILE,)))
        if config.gradient_checkpointing:
            student.activation_checkpointing_enable({"use_reentrant": False})
        if config.teacher_gradient_checkpointing:
            checkpoint_teacher_layers(teacher)
        reader = Reader(PreparedShards(data, config.shard_size), batch_size=config.batch_size,
                        shuffle_shards=config.shuffle_shards, seed=config.seed,
                        collate=functools.partial(collate_examples, pad_id=pad_token_id(tokenizer)),
                        rank=processes.rank, world_size=processes.world_size, prefetch=config.prefetch)
        steps_in, total_steps = step_plan(reader, config.optim.grad_accum, config.max_steps, config.epochs)
        trainer = Trainer(student, config.optim, config.loss, total_steps, processes, autocast)
        router_trainer = RouterTrainer(teacher, routing, routers, config.router, total_steps, processes, autocast)
        position, tokens = resume(latest, processes, config.seed, {"trainer": trainer, "router": router_trainer})
        processes.say(f"sar: {len(routing.routers)} routers of {config.teacher} ({teacher.config.model_type}, "
                      f"routing={config.routing.mode}) adapted while distilling into {config.student}; "
                      f"{config.sequences} sequences; {total_steps} steps of {config.optim.grad_accum} x "
                      f"{config.batch_size} sequences x {processes.world_size} ranks"
                      + (f"; resuming after step {trainer.steps_done}" if latest else ""))
        last = Loop(config, processes, reader, trainer, router_trainer, tokenizer, steps_in).run(position, tokens)
    if processes.rank == 0:
        save_routers(output / ROUTERS_FILE, routers, teacher_identity)
        save_model(output / FINAL, student, tokenizer)
        print(f"sar: {trainer.steps_done} steps done; the student is in {output / FINAL}, "
              f"the adapted routers in {output / ROUTERS_FILE}")
    return last


# ---------------------------------------------------------------- checks

def check_tokenizers(config: Config, data: PreparedData, student_tokenizer) -> None:
    """Refuse a teacher or student whose tokenizer is not the one the data was prepared with."""
    for role, path, tokenizer in (("teacher", config.teacher, load_tokenizer(config.teacher)),
                                  ("student", config.student, student_tokenizer)):
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != data.tokenizer_fingerprint:
            raise MoekdError(
                f"the {role}'s tokenizer ({path}, fingerprint {fingerprint[:12]}) is not the one {config.data} was "
                f"prepared with ({data.tokenizer_fingerprint[:12]}): teacher and student must share it"
            )


def check_vocabularies(config: Config, teacher, student) -> None:
    sizes = [model.get_output_embeddings().weight.shape[0] for model in (teacher, student)]
    if sizes[0] != sizes[1]:
        raise MoekdError(f"the teacher ({config.teacher}) has a vocabulary of {sizes[0]} but the student "
                         f"({config.student}) has {sizes[1]}; they must match")


# ---------------------------------------------------------------- the loop

class Loop:
    """The SAR steps of a set-up run (router step, then student step), with metrics and checkpoints."""

    def __init__(self, config: Config, processes: Distributed, reader: Reader, trainer: Trainer,
                 router_trainer: RouterTrainer, tokenizer, steps_in):
        self.config, self.processes, self.reader, self.steps_in = config, processes, reader, steps_in
        self.trainer, self.router_trainer, self.tokenizer = trainer, router_trainer, tokenizer
        self.student, self.teacher, self.routing = trainer.model, router_trainer.teacher, router_trainer.routing
        self.stop_ids = stop_token_ids(tokenizer, self.student)
        self.log = MetricsLog(Path(config.output) / METRICS_FILE)

    def run(self, position: tuple[int, int], tokens: int) -> dict:
        """Steps from `position` (epoch, next batch) to the last step; the last step's record."""
        walk = step_batches(self.reader, self.steps_in, self.config.optim.grad_accum, self.trainer.steps_done,
                            self.trainer.total_steps, position)
        return run_steps(walk, self.step, self.after_step, self.trainer, tokens, self.processes, "sar",
                         show=("loss", "kl"))

    def after_step(self, record: dict, position: tuple[int, int]) -> None:
        """Log the step; checkpoint it when due (every rank: the RNG states are gathered)."""
        if self.processes.rank == 0:
            self.log.append(record)
        step, every = record["step"], self.config.save_every
        if step == self.trainer.total_steps or (every and step % every == 0):
            save_run_checkpoint(Path(self.config.output) / CHECKPOINTS, self.processes, self.student,
                                self.tokenizer, self.config.keep_checkpoints,
                                {"trainer": self.trainer, "router": self.router_trainer}, position, record["tokens"])

    def step(self, batches: list[Batch]) -> dict:
        """The router step, then the student step, on one step's micro-batches; both steps' metrics."""
        batches = [self.sequences(batch).to(self.processes.device) for batch in batches]
        with self.evaluating(self.student):
            student_logprobs = [target_logprobs(self.student, batch) for batch in batches]
        routers = self.router_trainer.step(batches, student_logprobs)
        return self.trainer.step([self.with_teacher(batch) for batch in batches]) | routers

    @contextlib.contextmanager
    def evaluating(self, model):
        """`model` in eval mode (no dropout), without gradients, under the run's autocast."""
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                yield
        finally:
            model.train()

    def autocast(self):
        dtype = self.trainer.autocast
        return torch.autocast(self.processes.device.type, dtype, enabled=dtype is not None)

    def sequences(self, batch: Batch) -> Batch:
        """The batch as read (data sequences), or its prompts with responses the student samples now."""
        if self.config.sequences == "data":
            return batch
        with self.evaluating(self.student):
            examples = on_policy_examples(
                self.student, batch.examples, stop_ids=self.stop_ids, pad_id=pad_token_id(self.tokenizer),
                max_new_tokens=self.config.max_new_tokens, temperature=self.config.sample_temperature,
                top_p=self.config.sample_top_p, seed=self.config.seed, step=self.trainer.steps_done,
            )
        return collate_examples(examples, pad_token_id(self.tokenizer))

    def with_teacher(self, batch: Batch) -> Batch:
        """The batch with the adapted teacher's log-probs (1, N, V) at its targets."""
        with torch.no_grad(), self.autocast(), self.routing.sequences(batch.seq_ids, 0, batch.attention_mask):
            return dataclasses.replace(batch, teacher_logprobs=target_logprobs(self.teacher, batch)[None])
