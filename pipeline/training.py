"""Training a student: the run's settings and lifecycle, the optimizer step, DDP/FSDP, checkpoints, the step walk.

Shared by `moekd train` and `moekd sar`: each stage opens a `Run`, gives it
its teacher (`pipeline.teacher`) and its step, and the run does the rest.

- One optimizer step takes this rank's micro-batches (gradient accumulation)
  and divides the summed loss by the number of target tokens in the whole
  step: every micro-batch of every rank (an all-reduce). Together with DDP's
  or FSDP's gradient averaging (undone by a factor world_size), the gradient
  is exactly that of one batch holding all of them, however they are split.
- Mixed precision is bfloat16 autocast over float32 weights and AdamW state
  (and, under FSDP, parameters gathered in bfloat16).
- A checkpoint is a directory `step-NNNNNNNN/`: the student (save_pretrained,
  so `moekd eval` can load it), its tokenizer, `trainer.pt` (the whole
  optimizer state by parameter name, step, the reader's position, every
  rank's RNG states, ...), whatever the ranks and their kind, so it resumes
  on any number of ranks and with either kind, and, written last,
  `checkpoint.json`: its step and each of its files' size and sha256. Rank 0
  gathers and writes it all under a temporary name, fsynced and renamed.
- A checkpoint is trusted by what it holds, not by its name: rank 0, holding
  the run's lock, resumes from the newest one whose record checks out (its
  own step, exactly its files, their sizes and digests) and passes over
  newer ones that do not, with a warning; every rank then checks that the
  trainer state it loads is that step's. Entries named like checkpoints
  that are not directories are none, and whatever is named like a later
  checkpoint than the one resumed goes when the run goes on. A run none of
  whose checkpoints checks out (or whose checkpoints have no record: an
  older moekd's) is refused unless overwrite, which starts it afresh.
- A run directory holds run.json (the settings that decide the numbers, the
  ranks it last ran on, and the run's inputs by content), run.lock (held by
  the process running it), metrics.jsonl, checkpoints/ and final/. A re-run
  with the same settings resumes from the newest checkpoint (or finds the run
  finished), wherever the directory now lies and whichever `parallel`;
  other settings are refused unless overwrite, which starts afresh; other
  inputs (another cache, data, teacher or starting student) always.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import hashlib
import json
import math
import os
import pickle
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.config import to_dict
from pipeline.distributed import worker_slot
from pipeline.errors import MoekdError, first_line
from pipeline.batch import Batch, make_batch, pack
from pipeline.data import PreparedData
from pipeline.evaluation import cache_kl, response_loss
from pipeline.files import (
    FileLock, atomic_directory, atomic_write_bytes, atomic_write_json, disk_full, json_bytes, open_confined,
    parse_json, read_confined, read_json, remove_stale_directories, sha256_file,
)
from pipeline.logprobs import target_hidden, vocab_logprobs, vocab_size
from pipeline.losses import LossConfig, distillation_loss
from pipeline.models import (
    content_identity, load_config, load_model, load_tokenizer, pad_token_id, resolve_device, save_model,
)
from pipeline.reader import Reader
from pipeline.seeding import derive_seed, rng_state, seed_everything, set_rng_state
from pipeline.teacher import MadeWith, cache_inputs, cache_made_with, check_tokenizer

TRAINER_STATE = "trainer.pt"
CHECKPOINT_RECORD = "checkpoint.json"  # a checkpoint's step and its files' sizes and sha256, written last
RECORD_LIMIT = 1 << 20  # bytes: a record lists a few files (a sharded student's thousands fit)
CHECKPOINT_NAME = re.compile(r"step-(\d{8})")
RUN_FILE = "run.json"
RUN_LOCK = "run.lock"  # held by the one process that runs in the directory
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
FINISHED = "finished"
# The reader's next (epoch, batch, the changes of world size in that epoch: (ranks before, batches each took))
Position = tuple[int, int, tuple[tuple[int, int], ...]]
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # a sharded state gathered whole, rank 0
# Settings that change neither the losses nor the weights: a run may resume with other values. `output` is
# where the run lies (a run directory moved or copied resumes; its inputs are compared by content), and
# `parallel` how its ranks hold the student (checkpoints hold the whole state either way; the number of
# ranks may change too).
RESUMABLE_WITH_CHANGES = ("output", "parallel", "overwrite", "save_every", "keep_checkpoints",
                          "keep_checkpoints_at_end", "prefetch", "trust_remote_code", "follow_timeout")


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
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
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


# ---------------------------------------------------------------- processes

class Distributed:
    """This process's place in a torchrun job (a lone process is rank 0 of 1), and the collectives used.

    Under torchrun (WORLD_SIZE > 1) it joins the process group: NCCL on GPUs,
    gloo on CPUs.
    """

    def __init__(self, device: str = "auto"):
        self.rank, self.world_size = worker_slot()
        self.device = resolve_device(device)
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def stop(self) -> None:
        """Leave the process group. Drop every DDP wrapper first (`Trainer.close`): a Reducer freed after
        this, with the GIL held, would hold the group's last reference and join gloo's worker threads,
        which may be waiting for the GIL to free a finished collective's tensors (a deadlock at exit)."""
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()  # DDP's hooks make reference cycles: its Reducer goes only with a collection
            dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def on_rank0(self, fn: Callable):
        """fn() run by rank 0 alone; every rank gets its result, or raises the MoekdError it raised."""
        result = error = None
        if self.rank == 0:
            try:
                result = fn()
            except MoekdError as e:
                error = str(e)
        if self.world_size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise MoekdError(error)
        return result

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.rank == 0:
            print(message)


