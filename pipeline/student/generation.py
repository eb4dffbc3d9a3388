"""Generating from a causal LM: left-padded batches decoded with a KV cache, greedy or sampled.

Used by `moekd eval` (the generations exact match and ROUGE-L score) and by
SAR's on-policy sequences. The prompt is `input_ids[:prompt_length]`; batches
are left padded, so every row's next token comes from its own last position.
Greedy by default; sampling uses temperature then nucleus (top-p) filtering
with one generator per prompt. Decoding stops at the tokenizer's eos, the
model's generation-config eos ids and the chat template's end-of-turn token.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.errors import MoekdError
from pipeline.core.seeding import generator
from pipeline.data.prepared import padded
from pipeline.data.template import Template
from pipeline.models.loading import model_device, pad_token_id


def stop_token_ids(tokenizer, model) -> set[int]:
    """Ids that end a response: the tokenizer's eos, the model's generation-config eos ids, and the
    chat template's end-of-turn token (the last token of a rendered assistant turn)."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])}
    if tokenizer.chat_template:
        try:
            turn, _ = Template(tokenizer, "chat").encode("Hi", "", "Hello")
            ids.add(turn[-1])
        except MoekdError:
            pass  # the template ends turns without a special token: there is none to stop at
    return ids - {None}


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the fewest most likely tokens whose mass reaches top_p (the top token always stays)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generators) -> torch.Tensor:
    """Greedy (generators None) or sampled next tokens (B,) from last-position logits (B, V)."""
    if generators is None:
        return logits.argmax(-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, -1), top_p).cpu()
    drawn = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]
    return torch.cat(drawn).to(logits.device)


@torch.no_grad()
def generate_ids(
    model, prompts: list, stop_ids: set[int], pad_id: int, max_new_tokens: int,
    temperature: float = 1.0, top_p: float = 1.0, generators: list[torch.Generator] | None = None,
    keep_stop: bool = False,
) -> list[list[int]]:
    """New token ids per prompt (the stop token excluded, or kept with `keep_stop`), decoding one left-padded
    batch with a KV cache.

    Position ids count real tokens only, so a row's positions are those it
    would have alone.
    """
    device = model_device(model)
    input_ids, attention_mask = (t.to(device) for t in padded(prompts, pad_id, left=True))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache_name, cache, generated = cache_argument(model), None, []
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, logits_to_keep=1, **{cache_name: cache})
        cache = out[cache_name]
        token = next_tokens(out.logits[:, -1], temperature, top_p, generators).masked_fill(finished, pad_id)
        generated.append(token)
        finished |= torch.isin(token, stops)
        if finished.all():
            break
        input_ids = token[:, None]
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        position_ids = position_ids[:, -1:] + 1
    rows = torch.stack(generated, 1).tolist() if generated else [[] for _ in prompts]
    return [until_stop(row, stop_ids, keep_stop) for row in rows]


def cache_argument(model) -> str:
    """The forward argument (and output field) of the KV cache: transformers 5.x renamed
    `past_key_values` to `cache`, and the supported range includes releases from before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def until_stop(tokens: list[int], stop_ids: set[int], keep_stop: bool = False) -> list[int]:
    """`tokens` up to the first stop id (included with `keep_stop`)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + keep_stop]
    return tokens


def generate(
    model, tokenizer, prompts: list, *, max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, desc: str = "generate",
) -> list[str]:
    """Decoded continuations of `prompts` (token-id sequences), special tokens and outer whitespace removed.

    Prompts are batched in length order. With `do_sample`, prompt i draws from
    its own generator seeded by (seed, i), so its sample does not depend on
    the batch it lands in.
    """
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = pad_token_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    texts = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="ex") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            generators = [generator("generate", seed, i) for i in batch] if do_sample else None
            ids = generate_ids(model, [prompts[i] for i in batch], stop_ids, pad_id, max_new_tokens,
                               temperature, top_p, generators)
            for i, tokens in zip(batch, ids):
                texts[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(batch))
    return texts

