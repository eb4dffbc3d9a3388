"""Conformance of every MoE family in `families.RULES`, on a tiny random model of each built here.

Per family: stage one's hidden states to logits give the model's logits; KA with λ = 0 (M = 1) is bit-identical to the unhooked model; `all` equals the model with
k = E (and no group limit); KA with λ = 1 picks each expert with its inclusion probability under
sampling k without replacement from softmax(router logits); SAR's router step changes the router
parameters and nothing else.
"""

from __future__ import annotations

import contextlib
from functools import partial

import family_configs
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import fixtures
from pipeline.core.errors import MoekdError
from pipeline.models.loading import causal_lm_class
from pipeline.models.logprobs import target_hidden, vocab_logits
from pipeline.student.sar import train_routers_only
from pipeline.teacher.families import RULES, UNSUPPORTED, families_table, family_weights, find_routers, routing_of
from pipeline.teacher.routing import RoutingConfig, RoutingHooks
from test_routing import inclusion_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def build(family: str, settings: dict, state: dict | None = None):
    """A tiny random model of `family` (seeded; routers and selection biases given real spread), or
    with `state`'s weights."""
    model = untouched(family, settings)
    if state is not None:
        model.load_state_dict(state)
        return model
    routers = find_routers(model)
    with torch.no_grad():
        for weight in router_weights(routers):
            torch.nn.init.normal_(weight, std=1.0)
        # choose with the bias, weigh without: the rule must tell them apart (the bias is the router's or its
        # MoE block's)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                torch.nn.init.normal_(tensor, std=0.3)
    return model


def untouched(family: str, settings: dict):
    """A tiny random model of `family` as transformers initialises it (seeded)."""
    config = AutoConfig.for_model(family, vocab_size=fixtures.VOCAB_SIZE, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **settings)
    torch.manual_seed(0)
    cls = causal_lm_class(config)
    return (cls.from_config(config) if cls is AutoModelForCausalLM else cls(config)).float().eval()