# ---------------------------------------------------------------- the step

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
                teacher_ids=None, teacher_logprobs=None, teacher_weights=None, normalizer: float = 1.0, call=None):
        """(loss sum / normalizer, detached (ce sum, kd sum)); packed rows come with `position_ids` and no
        `attention_mask`. With `call`, call() instead (`Trainer.with_whole_student`)."""
        if call is not None:
            return call()
        hidden = target_hidden(self.model, input_ids, attention_mask, rows, cols, position_ids)
        sums = distillation_loss(hidden, functools.partial(vocab_logprobs, self.model), targets, teacher_ids,
                                 teacher_logprobs, self.loss, teacher_weights)
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

    def __init__(self, model: nn.Module, optim: OptimConfig, loss: LossConfig, total_steps: int,
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
                    loss, batch_sums = (self.parallel or self.module)(
                        *inputs, batch.targets, batch.teacher_ids, batch.teacher_logprobs, batch.teacher_weights,
                        normalizer,
                    )
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


# ---------------------------------------------------------------- checkpoints

def checkpoint_entries(directory: Path) -> list[Path]:
    """Every entry of `directory` named like a checkpoint (`step-NNNNNNNN`), whatever it is, oldest first."""
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if CHECKPOINT_NAME.fullmatch(p.name))


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's name says."""
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name)[1])


def remove_entry(path: Path) -> None:
    """Delete `path`: a directory with its contents; a link itself, never what it points to."""
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def save_checkpoint(directory: Path, step: int, model, tokenizer, state: dict, keep: int,
                    weights: dict | None = None) -> Path:
    """Write checkpoint `step` (the model, with `weights` where it does not hold them whole, its tokenizer,
    `state` and, last, its record), then drop all but the newest `keep`. A failed write leaves the earlier
    checkpoints as they were and is one line (a full disk: `files.disk_full`'s)."""
    path = Path(directory) / f"step-{step:08d}"
    try:
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            with open(tmp / TRAINER_STATE, "wb") as f:  # torch.save on a path loses a failed write's errno
                torch.save(state, f)
            # last, and plainly: the directory's rename commits it with the rest
            (tmp / CHECKPOINT_RECORD).write_bytes(json_bytes(checkpoint_record(tmp, step)))
    except (OSError, RuntimeError, SafetensorError) as e:  # each writer reports a failed write its own way
        if failed_errno(e) == errno.ENOSPC:
            raise disk_full(path) from None
        raise MoekdError(f"could not write checkpoint {path} ({type(e).__name__}: {first_line(e)}); the earlier "
                         "checkpoints are intact: re-run the same command to resume") from None
    for old in checkpoint_entries(directory)[:-keep]:
        remove_entry(old)
    return path


