"""Initialising a student from its teacher's source model: fewer layers, narrower FFNs, fewer heads.

The student is a model of the source's own family (same class, config fields
and tokenizer), so transformers and other engines load it as they load the
source. It keeps the source's embeddings, final norm and LM head, and its
weights are slices of the source's:

- depth (`keep_layers`): a subset of the decoder layers, unchanged, in order;
- width, Minitron style (Muralidharan et al. 2024: importance from activations
  on calibration data, width before depth):
  - `ffn_size`: per layer, the FFN neurons whose output is largest on average,
    importance = mean over calibration tokens of |act_j| * ‖down[:, j]‖ with
    act = act_fn(gate(x)) * up(x), i.e. the size of what neuron j adds;
  - `heads`: per layer, the attention heads whose output (through o_proj) is
    largest on average, the same number in every key/value group, so the
    grouped-query layout stays valid and key/value projections are untouched.

Layers are ranked on the source itself, whichever layers the student keeps.
Width pruning at full width keeps every weight, so the student computes what
the source computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.core.errors import MoekdError
from pipeline.embedded.fitting import ridge_toward

# Families whose layers are `self_attn.{q,k,v,o}_proj` + a gated `mlp.{gate,up,down}_proj`, and whose
# config has a `head_dim` field (so fewer heads keep their size when the config is read elsewhere).
WIDTH_FAMILIES = {"llama": True, "mistral": True, "qwen2": False}  # model_type -> heads can be pruned


@dataclass
class Importance:
    """Per decoder layer of the source: FFN neuron importance (I,), attention head importance (H,), and the
    Gram matrix (I, I) of the FFN activations (summed over the calibration tokens; for `refit_down`)."""

    neurons: list[Tensor]
    heads: list[Tensor]
    grams: list[Tensor]


def check_layers(keep: list[int], num_layers: int) -> None:
    if not keep:
        raise MoekdError("keep_layers is empty: the student needs at least one layer")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise MoekdError(f"keep_layers has {bad[0]}, not a layer of the {num_layers}-layer source model")
    if sorted(set(keep)) != list(keep):
        raise MoekdError(f"keep_layers must be increasing without repeats, got {keep}")


def check_width(config, ffn_size: int | None, heads: int | None) -> None:
    """Refuse widths the source's family or shape cannot take, naming the reason."""
    if ffn_size is None and heads is None:
        return
    if config.model_type not in WIDTH_FAMILIES:
        raise MoekdError(f"width pruning supports {', '.join(WIDTH_FAMILIES)} models, not {config.model_type!r}; "
                         "use keep_layers alone")
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise MoekdError("width pruning does not handle MLP or attention output biases")
    if ffn_size is not None and not 1 <= ffn_size <= config.intermediate_size:
        raise MoekdError(f"ffn_size {ffn_size} must be in [1, {config.intermediate_size}] (the source's FFN width)")
    if heads is not None:
        if not WIDTH_FAMILIES[config.model_type]:
            raise MoekdError(f"{config.model_type} configs have no head_dim field: pruning heads would give a "
                             "model other engines read with the wrong head size; prune ffn_size only")
        groups = config.num_key_value_heads
        if not groups <= heads <= config.num_attention_heads or heads % groups:
            raise MoekdError(f"heads {heads} must be a multiple of the {groups} key/value heads, at most "
                             f"{config.num_attention_heads}")


@torch.no_grad()
def importance(source, calibration: Tensor, batch: int = 4) -> Importance:
    """Neuron and head importance of every layer of `source` on calibration token ids (B, T), unpadded."""
    layers = source.model.layers
    attention = layers[0].self_attn
    num_heads, head_dim = source.config.num_attention_heads, attention.head_dim
    neurons = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    heads = [torch.zeros(num_heads) for _ in layers]
    grams = [torch.zeros(len(n), len(n)) for n in neurons]

    def ffn_hook(i, module, args):
        x = args[0].flatten(0, -2).float()
        act = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
        neurons[i] += (act.abs() * module.down_proj.weight.float().norm(dim=0)).sum(0)
        grams[i] += act.T @ act

    def head_hook(i, module, args):
        x = args[0].flatten(0, -2).float().view(-1, num_heads, head_dim)  # o_proj's input, per head
        w = module.weight.float().view(-1, num_heads, head_dim)  # (hidden, H, d)
        heads[i] += torch.einsum("nhd,ohd->nho", x, w).norm(dim=-1).sum(0)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: ffn_hook(i, m, a)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: head_hook(i, m, a)))
    try:
        for ids in tqdm(calibration.split(batch), desc="importance", unit="batch"):
            source.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = calibration.numel()
    return Importance([n / tokens for n in neurons], [h / tokens for h in heads], grams)


