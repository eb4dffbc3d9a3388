"""Distil with the teacher in the loop while adapting its routers to the student (Student-Aware Router).

Every optimizer step runs, on the same batch (METHOD, section SAR; the pieces
are in pipeline/student/sar.py):

1. router step: the teacher, frozen except its routers, runs with gradients
   under `routing` (every expert by default); the routers take an AdamW step
   (`router.optim`) on D_r(p, q.detach()) + router.balance · L_balance, with q
   the student's distribution at the batch's targets;
2. student step: the teacher runs again without gradients, with the updated
   routers, and the student takes the train stage's step (`pipeline.student.trainer.Trainer`)
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
probability per expert); tokens, tokens_per_s, peak_memory_mib), checkpoints/step-NNNNNNNN/
(the student, and in trainer.pt both optimizers, the router parameters, the
reader position and RNG states), routers.safetensors (the adapted routers and
the teacher's identity: `pipeline.teacher.routers.apply_routers` loads them into the
original teacher, and `moekd cache routers=...` caches that adapted teacher)
and final/, the student for AutoModelForCausalLM. The run around the steps
(reading, held-out evaluation with `eval_data` / `eval_cache`, checkpoints,
resume) is `pipeline.student.run.Run`, shared with `moekd train`; the step is
`Step`, built from the run's parts and the teacher side `adapt` wires.
Re-running the same command resumes from the newest checkpoint and gives the
losses of an uninterrupted run; once final/ exists it does nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch

from pipeline.data.batch import Batch, collate_examples
from pipeline.models.identity import model_identity
from pipeline.models.loading import honours_remote_code, load_model, resolve_dtype
from pipeline.models.logprobs import target_logprobs
from pipeline.student.generation import stop_token_ids
from pipeline.student.run import Run, RunConfig
from pipeline.student.sar import (
    RouterConfig, RouterTrainer, SarRoutingConfig, checkpoint_teacher_layers, on_policy_examples, train_routers_only,
)
from pipeline.student.trainer import Trainer
from pipeline.teacher.routers import save_routers
from pipeline.teacher.routing import RoutingHooks
from pipeline.teacher.sources import AdaptedTeacher

ROUTERS_FILE = "routers.safetensors"


@dataclass(kw_only=True)
class Config(RunConfig):
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    teacher: str  # local Hugging Face directory of the MoE teacher
    data: str  # a `moekd prepare` directory, made with the teacher's tokenizer
    routing: SarRoutingConfig = field(default_factory=SarRoutingConfig)  # the teacher's routing in both steps
    router: RouterConfig = field(default_factory=RouterConfig)  # the router step: D_r, balance, its optimiser
    sequences: Literal["data", "student"] = "data"  # student: on-policy, responses sampled by the student
    max_new_tokens: int = 256  # student sequences: longest sampled response
    sample_temperature: float = 1.0  # student sequences
    sample_top_p: float = 1.0  # student sequences: nucleus mass kept
    teacher_gradient_checkpointing: bool = False  # the teacher in the router step: recompute in backward

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.sample_temperature > 0 and 0 < self.sample_top_p <= 1):
            raise ValueError(f"sampling needs sample_temperature > 0 and 0 < sample_top_p <= 1, got "
                             f"{self.sample_temperature} and {self.sample_top_p}")
        if self.routing.samples != 1:
            raise ValueError(f"routing.samples={self.routing.samples}: SAR runs one teacher sample per step")
        if self.sequences == "student" and self.parallel == "fsdp":
            raise ValueError("sequences=student samples each rank's responses apart, which a sharded student "
                             "cannot (every rank must run the same forwards): use parallel=ddp")


@honours_remote_code
def run(config: Config) -> dict:
    """Run (or resume, or find finished) the SAR run in `config.output`; the last step's metrics."""
    with Run(config, "sar", also_clear=(ROUTERS_FILE,)) as run:
        if run.finished:
            return {}
        device = run.processes.device
        model = load_model(config.teacher, dtype=resolve_dtype(config.dtype, device), device=device)
        teacher_identity = model_identity(config.teacher, model)
        with RoutingHooks(model, config.routing) as routing:  # refuses a dense teacher
            student, tokenizer = run.load_student()
            routers, teacher = adapt(config, model, routing, run.autocast)
            run.begin(teacher, about=f"{len(routing.routers)} routers of {config.teacher} ({model.config.model_type}, "
                                     f"routing={config.routing.mode}) adapted while distilling into {config.student}; "
                                     f"{config.sequences} sequences")
            router_trainer = RouterTrainer(model, routing, routers, config=config.router, total_steps=run.total_steps,
                                           processes=run.processes, autocast=run.autocast_dtype)
            run.resume(router=router_trainer)
            step = Step(config=config, student=student, trainer=run.trainer, teacher=teacher,
                        router_trainer=router_trainer, pad_id=run.pad_id, autocast=run.autocast,
                        stop_ids=stop_token_ids(tokenizer, student))
            last = run.steps(step, show=("loss", "kl"))

        def save_routers_file() -> str:
            save_routers(run.output / ROUTERS_FILE, routers, teacher_identity)
            return f", the adapted routers in {run.output / ROUTERS_FILE}"

        run.finish(save_routers_file)
    return last


