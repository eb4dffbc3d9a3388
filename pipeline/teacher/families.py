"""MoE families as data: how each family's router chooses and weighs its experts, and how it is read.

The families are data: `RULES` describes each supported family's router by a
few choices (the score the weights are made of, softmax, sigmoid or
sqrt-softplus; whether it is taken over all experts or over the chosen ones'
logits; renormalisation over the chosen experts, always, never or behind a
flag, with shared experts or not; a selection-only bias; scaling factors; a
no-op expert), and one implementation serves them all; PhiMoE's sparsemixer
is the one rule of its own (`sparsemixer_weights`). Weights end in the dtype
of the router's own. `UNSUPPORTED` names the MoE families of the pinned
transformers that are refused, each with its reason.

`python -m pipeline.teacher.families` prints the README's table of families.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.core.errors import MoekdError

MODES = ("topk", "ka", "all", "top_p")


@dataclass(frozen=True)
class Rule:
    """How one family's router chooses and weighs its experts."""

    router: str  # class name of its router module
    _: KW_ONLY
    score: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"  # what the weights are made of
    over: Literal["all", "chosen"] = "all"  # softmax over all experts then gathered, or over the chosen logits
    renormalize: bool | str = True  # over the chosen experts: always, never, or iff this router attribute is true
    epsilon: float = 0.0  # added to the renormalising sum
    # added to the score to choose experts (not to weigh them): a router attribute, or (int) the index of
    # the router's forward argument that carries it (a bias the MoE block holds)
    bias: str | int | None = None
    scale: str | tuple[str, ...] | None = None  # router attribute(s) the weights are multiplied by (factors, or
    # one per expert)
    floor: str | None = None  # router attribute: the least the renormalising sum is divided by (a clamp)
    select_by: Literal["score", "logits"] = "score"  # what the bias is added to, to rank the experts
    requires: tuple[tuple[str, object], ...] = ()  # config settings (dotted paths) this rule holds for
    returns: Literal["logits", "probabilities"] = "logits"  # the first of the router's outputs
    # the router's outputs: (logits, weights, indices, *passed on), or (dense (N, E) weights, zero where not
    # chosen; logits), or its logits alone, the MoE block choosing and calling `block.experts(hidden, indices,
    # weights)`, whose inputs the hooks rewrite, or JetMoE's (slot order, token per slot, weight per slot,
    # slots per expert, logits), the token-slots sorted by expert
    outputs: Literal["chosen", "dense", "logits", "grouped"] = "chosen"
    # router attributes (dotted paths; `block.` for its MoE block's) holding its expert count and its k
    experts: str = "num_experts"
    top_k: str = "top_k"
    skip_class: bool = False  # the last expert is a no-op: chosen, it gets weight 0 and index 0 (as the router does)
    # router attribute: the number of shared experts whose logits (the last rows of `weight`) join the
    # renormalisation; their weights are the router's fourth output
    shared: str | None = None
    sparsemixer: str | None = None  # PhiMoE's weights, per pick in order (the router attribute: its jitter eps)
    fixed_k: str | None = None  # why the family takes exactly its k experts (all, top_p and other k_s refused)


_MIXTRAL = Rule("")
_QWEN = Rule("", renormalize="norm_topk_prob")
_CHOSEN = Rule("", over="chosen")
_DEEPSEEK_V3 = Rule("", score="sigmoid", renormalize="norm_topk_prob", epsilon=1e-20,
                    bias="e_score_correction_bias", scale="routed_scaling_factor")


def _rules(base: Rule, **routers: str) -> dict[str, Rule]:
    return {family: replace(base, router=router) for family, router in routers.items()}


