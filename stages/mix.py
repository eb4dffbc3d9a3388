"""Mix dense branches into an MoE teacher (Branch-Train-MiX): one expert per branch, routers fitted per domain.

Each branch is a copy of one dense Llama-family model fine-tuned on its own
domain (`moekd train` on that domain's prepared data). Their FFNs become the
experts of a Mixtral checkpoint, `top_k` active per token; attention, norms
and embeddings are averaged over the branches; each layer's router is fitted
to tell the branches' domains apart from calibration records whose
`label_field` names the branch they belong to (`pipeline.embedded.mixture`). The output
holds `mix.json` (the branches' identities, settings, router fit figures,
timings); if it already holds this mix it is reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.config import config_hash, to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import sha256_file
from pipeline.data.template import labelled_calibration_ids
from pipeline.embedded.mixture import mix
from pipeline.models.identity import content_identity
from pipeline.models.loading import (
    built_model, honours_remote_code, load_config, load_model, load_tokenizer, save_model,
)

REPORT = "mix.json"


@dataclass
class Config:
    """Settings of `moekd mix` (branches, calibration and output are required)."""

    branches: dict[str, str]  # label -> branch model directory: expert e is the e-th branch
    calibration: str  # instruction records (the prepare input format) whose `label_field` names their branch
    output: str
    label_field: str = "domain"
    top_k: int = 2  # experts per token
    calibration_tokens: int = 16384
    sequence_length: int = 256
    l2: float = 1e-3  # the routers' L2 penalty (on the mean squared weight)
    mass_outside: float | None = 0.4  # router probability left outside the top-k (softened to it); null: as fitted
    overwrite: bool = False
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        if len(self.branches) < 2:
            raise ValueError(f"branches needs at least two models (label -> directory), got {len(self.branches)}")
        if not 1 <= self.top_k <= len(self.branches):
            raise ValueError(f"top_k must be in [1, {len(self.branches)}] (one expert per branch), got {self.top_k}")
        if self.l2 < 0:
            raise ValueError(f"l2 must not be negative, got {self.l2}")
        if (self.mass_outside is not None and self.top_k < len(self.branches)
                and not 0 <= self.mass_outside < 1 - self.top_k / len(self.branches)):
            raise ValueError(f"mass_outside must be in [0, {1 - self.top_k / len(self.branches):.3f}) for top-"
                             f"{self.top_k} of {len(self.branches)} experts, got {self.mass_outside}")


@honours_remote_code
def run(config: Config) -> None:
    """Build the MoE into `config.output`, or reuse the one already there."""
    if not Path(config.calibration).is_file():
        raise MoekdError(f"calibration data not found: {config.calibration}")
    labels = list(config.branches)
    settings = {k: v for k, v in to_dict(config).items() if k not in ("branches", "calibration", "output", "overwrite")}
    identity = {
        "branches": {label: content_identity(path, load_config(path)) for label, path in config.branches.items()},
        "calibration_sha256": sha256_file(Path(config.calibration)),
        "settings_hash": config_hash(settings),
    }
    output = Path(config.output)
    if built_model(output, REPORT, identity, config.overwrite):
        print(f"mix: {output} already holds this teacher; nothing to do")
        return
    started = time.time()
    branches = [load_model(path, dtype="float32", device="cpu") for path in config.branches.values()]
    tokenizer = load_tokenizer(next(iter(config.branches.values())))
    ids, names = labelled_calibration_ids(Path(config.calibration), tokenizer, config.calibration_tokens,
                                          config.sequence_length, config.label_field)
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise MoekdError(f"calibration records have {config.label_field} {unknown[0]!r}, which names no branch "
                         f"({', '.join(labels)})")
    target = torch.tensor([labels.index(name) for name in names]).view_as(ids)
    model, layers = mix(branches, ids, target, config.top_k, config.l2, config.mass_outside)
    report = {
        "identity": identity,
        "config": to_dict(config),
        "experts": labels,
        "calibration_tokens": ids.numel(),
        "tokens_per_expert": {label: names.count(label) for label in labels},
        "mean_domain_accuracy": mean(layers, "domain_accuracy"),
        "mean_fitted_mass_outside_topk": mean(layers, "fitted_mass_outside_topk"),
        "mean_mass_outside_topk": mean(layers, "mass_outside_topk"),
        "seconds": {"build": round(time.time() - started, 1)},
        "layers": layers,
    }
    # An existing output is replaced only once the new teacher is saved: a failure keeps the old one.
    save_model(output, model, tokenizer, {REPORT: report}, replace=True)
    print(
        f"mix: {len(labels)} experts ({', '.join(labels)}), top-{config.top_k}; routers tell the domain of "
        f"{100 * report['mean_domain_accuracy']:.0f}% of calibration tokens (chance {100 / len(labels):.0f}%) "
        f"and leave {100 * report['mean_mass_outside_topk']:.0f}% of their probability outside the top-"
        f"{config.top_k} (as fitted: {100 * report['mean_fitted_mass_outside_topk']:.0f}%); built in "
        f"{report['seconds']['build']:.0f}s -> {output}"
    )


def mean(layers: list[dict], key: str) -> float:
    return round(sum(layer[key] for layer in layers) / len(layers), 4)