# Rust's io::Error, which safetensors reports as text only, ends its message with "(os error N)".
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def failed_errno(error: BaseException | None) -> int | None:
    """The errno behind a failed write: an OSError's own, one in the exceptions it came from (torch.save on a
    file object raises a RuntimeError from the file's OSError), or one a library gave as text (safetensors)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        if match := OS_ERROR_IN_TEXT.search(str(error)):
            return int(match[1])
        error = error.__cause__ or error.__context__
    return None


def checkpoint_record(directory: Path, step: int) -> dict:
    """What a checkpoint says of itself: its step and every file it holds (relative path: size, sha256)."""
    files, _ = directory_files(directory)
    return {"step": step, "files": {name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
                                    for name, path in files.items() if name != CHECKPOINT_RECORD}}


def directory_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """(every regular file below `directory` by its relative path, the relative paths of what is neither a
    regular file nor a directory there: links, pipes, ...); links are not followed."""
    files, others = {}, []
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            relative = path.relative_to(directory).as_posix()
            if path.is_symlink() or not path.is_file():
                others.append(relative)
            else:
                files[relative] = path
    return files, sorted(others)


def check_checkpoint(path: Path) -> None:
    """Refuse (a MoekdError saying why) a checkpoint directory that does not check out: its record (written
    last) must name its own step and exactly the files it holds, each of that size and sha256, among them
    the trainer state and the student's config and safetensors weights."""
    try:
        raw = read_confined(path, CHECKPOINT_RECORD, "checkpoint record", RECORD_LIMIT)
    except FileNotFoundError:
        raise MoekdError(f"it has no {CHECKPOINT_RECORD} (written by a moekd that did not record what its "
                         "checkpoints hold, or not by moekd)") from None
    record = parse_json(raw, f"its {CHECKPOINT_RECORD}")
    if not (isinstance(record, dict) and type(record.get("step")) is int and isinstance(record.get("files"), dict)
            and all(isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str)
                    for entry in record["files"].values())):
        raise MoekdError(f"its {CHECKPOINT_RECORD} is not a record of a step and of its files' sizes and sha256")
    if record["step"] != checkpoint_step(path):
        raise MoekdError(f"its {CHECKPOINT_RECORD} is that of step {record['step']}")
    listed, (files, others) = record["files"], directory_files(path)
    files.pop(CHECKPOINT_RECORD, None)
    unlisted, absent = sorted(set(files) - set(listed)), sorted(set(listed) - set(files))
    if others:
        raise MoekdError(f"{others[0]} is a link, or not a regular file")
    if unlisted:
        raise MoekdError(f"it holds {unlisted[0]}, which its {CHECKPOINT_RECORD} does not list")
    if absent:
        raise MoekdError(f"it lacks {absent[0]}")
    if TRAINER_STATE not in listed or "config.json" not in listed or not any(
            name.endswith(".safetensors") for name in listed):
        raise MoekdError(f"its {CHECKPOINT_RECORD} lacks the trainer state, the config or the weights")
    for name in sorted(listed):  # every size before any hash: a cut file is found at once
        if files[name].stat().st_size != listed[name]["size"]:
            raise MoekdError(f"{name} is {files[name].stat().st_size} bytes, and its record says "
                             f"{listed[name]['size']}")
    for name in sorted(listed):
        with os.fdopen(open_confined(path, name, "checkpoint file"), "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != listed[name]["sha256"]:
                raise MoekdError(f"{name} is not the file its record gives the sha256 of")


def newest_sound_checkpoint(directory: Path) -> tuple[str | None, list[str]]:
    """(the newest checkpoint in `directory` that checks out (`check_checkpoint`), or None; one line for
    each newer checkpoint directory that does not). Entries that are not directories (a stray file or link
    named like a checkpoint) are no checkpoints."""
    skipped = []
    for path in reversed(checkpoint_entries(directory)):
        if path.is_dir() and not path.is_symlink():
            try:
                check_checkpoint(path)
                return str(path), skipped
            except (MoekdError, OSError) as e:  # OSError: a file went or cannot be read while it is checked
                skipped.append(f"{path} does not check out: {first_line(e)}")
    return None, skipped


def load_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer.pt: tensors and plain data only (weights_only), so a checkpoint someone hands
    you cannot run code; anything else is refused in one line."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise MoekdError(f"{path} is not a moekd trainer state holding only tensors and plain data "
                         f"({type(e).__name__}: {first_line(e)}); moekd does not load it") from None


def save_run_checkpoint(directory: Path, processes: Distributed, model, tokenizer, keep: int, parts: dict,
                        position: Position, tokens: int) -> None:
    """Checkpoint the step just taken: `model`, and in trainer.pt each part's state_dict() by its name, the
    reader's next `position`, the `tokens` so far and every rank's RNG states (every rank calls this; rank 0
    gathers and writes it all, its record included)."""
    epoch, first, history = position
    state = {"position": [epoch, first, [list(change) for change in history]], "world_size": processes.world_size,
             "tokens": tokens, "rng": processes.gather(rng_state())}
    state |= {name: part.state_dict() for name, part in parts.items()}
    weights = parts["trainer"].student_weights()
    if processes.rank == 0:
        save_checkpoint(directory, parts["trainer"].steps_done, model, tokenizer, state, keep, weights)


