"""Building an MoE teacher from a dense Llama-family model, LLaMA-MoE style.

Each dense SwiGLU FFN (I neurons) is split, without changing a single weight,
into a Qwen2-MoE block:

- a shared expert: the `shared_size` neurons with the largest mean output on
  calibration tokens (always active);
- `num_experts` routed experts: the other neurons, clustered so that neurons
  active on the same tokens share an expert (balanced k-means on their output
  magnitudes), `top_k` of them active per token;
- a router fitted to predict, from the block's input, which experts carry the
  most output for a token (cross-entropy to each expert's share of the output
  energy), then scaled by a temperature fitted so the top-k output best matches
  the dense output.

Scaling makes the split exact where it should be: the shared expert's gate is
zero (sigmoid 0.5) and its down projection doubled; routed down projections are
multiplied by `num_experts`, so with a uniform router and all experts active
(softmax weights 1/E) the block returns the dense FFN's output. With top-k
routing each chosen expert gets weight E * softmax(r)_e, about 1 for a flat
router, and the unchosen experts' output is what the MoE loses.

Layers are fitted in order on the hidden states of the already-converted lower
layers, so each router sees the inputs it will see in the MoE model. The
attention, norms and embeddings are copied unchanged (Qwen2-MoE with
`qkv_bias=False` computes exactly Llama's and Mistral's attention, with
`qkv_bias=True` Qwen2's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.errors import MoekdError
from pipeline.embedded.fitting import ridge_toward


@dataclass
class Layout:
    """The shape of the MoE to build."""

    num_experts: int = 8
    top_k: int = 2
    shared_size: int = 512  # neurons in the always-active shared expert
    dense_layers: list[int] = field(default_factory=list)  # layers kept as plain FFNs


@dataclass(kw_only=True)
class LayerFit:
    shared: torch.Tensor  # (shared_size,) neuron ids
    experts: torch.Tensor  # (num_experts, expert_size) neuron ids
    router: torch.Tensor  # (num_experts, hidden) router weight, temperature included
    down_shared: torch.Tensor  # (hidden, shared_size)
    down_experts: torch.Tensor  # (num_experts, hidden, expert_size), before the E scaling
    report: dict


def check_source(config) -> None:
    """Refuse dense models whose blocks a Qwen2-MoE cannot reproduce exactly."""
    problems = []
    if config.model_type not in ("llama", "mistral", "qwen2"):
        problems.append(f"model_type {config.model_type!r} (llama, mistral or qwen2 expected)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r}")
    # Mistral applies `sliding_window` whenever it is set; Qwen2 only with use_sliding_window.
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if getattr(config, "use_sliding_window", False) or (window and window < config.max_position_embeddings):
        problems.append("sliding-window attention")
    if problems:
        raise MoekdError(f"cannot upcycle this source model: it has {', '.join(problems)}")


def check_layout(layout: Layout, config) -> None:
    routed = config.intermediate_size - layout.shared_size
    if not 0 <= layout.shared_size < config.intermediate_size:
        raise MoekdError(f"shared_size {layout.shared_size} must be in [0, {config.intermediate_size})")
    if layout.num_experts < 2 or routed % layout.num_experts:
        raise MoekdError(
            f"num_experts {layout.num_experts} must be at least 2 and divide the "
            f"{routed} routed neurons (intermediate_size {config.intermediate_size} - shared_size)"
        )
    if not 1 <= layout.top_k <= layout.num_experts:
        raise MoekdError(f"top_k {layout.top_k} must be in [1, num_experts={layout.num_experts}]")
    bad = [i for i in layout.dense_layers if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise MoekdError(f"dense_layers has {bad[0]}, not a layer of this {config.num_hidden_layers}-layer model")


def dense_settings(dense_config) -> dict:
    """What an MoE config built from `dense_config` keeps of it: vocabulary, attention, norms, RoPE, sizes,
    special tokens (for `moe_config` here and the Mixtral of `pipeline.embedded.mixture`)."""
    c = dense_config
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        attention_dropout=0.0,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def moe_config(dense_config, layout: Layout):
    """The Qwen2-MoE config matching `dense_config` (attention, norms, RoPE, vocabulary) with `layout`."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    return Qwen2MoeConfig(
        **dense_settings(c),
        qkv_bias=c.model_type == "qwen2",  # Qwen2 has q/k/v biases, Llama and Mistral none
        use_sliding_window=False,
        num_experts=layout.num_experts,
        num_experts_per_tok=layout.top_k,
        moe_intermediate_size=(c.intermediate_size - layout.shared_size) // layout.num_experts,
        shared_expert_intermediate_size=layout.shared_size,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=list(layout.dense_layers),
    )