# model_type -> its rule. Families whose modular source copies another's router share its rule.
RULES: dict[str, Rule] = {
    **_rules(_MIXTRAL, mixtral="MixtralTopKRouter", minimax="MiniMaxTopKRouter"),
    **_rules(replace(_QWEN, renormalize=True), qwen3_5_moe_text="Qwen3_5MoeTopKRouter",
             hunyuan_v1_moe="HunYuanMoEV1Gate"),
    **_rules(_QWEN, qwen2_moe="Qwen2MoeTopKRouter", qwen3_moe="Qwen3MoeTopKRouter", olmoe="OlmoeTopKRouter",
             flex_olmo="FlexOlmoTopKRouter", mellum="MellumTopKRouter", qwen3_next="Qwen3NextTopKRouter",
             qwen4_exp_text="Qwen4ExpTextTopKRouter", lara_mini="LaraMiniTopKRouter"),
    **_rules(replace(_QWEN, renormalize=False), jamba="JambaTopKRouter"),
    **_rules(_CHOSEN, gpt_oss="GptOssTopKRouter", granitemoe="GraniteMoeTopKRouter",
             granitemoe_swa="GraniteMoeSWATopKRouter", granitemoeshared="GraniteMoeSharedTopKRouter",
             granitemoehybrid="GraniteMoeHybridTopKRouter", aria_text="AriaTextTopKRouter"),
    **_rules(Rule("", renormalize=False, scale="routed_scaling_factor"),
             deepseek_v2="DeepseekV2TopkRouter"),
    **_rules(_DEEPSEEK_V3, deepseek_v3="DeepseekV3TopkRouter", sarvam_mla="DeepseekV3TopkRouter",
             deepseek_v32="DeepseekV32TopkRouter", glm4_moe="Glm4MoeTopkRouter", sarvam_moe="Glm4MoeTopkRouter",
             glm4_moe_lite="Glm4MoeLiteTopkRouter", glm_moe_dsa="GlmMoeDsaTopkRouter", dots1="Dots1TopkRouter",
             dots3_note_text="Dots3NoteTextTopkRouter", exaone_moe="ExaoneMoeTopkRouter",
             mimo_v2_flash="MiMoV2FlashTopkRouter", solar_open="SolarOpenTopkRouter", axk1="AXK1TopkRouter",
             axk2="AXK2TopkRouter", bailing_hybrid="BailingHybridTopkRouter", kimi_linear="KimiLinearTopkRouter",
             hy_v4="HYV4TopkRouter", nemotron_h="NemotronHTopkRouter"),
    **_rules(replace(_DEEPSEEK_V3, scale=None), beam="BeamTopKRouter"),  # its MoE block applies the scale
    **_rules(replace(_DEEPSEEK_V3, epsilon=0.0, bias=None, scale=None), flint="FlintTopKRouter"),
    # the bias lives on the MoE block, which passes it to the router
    **_rules(replace(_DEEPSEEK_V3, renormalize=True, epsilon=0.0, bias=1, scale=None),
             minimax_m2="MiniMaxM2TopKRouter"),
    **_rules(replace(_DEEPSEEK_V3, renormalize=True, bias=1, scale="router_scaling_factor"), hy_v3="HYV3TopKRouter"),
    **_rules(replace(_DEEPSEEK_V3, renormalize=True, bias=1, scale="route_scale"), afmoe="AfmoeTokenChoiceRouter"),
    **_rules(replace(_DEEPSEEK_V3, epsilon=1e-6, bias=1), lfm2_moe="Lfm2MoeTopKRouter"),
    **_rules(replace(_DEEPSEEK_V3, renormalize=True, epsilon=0.0, scale=None),  # its MoE block scales the output
             minimax_m3_vl_text="MiniMaxM3VLTopKRouter"),
    **_rules(replace(_DEEPSEEK_V3, renormalize=True, requires=(("scoring_func", "sigmoid"),)),
             inkling2_text="Inkling2TopKRouter"),
    **_rules(replace(_CHOSEN, requires=(("expert_selection_fn", "softmax"),)), cohere2_moe="Cohere2MoeTopKRouter"),
    **_rules(Rule("", floor="norm_min", bias="moe_statics.e_score_correction_bias"),
             ernie4_5_moe="Ernie4_5_MoeTopKRouter"),
    **_rules(Rule("", scale="per_expert_scale", returns="probabilities", experts="config.num_experts",
                  top_k="config.top_k_experts"), gemma4_text="Gemma4TextRouter"),
    **_rules(Rule("", score="sigmoid", renormalize=False, outputs="dense"), llama4_text="Llama4Router"),
    # its router soft-caps the logits it returns; its MoE block scales the output
    **_rules(replace(_DEEPSEEK_V3, renormalize=True, epsilon=0.0, scale=None),
             laguna="LagunaTopKRouter"),
    **_rules(replace(_DEEPSEEK_V3, epsilon=0.0, scale=None, select_by="logits"), kolibri1="Kolibri1TopKRouter"),
    **_rules(Rule("", renormalize="norm_topk_prob", epsilon=1e-20, scale="routed_scaling_factor"),
             mistral4="Mistral4TopkRouter"),
    # its hash-routed layers (DeepseekV4HashRouter: experts looked up by token id) keep their choice in every mode
    **_rules(replace(_DEEPSEEK_V3, score="sqrtsoftplus", renormalize=True),
             deepseek_v4="DeepseekV4TopKRouter"),
    **_rules(Rule("", renormalize=False, bias="balancing_biases", experts="num_router_classes", skip_class=True),
             zaya="ZayaRouter"),
    **_rules(Rule("", outputs="logits", experts="block.experts.num_experts", top_k="block.top_k",
                  requires=(("ffn_config.moe_normalize_expert_weights", 1),)), dbrx="DbrxRouter"),
    **_rules(Rule("", sparsemixer="router_jitter_noise", fixed_k="sparsemixer weighs exactly two experts"),
             phimoe="PhimoeTopKRouter"),
    **_rules(replace(_CHOSEN, outputs="grouped", fixed_k="its attention experts take exactly k per token"),
             jetmoe="JetMoeTopKGating"),
    **_rules(Rule("", score="sigmoid", bias="e_score_correction_bias", scale=("route_scale", "global_scale"),
                  shared="n_shared_experts"), inkling_text="InklingTopkRouter"),
    # its zero-compute experts (identity outputs) are routed like the others: n_routed_experts counts them
    **_rules(Rule("", renormalize=False, bias="e_score_correction_bias", scale="routed_scaling_factor",
                  experts="n_routed_experts"), longcat_flash="LongcatFlashTopkRouter"),
}