def resume(latest: str | None, processes: Distributed, seed: int, parts: dict) -> tuple[Position, int]:
    """(position, tokens) of checkpoint `latest`, after loading its states into `parts` and this rank's RNGs;
    without one, ((0, 0, ()), 0) after seeding this rank's RNGs from `seed`.

    Rank 0 checked the checkpoint before choosing it (`newest_sound_checkpoint`); every rank checks that the
    trainer state it loads is that of the checkpoint's step. A checkpoint of another number of ranks resumes
    too: the rest of its epoch is shared out among these ranks (`Reader.work`), whose RNGs are seeded afresh
    from (seed, rank, step)."""
    if latest is None:
        seed_everything(derive_seed(seed, "rank", processes.rank))
        return (0, 0, ()), 0
    state = load_trainer_state(latest)
    missing = sorted({"position", "world_size", "tokens", "rng", *parts} - set(state))
    if missing:
        raise MoekdError(f"{Path(latest) / TRAINER_STATE} lacks {', '.join(missing)}: it is not this run's")
    steps_done = state["trainer"].get("steps_done") if isinstance(state["trainer"], dict) else None
    if steps_done != checkpoint_step(latest):
        raise MoekdError(f"{Path(latest) / TRAINER_STATE} is the state after step {steps_done}, not after step "
                         f"{checkpoint_step(latest)}: it is not this checkpoint's")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    epoch, first, history = state["position"]
    history = tuple(tuple(change) for change in history)
    if state["world_size"] == processes.world_size:
        set_rng_state(state["rng"][processes.rank])
        return (epoch, first, history), state["tokens"]
    seed_everything(derive_seed(seed, "rank", processes.rank, "resumed", parts["trainer"].steps_done))
    return (epoch, 0, (*history, (state["world_size"], first))), state["tokens"]


# ---------------------------------------------------------------- reading what others may have written

# ---------------------------------------------------------------- metrics

class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step ("step" = steps done).

    A log rather than a commit: lines are appended and flushed as steps end.
    A resumed run first cuts it back to its checkpoint (atomically), so no
    step is ever listed twice; a line that is not a JSON object with an
    integer step (not UTF-8, torn, ...) goes then: silently when it is the
    last line (what a kill mid-write leaves), with a warning naming it when
    it is another (the file was damaged), so that it never blocks a resume.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def keep_until(self, step: int, warn: Callable[[str], None]) -> None:
        """Keep the lines of steps 1 to `step` (none: a run starting afresh), dropping damaged ones."""
        kept = []
        lines = self.path.read_bytes().splitlines() if step and self.path.is_file() else []
        for number, line in enumerate(lines, 1):
            record = metrics_record(line)
            if record is None and number < len(lines):
                warn(f"{self.path} line {number} is not a JSON object with a step; it is dropped")
            if record is not None and record["step"] <= step:
                kept.append(line + b"\n")
        atomic_write_bytes(self.path, b"".join(kept))

    def append(self, record: dict) -> None:
        """Append one line of strict JSON (a non-finite number, e.g. an empty evaluation's, becomes null)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(finite(record), allow_nan=False) + "\n")


def metrics_record(line: bytes) -> dict | None:
    """A metrics.jsonl line as its record, or None if it is not a JSON object with an integer step."""
    try:
        record = parse_json(line, "a metrics line")
    except MoekdError:
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def finite(value):
    """`value` with every non-finite float replaced by None, through lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# ---------------------------------------------------------------- the run directory

def run_identity(config, resumable_with_changes: tuple[str, ...]) -> dict:
    """What a run resumes only with: the config, less the fields a run may resume with changed (the number
    of ranks may change too)."""
    settings = {key: value for key, value in to_dict(config).items() if key not in resumable_with_changes}
    return json.loads(json.dumps({"config": settings}))  # tuples as JSON reads them


