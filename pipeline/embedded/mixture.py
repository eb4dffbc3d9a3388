"""Branch-Train-MiX: one MoE teacher from dense branches of one model, each fine-tuned on its own domain.

Sukhbaatar et al. 2024 (arXiv 2403.07816): copy a seed model once per domain,
fine-tune each copy on its domain, then stack the copies' FFNs as the experts
of one MoE layer, average every other weight over the copies, and learn a
router. Experts made this way really differ (each learnt its own domain),
unlike slices of one FFN, so routing samples give different teachers: the
setting the paper's Knowledge Augmentation is about.

The result is a standard Mixtral checkpoint (Llama attention, softmax router,
top-k renormalised). Each layer's router is fitted, layer by layer on the
MoE's own hidden states, as a multinomial logistic regression from the FFN's
input to the domain of the token's record. Where the domains are easy to tell
apart that router is confident (on the demo's tasks it leaves 3% of its
probability outside the top 2 of 6), far sharper than the routers of MoEs
trained end to end (the paper's LLaMA-MoE teachers leave more than half of it
to the experts they do not run), and a router that sharp leaves KA nothing to
sample. So each layer's logits are then divided by the temperature that
leaves `mass_outside` of the probability outside the top-k on the calibration
tokens (never sharpened): the experts' order, hence the top-k routing, stays
as fitted; only the weights within the top-k and KA's draws see the change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.errors import MoekdError
from pipeline.embedded.upcycle import attention_half, causal_mask, check_source, dense_settings

FFN = (".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


def check_branches(configs: list) -> None:
    """Refuse branches that are not one Llama-family architecture: their weights must line up tensor by tensor."""
    for config in configs:
        check_source(config)
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    first = configs[0]
    for i, config in enumerate(configs[1:], 1):
        different = [k for k in keys if getattr(config, k, None) != getattr(first, k, None)]
        if different:
            raise MoekdError(f"branch {i} differs from branch 0 in {', '.join(different)}: branches must be "
                             "copies of one model")


def mixtral_config(dense_config, num_experts: int, top_k: int):
    """The Mixtral config matching `dense_config` (attention, norms, RoPE, vocabulary), one expert per branch."""
    from transformers import MixtralConfig

    return MixtralConfig(**dense_settings(dense_config), sliding_window=None, num_local_experts=num_experts,
                         num_experts_per_tok=top_k)


def mixed_state(branches: list) -> dict[str, torch.Tensor]:
    """The MoE's weights: every branch's FFNs stacked as experts, every other tensor averaged over branches;
    routers zero until fitted."""
    states = [b.state_dict() for b in branches]
    state = {}
    for name in states[0]:
        if not any(part in name for part in FFN):
            state[name] = torch.stack([s[name].float() for s in states]).mean(0)
    for i in range(branches[0].config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([s[p + "gate_proj.weight"], s[p + "up_proj.weight"]]).float() for s in states])
        state[p + "experts.down_proj"] = torch.stack([s[p + "down_proj.weight"].float() for s in states])
        state[p + "gate.weight"] = torch.zeros(len(branches), branches[0].config.hidden_size)
    return state


def fit_router(x: torch.Tensor, labels: torch.Tensor, num_experts: int, l2: float, top_k: int,
               mass_outside: float | None, steps: int = 100) -> tuple[torch.Tensor, dict]:
    """Router weight (E, H) of the multinomial logistic regression from FFN inputs `x` (N, H) to each token's
    expert `labels` (N,), L2-penalised (`l2` times the mean squared weight), fitted by L-BFGS, then softened
    to leave `mass_outside` of the probability outside the top-k (None: as fitted); and fit figures."""
    weight = torch.zeros(num_experts, x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T, labels) + l2 * weight.pow(2).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(loss_fn)
    logits = x @ weight.detach().T
    fitted = outside_topk(logits, top_k)
    temperature = 1.0 if mass_outside is None else softening(logits, top_k, mass_outside)
    report = {
        "domain_accuracy": round((logits.argmax(-1) == labels).float().mean().item(), 4),
        "fitted_mass_outside_topk": round(fitted, 4),
        "temperature": round(temperature, 4),
        "mass_outside_topk": round(outside_topk(logits / temperature, top_k), 4),
    }
    return weight.detach() / temperature, report


def outside_topk(logits: torch.Tensor, top_k: int) -> float:
    """Mean softmax probability outside the top-k experts."""
    return (1 - torch.softmax(logits, -1).topk(top_k, -1).values.sum(-1)).mean().item()


def softening(logits: torch.Tensor, top_k: int, target: float) -> float:
    """The temperature >= 1 at which `outside_topk(logits / temperature)` reaches `target` (bisection on its
    logarithm; 1 when the logits are already that soft). The mass grows with the temperature towards
    1 − k/E, which bounds the targets reachable."""
    if outside_topk(logits, top_k) >= target:
        return 1.0
    low, high = 0.0, 12.0  # log-temperatures: e^12 flattens any fitted router
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if outside_topk(logits / math.exp(middle), top_k) < target else (low, middle)
    return math.exp(high)


@torch.no_grad()
def mix(branches: list, calibration: torch.Tensor, labels: torch.Tensor, top_k: int, l2: float = 1e-3,
        mass_outside: float | None = None, batch: int = 8):
    """The MoE (a MixtralForCausalLM) of `branches` (dense models, expert e = branch e), each layer's router
    fitted on `calibration` (B, T) token ids whose tokens belong to experts `labels` (B, T) and softened to
    `mass_outside` (`fit_router`). Returns the model and a per-layer report."""
    from transformers import AutoModelForCausalLM

    check_branches([b.config for b in branches])
    if not 1 <= top_k <= len(branches):
        raise MoekdError(f"top_k {top_k} must be in [1, {len(branches)}] (one expert per branch)")
    if top_k == len(branches):
        mass_outside = None  # every expert runs: nothing lies outside the top-k
    if mass_outside is not None and not 0 <= mass_outside < 1 - top_k / len(branches):
        raise MoekdError(f"mass_outside {mass_outside} is out of reach: a router over {len(branches)} experts leaves "
                         f"less than {1 - top_k / len(branches):.3f} outside its top-{top_k}")
    config = mixtral_config(branches[0].config, len(branches), top_k)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(mixed_state([b.float() for b in branches]), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.generation_config = branches[0].generation_config
    model.eval()
    length = calibration.shape[1]
    mask = causal_mask(length)
    hidden = [model.model.embed_tokens(ids) for ids in calibration.split(batch)]
    rope = model.model.rotary_emb(hidden[0], torch.arange(length)[None])
    targets = labels.flatten()
    report = []
    for i, layer in enumerate(tqdm(model.model.layers, desc="fitting routers", unit="layer")):
        halves = [attention_half(layer, h, rope, mask) for h in hidden]
        x = torch.cat([x.flatten(0, 1) for _, x in halves])
        weight, fit = fit_router(x, targets, len(branches), l2, top_k, mass_outside)
        layer.mlp.gate.weight.copy_(weight)
        hidden = [h + layer.mlp(x) for h, x in halves]
        report.append({"layer": i, **fit})
    return model, report