_NO_CAUSAL_LM = ("AutoModelForCausalLM does not load it (a multimodal model, or a text model without a "
                 "causal-LM class); moekd loads teachers with AutoModelForCausalLM")


# The other MoE model_types of the pinned transformers (text parts of composite models included): refused, and why.
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(["aria", "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_omni_moe", "qwen3_omni_moe_text",
                     "qwen3_omni_moe_thinker", "qwen3_omni_moe_talker_text", "glm4v_moe", "glm4v_moe_text",
                     "glm5_next", "glm5_next_text", "hy_v4_vl", "hy_v4_vl_text", "mistral_large4",
                     "mistral_large4_text", "deepseek_ocr2", "deepseek_ocr2_text", "unlimited_ocr",
                     "unlimited_ocr_text", "step3p5", "step3p7", "muse_spark", "muse_spark_text", "ernie4_5_vl_moe",
                     "ernie4_5_vl_moe_text", "diffusion_gemma", "diffusion_gemma_text", "inkling_mm_model"],
                    _NO_CAUSAL_LM),
    **dict.fromkeys(["inkling2_loop", "inkling2_loop_text"], "its looped layers run each router "
                    "loop_num_passes times per forward, while the hooks, the KA draws and SAR's recomputation take "
                    "one call per router and forward"),
    "doge": "routing is computed inside the MoE block (product-key experts, weights applied in its forward), "
            "with no router module whose outputs a hook could rewrite",
    "openai_privacy_filter": "a bidirectional encoder, not a causal language model",
    "switch_transformers": "an encoder-decoder model",
    "nllb-moe": "an encoder-decoder model",
}