# ---------------------------------------------------------------- one layer


def neuron_outputs(x: torch.Tensor, mlp) -> torch.Tensor:
    """(N, I) the size of each FFN neuron's output for each token: |activation| * |down column|."""
    acts = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return acts.abs() * mlp.down_proj.weight.norm(dim=0)


def balanced_kmeans(features: torch.Tensor, k: int, generator: torch.Generator, steps: int = 15) -> torch.Tensor:
    """Split the rows of `features` into `k` equal clusters by cosine similarity; (k, n/k) row ids."""
    n = features.shape[0]
    size = n // k
    unit = F.normalize(features, dim=1)
    centroids = unit[torch.randperm(n, generator=generator)[:k]]
    for _ in range(steps):
        assign = balanced_assign(unit @ centroids.T, size)
        centroids = F.normalize(torch.stack([unit[assign == c].mean(0) for c in range(k)]), dim=1)
    return torch.stack([torch.nonzero(assign == c).flatten() for c in range(k)])


def balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy assignment of rows to columns, most similar pairs first, `size` rows per column."""
    n, k = similarity.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    free = [size] * k
    for flat in torch.argsort(similarity.flatten(), descending=True).tolist():
        row, col = divmod(flat, k)
        if assign[row] < 0 and free[col]:
            assign[row] = col
            free[col] -= 1
    return assign


def expert_outputs(x: torch.Tensor, mlp, groups: torch.Tensor) -> torch.Tensor:
    """(N, G, H) the output of each neuron group of `mlp` for each token."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    acts = F.silu(x @ gate[groups.flatten()].T) * (x @ up[groups.flatten()].T)  # (N, G*m)
    acts = acts.view(x.shape[0], *groups.shape)  # (N, G, m)
    return torch.einsum("ngm,hgm->ngh", acts, down[:, groups])