def inspect_output(output: Path, identity: dict, overwrite: bool, warn: Callable[[str], None]) -> str | None:
    """Rank 0, read-only: FINISHED, the newest checkpoint to resume from, or None to start afresh.

    A run made with other settings is refused unless `overwrite`, which starts afresh. Newer checkpoints
    that do not check out are passed over, each named by `warn`; a run none of whose checkpoints checks
    out is refused unless `overwrite` (it is never restarted behind its owner's back).
    """
    run_file = Path(output) / RUN_FILE
    if run_file.is_file():
        recorded = read_json(run_file, "run settings")
        recorded = {key: recorded.get(key) for key in identity} if isinstance(recorded, dict) else {}
        if isinstance(recorded.get("config"), dict):  # recorded before some of its settings became resumable
            recorded["config"] = {key: value for key, value in recorded["config"].items()
                                  if key not in RESUMABLE_WITH_CHANGES}
        changed = changed_settings(recorded, identity)
        if changed and not overwrite:
            raise MoekdError(f"{output} holds a run with other settings: {'; '.join(changed)}. "
                             "Set overwrite=true to replace it, or choose another output directory.")
        if changed:
            return None
        if (Path(output) / FINAL).is_dir():
            return FINISHED
        latest, skipped = newest_sound_checkpoint(Path(output) / CHECKPOINTS)
        if latest is None and skipped and not overwrite:
            raise MoekdError(f"no checkpoint of {output} checks out ({len(skipped)} found; {skipped[0]}); put back "
                             "one that does, or set overwrite=true to start the run afresh")
        for line in skipped:
            warn(f"{line}; it is passed over")
        return latest
    if any((Path(output) / name).exists() for name in (CHECKPOINTS, FINAL, METRICS_FILE)) and not overwrite:
        raise MoekdError(f"{output} holds training outputs but no {RUN_FILE}; set overwrite=true to replace them")
    return None


def start_output(output: Path, identity: dict, latest: str | None, warn: Callable[[str], None],
                 also_clear: tuple[str, ...] = ()) -> None:
    """Rank 0: record the settings and take the run back to `latest`: the metrics after it, and whatever
    is named like a later checkpoint (passed over, or a stray entry), go.

    Without `latest` the old run's checkpoints, final/ and the files in `also_clear` go.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if latest is None:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(output / FINAL, ignore_errors=True)
        for name in also_clear:
            (output / name).unlink(missing_ok=True)
    remove_stale_directories(output)
    remove_stale_directories(output / CHECKPOINTS)
    step = checkpoint_step(latest) if latest else 0
    for entry in checkpoint_entries(output / CHECKPOINTS):
        if checkpoint_step(entry) > step:
            remove_entry(entry)
    atomic_write_json(output / RUN_FILE, identity)
    MetricsLog(output / METRICS_FILE).keep_until(step, warn)


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return flat


def changed_settings(old: dict, new: dict) -> list[str]:
    """One line per dotted key whose value differs."""
    old, new = flatten(old), flatten(new)
    return [f"{key} is {old.get(key, '<absent>')!r} in the run but {new.get(key, '<absent>')!r} now"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


# ---------------------------------------------------------------- the step walk

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


# ---------------------------------------------------------------- the run

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
        made_with = cache_made_with(self.config.eval_cache) if self.config.eval_cache else {}
        if self.config.eval_data:
            made_with[self.config.eval_data] = (PreparedData(self.config.eval_data).tokenizer_fingerprint, None)
        return made_with

    def begin(self, teacher) -> None:
        """Check the student against `teacher` and the held-out data, verify the teacher (rank 0), record
        the settings, then plan the steps and make the student's Trainer."""
        config, processes = self.config, self.processes
        check_tokenizer("the student", config.student, self.tokenizer, vocab_size(self.student),
                        teacher.made_with | self.held_out())
        processes.on_rank0(teacher.verify)
        processes.on_rank0(lambda: self.take_directory(self.inputs(teacher)))
        self.teacher, self.pad_id = teacher, pad_token_id(self.tokenizer)
        self.reader = Reader(teacher.shards(), batch_size=config.batch_size, shuffle_shards=config.shuffle_shards,
                             seed=config.seed, collate=functools.partial(teacher.collate, pad_id=self.pad_id),
                             rank=processes.rank, world_size=processes.world_size, prefetch=config.prefetch)
        self.steps_in, self.total_steps = step_plan(self.reader, config.optim.grad_accum, config.max_steps,
                                                    config.epochs)
        if config.pack_length:
            check_packing(self.student)
        self.trainer = Trainer(self.student, config.optim, config.loss, self.total_steps, processes,
                               self.autocast_dtype, config.pack_length, config.parallel)
        self.eval_data = PreparedData(config.eval_data) if config.eval_data else None

    def inputs(self, teacher) -> dict:
        """What the run learns from, by content: the teacher's inputs, the starting student, held-out data."""
        config = self.config
        inputs = dict(teacher.inputs)
        inputs["student"] = content_identity(config.student, load_config(config.student))
        if config.eval_data:
            inputs["eval_data"] = PreparedData(config.eval_data).fingerprint
        if config.eval_cache:
            inputs["eval_cache"] = cache_inputs(config.eval_cache)
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
            changed = changed_settings(recorded if isinstance(recorded, dict) else {}, inputs)
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
        self.processes.say(f"{self.name}: {self.teacher.description}; {self.total_steps} steps of "
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