def families_table() -> str:
    """The Markdown table of supported MoE families and their rules (the README's, generated)."""
    groups: dict[tuple, list[str]] = {}
    for name, rule in sorted(RULES.items()):
        groups.setdefault(dataclasses.astuple(replace(rule, router="")), []).append(name)
    lines = ["| families (model_type) | weights from | renormalised over the chosen | selection bias | scale |",
             "|---|---|---|---|---|"]
    for key, names in sorted(groups.items(), key=lambda item: item[1][0]):
        rule = Rule(**dict(zip((f.name for f in dataclasses.fields(Rule)), key)))
        source = f"{rule.score} over the chosen logits" if rule.over == "chosen" else f"{rule.score} over all experts"
        renormalize = {True: "always", False: "never"}.get(rule.renormalize, f"iff `{rule.renormalize}`")
        if rule.over == "chosen":
            renormalize = "by construction"
        if rule.floor is not None:
            renormalize += f" (the sum at least `{rule.floor}`)"
        if rule.shared is not None:
            renormalize += ", with the shared experts"
        if rule.sparsemixer is not None:
            source, renormalize = "sparsemixer: per pick, softmax over the experts within its jitter threshold", "—"
        settings = "".join(f" ({name} = {value})" for name, value in rule.requires)
        if rule.returns != "logits":
            settings += f" (its router returns {rule.returns})"
        settings += {"dense": " (its router returns dense weights)",
                     "logits": " (its MoE block chooses: the hooks rewrite its experts' inputs)"}.get(rule.outputs, "")
        if rule.skip_class:
            settings += " (its last expert is a no-op)"
        if rule.fixed_k is not None:
            settings += " (topk, and ka with its own k, only)"
        bias = {None: "—"}.get(rule.bias, f"forward argument {rule.bias}" if isinstance(rule.bias, int)
                                else f"`{rule.bias}`")
        if rule.bias is not None and rule.select_by == "logits":
            bias += ", added to the logits"
        scale = " × ".join(f"`{name}`" for name in ((rule.scale,) if isinstance(rule.scale, str) else rule.scale or ()))
        lines.append(f"| {', '.join(names)}{settings} | {source} | {renormalize} | {bias} "
                     f"| {scale or '—'} |")
    return "\n".join(lines)


@dataclass(kw_only=True)
class Router:
    name: str  # module path, e.g. model.layers.0.mlp.gate
    module: torch.nn.Module
    block: torch.nn.Module  # the MoE block that holds it
    family: str  # the model_type, a key of RULES
    rule: Rule
    num_experts: int = field(init=False)  # from the rule's `experts` and `top_k` paths
    top_k: int = field(init=False)

    def __post_init__(self):
        self.num_experts, self.top_k = self.attribute(self.rule.experts), self.attribute(self.rule.top_k)

    def attribute(self, path: str):
        """A dotted attribute of the router, or of its MoE block where `path` starts with `block.`."""
        owner, path = (self.block, path[6:]) if path.startswith("block.") else (self.module, path)
        return operator.attrgetter(path)(owner)


def find_routers(model) -> list[Router]:
    """The MoE router modules of `model` in layer order; refuses dense and unsupported models."""
    model_type = family(model)
    rule = RULES.get(model_type)
    routers = [
        Router(name=name, module=module, block=model.get_submodule(name.rpartition(".")[0]), family=model_type,
               rule=rule)
        for name, module in model.named_modules()
        if rule is not None and type(module).__name__ == rule.router
    ]
    if routers:
        text = model.config.get_text_config()
        for name, value in rule.requires:
            setting = _setting(text, name, value)
            if setting != value:
                raise MoekdError(f"model type {model_type!r} with {name}={setting!r} is not supported: "
                                 f"moekd describes its routing with {name}={value!r} only")
        return routers
    if model_type in UNSUPPORTED:
        raise MoekdError(f"model type {model_type!r} is an MoE family moekd does not support: "
                         f"{UNSUPPORTED[model_type]}")
    if rule is not None:
        raise MoekdError(f"model type {model_type!r}: none of its layers routes with a {rule.router}, the router "
                         "moekd rewrites (e.g. DeepSeek-V4's hash-routed layers only)")
    if _looks_moe(model):
        raise MoekdError(f"model type {model_type!r} is an MoE family moekd does not know "
                         f"({len(RULES)} supported: see the README's table)")
    raise MoekdError(f"model type {model_type!r} is a dense model; KA/SAR need an MoE teacher")


def _setting(config, path: str, default):
    """A config setting by dotted path (`default` where it is absent)."""
    for part in path.split("."):
        if not hasattr(config, part):
            return default
        config = getattr(config, part)
    return config


def family(model) -> str:
    """The model's family: its config's model_type, or its text model's where the config composes several
    (e.g. Qwen3.5-MoE's `qwen3_5_moe_text`)."""
    config = model.config
    text = config.get_text_config()
    known = RULES.keys() | UNSUPPORTED.keys()
    return text.model_type if config.model_type not in known and text.model_type in known else config.model_type


