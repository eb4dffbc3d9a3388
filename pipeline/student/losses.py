"""Distillation losses: (1 − α)·CE + α·D, with D from a sparse (top-k + tail) or dense teacher.

A divergence is computed between two distributions over a common set of
*outcomes*, the last axis of two log-probability tensors:

- dense: the whole vocabulary;
- sparse, `tail="bucket"`: the k cached ids plus one extra outcome, "any other
  id". The teacher's tail mass is 1 − Σ_k p (the cache stores log-probs
  normalised over the full vocabulary), clamped at 0 where float16 rounding
  makes Σ_k p ≥ 1 (the top-k are then renormalised). The student's is
  log(1 − Σ_k q), or, where that is below 1e-3 and float32 cancellation would
  lose it, summed over the non-cached ids: exact even for a very peaked student;
- sparse, `tail="renormalize"`: the k cached ids, both distributions restricted
  to them and renormalised.

The student's side of a sparse outcome set is gathered from its log-probs at the
cached ids, so no dense teacher distribution is ever built.

Temperature τ is applied to the outcome distributions, both sides alike:
log_softmax(log-probs / τ) over the outcomes. Over the full vocabulary, and in
renormalize mode, this is exactly softmax(logits / τ) (restricted). In bucket
mode the tail is tempered as if it were one token: the true tempered tail,
Σ_{v∉top-k} p_v^{1/τ} / Z, depends on how the tail mass is spread, which the
cache does not record (for τ > 1 the true value is larger than the one-token
value). The one-token rule treats teacher and student identically, so D stays a
proper divergence between the (k + 1)-outcome distributions (zero iff they
agree), the odds among the top-k ids stay exact, and it is exact when the tail
is empty. Caveat: τ > 1 magnifies small tails, including the teacher's rounding
residue (1 − Σ_k p is only as precise as the stored log-probs). D is
multiplied by τ² (Hinton et al.) so that its gradient's scale, and hence α's
meaning, does not change with τ. CE always uses τ = 1.

An outcome of probability 0 (an empty tail, a clamped teacher tail, a −inf
logit) has log-prob −inf, replaced by the log of the dtype's smallest normal
number so that values and gradients stay finite: 0·log 0 contributes 0, and a
support mismatch (e.g. reverse KL against a clamped teacher tail) costs a large
finite amount instead of infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.data.signals import Dense, NoTeacher, Sampled, Signal, TopK
from pipeline.models.logprobs import CHUNK_TOKENS

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
Tail = Literal["bucket", "renormalize"]


@dataclass
class LossConfig:
    alpha: float = 0.5  # weight of D: (1 − α)·CE + α·D; α = 0 is SFT only
    divergence: Divergence = "forward_kl"
    beta: float = 0.5  # JSD: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q
    skew: float = 0.1  # skew KL: KL(p ‖ skew·p + (1−skew)·q)
    temperature: float = 1.0
    tail: Tail = "bucket"  # sparse teacher: the mass beyond the top-k as one outcome, or dropped
    chunk_tokens: int = CHUNK_TOKENS  # tokens per chunk of student logits (bounds peak memory)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.divergence not in get_args(Divergence):
            choices = ", ".join(get_args(Divergence))
            raise ValueError(f"loss.divergence must be one of {choices}, got {self.divergence!r}")
        # At β ∈ {0, 1} the JSD is identically 0; skew 0 is forward KL, skew 1 is 0.
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"loss.beta must be in (0, 1), got {self.beta}")
        if not 0.0 < self.skew < 1.0:
            raise ValueError(f"loss.skew must be in (0, 1), got {self.skew}")
        if not self.temperature > 0.0:
            raise ValueError(f"loss.temperature must be positive, got {self.temperature}")
        if self.tail not in get_args(Tail):
            raise ValueError(f"loss.tail must be one of {', '.join(get_args(Tail))}, got {self.tail!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"loss.chunk_tokens must be at least 1, got {self.chunk_tokens}")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)), stable for x < 0; −inf (with zero gradient) where x ≥ 0.

    x is the log of a probability sum, which rounding can push to 0 or above.
    """
    inside = x < 0
    x = torch.where(inside, x, -1.0)  # keeps the unused branch's gradient finite
    value = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return torch.where(inside, value, -math.inf)


