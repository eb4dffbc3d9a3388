"""Routing hooks on real tiny MoE teachers of every supported family."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import fixtures
from pipeline.core.config import from_dict
from pipeline.core.errors import MoekdError
from pipeline.teacher.families import find_routers
from pipeline.teacher.routing import RoutingConfig, RoutingHooks, load_balancing_loss

FAMILIES = fixtures.FAMILIES
NUM_EXPERTS, TOP_K = 4, 2  # every fixture family


def load(moe_dir, family, **overrides):
    return AutoModelForCausalLM.from_pretrained(moe_dir(family), **overrides).eval()


def reload_with_k(moe_dir, family, k):
    """The same weights with the config's experts-per-token set to k (no DeepSeek group limit)."""
    model = load(moe_dir, family)
    groups = {"topk_group": model.config.n_group} if family == "deepseek_v3" else {}
    return load(moe_dir, family, num_experts_per_tok=k, **groups)


@contextlib.contextmanager
def experts_inputs(model):
    """Capture, per forward and MoE layer, the (indices, weights) each experts module receives."""
    calls = []

    def grab(module, args, kwargs):
        calls.append((args[1].detach().clone(), args[2].detach().clone()))

    handles = [
        m.register_forward_pre_hook(grab, with_kwargs=True)
        for name, m in model.named_modules()
        if name.endswith("mlp.experts")
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def routed_sets(indices, weights):
    """(N, E) bool: the experts each token actually uses (weight > 0)."""
    used = torch.zeros(indices.shape[0], NUM_EXPERTS).scatter_add_(1, indices, (weights.float() > 0).float())
    return used > 0


def ordered_draw_probabilities(probs: torch.Tensor, k: int) -> dict[tuple, torch.Tensor]:
    """P(first k draws without replacement are exactly this ordered tuple), per token, by enumeration."""
    result = {}
    for draw in itertools.permutations(range(probs.shape[1]), k):
        p = torch.ones(probs.shape[0], dtype=torch.float64)
        left = torch.ones_like(p)
        for e in draw:
            p = p * probs[:, e] / left
            left = left - probs[:, e]
        result[draw] = p
    return result


def inclusion_probabilities(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(N, E): probability each expert is among k drawn without replacement."""
    incl = torch.zeros_like(probs)
    for draw, p in ordered_draw_probabilities(probs, k).items():
        incl[:, list(draw)] += p[:, None]
    return incl


@pytest.mark.parametrize("family", FAMILIES)
def test_ka_without_sampling_is_exactly_the_model(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    ids, mask = encode(texts[:4])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        config = RoutingConfig(mode="ka", lam=0.0, samples=1, k_s=TOP_K)
        with RoutingHooks(model, config) as routing, routing.sequences([0, 1, 2, 3], 0, mask):
            got = model(input_ids=ids, attention_mask=mask).logits
        unhooked = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert torch.equal(unhooked, expected)  # the hooks are gone after the context


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_equals_model_with_k_equal_e(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    ids, mask = encode(texts[:4])
    with torch.no_grad():
        with RoutingHooks(model, RoutingConfig(mode="all")), experts_inputs(model) as calls:
            got = model(input_ids=ids, attention_mask=mask).logits
        expected = reload_with_k(moe_dir, family, NUM_EXPERTS)(input_ids=ids, attention_mask=mask).logits
        topk = model(input_ids=ids, attention_mask=mask).logits
    assert all(routed_sets(i, w).all() for i, w in calls)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, topk, atol=1e-3)  # all experts really changed the output


@pytest.mark.parametrize("family", FAMILIES)
def test_ka_with_other_k_uses_the_families_top_k(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    ids, mask = encode(texts[:4])
    with torch.no_grad():
        with RoutingHooks(model, RoutingConfig(mode="ka", lam=0.0, k_s=3)) as routing:
            with routing.sequences([0, 1, 2, 3], 0, mask):
                got = model(input_ids=ids, attention_mask=mask).logits
        expected = reload_with_k(moe_dir, family, 3)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_top_p_keeps_the_fewest_experts_reaching_p(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    normalised = family in ("mixtral", "gpt_oss") or model.config.norm_topk_prob
    scale = getattr(model.config, "routed_scaling_factor", 1.0)
    ids, mask = encode(texts[:4])
    real = mask.reshape(-1).bool()
    counts = {}
    for p in (1.0, 0.6, 1e-6):
        with torch.no_grad(), RoutingHooks(model, RoutingConfig(mode="top_p", top_p=p)) as routing:
            routing.record_logits = True
            with experts_inputs(model) as calls:
                model(input_ids=ids, attention_mask=mask)
        counts[p] = []
        for (indices, weights), logits in zip(calls, routing.router_logits):
            routed = routed_sets(indices, weights)[real]
            probs = F.softmax(logits.double(), dim=-1)[real]
            count = routed.sum(-1)
            sorted_probs = probs.sort(dim=-1, descending=True).values
            mass = (probs * routed).sum(-1)  # the routed experts are the most probable ones
            assert torch.allclose(mass, sorted_probs.cumsum(-1).gather(1, (count - 1)[:, None]).squeeze(1))
            assert (mass >= p - 1e-6).all()
            mass_without_last = mass - sorted_probs.gather(1, (count - 1)[:, None]).squeeze(1)
            assert (mass_without_last < p + 1e-6).all()
            # The family rule over the chosen set only: padding slots carry no weight.
            total = weights[real].double().sum(-1)
            expected_total = scale * (torch.ones_like(mass) if normalised else mass)
            torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=1e-6)
            counts[p].append(count)
    assert all((c == NUM_EXPERTS).all() for c in counts[1.0])
    assert all((c == 1).all() for c in counts[1e-6])
    assert any(((c > 1) & (c < NUM_EXPERTS)).any() for c in counts[0.6])  # variable width really occurs


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_top_p_padding_is_safe_for_every_experts_implementation(moe_dir, encode, texts, family):
    ids, mask = encode(texts[:4])
    outputs = []
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        model = load(moe_dir, family, experts_implementation=implementation)
        with torch.no_grad(), RoutingHooks(model, RoutingConfig(mode="top_p", top_p=0.6)):
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-5, atol=1e-5)


def run_ka(model, config, ids, mask, seq_ids, samples):
    """Per sample: captured experts inputs and recorded router logits of one forward."""
    runs = []
    with torch.no_grad(), RoutingHooks(model, config) as routing:
        routing.record_logits = True
        for sample in samples:
            with routing.sequences(seq_ids, sample, mask), experts_inputs(model) as calls:
                logits = model(input_ids=ids, attention_mask=mask).logits
            runs.append((calls, routing.router_logits, logits))
    return runs


def flat_router_model(moe_dir, family):
    """The fixture teacher with routers scaled down: flatter softmaxes make sampling visible."""
    model = load(moe_dir, family)
    with torch.no_grad():
        for router in find_routers(model):
            router.module.weight.mul_(0.2)
    return model


def test_ka_draws_without_replacement_from_the_router_softmax(moe_dir, encode, texts):
    """λ=1: each expert is chosen with its exact inclusion probability (per-expert z test)."""
    model = flat_router_model(moe_dir, "mixtral")
    ids, mask = encode(texts[:24])
    real = mask.reshape(-1).bool()
    runs = run_ka(model, RoutingConfig(mode="ka", lam=1.0, samples=16, seed=11), ids, mask, list(range(24)), range(16))
    observed = torch.zeros(2, NUM_EXPERTS, dtype=torch.float64)
    expected, variance, naive = torch.zeros_like(observed), torch.zeros_like(observed), torch.zeros_like(observed)
    for calls, router_logits, _ in runs:
        for layer, ((indices, weights), logits) in enumerate(zip(calls, router_logits)):
            probs = F.softmax(logits.double(), dim=-1)[real]
            incl = inclusion_probabilities(probs, TOP_K)
            observed[layer] += routed_sets(indices, weights)[real].sum(0)
            expected[layer] += incl.sum(0)
            variance[layer] += (incl * (1 - incl)).sum(0)
            naive[layer] += (TOP_K * probs).clamp(max=1).sum(0)  # independent inclusions: a plausible mistake
    assert observed.sum() == TOP_K * real.sum() * len(runs) * 2
    z = (observed - expected) / variance.sqrt()
    assert z.abs().max() < 4.0, z  # 8 tests: two-sided α ≈ 5e-4
    assert ((observed - naive) / variance.sqrt()).abs().max() > 8.0  # the test has the power to tell


def test_ka_samples_a_fraction_lam_of_tokens(moe_dir, encode, texts):
    """0 < λ < 1: a token leaves its top-k set with probability λ · P(draw ≠ top-k set)."""
    model = flat_router_model(moe_dir, "qwen3_moe")
    ids, mask = encode(texts[:24])
    real = mask.reshape(-1).bool()
    runs = run_ka(model, RoutingConfig(mode="ka", lam=0.3, samples=12, seed=5), ids, mask, list(range(24)), range(12))
    changed, p_change = 0, []
    for calls, router_logits, _ in runs:
        for (indices, weights), logits in zip(calls, router_logits):
            probs = F.softmax(logits.double(), dim=-1)[real]
            top_set = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(TOP_K, dim=-1).indices, True)
            changed += (routed_sets(indices, weights)[real] != top_set).any(-1).sum().item()
            draws = ordered_draw_probabilities(probs, TOP_K)
            p_change.append(1 - sum(p * top_set[:, list(draw)].all(-1) for draw, p in draws.items()))
    p_change = torch.cat(p_change)

    def z(lam):
        q = lam * p_change
        return (changed - q.sum().item()) / math.sqrt((q * (1 - q)).sum().item())

    assert abs(z(0.3)) < 4.0, z(0.3)
    assert abs(z(0.25)) > 4.0 and abs(z(0.35)) > 4.0  # the bound is tight enough to notice ±0.05


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_ka_routing_depends_only_on_seed_sequence_and_sample(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    config = RoutingConfig(mode="ka", lam=0.5, samples=2, seed=7)
    short, long = sorted(texts[:8], key=len)[0], sorted(texts[:8], key=len)[-1]
    alone_ids, alone_mask = encode([short])
    ids, mask = encode([long, short])  # the short sequence is row 1, right-padded
    n = int(alone_mask.sum())
    alone = run_ka(model, config, alone_ids, alone_mask, [5], [0, 1])
    batched = run_ka(model, config, ids, mask, [9, 5], [0])[0]
    length = ids.shape[1]
    for (indices, weights), (b_indices, b_weights) in zip(alone[0][0], batched[0]):
        assert torch.equal(indices, b_indices[length : length + n])
        torch.testing.assert_close(weights, b_weights[length : length + n])
    torch.testing.assert_close(alone[0][2][0], batched[2][1, :n], rtol=1e-5, atol=1e-5)
    sample_0 = [routed_sets(i, w) for i, w in alone[0][0]]
    sample_1 = [routed_sets(i, w) for i, w in alone[1][0]]
    assert any(not torch.equal(a, b) for a, b in zip(sample_0, sample_1))


def test_dense_model_is_refused(student_dir):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    with pytest.raises(MoekdError, match="'llama' is a dense model; KA/SAR need an MoE teacher"):
        find_routers(student)
    with pytest.raises(MoekdError, match="dense model"):
        RoutingHooks(student, RoutingConfig(mode="ka"))
    with RoutingHooks(student, RoutingConfig(mode="topk")) as plain:  # plain top-k caching needs no routers
        assert plain.routers == []


def test_unsupported_moe_family_is_refused_with_its_reason():
    doge = AutoConfig.for_model(
        "doge", vocab_size=fixtures.VOCAB_SIZE, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, is_moe=True, num_experts=16, num_experts_per_tok=2,
    )
    with pytest.raises(MoekdError, match="'doge' is an MoE family moekd does not support: routing is computed "
                                         "inside the MoE block"):
        find_routers(AutoModelForCausalLM.from_config(doge))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(mode="random"), "mode must be one of"),
        (dict(samples=0), "routing.samples"),
        (dict(mode="topk", samples=4), "routing.samples=4 needs routing.mode=ka"),
        (dict(mode="ka", lam=1.5), "routing.lam"),
        (dict(mode="ka", k_s=0), "routing.k_s"),
        (dict(mode="all", k_s=2), "routing.k_s=2 needs routing.mode=ka"),
        (dict(mode="top_p", top_p=0.0), "routing.top_p"),
    ],
)
def test_routing_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        RoutingConfig(**bad)
    with pytest.raises(MoekdError, match=message):  # as a user's config file would give it
        from_dict(RoutingConfig, bad)


def test_k_s_above_the_expert_count_is_refused(moe_dir):
    with pytest.raises(MoekdError, match=r"routing.k_s=5 exceeds the 4 experts of model.layers.0.mlp.gate"):
        RoutingHooks(load(moe_dir, "mixtral"), RoutingConfig(mode="ka", k_s=5))


def test_ka_forward_outside_sequences_is_an_error(moe_dir, encode, texts):
    model = load(moe_dir, "olmoe")
    ids, mask = encode(texts[:2])
    with RoutingHooks(model, RoutingConfig(mode="ka")), pytest.raises(RuntimeError, match="sequences"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_mode_trains_every_router(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    ids, mask = encode(texts[:3])
    with RoutingHooks(model, RoutingConfig(mode="all")) as routing:
        routing.record_logits = True
        logits = model(input_ids=ids, attention_mask=mask).logits
        routers = routing.routers
    assert len(routing.router_logits) == len(routers) == model.config.num_hidden_layers
    for router_logits in routing.router_logits:
        assert router_logits.shape == (ids.numel(), NUM_EXPERTS) and router_logits.requires_grad
    # The language-model loss reaches the routers only through the hooks' mixing weights.
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for router in routers:
        for name, param in router.module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{router.name}.{name}"


def test_expert_load_counts_real_tokens_only(moe_dir, encode, texts):
    model = load(moe_dir, "qwen2_moe")
    ids, mask = encode(texts[:4])
    real = mask.reshape(-1).bool()
    with torch.no_grad(), RoutingHooks(model, RoutingConfig()) as routing, experts_inputs(model) as calls:
        with routing.sequences([0, 1, 2, 3], 0, mask):
            model(input_ids=ids, attention_mask=mask)
        loads = routing.expert_load()
    expected = torch.stack([routed_sets(i, w)[real].double().mean(0) for i, w in calls]).float()
    torch.testing.assert_close(loads, expected)
    torch.testing.assert_close(loads.sum(-1), torch.full((2,), float(TOP_K)))
    assert not real.all()  # the batch really has padding


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_drop_leaves_one_expert_out_and_the_next_best_takes_its_place(moe_dir, encode, texts, family):
    model = load(moe_dir, family)
    ids, mask = encode(texts[:4])
    with torch.no_grad(), RoutingHooks(model, RoutingConfig()) as own:
        own.record_logits = True
        with own.sequences([0, 1, 2, 3], 0, mask):
            reference = model(input_ids=ids, attention_mask=mask).logits
        chosen = [c.clone() for c in own.chosen]
    with torch.no_grad(), RoutingHooks(model, RoutingConfig(), drop=1) as dropped:
        with dropped.sequences([0, 1, 2, 3], 0, mask):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loads = dropped.expert_load()
    assert (loads[:, 1] == 0).all() and torch.allclose(loads.sum(-1), torch.full((len(loads),), float(TOP_K)))
    assert not torch.allclose(logits, reference)
    # Tokens that never chose expert 1 keep their routing, so the first layer's choice changes only where it did
    # (DeepSeek-V3's expert groups are not applied to a re-choice, as for KA's: every token may change there).
    first = chosen[0]
    untouched = ~(first == 1).any(-1)
    same = dropped.chosen[0][untouched].sort(-1).values == first[untouched].sort(-1).values
    assert untouched.any() and (same.all() or family == "deepseek_v3")
    with pytest.raises(ValueError, match="drop leaves an expert out"):
        RoutingHooks(model, RoutingConfig(mode="all"), drop=1)
    with pytest.raises(MoekdError, match="drop=9 is not an expert"):
        RoutingHooks(model, RoutingConfig(), drop=9)


def test_load_balancing_loss_by_hand():
    layer_0 = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [5.0, 5.0, 5.0]])
    layer_1 = torch.tensor([[0.0, 0.5, 0.2], [1.0, -2.0, 0.0], [0.1, 0.0, 0.3]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    # By hand, top_k=2, real tokens only: chosen sets {0,1}, {2,1}, {1,2}, {0,2};
    # f = (1/4)·(2, 3, 3) ; P = mean softmax over those four rows.
    rows = [layer_0[0], layer_0[1], layer_1[0], layer_1[1]]
    probs = [[math.exp(x) / sum(math.exp(y) for y in row.tolist()) for x in row.tolist()] for row in rows]
    f = [2 / 4, 3 / 4, 3 / 4]
    p_mean = [sum(p[e] for p in probs) / 4 for e in range(3)]
    by_hand = 3 * sum(f[e] * p_mean[e] for e in range(3))
    got = load_balancing_loss([layer_0, layer_1], top_k=2, attention_mask=mask)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    reference = load_balancing_loss_func((layer_0, layer_1), 3, 2, mask)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    unmasked = load_balancing_loss_func((layer_0, layer_1), 3, 2, None)
    assert load_balancing_loss([layer_0, layer_1], 2, None).item() == pytest.approx(unmasked.item(), rel=1e-6)