@contextlib.contextmanager
def routed(routers):
    """Per forward and MoE layer, the (N, E) experts each token is routed to, as the hooks left them."""
    calls = [None] * len(routers)  # in the routers' order, which need not be the order they run in

    def grab(layer, module, inputs, output):
        router = routers[layer]
        if router.rule.outputs == "dense":  # every expert it weighs
            calls[layer] = output[0] > 0
            return
        _, weights, indices = routing_of(router, output)
        if router.rule.skip_class:  # the no-op class reaches the experts as index 0 at weight 0, after any real 0
            zero = indices == 0
            skip = zero & (weights == 0) & ((zero.cumsum(1) > 1) | (indices.shape[1] == 1))
            indices = indices.masked_fill(skip, router.num_experts - 1)
        calls[layer] = torch.zeros(indices.shape[0], router.num_experts, dtype=torch.bool).scatter_(1, indices, True)

    def grab_experts_inputs(layer, module, args):  # outputs="logits": the MoE block's call of its experts
        grab(layer, module, None, (None, args[2], args[1]))

    # Registered after RoutingHooks' own hooks, so it sees the rewritten routing.
    handles = [r.block.experts.register_forward_pre_hook(partial(grab_experts_inputs, layer))
               if r.rule.outputs == "logits" else r.module.register_forward_hook(partial(grab, layer))
               for layer, r in enumerate(routers)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def with_every_expert(family: str, model, num_experts: int):
    """`model` with k = E (its weights; no group limit)."""
    if family not in family_configs.ONLY_ITS_K:
        return build(family, family_configs.with_k(family, num_experts), model.state_dict())
    reference = build(family, family_configs.CONFIGS[family], model.state_dict())
    for router in find_routers(reference):
        router.module.top_k = num_experts
    return reference


def router_weights(routers):
    return [p for r in routers for name, p in r.module.named_parameters() if name.endswith("weight")]


def test_every_family_has_a_tiny_config_and_is_either_supported_or_refused():
    assert set(family_configs.CONFIGS) == set(RULES)
    assert not set(RULES) & set(UNSUPPORTED)


@pytest.mark.parametrize("family", sorted(RULES))
def test_family_conformance(family, encode, texts):
    model = build(family, family_configs.CONFIGS[family])
    routers = find_routers(model)
    num_experts, top_k = routers[0].num_experts, routers[0].top_k
    assert top_k == (1 if family == "zaya" else 2) and len({(r.num_experts, r.top_k) for r in routers}) == 1
    ids, mask = encode(texts[:4])
    forward = lambda m: m(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    with torch.no_grad():
        expected = forward(model)
        # Stage one's path from the decoder's hidden states to logits gives the model's own logits.
        rows, cols = mask.nonzero(as_tuple=True)
        captured = vocab_logits(model, target_hidden(model, ids, mask, rows, cols))
        torch.testing.assert_close(captured, expected[rows, cols], rtol=1e-5, atol=1e-5)
        with RoutingHooks(model, RoutingConfig(mode="ka", lam=0.0)) as routing, routing.sequences(
                [0, 1, 2, 3], 0, mask):
            assert torch.equal(forward(model), expected)
        if routers[0].rule.fixed_k is not None:
            with pytest.raises(MoekdError, match=f"takes exactly its {top_k} experts per token"):
                RoutingHooks(model, RoutingConfig(mode="all"))
        else:
            with RoutingHooks(model, RoutingConfig(mode="all")), routed(routers) as calls:
                every = forward(model)
            torch.testing.assert_close(every, forward(with_every_expert(family, model, num_experts)),
                                       rtol=1e-5, atol=1e-5)
            assert all(used.all() for used in calls)
            assert not torch.allclose(every, expected, atol=1e-4)

    # KA, λ = 1, flatter routers so that every expert is drawn: inclusion frequencies per expert.
    with torch.no_grad():
        for weight in router_weights(routers):
            weight.mul_(0.2)
    ids, mask = encode(texts[:16])
    real = mask.reshape(-1).bool()
    observed = torch.zeros(len(routers), num_experts, dtype=torch.float64)
    expected_counts, variance = torch.zeros_like(observed), torch.zeros_like(observed)
    with torch.no_grad(), RoutingHooks(model, RoutingConfig(mode="ka", lam=1.0, samples=4, seed=3)) as routing:
        routing.record_logits = True
        for sample in range(4):
            with routing.sequences(list(range(16)), sample, mask), routed(routers) as calls:
                model(input_ids=ids, attention_mask=mask)
            assert all(used is not None for used in calls) and all(x is not None for x in routing.router_logits)
            for layer, (used, logits) in enumerate(zip(calls, routing.router_logits)):
                incl = inclusion_probabilities(F.softmax(logits.double(), dim=-1)[real], top_k)
                observed[layer] += used[real].sum(0)
                expected_counts[layer] += incl.sum(0)
                variance[layer] += (incl * (1 - incl)).sum(0)
    z = (observed - expected_counts) / variance.sqrt()
    assert z.abs().max() < 5.0, z  # ≈ 600 tests over all families: two-sided α ≈ 6e-7 each

    # SAR's router step: only the routers' parameters move, and all of them.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = train_routers_only(model, routers)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    with RoutingHooks(model, RoutingConfig(mode="topk" if routers[0].rule.fixed_k else "all")):
        logits = model(input_ids=ids, attention_mask=mask).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach().float(), before[name])}
    assert changed == set(trainable)
    assert all(any(name.startswith(f"{r.name}.") for r in routers) for name in trainable)
    assert all(any(name.startswith(f"{r.name}.") for name in trainable) for r in routers)
    assert not any(name.endswith(("e_score_correction_bias", "expert_bias")) for name in trainable)  # frozen


