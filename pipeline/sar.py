"""Student-Aware Router (SAR): trainable teacher routers, the router step, on-policy sequences, the routers file.

SAR (METHOD, section SAR) adapts the MoE teacher to the student. Each step, on
the student's batch, the router step trains the teacher's routers, all else
frozen, on D_r(p, q.detach()) + β·L_balance; then the student learns from the
adapted teacher with the train stage's loss (`training.Trainer`).

Trainable: every parameter of each MoE layer's router module
(`routing.find_routers`): its weight, and its bias where the family has one
(GPT-OSS). None of the supported families has router noise weights (LLaMA-MoE's
noisy gate is not a transformers family); a router module holding such
parameters would train them too. Frozen: everything else, including
- DeepSeek-V3's `e_score_correction_bias`, a buffer its pretraining moves by a
  sign rule on the expert loads, not by gradients: it keeps its value;
- Qwen2-MoE's `shared_expert_gate`, the sigmoid gate of the always-active
  shared expert: part of that expert, not a choice between experts.

L_balance is `routing.load_balancing_loss` (the Switch-Transformer loss that
transformers uses for Mixtral, Qwen2/3-MoE, OLMoE and GPT-OSS) over every
layer's router logits with the router's own k. DeepSeek-V3 has no auxiliary
loss (it balances with the frozen bias above); it gets the same loss, over
softmax(router logits), whose top-k are those of its sigmoid scores without the
bias. β = 0 turns L_balance off for every family.

The routers file is safetensors: the router parameters (float32) by their
names in the teacher, and metadata naming the teacher they were trained on
(`model_identity` without the path), so `apply_routers` refuses another one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.capture import vocab_logprobs
from pipeline.data import PreparedExample
from pipeline.errors import MoekdError
from pipeline.evaluation import generate_ids
from pipeline.files import atomic_write
from pipeline.losses import Divergence, LossConfig, dense_divergence
from pipeline.models import model_identity
from pipeline.reader import Batch
from pipeline.routing import Router, RoutingConfig, RoutingHooks, load_balancing_loss, top_experts
from pipeline.seeding import generator
from pipeline.training import Distributed, OptimConfig, begin_step, make_optimizer

ROUTERS_FORMAT = "moekd-routers"
ROUTERS_VERSION = "1"
IDENTITY_KEYS = ("model_type", "config_hash", "weights_fingerprint", "vocab_size")  # what must match


@dataclass
class SarRoutingConfig(RoutingConfig):
    """The teacher's routing during SAR: every expert active unless set otherwise (e.g. ka, lam 0, k_s)."""

    mode: Literal["topk", "ka", "all", "top_p"] = "all"


@dataclass
class RouterOptimConfig(OptimConfig):
    """The routers' AdamW and schedule. No weight decay: it would pull the teacher's routers
    towards uniform routing whatever the student."""

    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.grad_accum != 1:
            raise ValueError("router.optim.grad_accum must stay 1: the router step takes the student step's "
                             "micro-batches (optim.grad_accum)")


