"""Student-Aware Router (SAR): trainable teacher routers, the router step, on-policy sequences.

SAR (METHOD, section SAR) adapts the MoE teacher to the student. Each step, on
the student's batch, the router step trains the teacher's routers, all else
frozen, on D_r(p, q.detach()) + β·L_balance; then the student learns from the
adapted teacher with the train stage's loss (`trainer.Trainer`).

Trainable: every parameter of each MoE layer's router module
(`families.find_routers`): its weight, and its bias where the family has one
(GPT-OSS); a router module holding other parameters would train them too.
Frozen: everything else, including
- a selection bias (`Rule.bias`, DeepSeek-V3's `e_score_correction_bias` and
  its kin's), a buffer their pretraining moves by a sign rule on the expert
  loads, not by gradients: it keeps its value;
- Qwen2-MoE's `shared_expert_gate`, the sigmoid gate of the always-active
  shared expert: part of that expert, not a choice between experts.

L_balance is `routing.load_balancing_loss` (the Switch-Transformer loss that
transformers uses for Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS and others) over
every layer's router logits with the router's own k, for every family:
families that balance with a selection bias instead get the same loss, over
softmax(router logits). β = 0 turns L_balance off for every family.

The adapted routers are written with `pipeline.teacher.routers.save_routers`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.core.errors import MoekdError
from pipeline.core.processes import Distributed
from pipeline.core.seeding import generator
from pipeline.data.batch import Batch
from pipeline.data.prepared import PreparedExample
from pipeline.models.logprobs import target_logprobs
from pipeline.student.generation import generate_ids
from pipeline.student.losses import Divergence, LossConfig, dense_divergence
from pipeline.student.trainer import OptimConfig, begin_step, make_optimizer, require_finite
from pipeline.teacher.families import Router, top_experts
from pipeline.teacher.routers import set_router_parameters
from pipeline.teacher.routing import RoutingConfig, RoutingHooks, load_balancing_loss


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
        if isinstance(router.rule.bias, str):  # a selection bias is frozen even where it is a Parameter (ERNIE)
            operator.attrgetter(router.rule.bias)(router.module).requires_grad_(False)
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

def router_statistics(routers: list[Router], router_logits: list[Tensor], biases: list[Tensor | None],
                      attention_mask: Tensor) -> Tensor:
    """Per layer, summed over the real tokens: (L, 1 + 2E) = router entropy, top-k membership, probability.

    Entropy and probabilities are of softmax(router logits) for every family;
    the top-k is the router's own choice of its k experts (`families.top_experts`,
    the family's selection score), which in `all` mode is not the routed set.
    """
    real = attention_mask.reshape(-1).bool()
    rows = []
    for router, logits, bias in zip(routers, router_logits, biases):
        logits = logits.detach().float()[real.to(logits.device)]
        probs = F.softmax(logits, dim=-1)
        entropy = -(probs * F.log_softmax(logits, dim=-1)).sum()
        chosen = F.one_hot(top_experts(router, logits, router.top_k, bias), router.num_experts).sum(1).float()
        rows.append(torch.cat([entropy[None], chosen.sum(0), probs.sum(0)]))
    return torch.stack(rows)


class RouterTrainer:
    """The teacher's routers, their AdamW and schedule, and `step`: one router update over micro-batches.

    The loss is Σ_tokens D_r(p, q) / (tokens of the whole step, all ranks) +
    β · (mean over all micro-batches of L_balance); router gradients are summed
    over ranks, so the update is that of one process holding every batch.
    """

    def __init__(self, teacher: nn.Module, routing: RoutingHooks, routers: dict[str, nn.Parameter], *,
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
                stats.append(router_statistics(self.routing.routers, logits, self.routing.selection_biases,
                                               batch.attention_mask))
                loss = divergence / max(tokens, 1) + self.config.balance * balance / parts
                loss.backward()  # inside `sequences`: recomputed layers route the same
            kl = dense_divergence(q, p.detach(), self.kl).sum()
            sums += torch.stack([divergence.detach(), kl, balance.detach(), batch.attention_mask.sum()]).float()
        for param in self.routers.values():
            self.processes.sum(param.grad)
        grad_norm = nn.utils.clip_grad_norm_(self.routers.values(), self.config.optim.grad_clip or math.inf)
        divergence, kl, balance, real = self.processes.sum(sums).tolist()
        require_finite(self.steps_done + 1, router_divergence=divergence, balance=balance,
                       router_grad_norm=grad_norm.item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
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