def _looks_moe(model) -> bool:
    expert_counts = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any(getattr(model.config, key, None) for key in expert_counts) or any(
        "router" in type(module).__name__.lower() for module in model.modules()
    )


def _flag(module, setting: bool | str) -> bool:
    return setting if isinstance(setting, bool) else bool(getattr(module, setting))


def family_weights(router: Router, logits: torch.Tensor, indices: torch.Tensor, keep=None,
                   shared_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mixing weights of the chosen `indices` (N, w) by the family's own rule (`Rule`).

    `keep` (N, w) marks real choices; False slots get weight 0 and are left out
    of any normalisation (top_p pads its variable-size sets this way). With
    `shared_logits` (N, S) (a rule with `shared`) the shared experts join the
    normalisation, and their weights follow the chosen ones': (N, w + S).
    """
    rule = router.rule
    if rule.sparsemixer is not None:
        weights = sparsemixer_weights(logits, indices, router.attribute(rule.sparsemixer))
    elif rule.over == "chosen":  # softmax over the chosen logits: normalised by construction
        chosen = logits.gather(1, indices)
        if keep is not None:
            chosen = chosen.masked_fill(~keep, float("-inf"))
        weights = F.softmax(chosen, dim=1, dtype=chosen.dtype)
    else:
        weights = expert_scores(rule.score, logits).gather(1, indices)
        if keep is not None:
            weights = weights.masked_fill(~keep, 0.0)
        if shared_logits is not None:
            weights = torch.cat([weights, expert_scores(rule.score, shared_logits)], dim=1)
        if _flag(router.module, rule.renormalize):
            total = weights.sum(dim=-1, keepdim=True)
            if rule.floor is not None:
                total = total.clamp(min=router.attribute(rule.floor))
            weights = weights / (total + rule.epsilon)
    for name in (rule.scale,) if isinstance(rule.scale, str) else rule.scale or ():
        scale = router.attribute(name)  # a factor, or one per expert
        weights = weights * (scale[indices] if torch.is_tensor(scale) and scale.numel() > 1 else scale)
    return weights


def expert_scores(score: str, logits: torch.Tensor) -> torch.Tensor:
    """Every expert's `score` (a `Rule.score`; float32): softmax over the experts, or a sigmoid or sqrt-softplus
    of each logit."""
    if score == "sigmoid":
        return logits.float().sigmoid()
    if score == "sqrtsoftplus":
        return F.softplus(logits.float()).sqrt()
    return F.softmax(logits, dim=-1, dtype=torch.float)


def sparsemixer_weights(logits: torch.Tensor, indices: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """PhiMoE's sparsemixer weights (eval) of experts picked in order: pick i's share of the softmax over
    the experts whose logit is within the jitter threshold of its own, the earlier picks left out."""
    weights, remaining = [], logits
    for i in range(indices.shape[1]):
        pick = indices[:, i : i + 1]
        threshold = logits.gather(1, pick)
        outside = (threshold - logits) / logits.abs().clamp(min=threshold) > 2 * jitter_eps
        weights.append(F.softmax(remaining.masked_fill(outside, float("-inf")), dim=-1).gather(1, pick))
        remaining = remaining.scatter(1, pick, float("-inf"))
    return torch.cat(weights, dim=1)


def selection_bias(router: Router, inputs: tuple) -> torch.Tensor | None:
    """What the family adds to its score to choose experts, from the router or its forward's `inputs`."""
    bias = router.rule.bias
    if isinstance(bias, int):
        return inputs[bias] if len(inputs) > bias else None
    return None if bias is None else router.attribute(bias).squeeze()


def top_experts(router: Router, logits: torch.Tensor, k: int, bias: torch.Tensor | None,
                excluded: int | None = None) -> torch.Tensor:
    """The `k` best experts per token by the family's selection score: its score plus `bias`
    (`selection_bias`), never the `excluded` expert.

    Expert groups are not applied: a group limit is defined for the family's own k only.
    """
    rule = router.rule
    scores = logits if rule.over == "chosen" or rule.select_by == "logits" else expert_scores(rule.score, logits)
    if bias is not None:
        scores = scores + bias
    if excluded is not None:
        scores = scores.index_fill(-1, torch.tensor([excluded], device=scores.device), float("-inf"))
    return scores.topk(k, dim=-1).indices


def top_p_experts(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fewest experts whose softmax(logits) mass reaches `p`, padded to a common width.

    Returns (indices (N, w), keep (N, w)); padding slots repeat the token's best
    expert (a valid index for every experts module) and have keep=False.
    """
    probs, order = F.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True)
    # Expert at rank i is needed iff the mass before it is < p, i.e. the mass
    # from rank i on is > 1 - p; summing the tail keeps tiny probabilities exact.
    tail = probs.flip(-1).cumsum(-1).flip(-1)
    keep = tail > 1.0 - p
    keep[:, 0] = True
    width = int(keep.sum(dim=-1).max())
    keep, order = keep[:, :width], order[:, :width]
    return torch.where(keep, order, order[:, :1]), keep


def routing_of(router: Router, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first output, weights (N, w), indices (N, w)) of a router's `output` (`Rule.outputs`); with `shared`,
    the shared experts' weights follow the routed ones'."""
    rule = router.rule
    if rule.outputs == "dense":  # the chosen experts are the nonzero weights
        dense, first = output
        weights, indices = dense.topk(router.top_k, dim=-1)
        return first, weights, indices
    if rule.outputs == "grouped":  # JetMoE: slots sorted by expert, each naming its flat (token, slot) place
        order, _, gates, sizes, logits = output
        experts = torch.repeat_interleave(torch.arange(len(sizes), device=order.device),
                                          torch.tensor(sizes, device=order.device))
        shape = (logits.shape[0], router.top_k)
        indices = torch.empty_like(order).index_put_((order,), experts).view(shape)
        return logits, gates.new_empty(order.shape).index_put_((order,), gates).view(shape), indices
    first, weights, indices = output[:3]
    if rule.shared is not None:
        weights = torch.cat([weights, output[3]], dim=1)
    return first, weights, indices


def with_routing(router: Router, output, weights: torch.Tensor, indices: torch.Tensor):
    """The router's `output` (`Rule.outputs`) carrying `weights` and `indices` instead of its own."""
    rule, width = router.rule, indices.shape[1]
    if rule.outputs == "dense":
        dense, first = output
        return torch.zeros_like(dense).scatter_add(1, indices, weights.to(dense.dtype)), first
    if rule.outputs == "grouped":  # as the router groups them
        _, order = indices.flatten().sort(0)
        sizes = torch.bincount(indices.flatten(), minlength=router.num_experts).tolist()
        return order, order.div(width, rounding_mode="trunc"), weights.flatten()[order], sizes, output[4]
    if rule.shared is not None:
        return output[0], weights[:, :width], indices, weights[:, width:]
    return output[0], weights, indices, *output[3:]


# The routing modes whose vLLM cache (backend=vllm, `teacher.vllm`) equals the transformers cache in
# tests/test_vllm.py, by family (the CPU build, fp32, tiny random models). Every family of `RULES` runs every mode on
# the transformers backend.
VLLM_CHECKED = {
    "mixtral": ("topk", "ka"), "qwen2_moe": ("topk",), "qwen3_moe": ("topk",), "olmoe": ("topk", "all", "top_p"),
    "gpt_oss": ("topk",), "glm4_moe": ("topk", "ka", "all"), "afmoe": ("topk", "ka", "all"),
    "llama4_text": ("topk", "ka"),
}


def backends_table() -> str:
    """The Markdown table of the routing modes each backend was shown to run right, by family (the README's)."""
    lines = ["| family (model_type) | transformers | vLLM (CPU build: the cache equals the transformers one) |",
             "|---|---|---|"]
    lines += [f"| {family} | topk, ka, all, top_p | {', '.join(modes)} |" for family, modes in VLLM_CHECKED.items()]
    lines.append("| the other families of the table above | topk, ka, all, top_p | not checked (deepseek_v2, "
                 "deepseek_v3, deepseek_v32: refused) |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pipeline.teacher.families: the README's tables of families
    print(families_table())
    print(f"\n{len(RULES)} model types supported; {len(UNSUPPORTED)} refused with their reason.\n")
    print(backends_table())

