"""Distillation losses against independent computations from the definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.config import ConfigError, load_config
from pipeline.data.signals import Dense, NoTeacher, TopK
from pipeline.student.losses import (
    EXACT_TAIL_BELOW, LossConfig, LossSums, dense_divergence, distillation_loss, sparse_divergence,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl")
f64 = torch.float64


def reference(p, q, config):
    """τ²·D(p_τ, q_τ) from the definitions, on probabilities over the last axis."""
    p = p ** (1 / config.temperature)
    q = q ** (1 / config.temperature)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if config.divergence == "forward_kl":
        d = kl(p, q)
    elif config.divergence == "reverse_kl":
        d = kl(q, p)
    elif config.divergence == "jsd":
        m = config.beta * p + (1 - config.beta) * q
        d = config.beta * kl(p, m) + (1 - config.beta) * kl(q, m)
    else:
        d = kl(p, config.skew * p + (1 - config.skew) * q)
    return config.temperature**2 * d


def collapse(probs, ids):
    """(N, V) probabilities -> (N, k + 1): the masses at ids, then the mass of all other ids."""
    rest = probs.scatter(-1, ids, 0.0).sum(-1, keepdim=True)
    return torch.cat([probs.gather(-1, ids), rest], -1)


def grad(value, x):
    return torch.autograd.grad(value.sum(), x, retain_graph=True)[0]


def random_permutations(n, v, generator):
    return torch.stack([torch.randperm(v, generator=generator) for _ in range(n)])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alpha", 1.5, "loss.alpha must be in"),
        ("divergence", "kl", "loss.divergence must be one of"),
        ("beta", 1.0, "loss.beta must be in"),
        ("skew", 0.0, "loss.skew must be in"),
        ("temperature", 0.0, "loss.temperature must be positive"),
        ("tail", "drop", "loss.tail must be one of"),
        ("chunk_tokens", 0, "loss.chunk_tokens must be at least 1"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**{field: value})


def test_config_errors_reach_the_user_as_config_errors():
    with pytest.raises(ConfigError, match="loss.temperature must be positive"):
        load_config(LossConfig, None, ["temperature=-1"])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_matches_definitions_in_both_arguments(divergence, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 9, generator=g, dtype=f64, requires_grad=True)
    teacher = (2 * torch.randn(4, 9, generator=g, dtype=f64)).requires_grad_()
    config = LossConfig(divergence=divergence, temperature=temperature, beta=0.3, skew=0.2)
    ours = dense_divergence(student.log_softmax(-1), teacher.log_softmax(-1), config)
    expected = reference(teacher.softmax(-1), student.softmax(-1), config)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad(ours, student), grad(expected, student))
    torch.testing.assert_close(grad(ours, teacher), grad(expected, teacher))


# Bucket mode at τ ≠ 1 is left out: with k = V its tail is the rounding residue of
# 1 − Σ p, which tempering magnifies; the rule itself is checked on k < V below.
@pytest.mark.parametrize("tail, temperature", [("bucket", 1.0), ("renormalize", 1.0), ("renormalize", 3.0)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_equals_dense_when_every_id_is_cached(divergence, tail, temperature):
    g = torch.Generator().manual_seed(1)
    n, v = 6, 17
    student = torch.randn(n, v, generator=g, dtype=f64, requires_grad=True)
    teacher = (3 * torch.randn(n, v, generator=g, dtype=f64)).log_softmax(-1)
    ids = random_permutations(n, v, g)
    config = LossConfig(divergence=divergence, tail=tail, temperature=temperature)
    sparse = sparse_divergence(student.log_softmax(-1), ids, teacher.gather(-1, ids), config)
    dense = dense_divergence(student.log_softmax(-1), teacher, config)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad(sparse, student), grad(dense, student), rtol=1e-9, atol=1e-12)


# V = 5, k = 2: teacher p over the vocabulary, cached ids [2, 0] in row 0 and [1, 4] in row 1.
TEACHER = torch.tensor([[0.4, 0.1, 0.3, 0.15, 0.05], [0.2, 0.5, 0.1, 0.05, 0.15]], dtype=f64)
IDS = torch.tensor([[2, 0], [1, 4]])
TEACHER_BUCKETS = torch.tensor([[0.3, 0.4, 0.3], [0.5, 0.15, 0.35]], dtype=f64)  # by hand


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tail_bucket_on_hand_made_distributions(divergence, temperature):
    student = torch.randn(2, 5, generator=torch.Generator().manual_seed(2), dtype=f64, requires_grad=True)
    config = LossConfig(divergence=divergence, temperature=temperature)
    ours = sparse_divergence(student.log_softmax(-1), IDS, TEACHER.log().gather(-1, IDS), config)
    expected = reference(TEACHER_BUCKETS, collapse(student.softmax(-1), IDS), config)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad(ours, student), grad(expected, student))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_renormalize_restricts_both_sides_to_the_cached_ids(divergence, temperature):
    student = torch.randn(2, 5, generator=torch.Generator().manual_seed(3), dtype=f64, requires_grad=True)
    config = LossConfig(divergence=divergence, temperature=temperature, tail="renormalize")
    ours = sparse_divergence(student.log_softmax(-1), IDS, TEACHER.log().gather(-1, IDS), config)
    expected = reference(TEACHER.gather(-1, IDS), student.softmax(-1).gather(-1, IDS), config)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad(ours, student), grad(expected, student))


def empty_tail_case(seed):
    """A teacher whose two cached ids hold all its mass (0.75 + 0.25 is exactly 1), a random student."""
    teacher = torch.tensor([[0.75, 0.25]], dtype=f64).log()
    ids = torch.tensor([[3, 1]])
    student = torch.randn(1, 5, generator=torch.Generator().manual_seed(seed), dtype=f64, requires_grad=True)
    return teacher, ids, student


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_kl"])
def test_empty_teacher_tail(divergence, temperature):
    teacher, ids, student = empty_tail_case(4)
    config = LossConfig(divergence=divergence, temperature=temperature)
    ours = sparse_divergence(student.log_softmax(-1), ids, teacher, config)
    buckets = torch.tensor([[0.75, 0.25, 0.0]], dtype=f64)
    expected = reference(buckets, collapse(student.softmax(-1), ids), config)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad(ours, student), grad(expected, student))


def test_empty_teacher_tail_under_reverse_kl_is_large_but_finite():
    teacher, ids, student = empty_tail_case(4)
    config = LossConfig(divergence="reverse_kl")
    ours = sparse_divergence(student.log_softmax(-1), ids, teacher, config)
    # Against a zero teacher tail reverse KL is infinite; log 0 is stood in for by log(tiny).
    buckets = torch.tensor([[0.75, 0.25, torch.finfo(f64).tiny]], dtype=f64)
    expected = reference(buckets, collapse(student.softmax(-1), ids), config)
    torch.testing.assert_close(ours, expected)
    assert grad(ours, student).isfinite().all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float16_teacher_whose_top_k_sums_above_one(divergence, tail):
    # A confident teacher: tail mass 1e-6, below float16's resolution of the top-k log-probs.
    probs = torch.tensor([[0.6, 0.2, 0.2 - 1e-6, 0.5e-6, 0.5e-6]], dtype=f64)
    ids = torch.tensor([[0, 1, 2]])
    rounded = probs.log().gather(-1, ids).half()
    assert rounded.double().exp().sum() > 1  # the case under test
    student = torch.randn(1, 5, generator=torch.Generator().manual_seed(5), requires_grad=True)
    config = LossConfig(divergence=divergence, tail=tail)
    ours = sparse_divergence(student.log_softmax(-1), ids, rounded, config)
    assert ours.isfinite().all() and grad(ours, student).isfinite().all()
    if divergence != "reverse_kl":  # reverse KL punishes the (clamped) empty teacher tail hard
        exact = sparse_divergence(student.double().log_softmax(-1), ids, probs.log().gather(-1, ids), config)
        torch.testing.assert_close(ours.double(), exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_very_peaked_student_keeps_its_tail_in_float32(divergence):
    # q puts all but ~e^-150 of its mass on id 0: 1 − Σ_k q is 0 in float32, the tail is not.
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 40, generator=g, dtype=f64)
    logits[:, 0] += 150
    teacher = torch.randn(3, 40, generator=g, dtype=f64).softmax(-1)
    ids = teacher.topk(4, -1).indices
    config = LossConfig(divergence=divergence)
    student = logits.float().requires_grad_()
    ours = sparse_divergence(student.log_softmax(-1), ids, teacher.log().gather(-1, ids).float(), config)
    exact = logits.clone().requires_grad_()
    expected = reference(collapse(teacher, ids), collapse(exact.softmax(-1), ids), config)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(ours, student).double(), grad(expected, exact), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_tails_either_side_of_the_exact_summation_threshold(divergence):
    # Rows whose student tail is just above EXACT_TAIL_BELOW take log(1 − Σ_k q), rows just
    # below it the exact tail sum: both must agree with float64 (0.01% expected; asserted to 0.1%).
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 200, generator=g, dtype=f64)
    ids = torch.stack([torch.randperm(200, generator=g)[:8] for _ in range(6)])
    for row, log_tail in enumerate([-5.5, -6.5, -6.8, -7.0, -7.5, -9.0]):  # threshold log(1e-3) ≈ -6.91
        tail_ids = torch.ones(200, dtype=torch.bool)
        tail_ids[ids[row]] = False
        cached, rest = logits[row, ~tail_ids].logsumexp(-1), logits[row, tail_ids].logsumexp(-1)
        t = math.exp(log_tail)
        logits[row, tail_ids] += math.log(t / (1 - t)) + cached - rest  # now the tail holds mass t
    student_tail = lambda lg: collapse(lg.softmax(-1), ids)[:, -1].log()  # noqa: E731
    assert any(t > EXACT_TAIL_BELOW for t in student_tail(logits)) and any(t < EXACT_TAIL_BELOW for t in student_tail(logits))
    teacher = torch.randn(6, 200, generator=g, dtype=f64).softmax(-1)
    config = LossConfig(divergence=divergence)
    student = logits.float().requires_grad_()
    ours = sparse_divergence(student.log_softmax(-1), ids, teacher.log().gather(-1, ids).float(), config)
    exact = logits.clone().requires_grad_()
    expected = reference(collapse(teacher, ids), collapse(exact.softmax(-1), ids), config)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grad(ours, student).double(), grad(expected, exact), rtol=1e-3, atol=1e-6)


# distillation_loss: a tiny linear LM head over N response tokens.
N, H, V = 10, 8, 13


def tiny_student(seed):
    g = torch.Generator().manual_seed(seed)
    lm_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, H, generator=g))
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    targets = torch.randint(V, (N,), generator=g)
    return hidden, lm_head, targets, g


def project(lm_head):
    """The student's head as distillation_loss takes it: hidden states -> log-probs."""
    return lambda hidden: torch.log_softmax(lm_head(hidden), -1)