class TailLogMass(torch.autograd.Function):
    """log Σ_{v ∉ ids} exp(logprobs_v): (..., V) log-probs, (..., k) ids -> (..., 1) tail log-mass.

    Summed over the tail itself rather than as log(1 − Σ_k q), whose float32
    cancellation loses a peaked student's tail (and its gradient) entirely. A
    custom backward, so that no (..., V) tensor is kept per teacher sample.
    """

    @staticmethod
    def forward(ctx, logprobs: Tensor, ids: Tensor) -> Tensor:
        tail = logprobs.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)
        ctx.save_for_backward(logprobs, ids, tail)
        return tail

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logprobs, ids, tail = ctx.saved_tensors
        # d tail / d logprobs_v = softmax over the tail ids; the scatter also clears the
        # inf that exp gives where the tail is empty (tail = −inf, every id cached).
        return grad * (logprobs - tail).exp().scatter(-1, ids, 0.0), None


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) over the last axis, from finite log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def mixture(logp: Tensor, logq: Tensor, weight: float) -> Tensor:
    """log(weight·p + (1 − weight)·q)."""
    return torch.logaddexp(logp + math.log(weight), logq + math.log(1 - weight))


def divergence(teacher_logprobs: Tensor, student_logprobs: Tensor, config: LossConfig) -> Tensor:
    """τ²·D(p_τ, q_τ) over the last axis (the outcomes), both sides normalised at temperature τ."""
    tau = config.temperature
    zero = math.log(torch.finfo(student_logprobs.dtype).tiny)  # stands in for log 0
    logp = F.log_softmax(teacher_logprobs / tau, -1)
    logq = F.log_softmax(student_logprobs / tau, -1)
    logp, logq = logp.masked_fill(logp.isneginf(), zero), logq.masked_fill(logq.isneginf(), zero)
    if config.divergence == "forward_kl":
        d = kl(logp, logq)
    elif config.divergence == "reverse_kl":
        d = kl(logq, logp)
    elif config.divergence == "jsd":
        logm = mixture(logp, logq, config.beta)
        d = config.beta * kl(logp, logm) + (1 - config.beta) * kl(logq, logm)
    else:
        d = kl(logp, mixture(logp, logq, config.skew))
    return tau**2 * d


def sparse_divergence(
    student_logprobs: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, config: LossConfig
) -> Tensor:
    """Per-token D from a cached top-k teacher: student (N, V), teacher ids/log-probs (N, k) -> (N,).

    `student_logprobs` are at τ = 1 (the log-softmax shared with CE);
    `teacher_logprobs` are normalised over the full vocabulary. See the module
    docstring for the tail and temperature rules.
    """
    teacher = teacher_logprobs.to(student_logprobs.dtype)
    student = student_logprobs.gather(-1, teacher_ids)
    if config.tail == "bucket":
        teacher = torch.cat([teacher, log1mexp(teacher.logsumexp(-1, keepdim=True))], -1)
        student = torch.cat([student, student_tail(student_logprobs, teacher_ids, student)], -1)
    return divergence(teacher, student, config)


# Below this tail mass, 1 − Σ_k q in float32 is off by more than ~0.01% of the tail.
EXACT_TAIL_BELOW = math.log(1e-3)


def student_tail(logprobs: Tensor, ids: Tensor, gathered: Tensor) -> Tensor:
    """The student's log-mass outside `ids`: (N, V), (N, k), its log-probs there (N, k) -> (N, 1).

    log(1 − Σ_k q) is cheap and accurate while the tail is not tiny; rows with a
    tiny tail (a peaked student) are summed over the tail itself (`TailLogMass`,
    one pass over the vocabulary for those rows only).
    """
    tail = log1mexp(gathered.logsumexp(-1, keepdim=True))
    rows = (tail[:, 0] < EXACT_TAIL_BELOW).nonzero()[:, 0]
    if len(rows) == 0:
        return tail
    return tail.index_put((rows,), TailLogMass.apply(logprobs[rows], ids[rows]))


def dense_divergence(student_logprobs: Tensor, teacher_logprobs: Tensor, config: LossConfig) -> Tensor:
    """Per-token D from a dense teacher: student and teacher log-probs (N, V) -> (N,).

    Differentiable in both arguments (SAR's router step needs the teacher side).
    """
    return divergence(teacher_logprobs.to(student_logprobs.dtype), student_logprobs, config)


