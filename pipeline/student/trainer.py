"""The optimizer step: the student's loss as one module, AdamW and its schedule, DDP or FSDP, finite checks.

- One optimizer step takes this rank's micro-batches (gradient accumulation)
  and divides the summed loss by the number of target tokens in the whole
  step: every micro-batch of every rank (an all-reduce). Together with DDP's
  or FSDP's gradient averaging (undone by a factor world_size), the gradient
  is exactly that of one batch holding all of them, however they are split.
- Mixed precision is bfloat16 autocast over float32 weights and AdamW state
  (and, under FSDP, parameters gathered in bfloat16).

SAR's router step (`pipeline.student.sar`) shares the schedule, the optimizer
and the finite check.
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.errors import MoekdError
from pipeline.core.processes import Distributed
from pipeline.data.batch import Batch, make_batch, pack
from pipeline.data.signals import NoTeacher, Signal
from pipeline.models.logprobs import target_hidden, vocab_logprobs, vocab_size
from pipeline.student.losses import LossConfig, distillation_loss

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # a sharded state gathered whole, rank 0


@dataclass
class OptimConfig:
    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 0.01  # AdamW decay of weight matrices (not norms, biases or 1-d parameters)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup
    min_lr_ratio: float = 0.1  # cosine: the learning rate at the last step, relative to lr
    grad_clip: float = 1.0  # largest global gradient norm; 0 = no clipping
    grad_accum: int = 1  # micro-batches per optimizer step, per rank

    def __post_init__(self):
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be positive; optim.weight_decay and optim.grad_clip non-negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_accum < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.grad_accum >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def learning_rate(step: int, config: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(total_steps - 1 - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop: on 2 CPU cores it
    # took an 81M student's optimizer step from 0.5 s to 0.06 s (a sixth of the whole step).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=fused or None)


def begin_step(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_done: int, total_steps: int,
               batches: list[Batch], processes: Distributed) -> tuple[float, int]:
    """Set the learning rate of step `steps_done`; (that rate, target tokens of the whole step on all ranks)."""
    lr = learning_rate(steps_done, config, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    local = torch.tensor(sum(b.tokens for b in batches), device=batches[0].input_ids.device)
    return lr, int(processes.sum(local).item())


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `dtype` = auto (bfloat16 on CUDA, none elsewhere), bfloat16 or float32 (none)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if dtype == "bfloat16" else None


class StudentLoss(nn.Module):
    """The student's loss as one module, so DDP sees the whole forward.

    The student's final hidden states are taken at the target positions only
    (`logprobs.target_hidden`); `distillation_loss` projects them to the
    vocabulary chunk by chunk with the student's own head
    (`logprobs.vocab_logprobs`, soft-capping included), so neither a
    (B, L, V) logit tensor nor a dense teacher exists.
    """

    def __init__(self, model: nn.Module, loss: LossConfig):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, rows=None, cols=None, targets=None,
                teacher: Signal | None = None, normalizer: float = 1.0, call=None):
        """(loss sum / normalizer, detached (ce sum, kd sum)); packed rows come with `position_ids` and no
        `attention_mask`; `teacher` is the teacher's signal at the targets. With `call`, call() instead
        (`Trainer.with_whole_student`)."""
        if call is not None:
            return call()
        hidden = target_hidden(self.model, input_ids, attention_mask, rows, cols, position_ids)
        sums = distillation_loss(hidden, functools.partial(vocab_logprobs, self.model), targets,
                                 teacher or NoTeacher(), self.loss)
        return sums.total(self.loss.alpha, normalizer), torch.stack([sums.ce, sums.kd]).detach()


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far, MiB: the most CUDA memory its tensors held on a GPU, its peak
    resident set on a CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def check_packing(model: nn.Module) -> None:
    """Refuse packing for a student whose forward does not confine attention to each packed row (it must
    give a packed row the hidden states it has alone); checked on three short rows of random tokens."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(vocab_size(model), (n,), generator=generator).numpy() for n in (5, 3, 4)]
    batch = make_batch(list(range(len(rows))), rows, [np.arange(len(row) - 1) for row in rows], pad_id=0)
    packed = pack(batch.to(device), pack_length=sum(map(len, rows)))
    kind, training = model.config.model_type, model.training
    model.eval()  # no dropout
    with torch.no_grad():
        alone = target_hidden(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                              batch.rows.to(device), batch.cols.to(device))
        try:
            together = target_hidden(model, packed.input_ids, None, packed.rows, packed.cols, packed.position_ids)
        except Exception as e:  # noqa: BLE001 - any refusal of the packed inputs is this error
            raise MoekdError(f"the student ({kind}) does not take packed rows ({type(e).__name__}: {e}); "
                             "set pack_length=null") from e
        finally:
            model.train(training)
    if not torch.allclose(alone.float(), together.float(), rtol=1e-3, atol=1e-3):
        raise MoekdError(f"the student ({kind}) does not keep packed rows apart (e.g. attention or state that "
                         f"crosses rows): a packed row's hidden states differ from its own by up to "
                         f"{(alone.float() - together.float()).abs().max().item():.3g}; set pack_length=null")