def test_the_readme_lists_the_supported_families_as_the_table_says():
    readme = (fixtures.REPO / "README.md").read_text()
    assert families_table() in readme
    assert f"{len(RULES)} model types" in readme and f"The other {len(UNSUPPORTED)} MoE model" in readme


def test_a_rule_that_holds_for_one_setting_refuses_the_others():
    settings = family_configs.CONFIGS["cohere2_moe"] | {"expert_selection_fn": "sigmoid"}
    config = AutoConfig.for_model("cohere2_moe", vocab_size=fixtures.VOCAB_SIZE, pad_token_id=0, **settings)
    with pytest.raises(MoekdError, match="expert_selection_fn='sigmoid' is not supported: moekd describes its "
                                         "routing with expert_selection_fn='softmax' only"):
        find_routers(AutoModelForCausalLM.from_config(config))


def test_deepseek_v4s_hash_routed_layers_keep_their_token_id_experts_in_every_mode(encode, texts):
    settings = family_configs.CONFIGS["deepseek_v4"] | {"mlp_layer_types": ["hash_moe", "moe"]}
    model = build("deepseek_v4", settings)
    hashed = model.model.layers[0].mlp.gate
    assert type(hashed).__name__ == "DeepseekV4HashRouter" and [r.name for r in find_routers(model)] == [
        "model.layers.1.mlp.gate"]
    with torch.no_grad():
        torch.nn.init.normal_(hashed.weight, std=1.0)
        hashed.tid2eid.copy_(torch.randint(0, 4, hashed.tid2eid.shape))
    ids, mask = encode(texts[:4])
    seen = []
    handle = hashed.register_forward_hook(lambda module, inputs, output: seen.append(output[1:]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        with RoutingHooks(model, RoutingConfig(mode="all")):
            model(input_ids=ids, attention_mask=mask)
        with RoutingHooks(model, RoutingConfig(mode="ka", lam=1.0)) as routing, routing.sequences(
                [0, 1, 2, 3], 0, mask):
            model(input_ids=ids, attention_mask=mask)
    handle.remove()
    (weights, indices), *others = seen
    assert all(torch.equal(weights, w) and torch.equal(indices, i) for w, i in others)
    assert torch.equal(indices, hashed.tid2eid[ids.reshape(-1)])


def test_a_family_that_takes_exactly_its_k_weighs_its_own_choice_as_it_does_and_refuses_another_k_s(encode, texts):
    # a wide jitter threshold, so that several experts share most tokens' weights
    model = build("phimoe", family_configs.CONFIGS["phimoe"] | {"router_jitter_noise": 0.5})
    routers = find_routers(model)
    outputs = []
    handles = [r.module.register_forward_hook(lambda module, inputs, output: outputs.append(output))
               for r in routers]
    ids, mask = encode(texts[:4])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    for router, (logits, weights, indices) in zip(routers, outputs, strict=True):
        # the sparsemixer's two picks: the best expert, then the best of the rest, each weighed within its
        # jitter threshold
        assert (weights < 0.99).float().mean() > 0.25
        torch.testing.assert_close(family_weights(router, logits, indices), weights, rtol=0, atol=0)
    with pytest.raises(MoekdError, match=r"'phimoe' takes exactly its 2 experts per token \(sparsemixer weighs "
                                         r"exactly two experts\): routing.mode=ka with k_s=3"):
        RoutingHooks(model, RoutingConfig(mode="ka", k_s=3))
    RoutingHooks(model, RoutingConfig(mode="ka", k_s=2)).remove()


def test_a_family_with_a_rule_but_none_of_its_routers_is_refused_with_the_reason():
    settings = family_configs.CONFIGS["deepseek_v4"] | {"mlp_layer_types": ["hash_moe", "hash_moe"]}
    with pytest.raises(MoekdError, match="none of its layers routes with a DeepseekV4TopKRouter"):
        RoutingHooks(untouched("deepseek_v4", settings), RoutingConfig(mode="ka"))