def sparse_teacher(m, k, g):
    logprobs = (2 * torch.randn(m, N, V, generator=g)).log_softmax(-1)
    top = logprobs.topk(k, -1)
    return top.indices, top.values.half()


def grads(sums, hidden, lm_head, alpha=0.5):
    return torch.autograd.grad(sums.total(alpha, N), [hidden, lm_head.weight])


def test_chunked_equals_unchunked():
    hidden, lm_head, targets, g = tiny_student(0)
    ids, logprobs = sparse_teacher(2, 4, g)
    whole = distillation_loss(hidden, project(lm_head), targets, TopK(ids, logprobs), LossConfig(chunk_tokens=N))
    chunked = distillation_loss(hidden, project(lm_head), targets, TopK(ids, logprobs), LossConfig(chunk_tokens=3))
    assert whole.tokens == chunked.tokens == N
    torch.testing.assert_close(chunked.ce, whole.ce)
    torch.testing.assert_close(chunked.kd, whole.kd)
    for a, b in zip(grads(chunked, hidden, lm_head), grads(whole, hidden, lm_head)):
        torch.testing.assert_close(a, b)


def test_teacher_samples_are_averaged():
    hidden, lm_head, targets, g = tiny_student(1)
    ids, logprobs = sparse_teacher(3, 5, g)
    config = LossConfig(chunk_tokens=4)
    together = distillation_loss(hidden, project(lm_head), targets, TopK(ids, logprobs), config)
    apart = [
        distillation_loss(hidden, project(lm_head), targets, TopK(ids[m : m + 1], logprobs[m : m + 1]), config)
        for m in range(3)
    ]
    torch.testing.assert_close(together.kd, sum(s.kd for s in apart) / 3)
    torch.testing.assert_close(together.ce, apart[0].ce)
    together_grads = grads(together, hidden, lm_head, alpha=1.0)
    apart_grads = [grads(s, hidden, lm_head, alpha=1.0) for s in apart]
    for i, a in enumerate(together_grads):
        torch.testing.assert_close(a, sum(b[i] for b in apart_grads) / 3)