@dataclass
class Width:
    """What each source layer keeps: FFN neuron ids and attention head ids, ascending (None: all)."""

    neurons: list[Tensor] | None = None
    heads: list[Tensor] | None = None
    down: list[Tensor] | None = None  # per layer, (hidden, kept neurons) down projections in place of the source's


def choose_width(scores: Importance, ffn_size: int | None, heads: int | None, groups: int) -> Width:
    """Per layer, the `ffn_size` most important neurons and the `heads` most important heads, the same
    number from each of the `groups` key/value groups (None: keep all of that kind)."""
    width = Width()
    if ffn_size is not None:
        width.neurons = [s.topk(ffn_size).indices.sort().values for s in scores.neurons]
    if heads is not None:
        width.heads = []
        for s in scores.heads:
            per_group = len(s) // groups
            best = s.view(groups, per_group).topk(heads // groups, dim=1).indices.sort(dim=1).values
            width.heads.append((best + torch.arange(groups)[:, None] * per_group).flatten())
    return width


def refit_down(source, width: Width, scores: Importance, ridge: float) -> None:
    """Set `width.down`: per layer, the kept neurons' down projection that best reproduces the full FFN's
    output on the calibration tokens (ridge regression towards the source's columns, `fitting.ridge_toward`).

    The FFN output is linear in the activations a, y = a Wᵀ, so the fit needs
    only their Gram matrix G = aᵀa: for the kept set K, ZᵀZ = G[K, K] and
    ZᵀY = G[K, :] Wᵀ.
    """
    width.down = []
    for layer, kept, gram in zip(source.model.layers, width.neurons, scores.grams):
        down = layer.mlp.down_proj.weight.detach().float()  # (hidden, I)
        solved = ridge_toward(gram[kept][:, kept], gram[kept] @ down.T, down[:, kept].T, ridge)
        width.down.append(solved.T.contiguous())


def make_student(source, keep_layers: list[int] | None = None, width: Width | None = None):
    """A new model of `source`'s class with decoder layers `keep_layers` (None: all), each cut to the
    neurons and heads of `width` (`choose_width`; None: full width)."""
    from transformers import AutoModelForCausalLM

    config, width = source.config, width or Width()
    keep = list(range(config.num_hidden_layers)) if keep_layers is None else list(keep_layers)
    check_layers(keep, config.num_hidden_layers)
    settings = config.to_dict()
    settings["num_hidden_layers"] = len(keep)
    if settings.get("layer_types"):
        settings["layer_types"] = [settings["layer_types"][i] for i in keep]
    if width.neurons is not None:
        settings["intermediate_size"] = len(width.neurons[0])
    if width.heads is not None:
        settings["head_dim"] = source.model.layers[0].self_attn.head_dim  # no longer hidden / heads
        settings["num_attention_heads"] = len(width.heads[0])
    student = AutoModelForCausalLM.from_config(type(config).from_dict(settings), dtype=torch.float32)
    state = {}
    for name, value in source.state_dict().items():
        value = value.detach().clone().float()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            if int(layer) not in keep:
                continue
            value = sliced(rest, value, int(layer), width, config.num_attention_heads)
            name = f"model.layers.{keep.index(int(layer))}.{rest}"
        state[name] = value
    student.load_state_dict(state, strict=True)
    student.generation_config = source.generation_config
    return student.eval()


def sliced(name: str, value: Tensor, layer: int, width: Width, num_heads: int) -> Tensor:
    """The part of layer tensor `name` (e.g. `mlp.up_proj.weight`) that `width` keeps."""
    if width.down is not None and name == "mlp.down_proj.weight":
        return width.down[layer].clone()
    if width.neurons is not None and name.startswith("mlp."):
        neurons = width.neurons[layer]
        return value[:, neurons] if name == "mlp.down_proj.weight" else value[neurons]
    if width.heads is not None and name.startswith(("self_attn.q_proj.", "self_attn.o_proj.")):
        head_dim = value.shape[0 if "q_proj" in name else 1] // num_heads
        rows = (width.heads[layer][:, None] * head_dim + torch.arange(head_dim)).flatten()
        return value[:, rows] if "o_proj" in name else value[rows]
    return value