def adapt(config: Config, model, routing: RoutingHooks,
          autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[dict[str, torch.nn.Parameter],
                                                                            AdaptedTeacher]:
    """SAR's teacher side: its routers made trainable (every other parameter frozen; `train_routers_only`)
    and the teacher the student learns from, `model` under `routing`; with `teacher_gradient_checkpointing`
    its layers recompute activations in the router step's backward."""
    routers = train_routers_only(model, routing.routers)
    teacher = AdaptedTeacher(data=config.data, shard_size=config.shard_size, teacher=config.teacher, model=model,
                             routing=routing, autocast=autocast)
    if config.teacher_gradient_checkpointing:
        checkpoint_teacher_layers(model)
    return routers, teacher


@dataclass(kw_only=True)
class Step:
    """One SAR step on a step's micro-batches: the router step, then the student step (both steps' metrics).

    Its parts are the run's (`run`): the `student` and its `trainer` (whose processes give the device), the
    `teacher` (`adapt`) and its `router_trainer`, the padding id, the stop tokens of sampled responses and the
    run's mixed precision (`autocast`)."""

    config: Config
    student: torch.nn.Module
    trainer: Trainer
    teacher: AdaptedTeacher
    router_trainer: RouterTrainer
    pad_id: int
    stop_ids: set[int]
    autocast: Callable[[], contextlib.AbstractContextManager]

    def __call__(self, batches: list[Batch]) -> dict:
        device = self.trainer.processes.device
        batches = [self.sequences(batch).to(device) for batch in batches]
        with self.evaluating():
            student_logprobs = self.trainer.with_whole_student(
                lambda: [target_logprobs(self.student, batch) for batch in batches])
        routers = self.router_trainer.step(batches, student_logprobs)
        return self.trainer.step([self.teacher.teach(batch) for batch in batches]) | routers

    @contextlib.contextmanager
    def evaluating(self):
        """The student in eval mode (no dropout), without gradients, under the run's autocast."""
        self.student.eval()
        try:
            with torch.no_grad(), self.autocast():
                yield
        finally:
            self.student.train()

    def sequences(self, batch: Batch) -> Batch:
        """The batch as read (data sequences), or its prompts with responses the student samples now."""
        config = self.config
        if config.sequences == "data":
            return batch
        with self.evaluating():
            examples = on_policy_examples(
                self.student, batch.examples, stop_ids=self.stop_ids, pad_id=self.pad_id,
                max_new_tokens=config.max_new_tokens, temperature=config.sample_temperature,
                top_p=config.sample_top_p, seed=config.seed, step=self.trainer.steps_done,
            )
        return collate_examples(examples, self.pad_id)