def test_alpha_zero_is_cross_entropy():
    hidden, lm_head, targets, g = tiny_student(2)
    ids, logprobs = sparse_teacher(2, 3, g)
    sums = distillation_loss(hidden, project(lm_head), targets, TopK(ids, logprobs),
                             LossConfig(alpha=0.0, chunk_tokens=4))
    expected = F.cross_entropy(lm_head(hidden), targets, reduction="sum")
    torch.testing.assert_close(sums.ce, expected)
    torch.testing.assert_close(sums.total(0.0, 1), expected)
    assert sums.kd > 0
    sft = distillation_loss(hidden, project(lm_head), targets, NoTeacher(), LossConfig())
    torch.testing.assert_close(sft.ce, expected)
    assert sft.kd == 0


def test_total_weighs_and_normalises():
    sums = LossSums(ce=torch.tensor(2.0), kd=torch.tensor(4.0), tokens=7)
    assert sums.total(0.25, 2) == (0.75 * 2.0 + 0.25 * 4.0) / 2


def test_forward_kl_over_samples_has_the_gradient_of_kl_to_their_mean():
    hidden, lm_head, targets, g = tiny_student(3)
    teacher = (2 * torch.randn(4, N, V, generator=g, dtype=f64)).log_softmax(-1)
    ids = torch.stack([random_permutations(N, V, g) for _ in range(4)])
    hidden, lm_head = hidden.double(), lm_head.double()
    config = LossConfig(alpha=1.0, chunk_tokens=4)
    samples = distillation_loss(hidden, project(lm_head), targets, TopK(ids, teacher.gather(-1, ids)), config)
    mean = distillation_loss(hidden, project(lm_head), targets, Dense(teacher.exp().mean(0).log()[None]), config)
    for a, b in zip(grads(samples, hidden, lm_head, alpha=1.0), grads(mean, hidden, lm_head, alpha=1.0)):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(samples.kd, mean.kd)  # equal gradients, different values (entropies)