def sampled_forward_kl(student_logprobs: Tensor, teacher_ids: Tensor, teacher_weights: Tensor) -> Tensor:
    """Per-token KL(p̂ ‖ q) to the empirical distribution of a sampled teacher: student (N, V), the distinct
    ids drawn (N, K) and their shares of the draws (N, K; 0 on padding) -> (N,).

    p̂ (the shares) is an unbiased estimate of the teacher's p, and KL(p̂ ‖ q) = −H(p̂) − Σ p̂ log q, whose
    gradient in q is that of the cross-entropy −Σ p̂ log q: in expectation, exactly the gradient of
    KL(p ‖ q). (Its value estimates KL(p ‖ q) only up to the bias of the empirical entropy.)
    """
    student = student_logprobs.gather(-1, teacher_ids)
    drawn = teacher_weights > 0
    entropy_term = torch.where(drawn, teacher_weights * teacher_weights.clamp_min(1e-30).log(), 0.0)
    return (entropy_term - torch.where(drawn, teacher_weights * student, 0.0)).sum(-1)


def sample_mean_divergence(student_logprobs: Tensor, teacher: Signal, config: LossConfig) -> Tensor:
    """Per-token D averaged over the M teacher samples, (1/M) Σ_m D(p^(m), q) (KA): (N,), by the kind of
    teacher signal (`data.signals`): top-k (sparse, with the tail), dense, or sampled: forward KL to the
    draws, which already mix the M samples (`sampled_forward_kl`; the train stage refuses other D)."""
    if isinstance(teacher, Sampled):
        return sampled_forward_kl(student_logprobs, teacher.ids[0], teacher.weights[0])
    if isinstance(teacher, Dense):
        per_sample = [dense_divergence(student_logprobs, lp, config) for lp in teacher.logprobs]
    elif isinstance(teacher, TopK):
        per_sample = [sparse_divergence(student_logprobs, ids, lp, config)
                      for ids, lp in zip(teacher.ids, teacher.logprobs)]
    else:
        raise TypeError(f"no divergence to a {type(teacher).__name__} teacher")
    return torch.stack(per_sample).mean(0)


@dataclass
class LossSums:
    """Loss SUMS over tokens, so callers can normalise by a global (all-rank) token count."""

    ce: Tensor
    kd: Tensor
    tokens: int

    def total(self, alpha: float, normalizer: float) -> Tensor:
        """((1 − α)·ce + α·kd) / normalizer."""
        return ((1 - alpha) * self.ce + alpha * self.kd) / normalizer


Project = Callable[[Tensor], Tensor]  # hidden states (n, H) -> log-probs (n, V), e.g. `logprobs.vocab_logprobs`


def chunk_losses(hidden: Tensor, project: Project, targets: Tensor, teacher: Signal,
                 config: LossConfig) -> tuple[Tensor, Tensor]:
    """Summed CE and teacher-sample-averaged D for one chunk of tokens."""
    logprobs = project(hidden)
    ce = F.nll_loss(logprobs, targets, reduction="sum")
    if isinstance(teacher, NoTeacher):
        return ce, torch.zeros_like(ce)
    return ce, sample_mean_divergence(logprobs, teacher, config).sum()


def distillation_loss(hidden: Tensor, project: Project, targets: Tensor, teacher: Signal,
                      config: LossConfig) -> LossSums:
    """CE and KD sums over N response-predicting tokens.

    hidden: (N, H) the student's final hidden states (after the final norm);
    `project` turns a chunk of them into log-probs over the vocabulary (the
    student's head, `logprobs.vocab_logprobs`); targets: (N,) the next tokens;
    `teacher` the teacher's signal at them (`data.signals`): top-k (a cache),
    dense (SAR's teacher), sampled (a sampled cache's draws) or none (SFT,
    kd = 0). D is averaged over the M teacher samples, (1/M) Σ_m D(p^(m), q)
    (KA). Log-probs are computed chunk by chunk (config.chunk_tokens), under
    activation checkpointing when there are several chunks, so peak memory
    holds a few (chunk, V) tensors of one chunk (logits, log-probs; per
    teacher sample only with a dense teacher), never (N, V).
    """
    ce = kd = torch.zeros((), device=hidden.device)
    # At least one (possibly empty) chunk, so the sums stay connected to the
    # parameters even with no tokens (every DDP rank must run backward).
    # Recomputing a chunk in backward only pays off when there is a next chunk whose
    # (chunk, V) tensors would otherwise sit beside this one's.
    several = len(hidden) > config.chunk_tokens
    run = partial(checkpoint, chunk_losses, use_reentrant=False) if several else chunk_losses
    for start in range(0, max(len(hidden), 1), config.chunk_tokens):
        chunk = slice(start, start + config.chunk_tokens)
        chunk_ce, chunk_kd = run(hidden[chunk], project, targets[chunk], teacher.chunk(chunk), config)
        ce, kd = ce + chunk_ce, kd + chunk_kd
    return LossSums(ce, kd, len(targets))
