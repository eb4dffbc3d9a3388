"""Diagnose an MoE teacher: router mass outside the top-k, expert drop per domain, KA headroom.

Forward passes of the teacher (and, where given, the student at its start and
the teacher's parent dense model) over a prepared held-out split, grouped by
domain or source (`pipeline.teacher.diagnostics`). Writes `diagnose.json`,
`diagnose.md` (also printed) and `diagnose.png` (the expert-drop matrix,
router mass per layer, cross-entropy by active experts) to `output`; a re-run
with the same models, data and settings prints the stored report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.core.config import config_hash, to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write_bytes, atomic_write_json, read_json
from pipeline.core.outputs import FOREIGN, Output, Verdict, judge, recorded_in
from pipeline.core.processes import resolve_device
from pipeline.data.prepared import PreparedData
from pipeline.models.identity import check_tokenizer, content_identity
from pipeline.models.loading import (
    honours_remote_code, load_config, load_model, load_tokenizer, pad_token_id, resolve_dtype,
)
from pipeline.student.evaluation import select_examples
from pipeline.teacher.diagnostics import markdown, measure, summarize
from pipeline.teacher.routing import RoutingConfig

REPORT = "diagnose.json"


@dataclass
class KaSettings:
    """The KA samples whose distance to the top-k routing is measured: the paper's M = 2, λ = 0.05, k_s = E − 1."""

    samples: int = 2
    lam: float = 0.05
    k_s: int | None = None  # null: E − 1
    seed: int = 0


@dataclass
class Config:
    """Settings of `moekd diagnose` (teacher, data and output are required)."""

    teacher: str  # the MoE teacher (local directory)
    data: str  # a `moekd prepare` output: the held-out split
    output: str
    student: str | None = None  # the student at its start: its KL to the teacher is KA headroom's yardstick
    dense: str | None = None  # the teacher's parent dense model, for its cross-entropy beside the MoE's
    group_by: Literal["domain", "source"] = "domain"  # domain: a source up to its "/"
    expert_names: list[str] | None = None  # expert e's group; null: the teacher's mix.json, if it has one
    ka: KaSettings = field(default_factory=KaSettings)
    max_examples: int | None = None  # evenly spaced rows of the split; null: all
    batch_size: int = 16
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be positive or null, got {self.max_examples}")
        if self.ka.samples < 1 or not 0 <= self.ka.lam <= 1:
            raise ValueError(f"ka needs samples >= 1 and lam in [0, 1], got {self.ka.samples} and {self.ka.lam}")


@honours_remote_code
def run(config: Config) -> dict:
    """Measure (or reuse) the diagnostics of `config.teacher`, write and print the report."""
    data = PreparedData(config.data)
    models = {"teacher": config.teacher, "student": config.student, "dense": config.dense}
    models = {role: path for role, path in models.items() if path}
    made_with = {str(data.directory): (data.tokenizer_fingerprint, None)}
    for role, path in models.items():
        check_tokenizer(f"{role} {path}", path, load_tokenizer(path), None, made_with)
    names = config.expert_names or mix_experts(Path(config.teacher))
    identity = {
        "models": {role: content_identity(path, load_config(path)) for role, path in models.items()},
        "data": data.fingerprint,
        "settings": config_hash({k: v for k, v in to_dict(config).items()
                                 if k not in ("teacher", "data", "output", "student", "dense", "device")}),
    }
    output = Path(config.output)
    stored = recorded_in(output, REPORT, unrecorded=None)
    recorded = None if stored is None else stored.get("identity") or FOREIGN
    where = Output(output, holds="holds a diagnosis of other models, data or settings")
    if judge(where, recorded, identity, overwrite=True) is Verdict.SAME:  # another diagnosis is replaced
        print(f"diagnose: reusing {output / REPORT}")
        print((output / "diagnose.md").read_text(), end="")
        return stored
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    loaded = {role: load_model(path, dtype=dtype, device=device) for role, path in models.items()}
    experts = loaded["teacher"].config.get_text_config()
    num_experts = next(getattr(experts, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                       if getattr(experts, k, None))
    ka = RoutingConfig(mode="ka", samples=config.ka.samples, lam=config.ka.lam,
                       k_s=config.ka.k_s or num_experts - 1, seed=config.ka.seed)
    examples = select_examples(data, config.max_examples)
    measured = measure(loaded["teacher"], examples, pad_token_id(load_tokenizer(config.teacher)),
                       group_by=config.group_by, ka=ka, student=loaded.get("student"), dense=loaded.get("dense"),
                       batch_size=config.batch_size)
    report = {"identity": identity, "config": to_dict(config), "ka": to_dict(ka),
              **summarize(measured, names)}
    text = markdown(report, f"moekd diagnose: {config.teacher} on {data.directory.name}")
    atomic_write_bytes(output / "diagnose.md", text.encode())
    plot(report, output / "diagnose.png")
    atomic_write_json(output / REPORT, report)  # last: its presence means the others are complete
    print(text, end="")
    return report


def mix_experts(teacher: Path) -> list[str] | None:
    """The expert names a `moekd mix` teacher records (its branches' labels), else None."""
    path = teacher / "mix.json"
    if not path.is_file():
        return None
    experts = read_json(path, "mix report").get("experts")
    if not (isinstance(experts, list) and all(isinstance(e, str) for e in experts)):
        raise MoekdError(f"{path}: 'experts' must be a list of names")
    return experts


def plot(report: dict, path: Path) -> None:
    """diagnose.png: the expert-drop matrix, router mass per layer and cross-entropy by active experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(report["expert_drop"])
    names = report.get("expert_names") or [str(e) for e in range(report["experts"])]
    matrix = np.array([[cell["change"] for cell in report["expert_drop"][g]] for g in groups])
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.8))
    limit = max(np.abs(matrix).max(), 1e-6)
    image = a.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
    a.set_xticks(range(len(names)), names, rotation=30, ha="right")
    a.set_yticks(range(len(groups)), groups)
    for (i, j), value in np.ndenumerate(matrix):
        a.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
    a.set(title="held-out CE change when an expert is dropped (nats)", xlabel="dropped expert", ylabel="group")
    fig.colorbar(image, ax=a, fraction=0.046)
    b.plot(report["mass_outside_topk"], marker="o", label=f"router mass outside the top-{report['top_k']}")
    b.plot(report["mutual_information_bits"], marker="s", label="MI(top-1 expert; group), bits")
    b.set(xlabel="MoE layer", title="routing per layer")
    b.legend(fontsize=8)
    ks = list(report["ce_by_active_experts"])
    c.plot([int(k) for k in ks], list(report["ce_by_active_experts"].values()), marker="o", label="MoE teacher")
    if "dense_ce" in report:
        c.axhline(report["dense_ce"], color="black", linestyle="--", label="parent dense")
    c.axvline(report["top_k"], color="grey", linestyle=":", label="its own k")
    c.set(xlabel="active experts k", ylabel="held-out CE (nats)", title="cross-entropy by active experts")
    c.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