@dataclass
class RouterConfig:
    """The router step: D_r(p, q.detach()) + balance · L_balance, with its own optimiser."""

    divergence: Divergence = "forward_kl"  # D_r; forward_kl is KL(p‖q), p the teacher
    jsd_beta: float = 0.5  # jsd: β·KL(p‖m) + (1−β)·KL(q‖m)
    skew: float = 0.1  # skew_kl: KL(p ‖ skew·p + (1−skew)·q)
    temperature: float = 1.0
    balance: float = 0.01  # β: weight of the load-balancing loss
    optim: RouterOptimConfig = field(default_factory=RouterOptimConfig)

    def __post_init__(self):
        checks = (("balance", self.balance >= 0, ">= 0"), ("temperature", self.temperature > 0, "> 0"),
                  ("jsd_beta", 0 < self.jsd_beta < 1, "in (0, 1)"), ("skew", 0 < self.skew < 1, "in (0, 1)"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"router.{name} must be {rule}, got {getattr(self, name)}")

    def loss_config(self) -> LossConfig:
        """D_r's settings in the form `losses.dense_divergence` reads."""
        return LossConfig(divergence=self.divergence, beta=self.jsd_beta, skew=self.skew,
                          temperature=self.temperature)


# ---------------------------------------------------------------- trainable routers

def train_routers_only(teacher: nn.Module, routers: list[Router]) -> dict[str, nn.Parameter]:
    """Freeze every teacher parameter except those of the router modules; the trainable ones by name."""
    teacher.requires_grad_(False)
    for router in routers:
        router.module.requires_grad_(True)
    trainable = {name: p for name, p in teacher.named_parameters() if p.requires_grad}
    if not trainable:
        names = ", ".join(r.name for r in routers[:2])
        raise MoekdError(f"the teacher's router modules ({names}, ...) hold no parameters to train: "
                         f"SAR cannot adapt a {teacher.config.model_type} teacher stored this way")
    for p in trainable.values():
        # Router updates at learning rates like 5e-6 vanish in bfloat16: keep float32 master weights
        # (forwards run under autocast, which casts them like the frozen weights).
        p.data = p.data.float()
    return trainable


def set_router_parameters(teacher: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy `tensors` into the teacher's parameters of the same names, refusing other names or shapes."""
    params = dict(teacher.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            have = tuple(params[name].shape) if name in params else "no such parameter"
            raise MoekdError(f"{source} holds {name} of shape {tuple(tensor.shape)} but the teacher has {have}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save_routers(path: Path, routers: dict[str, nn.Parameter], teacher_identity: dict) -> None:
    """Write the router parameters (float32) and the teacher's identity to a safetensors file, atomically."""
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in routers.items()}
    metadata = {"format": ROUTERS_FORMAT, "version": ROUTERS_VERSION,
                "teacher": json.dumps({k: v for k, v in teacher_identity.items() if k != "path"}, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_routers(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(router tensors by parameter name, identity of the teacher they were trained on) of a routers file."""
    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"routers file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MoekdError(f"{path} is not a readable safetensors file: {e}") from None
    if metadata.get("format") != ROUTERS_FORMAT or metadata.get("version") != ROUTERS_VERSION:
        raise MoekdError(f"{path} is not a moekd routers file (version {ROUTERS_VERSION}); `moekd sar` writes them")
    return tensors, json.loads(metadata["teacher"])


def apply_routers(model: nn.Module, path: str | Path) -> None:
    """Load the adapted routers of a routers file into `model`, the teacher they were trained on.

    The model must come from its local directory (`models.load_model`): its
    identity there (family, config hash, weights fingerprint, vocabulary) must
    be the file's, and the file's parameter names and shapes the model's.
    """
    tensors, trained_on = read_routers(path)
    directory = Path(model.name_or_path)
    if not directory.is_dir():
        raise MoekdError(f"applying {path} needs a teacher loaded from its local directory, to check that it "
                         f"is the teacher the routers were trained on (this one comes from {str(directory)!r})")
    identity = model_identity(directory, model)
    for key in IDENTITY_KEYS:
        if identity[key] != trained_on.get(key):
            raise MoekdError(f"{path} holds routers trained on teacher {trained_on.get('name')!r}, not on {directory}: "
                             f"{key} is {trained_on.get(key)!r} there but {identity[key]!r} here")
    set_router_parameters(model, tensors, str(path))


def checkpoint_teacher_layers(teacher: nn.Module) -> None:
    """Recompute the teacher's decoder layers in the router step's backward: less memory, one more forward.

    transformers checkpoints a layer only while that layer is in training mode;
    only the layers' own flags are set, so the modules inside them (attention
    dropout, Mixtral's router jitter) keep behaving as in eval mode.
    """
    teacher.activation_checkpointing_enable({"use_reentrant": False})
    for module in teacher.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


# ---------------------------------------------------------------- the router step

def target_logprobs(model: nn.Module, batch: Batch) -> Tensor:
    """Log-probabilities (N, V) of `model` at the batch's training targets (float32)."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return vocab_logprobs(model, hidden.last_hidden_state[batch.rows, batch.cols])


def router_statistics(routers: list[Router], router_logits: list[Tensor], attention_mask: Tensor) -> Tensor:
    """Per layer, summed over the real tokens: (L, 1 + 2E) = router entropy, top-k membership, probability.

    Entropy and probabilities are of softmax(router logits) for every family;
    the top-k is the router's own choice of its k experts (`routing.top_experts`,
    the family's selection score), which in `all` mode is not the routed set.
    """
    real = attention_mask.reshape(-1).bool()
    rows = []
    for router, logits in zip(routers, router_logits):
        logits = logits.detach().float()[real.to(logits.device)]
        probs = F.softmax(logits, dim=-1)
        entropy = -(probs * F.log_softmax(logits, dim=-1)).sum()
        chosen = F.one_hot(top_experts(router, logits, router.top_k), router.num_experts).sum(1).float()
        rows.append(torch.cat([entropy[None], chosen.sum(0), probs.sum(0)]))
    return torch.stack(rows)


class RouterTrainer:
    """The teacher's routers, their AdamW and schedule, and `step`: one router update over micro-batches.

    The loss is Σ_tokens D_r(p, q) / (tokens of the whole step, all ranks) +
    β · (mean over all micro-batches of L_balance); router gradients are summed
    over ranks, so the update is that of one process holding every batch.
    """

    def __init__(self, teacher: nn.Module, routing: RoutingHooks, routers: dict[str, nn.Parameter],
                 config: RouterConfig, total_steps: int, processes: Distributed,
                 autocast: torch.dtype | None = None):
        self.teacher, self.routing, self.routers, self.config = teacher, routing, routers, config
        self.total_steps, self.processes, self.autocast = total_steps, processes, autocast
        self.optimizer = make_optimizer(teacher, config.optim)  # only the routers require grad
        self.divergence = config.loss_config()
        self.kl = LossConfig()  # the reported teacher–student KL: forward KL at τ = 1
        routing.record_logits = True
        self.steps_done = 0

    def step(self, batches: list[Batch], student_logprobs: list[Tensor]) -> dict:
        """Update the routers on the batches, given the student's (detached) log-probs at their targets."""
        lr, tokens = begin_step(self.optimizer, self.config.optim, self.steps_done, self.total_steps, batches,
                                self.processes)
        device = batches[0].input_ids.device
        parts = len(batches) * self.processes.world_size
        sums = torch.zeros(4, device=device)  # Σ D_r, Σ KL (over tokens), Σ L_balance (micro-batches), real tokens
        stats = []  # router_statistics per micro-batch
        for batch, q in zip(batches, student_logprobs):
            with self.routing.sequences(batch.seq_ids, 0, batch.attention_mask):
                with torch.autocast(device.type, self.autocast, enabled=self.autocast is not None):
                    p = target_logprobs(self.teacher, batch)
                    divergence = dense_divergence(q, p, self.divergence).sum()
                    logits = self.routing.router_logits  # read now: checkpointing's recompute replaces them
                    balance = load_balancing_loss(logits, self.routing.routers[0].top_k, batch.attention_mask)
                stats.append(router_statistics(self.routing.routers, logits, batch.attention_mask))
                loss = divergence / max(tokens, 1) + self.config.balance * balance / parts
                loss.backward()  # inside `sequences`: recomputed layers route the same
            kl = dense_divergence(q, p.detach(), self.kl).sum()
            sums += torch.stack([divergence.detach(), kl, balance.detach(), batch.attention_mask.sum()]).float()
        for param in self.routers.values():
            self.processes.sum(param.grad)
        grad_norm = nn.utils.clip_grad_norm_(self.routers.values(), self.config.optim.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        divergence, kl, balance, real = self.processes.sum(sums).tolist()
        divergence, kl, balance = divergence / max(tokens, 1), kl / max(tokens, 1), balance / parts
        stats = (self.processes.sum(torch.stack(stats).sum(0)) / max(real, 1)).cpu()
        experts = (stats.shape[1] - 1) // 2
        return {"router_loss": divergence + self.config.balance * balance, "router_divergence": divergence,
                "balance": balance, "kl": kl, "router_lr": lr, "router_grad_norm": grad_norm.item(),
                "router_entropy": stats[:, 0].tolist(), "topk_load": stats[:, 1 : 1 + experts].tolist(),
                "router_prob": stats[:, 1 + experts :].tolist()}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps_done": self.steps_done,
                "parameters": {name: p.detach().cpu().clone() for name, p in self.routers.items()}}

    def load_state_dict(self, state: dict) -> None:
        set_router_parameters(self.teacher, state["parameters"], "the checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = state["steps_done"]


# ---------------------------------------------------------------- on-policy sequences

def on_policy_examples(
    student: nn.Module, examples: list[PreparedExample], *, stop_ids: set[int], pad_id: int, max_new_tokens: int,
    temperature: float, top_p: float, seed: int, step: int,
) -> list[PreparedExample]:
    """The examples' prompts, each followed by a response the student samples; those tokens are the response.

    Sequence `seq_id` at step `step` samples from its own generator (seed,
    "on-policy", step, seq_id): the same draw in any batch or resumed run. The
    stop token ends a response and is not part of it (`generate_ids` drops it).
    """
    prompts = [e.input_ids[: e.prompt_length] for e in examples]
    generators = [generator(seed, "on-policy", step, e.seq_id) for e in examples]
    responses = generate_ids(student, prompts, stop_ids, pad_id, max_new_tokens, temperature, top_p, generators)
    return [
        replace(e, input_ids=np.concatenate([prompt, np.asarray(response, dtype=prompt.dtype)]),
                response_mask=np.arange(len(prompt) + len(response)) >= len(prompt))
        for e, prompt, response in zip(examples, prompts, responses)
    ]