def require_finite(step: int, **values: float) -> None:
    """Stop the run before optimizer step `step` is taken if a loss or gradient is not finite (every rank
    sees the same all-reduced values): the weights are never updated, saved or logged as NaN."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        shown = ", ".join(f"{name} {value}" for name, value in bad.items())
        raise MoekdError(f"step {step}: {shown}; the step was not taken and nothing of it was saved. Lower the "
                         "learning rate or the temperature, check the teacher cache (`moekd verify`), or resume "
                         "from the last checkpoint with other settings (overwrite=true)")


def shard(module: nn.Module, model: nn.Module, autocast: torch.dtype | None) -> None:
    """FSDP2 in place: each of `model`'s decoder layers (its `_no_split_modules` classes) a unit, `module`
    (holding `model`) the root unit with the rest (embeddings, final norm, head); parameters gathered in the
    autocast dtype where there is one, gradients reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32) if autocast else None
    options = {"mp_policy": policy} if policy else {}
    layers = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in layers]
    if not units:
        raise MoekdError(f"parallel=fsdp shards a student by its decoder layers, and {type(model).__name__} names "
                         "none (_no_split_modules); use parallel=ddp")
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(module, **options)


class Trainer:
    """The student, its AdamW and schedule, and `step`: one optimizer step over micro-batches.

    Under torchrun the student is replicated (`parallel="ddp"`) or sharded
    (`"fsdp"`, `shard`); its state (`student_weights`, `state_dict`) is the
    full one either way, so a checkpoint resumes with any number of ranks and
    either kind.
    """

    def __init__(self, model: nn.Module, *, optim: OptimConfig, loss: LossConfig, total_steps: int,
                 processes: Distributed, autocast: torch.dtype | None = None, pack_length: int | None = None,
                 parallel: Literal["ddp", "fsdp"] = "ddp"):
        self.model, self.optim, self.loss, self.total_steps = model, optim, loss, total_steps
        self.processes, self.autocast, self.pack_length = processes, autocast, pack_length
        self.module = StudentLoss(model, loss)
        self.sharded = processes.world_size > 1 and parallel == "fsdp"
        self.parallel = None
        if self.sharded:
            shard(self.module, model, autocast)
        elif processes.world_size > 1:
            self.parallel = DistributedDataParallel(self.module)
        self.optimizer = make_optimizer(model, optim)  # after sharding: FSDP replaces the parameters
        self.steps_done = 0

    def step(self, batches: list[Batch]) -> dict:
        """Accumulate the micro-batches' gradients, clip, update; the step's metrics (all ranks)."""
        lr, tokens = begin_step(self.optimizer, self.optim, self.steps_done, self.total_steps, batches, self.processes)
        device = batches[0].input_ids.device
        # DDP averages gradients over ranks; the loss is a sum over all ranks' tokens.
        normalizer = max(tokens, 1) / self.processes.world_size
        sums = torch.zeros(2, device=device)
        for i, batch in enumerate(batches):
            with self.no_sync(last=i == len(batches) - 1):
                if self.pack_length:
                    packed = pack(batch, self.pack_length)
                    inputs = (packed.input_ids, None, packed.position_ids, packed.rows, packed.cols)
                else:
                    inputs = (batch.input_ids, batch.attention_mask, None, batch.rows, batch.cols)
                with torch.autocast(device.type, self.autocast, enabled=self.autocast is not None):
                    loss, batch_sums = (self.parallel or self.module)(*inputs, batch.targets, batch.teacher, normalizer)
                loss.backward()
            sums += batch_sums.float()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        ce, kd = (self.processes.sum(sums) / max(tokens, 1)).tolist()
        require_finite(self.steps_done + 1, ce=ce, kd=kd, grad_norm=grad_norm.item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        alpha = self.loss.alpha
        return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd, "lr": lr,
                "grad_norm": grad_norm.item(), "tokens": tokens,
                "peak_memory_mib": self.processes.gather(peak_memory_mib(device))}

    def close(self) -> None:
        """Drop the DDP wrapper, before the process group goes (`Distributed.stop`)."""
        self.parallel = None

    def no_sync(self, last: bool):
        """DDP and FSDP exchange gradients only on the step's last micro-batch."""
        if self.sharded:
            self.module.set_requires_gradient_sync(last)
        return self.parallel.no_sync() if self.parallel is not None and not last else contextlib.nullcontext()

    def with_whole_student(self, fn: Callable[[], object]):
        """fn(), which uses the student outside the training step (evaluation, SAR's targets): a sharded
        student runs it inside its root unit's forward, which gathers the root's parameters (embeddings,
        head) on every rank; all ranks must call it and run the same forwards."""
        if not self.sharded:
            return fn()
        try:
            return self.module(call=fn)
        finally:
            self.module.reshard()  # no backward follows to reshard the root: its sharded parameters come back

    def student_weights(self) -> dict | None:
        """The student's full weights, on rank 0, where they are sharded (every rank calls this); None where
        the student holds them whole."""
        return get_model_state_dict(self.model, options=FULL_ON_CPU) if self.sharded else None

    def state_dict(self) -> dict:
        """The optimizer's full state, by parameter name (every rank calls this: under FSDP it is gathered)."""
        return {"optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=FULL_ON_CPU),
                "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        """Load a full optimizer state, shared out to this rank's shards where the student is sharded."""
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.steps_done = state["steps_done"]

