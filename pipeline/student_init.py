"""Initialising a student from its teacher's source: the same model with layers dropped.

The student keeps the source's embeddings, final norm, LM head and tokenizer
and a chosen subset of its decoder layers, unchanged and in order, so it shares
the vocabulary and starts from real weights but is several times cheaper.
"""

from __future__ import annotations

import torch

from pipeline.errors import MoekdError


def check_layers(keep: list[int], num_layers: int) -> None:
    if not keep:
        raise MoekdError("keep_layers is empty: the student needs at least one layer")
    bad = [i for i in keep if not 0 <= i < num_layers]
    if bad:
        raise MoekdError(f"keep_layers has {bad[0]}, not a layer of the {num_layers}-layer source model")
    if sorted(set(keep)) != list(keep):
        raise MoekdError(f"keep_layers must be increasing without repeats, got {keep}")


def drop_layers(source, keep: list[int]):
    """A new model of `source`'s class holding only the decoder layers `keep` (copied, renumbered)."""
    from transformers import AutoModelForCausalLM

    config = source.config
    check_layers(keep, config.num_hidden_layers)
    settings = config.to_dict()
    settings["num_hidden_layers"] = len(keep)
    if settings.get("layer_types"):
        settings["layer_types"] = [settings["layer_types"][i] for i in keep]
    student_config = type(config).from_dict(settings)
    student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    renamed = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(keep)}
    state = {}
    for name, value in source.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renamed:
                continue
            name = renamed[prefix] + name[len(prefix):]
        state[name] = value.detach().clone().float()
    student.load_state_dict(state, strict=True)
    student.generation_config = source.generation_config
    return student.eval()