def test_dense_teacher_equals_sparse_teacher_with_every_id():
    hidden, lm_head, targets, g = tiny_student(4)
    teacher = (2 * torch.randn(2, N, V, generator=g)).log_softmax(-1)
    ids = torch.stack([random_permutations(N, V, g) for _ in range(2)])
    config = LossConfig(divergence="reverse_kl", chunk_tokens=6)
    dense = distillation_loss(hidden, project(lm_head), targets, Dense(teacher), config)
    sparse = distillation_loss(hidden, project(lm_head), targets, TopK(ids, teacher.gather(-1, ids)), config)
    torch.testing.assert_close(dense.kd, sparse.kd)
    for a, b in zip(grads(dense, hidden, lm_head), grads(sparse, hidden, lm_head)):
        torch.testing.assert_close(a, b)


def test_no_tokens_still_reaches_the_parameters():
    _, lm_head, _, g = tiny_student(5)
    hidden = torch.zeros(0, H, requires_grad=True)
    ids, logprobs = torch.zeros(1, 0, 3, dtype=torch.long), torch.zeros(1, 0, 3)
    sums = distillation_loss(hidden, project(lm_head), torch.zeros(0, dtype=torch.long), TopK(ids, logprobs),
                             LossConfig())
    assert sums.tokens == 0 and sums.ce == 0 and sums.kd == 0
    (weight_grad,) = torch.autograd.grad(sums.total(0.5, 1), [lm_head.weight])
    assert torch.equal(weight_grad, torch.zeros_like(weight_grad))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_a_whole_vocabulary_cache_gives_trls_generalized_jsd(beta, monkeypatch):
    """GKD's loss as TRL computes it (`GKDTrainer.generalized_jsd_loss`: β = 0 forward KL, β = 1 reverse KL,
    between the mixture's two KLs otherwise; mean over the unmasked tokens) equals ours from a top-k cache
    holding every id, masked tokens left out of the batch as the train stage leaves out prompt tokens."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(6)
    hidden, lm_head, targets, _ = tiny_student(6)
    teacher_logits = 2 * torch.randn(N, V, generator=g)
    labels = torch.where(torch.rand(N, generator=g) < 0.3, -100, targets)  # prompt tokens: -100
    trl = GKDTrainer.generalized_jsd_loss(lm_head(hidden)[None], teacher_logits[None], labels[None], beta=beta)
    kept = labels != -100
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    config = LossConfig(alpha=1.0, divergence=divergence, beta=beta if divergence == "jsd" else 0.5)
    teacher = teacher_logits[kept].log_softmax(-1)
    ids = random_permutations(int(kept.sum()), V, g)
    cache = TopK(ids[None], teacher.gather(-1, ids)[None])
    ours = distillation_loss(hidden[kept], project(lm_head), targets[kept], cache, config)
    torch.testing.assert_close(ours.kd / ours.tokens, trl, rtol=1e-5, atol=1e-6)
    trl_grad, = torch.autograd.grad(trl, hidden)
    ours_grad, = torch.autograd.grad(ours.kd / ours.tokens, hidden)
    torch.testing.assert_close(ours_grad, trl_grad, rtol=1e-4, atol=1e-6)
