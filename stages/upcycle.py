"""Build an MoE teacher (Qwen2-MoE format) from a dense Llama-family model, fitted on training tasks.

Splits every FFN into an always-active shared expert of its most important
neurons plus routed experts of clustered neurons, fits each layer's router (and
refits the down projections) on calibration tokens from the training split, and
writes a standard transformers model any `AutoModelForCausalLM` loads. The
output holds `upcycle.json` (source identity, partition, router fit figures,
timings); if it already holds this build it is reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.core.config import config_hash, to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import sha256_file
from pipeline.data.template import calibration_ids
from pipeline.embedded.upcycle import Layout, upcycle
from pipeline.models.identity import model_identity
from pipeline.models.loading import built_model, honours_remote_code, load_model, load_tokenizer, save_model

REPORT = "upcycle.json"


@dataclass
class Config:
    """Settings of `moekd upcycle`."""

    source: str = "runs/material/model"  # dense Llama-family model directory
    calibration: str = "runs/material/train.jsonl"  # training-task records (the prepare input format)
    output: str = "runs/teacher"
    layout: Layout = field(default_factory=Layout)
    calibration_tokens: int = 24576
    sequence_length: int = 256
    router_steps: int = 200
    ridge: float | None = 0.1  # refit down projections by ridge regression (None: keep the dense ones)
    follow_dense: bool = True  # fit each layer to the dense model's residual stream, not its own FFN
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)


@honours_remote_code
def run(config: Config) -> None:
    """Build the teacher into `config.output`, or reuse the one already there."""
    torch.manual_seed(config.seed)
    dense = load_model(config.source, dtype="float32", device="cpu")
    identity = build_identity(config, dense)
    output = Path(config.output)
    if built_model(output, REPORT, identity, config.overwrite, models=("source",)):
        print(f"upcycle: {output} already holds this teacher; nothing to do")
        return
    started = time.time()
    tokenizer = load_tokenizer(config.source)
    calibration = calibration_ids(Path(config.calibration), tokenizer, config.calibration_tokens,
                                  config.sequence_length)
    model, layers = upcycle(
        dense, calibration, config.layout, config.seed, config.router_steps, config.ridge, config.follow_dense
    )
    report = {
        "identity": identity,
        "config": to_dict(config),
        "calibration_tokens": calibration.numel(),
        "expert_size": model.config.moe_intermediate_size,
        "active_fraction": active_fraction(config.layout, dense.config.intermediate_size),
        "mean_router_topk_overlap": mean(layers, "router_topk_overlap"),
        "mean_layer_relative_error": mean(layers, "dense_relative_error"),
        "seconds": {"build": round(time.time() - started, 1)},
        "layers": layers,
    }
    # An existing output is replaced only once the new teacher is saved: a failure keeps the old one.
    save_model(output, model, tokenizer, {REPORT: report}, replace=True)
    print(
        f"upcycle: {config.layout.num_experts} experts, top-{config.layout.top_k}, shared {config.layout.shared_size} "
        f"neurons ({100 * report['active_fraction']:.0f}% of the FFN active); router picks the top experts "
        f"{100 * report['mean_router_topk_overlap']:.0f}% of the time (chance "
        f"{100 * config.layout.top_k / config.layout.num_experts:.0f}%); built in {report['seconds']['build']:.0f}s -> {output}"
    )


def build_identity(config: Config, source) -> dict:
    """What decides the teacher: the source model, the calibration data and the settings."""
    if not Path(config.calibration).is_file():
        raise MoekdError(f"calibration data not found: {config.calibration}")
    settings = {k: v for k, v in to_dict(config).items() if k not in ("source", "calibration", "output", "overwrite")}
    return {
        "source": model_identity(config.source, source),
        "calibration_sha256": sha256_file(Path(config.calibration)),
        "settings_hash": config_hash(settings),
    }


def active_fraction(layout: Layout, intermediate_size: int) -> float:
    expert_size = (intermediate_size - layout.shared_size) // layout.num_experts
    return round((layout.shared_size + layout.top_k * expert_size) / intermediate_size, 4)


def mean(layers: list[dict], key: str) -> float:
    values = [layer[key] for layer in layers if key in layer]
    return round(sum(values) / len(values), 4) if values else 0.0
