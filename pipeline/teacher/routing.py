"""MoE routing modes for the teacher, applied by forward hooks on the router modules.

Most routers return `(router_logits, weights, indices)` for the flattened
tokens (B*L, batch-major); the experts module then mixes the chosen experts'
outputs with the weights. A hook rewrites the last two, so no model class is
edited; the few routers that hand their choice on otherwise (dense weights,
expert-sorted slots, logits alone with the MoE block choosing) are read and
rewritten by `families.routing_of` / `with_routing` or at their experts'
inputs:

- `topk`: the model's own routing, untouched.
- `ka` (Knowledge Augmentation): per token and layer, with probability λ draw
  k_s experts without replacement from softmax(router_logits) (Gumbel-top-k),
  otherwise take the top-k_s by the family's own selection score.
- `all`: every expert, weighted by the family rule.
- `top_p`: the fewest experts whose softmax(router_logits) mass reaches p.

Weights always follow the family's own rule over the chosen set, with the
family's arithmetic and dtype casts, and stay differentiable in the router
parameters (SAR trains routers through these hooks).

The families' rules are `families`' (`RULES`); this module applies the modes
with them, and draws KA's randomness (`ka_draws`, shared with the vLLM
backend).

Choices where a family leaves room:
- ka with k_s = k keeps the router's own (indices, weights) for tokens that
  are not sampled, so λ=0 reproduces the model bit for bit.
- Every family samples from softmax(router_logits) (METHOD), sigmoid-scored
  ones (DeepSeek-V3 and its kin) included, ignoring expert groups. With
  k_s != k and in `all`/`top_p` the choice is ranked by the family's own score
  (plus its selection bias) over all experts: a group limit is defined for the
  family's own k only.
- top_p measures mass with softmax(router_logits) for every family; the
  variable-size sets are padded with the token's best expert at weight 0,
  which every experts implementation accepts (GPT-OSS's eager experts reject
  the out-of-range index E).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from pipeline.core.errors import MoekdError
from pipeline.core.seeding import generator
from pipeline.teacher.families import (
    MODES, Router, family_weights, find_routers, routing_of, selection_bias, top_experts, top_p_experts, with_routing,
)


@dataclass
class RoutingConfig:
    mode: Literal["topk", "ka", "all", "top_p"] = "topk"
    samples: int = 1  # M: KA teacher samples per sequence (ka only; must be 1 otherwise)
    lam: float = 0.05  # λ: per-token, per-layer probability of sampling the routing (ka)
    k_s: int | None = None  # experts per token in ka; None = the teacher's own k
    top_p: float = 0.9  # top_p: keep the fewest experts whose router probability reaches p
    seed: int = 0  # run seed for KA sampling

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"routing.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.samples < 1:
            raise ValueError(f"routing.samples must be at least 1, got {self.samples}")
        if self.mode != "ka" and self.samples != 1:
            raise ValueError(f"routing.samples={self.samples} needs routing.mode=ka (got {self.mode!r})")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"routing.lam must be in [0, 1], got {self.lam}")
        if self.k_s is not None and self.k_s < 1:
            raise ValueError(f"routing.k_s must be at least 1 (or null for the teacher's k), got {self.k_s}")
        if self.k_s is not None and self.mode != "ka":
            raise ValueError(f"routing.k_s={self.k_s} needs routing.mode=ka (got {self.mode!r})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"routing.top_p must be in (0, 1], got {self.top_p}")


def gumbel(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise; top-k of logits + noise samples k without replacement."""
    u = torch.rand(shape, generator=g).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def ka_draws(config: RoutingConfig, seq_id: int, sample: int, length: int,
             experts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KA's randomness for sample `sample` of a sequence of `length` real tokens: per MoE layer (with
    `experts[layer]` experts), the token positions whose routing is sampled (each with probability λ) and their
    Gumbel noise. A pure function of (seed, seq_id, sample, length), drawn from the sequence's own generator,
    layer by layer: the same in any batch, padding, worker split, resumed run or backend."""
    g = generator(config.seed, seq_id, sample)
    draws = []
    for num_experts in experts:
        sampled = (torch.rand(length, generator=g) < config.lam).nonzero().squeeze(1)
        draws.append((sampled, gumbel((len(sampled), num_experts), g)))
    return draws


class RoutingHooks:
    """Router hooks applying `config`'s routing mode to `model`; a context manager.

    In ka mode each forward must run inside `sequences(...)`, which fixes the
    per-token randomness of that batch. Set `record_logits` to keep each MoE
    layer's router logits (with grad) of the last forward in `router_logits`.
    `drop` (topk mode) leaves one expert out of every token's choice, its
    place taken by the next best: the expert-drop diagnostic. Like KA's
    re-choices it ranks every expert, without the expert groups of the
    families that limit the top-k to a few groups (DeepSeek-V3's).
    """

    def __init__(self, model, config: RoutingConfig, drop: int | None = None):
        if drop is not None and config.mode != "topk":
            raise ValueError(f"drop leaves an expert out of the model's own top-k routing; mode is {config.mode!r}")
        self.config, self.drop = config, drop
        try:
            self.routers = find_routers(model)
        except MoekdError:
            if config.mode != "topk":
                raise
            self.routers = []  # topk is the model's own routing: plain top-k caching of a dense teacher
        for router in self.routers:
            if drop is not None and not 0 <= drop < router.num_experts:
                raise MoekdError(f"drop={drop} is not an expert of {router.name} (0..{router.num_experts - 1})")
            if config.k_s is not None and config.k_s > router.num_experts:
                raise MoekdError(
                    f"routing.k_s={config.k_s} exceeds the {router.num_experts} experts of {router.name}"
                )
            other_k = config.mode in ("all", "top_p") or config.k_s not in (None, router.top_k)
            if router.rule.fixed_k is not None and other_k:
                raise MoekdError(f"model type {router.family!r} takes exactly its {router.top_k} experts per token "
                                 f"({router.rule.fixed_k}): routing.mode={config.mode} with k_s={config.k_s} "
                                 "would change that; use topk, or ka with k_s null")
        self.record_logits = False
        self.router_logits: list[torch.Tensor | None] = [None] * len(self.routers)  # in the routers' order
        self._seen: set[int] = set(range(len(self.routers)))  # routers that ran in the current forward
        self.selection_biases: list[torch.Tensor | None] = [None] * len(self.routers)  # of the last forward
        self._draws = None  # per layer: (flat token rows to sample, their Gumbel noise)
        self._real = None  # (B*L,) bool, real tokens of the batch in `sequences`
        self._num_tokens = None  # B*L of that batch
        self._chosen: list[torch.Tensor | None] = [None] * len(self.routers)
        self._chosen_real = None
        self._pending: list[tuple | None] = [None] * len(self.routers)  # outputs="logits": (logits, inputs)
        self._handles = [
            router.module.register_forward_hook(partial(self._hook, layer))
            for layer, router in enumerate(self.routers)
        ] + [
            router.block.experts.register_forward_pre_hook(partial(self._experts_hook, layer))
            for layer, router in enumerate(self.routers) if router.rule.outputs == "logits"
        ]

    def __enter__(self) -> "RoutingHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Detach the hooks; the model routes as its own again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def sequences(self, seq_ids: list[int], sample: int, attention_mask: torch.Tensor) -> Iterator["RoutingHooks"]:
        """Fix the KA randomness for forwards of this batch, sample `sample`.

        Sequence `s` draws from its own generator (seed, seq_id, sample), per
        layer in order, for its real tokens only, so its routing is the same in
        any batch, padding, worker split or resumed run. Every forward inside the
        context reuses these draws. Outside ka mode only the mask is kept (it
        excludes padding from `expert_load`).
        """
        if len(seq_ids) != attention_mask.shape[0]:
            raise ValueError(f"{len(seq_ids)} seq_ids for a batch of {attention_mask.shape[0]} rows")
        self._real = attention_mask.reshape(-1).bool()
        self._num_tokens = attention_mask.numel()
        if self.config.mode == "ka":
            self._draws = self._draw(seq_ids, sample, attention_mask)
        try:
            yield self
        finally:
            self._draws = None
            self._real = None
            self._num_tokens = None

    def _draw(self, seq_ids: list[int], sample: int, attention_mask: torch.Tensor) -> list[tuple]:
        mask = attention_mask.cpu()
        rows = [[] for _ in self.routers]
        noise = [[] for _ in self.routers]
        experts = [router.num_experts for router in self.routers]
        for b, seq_id in enumerate(seq_ids):
            positions = mask[b].nonzero().squeeze(1) + b * mask.shape[1]
            for layer, (sampled, gumbels) in enumerate(ka_draws(self.config, seq_id, sample, len(positions), experts)):
                rows[layer].append(positions[sampled])
                noise[layer].append(gumbels)
        device = attention_mask.device
        return [(torch.cat(r).to(device), torch.cat(n).to(device)) for r, n in zip(rows, noise)]

    def _hook(self, layer: int, module, inputs, output):
        router = self.routers[layer]
        if router.rule.outputs == "logits":  # the MoE block chooses: its experts' inputs are rewritten
            self._pending[layer] = (output, inputs)
            return None
        first, weights, indices = routing_of(router, output)
        weights, indices = self._route(layer, router, first, weights, indices, inputs)
        return with_routing(router, output, weights, indices)

    def _experts_hook(self, layer: int, module, args):
        """outputs="logits": the MoE block calls its experts with (hidden, indices, weights)."""
        (first, inputs), self._pending[layer] = self._pending[layer], None
        hidden, indices, weights = args[:3]
        weights, indices = self._route(layer, self.routers[layer], first, weights, indices, inputs)
        return hidden, indices, weights, *args[3:]

    def _route(self, layer: int, router: Router, first, weights, indices, inputs):
        """The (weights, indices) the mode gives, from the router's first output and its own choice."""
        rule, own_dtype = router.rule, weights.dtype  # the family's own arithmetic ends in its dtype
        # Every rule works on logits; log-probabilities are logits of the same softmax.
        logits = first.log() if rule.returns == "probabilities" else first
        if self._num_tokens is not None and logits.shape[0] != self._num_tokens:
            raise RuntimeError(
                f"sequences() was given a mask of {self._num_tokens} tokens, the forward has {logits.shape[0]}"
            )
        shared = None
        if rule.shared is not None:  # the shared experts' logits: the last rows of the router's weight
            weight = router.module.weight
            hidden = inputs[0].reshape(-1, weight.shape[1]).float()
            shared = F.linear(hidden, weight[-router.attribute(rule.shared) :].float())
        mode = self.config.mode
        self.selection_biases[layer] = selection_bias(router, inputs)
        if mode == "ka":
            weights, indices = self._ka(layer, router, logits, shared, weights, indices)
        elif mode == "all":
            indices = torch.arange(router.num_experts, device=logits.device).expand(logits.shape[0], -1)
            weights = family_weights(router, logits, indices, shared_logits=shared)
        elif mode == "top_p":
            indices, keep = top_p_experts(logits, self.config.top_p)
            weights = family_weights(router, logits, indices, keep, shared)
        elif self.drop is not None:
            indices = top_experts(router, logits, router.top_k, self.selection_biases[layer], self.drop)
            weights = family_weights(router, logits, indices, shared_logits=shared)
        if layer in self._seen:  # a new forward starts (routers may run in another order than found)
            self._seen.clear()
            self.router_logits = [None] * len(self.routers)
            self._chosen_real = self._real
        self._seen.add(layer)
        if self.record_logits:
            self.router_logits[layer] = logits
        self._chosen[layer] = indices.detach()
        if rule.skip_class:  # the no-op expert: weight 0, index 0, as the router leaves it
            skip = indices == router.num_experts - 1
            weights = weights.masked_fill(skip, 0.0)
            indices = indices.masked_fill(skip, 0)
        return weights.to(own_dtype), indices

    def _ka(self, layer: int, router: Router, logits, shared, weights, indices):
        if self._draws is None:
            raise RuntimeError("ka routing needs each forward inside `with hooks.sequences(...)`")
        rows, noise = (draw.to(logits.device) for draw in self._draws[layer])  # a layer on another device
        k_s = self.config.k_s or router.top_k
        if k_s != router.top_k:
            indices = top_experts(router, logits, k_s, self.selection_biases[layer])
            weights = family_weights(router, logits, indices, shared_logits=shared)
        if rows.numel() == 0:
            return weights, indices
        # Gumbel-top-k on the logits: log-softmax only shifts each row by a constant.
        picked = (logits[rows].float() + noise).topk(k_s, dim=-1).indices
        indices = indices.index_put((rows,), picked)
        sampled_shared = None if shared is None else shared[rows]
        weights = weights.index_put((rows,), family_weights(router, logits[rows], picked, shared_logits=sampled_shared))
        return weights, indices

    @property
    def chosen(self) -> list[torch.Tensor | None]:
        """Per MoE layer, the experts (N, w) the last forward chose for each of its B*L tokens."""
        return self._chosen

    def expert_load(self) -> torch.Tensor:
        """(layers, E): fraction of the last forward's tokens routed to each expert.

        Padding is excluded when that forward ran inside `sequences`.
        """
        if any(chosen is None for chosen in self._chosen):
            raise RuntimeError("expert_load() needs a forward first")
        loads = []
        for router, chosen in zip(self.routers, self._chosen):
            routed = torch.zeros(chosen.shape[0], router.num_experts, dtype=torch.bool, device=chosen.device)
            routed.scatter_(1, chosen, True)
            if self._chosen_real is not None:
                routed = routed[self._chosen_real.to(routed.device)]
            loads.append(routed.float().mean(dim=0))
        return torch.stack(loads)


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E · Σ_e f_e · P_e over all layers' tokens.

    f_e: fraction of tokens whose top-k includes expert e (summed over the k
    slots, as transformers does for Mixtral/Qwen/OLMoE/GPT-OSS); P_e: mean
    router probability of e. Padding (attention_mask 0) is excluded.
    """
    logits = torch.cat(router_logits)
    num_experts = logits.shape[-1]
    probs = F.softmax(logits.float(), dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
    if attention_mask is None:
        real = torch.ones(logits.shape[0], device=logits.device)
    else:
        real = attention_mask.reshape(-1).float().to(logits.device).repeat(len(router_logits))
    real = real / real.sum()
    tokens_per_expert = (chosen * real[:, None]).sum(dim=0)
    prob_per_expert = (probs * real[:, None]).sum(dim=0)
    return num_experts * (tokens_per_expert * prob_per_expert).sum()