def fit_router(x: torch.Tensor, energy: torch.Tensor, steps: int, lr: float = 0.05) -> torch.Tensor:
    """A linear router (E, H) whose softmax matches each expert's share of the output energy."""
    target = energy / energy.sum(1, keepdim=True)
    weight = torch.zeros(energy.shape[1], x.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(x @ weight.T, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return weight.detach()


def routed_output(logits: torch.Tensor, outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Qwen2-MoE routing (softmax over all experts, top-k kept, not renormalised) of
    experts whose down projections were scaled by E: (N, H)."""
    weights = outputs.shape[1] * torch.softmax(logits, dim=-1)
    top = logits.topk(top_k, dim=-1).indices
    keep = torch.zeros_like(weights).scatter_(1, top, 1.0)
    return torch.einsum("ne,neh->nh", weights * keep, outputs)


def fit_temperature(logits, outputs, target, top_k) -> tuple[float, float]:
    """The router scale (from a log grid, 0 = flat) minimising the top-k output's squared error."""
    best = (math.inf, 0.0)
    for t in [0.0] + [2.0 ** (i / 2) for i in range(-8, 7)]:
        err = (routed_output(t * logits, outputs, top_k) - target).pow(2).sum(1).mean().item()
        best = min(best, (err, t))
    return best[1], best[0]


def fit_layer(x, mlp, layout: Layout, generator, router_steps: int, target=None, ridge: float | None = None) -> LayerFit:
    """Split one dense FFN into shared + routed experts and fit its router on inputs `x` (N, H).

    `target` (N, H), default the dense FFN output, is what the block should
    output; with `ridge` the down projections are refitted to it by ridge
    regression (towards the dense weights) given the fitted routing.
    """
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator)
    fit_ids, test_ids = perm[: n * 9 // 10], perm[n * 9 // 10 :]  # figures on tokens not fitted
    magnitude = neuron_outputs(x, mlp)
    shared = magnitude.mean(0).topk(layout.shared_size).indices.sort().values
    rest = torch.ones(magnitude.shape[1], dtype=torch.bool)
    rest[shared] = False
    rest = torch.nonzero(rest).flatten()
    sample = fit_ids[: min(len(fit_ids), 4096)]
    experts = rest[balanced_kmeans(magnitude[sample][:, rest].T, layout.num_experts, generator)]
    experts = experts.sort(dim=1).values
    del magnitude

    dense = mlp(x)
    target = dense if target is None else target
    shared_out = expert_outputs(x, mlp, shared[None])[:, 0]
    outputs = expert_outputs(x, mlp, experts)  # (N, E, H)
    energy = outputs.pow(2).sum(-1)
    router = fit_router(x[fit_ids], energy[fit_ids], router_steps)
    logits = x @ router.T
    temperature, _ = fit_temperature(logits[fit_ids], outputs[fit_ids], (target - shared_out)[fit_ids], layout.top_k)
    router = temperature * router
    logits = temperature * logits

    down = mlp.down_proj.weight
    down_shared, down_experts = down[:, shared], down[:, experts].permute(1, 0, 2)  # (H, S), (E, H, m)
    if ridge is not None:
        down_shared, down_experts = refit_down(x, mlp, shared, experts, logits, layout.top_k, target, fit_ids, ridge)
    approx = block_output(x[test_ids], mlp, shared, experts, down_shared, down_experts, logits[test_ids], layout.top_k)

    k = layout.top_k
    oracle = energy[test_ids].topk(k, dim=-1).indices
    chosen = logits[test_ids].topk(k, dim=-1).indices
    overlap = (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean().item()
    report = {
        "router_topk_overlap": round(overlap, 4),  # share of chosen experts among the k with most output
        "chance_overlap": round(k / layout.num_experts, 4),
        "temperature": temperature,
        "relative_error": round(relative_error(approx, target[test_ids]), 4),
        "dense_relative_error": round(relative_error(approx, dense[test_ids]), 4),
    }
    return LayerFit(shared=shared, experts=experts, router=router, down_shared=down_shared, down_experts=down_experts,
                    report=report)


def activations(x, mlp, neurons):
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    return F.silu(x @ gate[neurons].T) * (x @ up[neurons].T)


def routed_features(x, mlp, shared, experts, logits, top_k):
    """(N, S + E*m) the activations the block's down projections see, routing weights applied."""
    num_experts = experts.shape[0]
    weights = num_experts * torch.softmax(logits, dim=-1)
    keep = torch.zeros_like(weights).scatter_(1, logits.topk(top_k, dim=-1).indices, 1.0)
    routed = activations(x, mlp, experts.flatten()).view(x.shape[0], num_experts, -1) * (weights * keep)[..., None]
    return torch.cat([activations(x, mlp, shared), routed.flatten(1)], 1)


def block_output(x, mlp, shared, experts, down_shared, down_experts, logits, top_k):
    features = routed_features(x, mlp, shared, experts, logits, top_k)
    return features @ torch.cat([down_shared, down_experts.permute(1, 0, 2).flatten(1)], 1).T


def refit_down(x, mlp, shared, experts, logits, top_k, target, fit_ids, ridge):
    """Down projections (shared, experts) minimising |block - target|^2 + ridge * |W - W_dense|^2."""
    down = mlp.down_proj.weight
    initial = torch.cat([down[:, shared], down[:, experts.flatten()]], 1).T  # (S + E*m, H)
    gram = torch.zeros(initial.shape[0], initial.shape[0])
    cross = torch.zeros_like(initial)
    for ids in fit_ids.split(4096):
        z = routed_features(x[ids], mlp, shared, experts, logits[ids], top_k)
        gram += z.T @ z
        cross += z.T @ target[ids]
    solved = ridge_toward(gram, cross, initial, ridge).T
    s = len(shared)
    return solved[:, :s], solved[:, s:].reshape(-1, experts.shape[0], experts.shape[1]).permute(1, 0, 2)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def moe_block_weights(mlp, fit: LayerFit) -> dict[str, torch.Tensor]:
    """The Qwen2-MoE block tensors for one fitted layer."""
    gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    num_experts = fit.experts.shape[0]
    return {
        "gate.weight": fit.router.clone(),
        "experts.gate_up_proj": torch.cat([gate[fit.experts], up[fit.experts]], dim=1),
        "experts.down_proj": num_experts * fit.down_experts,
        "shared_expert.gate_proj.weight": gate[fit.shared].clone(),
        "shared_expert.up_proj.weight": up[fit.shared].clone(),
        # sigmoid(0) = 0.5 halves the shared expert; doubling its output undoes that exactly
        "shared_expert.down_proj.weight": 2 * fit.down_shared,
        "shared_expert_gate.weight": torch.zeros(1, gate.shape[1]),
    }


# ---------------------------------------------------------------- whole model


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)[None, None]


def attention_half(layer, hidden, position_embeddings, mask):
    """A decoder layer up to its FFN: (residual stream after attention, normed FFN input)."""
    attn, _ = layer.self_attn(
        layer.input_layernorm(hidden), position_embeddings=position_embeddings, attention_mask=mask
    )
    hidden = hidden + attn
    return hidden, layer.post_attention_layernorm(hidden)


@torch.no_grad()
def upcycle(dense, calibration, layout: Layout, seed: int, router_steps: int = 200, ridge=None,
            follow_dense: bool = False, batch: int = 8):
    """Build the MoE (a Qwen2MoeForCausalLM) from `dense` with routers fitted on `calibration` (B, T) token ids.

    Returns the model and a per-layer report (partition and fit figures).
    """
    from transformers import AutoModelForCausalLM

    check_source(dense.config)
    check_layout(layout, dense.config)
    dense = dense.float().eval()
    generator = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    length = calibration.shape[1]
    mask = causal_mask(length)
    chunks = calibration.split(batch)
    hidden = [dense.model.embed_tokens(ids) for ids in chunks]
    reference = list(hidden)  # the dense model's own residual stream
    rope = dense.model.rotary_emb(hidden[0], torch.arange(length)[None])
    layers_report = []
    for i, layer in enumerate(tqdm(dense.model.layers, desc="upcycling layers", unit="layer")):
        prefix = f"model.layers.{i}.mlp."
        halves = [attention_half(layer, h, rope, mask) for h in hidden]
        if follow_dense:
            reference = [r + layer.mlp(x) for r, x in (attention_half(layer, r, rope, mask) for r in reference)]
        if i in layout.dense_layers:
            state.update({prefix + k: v for k, v in layer.mlp.state_dict().items()})
            hidden = [h + layer.mlp(x) for h, x in halves]
            layers_report.append({"layer": i, "dense": True})
            continue
        x = torch.cat([x.flatten(0, 1) for _, x in halves])
        target = torch.cat([(r - h).flatten(0, 1) for r, (h, _) in zip(reference, halves)]) if follow_dense else None
        fit = fit_layer(x, layer.mlp, layout, generator, router_steps, target, ridge)
        weights = moe_block_weights(layer.mlp, fit)
        state.update({prefix + k: v for k, v in weights.items()})
        block = moe_block(dense.config, layout, weights)
        hidden = [h + block(x) for h, x in halves]
        layers_report.append({"layer": i, **fit.report, "experts": fit.experts.tolist(), "shared": fit.shared.tolist()})
    model = AutoModelForCausalLM.from_config(moe_config(dense.config, layout), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.generation_config = dense.generation_config
    return model.eval(), layers_report


def moe_block(dense_config, layout: Layout, weights: dict[str, torch.Tensor]):
    """A standalone Qwen2-MoE block holding `weights` (to propagate calibration states)."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = moe_config(dense_config, layout)
    config._experts_implementation = "eager"
    block = Qwen2MoeSparseMoeBlock(config)
    block.load_state_dict(weights)
    return block.eval()
