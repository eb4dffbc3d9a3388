"""The quality study: the paper's comparison of distillation methods, with seeds, spread and paired CIs.

    python bench/quality.py --config configs/study/cpu.yaml [key=value ...]

One teacher, one student initialisation, one data budget; every method trains
the same student on the same rows for the same steps, once per seed (the seed
sets the data order and the training draws):

- `sft`: cross-entropy on the labels only (`moekd train`, loss.alpha 0);
- `kd`: the teacher's own routing (`moekd cache` routing.mode topk);
- `ka`: Knowledge Augmentation, M routing samples (`ka`: samples, lam, k_s;
  k_s null means E − 1, the paper's setting);
- `all`: every expert active; `top_p`: top-p routing (`top_p`);
- `sar`: the Student-Aware Router (`moekd sar`, online; `sar` overrides, e.g.
  a reduced step budget on CPU);
- `variants`: more methods by name, each a cache made with its own routing and
  settings (e.g. another k, or `storage: sampled`) or the teacher in the loop
  (`online`, e.g. top_k = the vocabulary: full-distribution KD); the report
  adds each cache's bytes per position.

Cached methods share one cache each (the student's seed does not change the
teacher). Then `moekd eval` scores every model, the teacher and the untrained
student on the held-out split (cross-entropy, KL(teacher ‖ model) on a
held-out cache of the teacher's own routing: over its top-k and the tail as one
outcome, or over the whole vocabulary with `heldout_top_k` set to its size;
ROUGE-L of greedy generations),
and the study reports per method the mean and standard deviation over seeds
and, against `baseline`, the paired difference with a 95% bootstrap CI over
held-out examples and seeds (`pipeline.statistics`): `study.md`, `study.json`
and `study.png` (learning curves and the final comparison) in `output`.

Every step goes through the `moekd` command line and reuses what is already
done (caches, finished runs, stored evaluations), so an interrupted study
resumes where it stopped and a finished one only rebuilds its report.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main as moekd  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import MoekdError  # noqa: E402
from pipeline.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from pipeline.routing import RoutingConfig  # noqa: E402
from pipeline.statistics import Measured, paired_difference, spread  # noqa: E402

CACHED = ("kd", "ka", "all", "top_p")
METHODS = ("sft", *CACHED, "sar")
METRICS = (  # (key in the predictions, numerator, denominator, title, lower is better)
    ("ce", "nll", "tokens", "held-out cross-entropy (nats)", True),
    ("kl", "kl_sum", "kl_tokens", "KL(teacher ‖ student) (nats)", True),
    ("rougeL", "rougeL", None, "ROUGE-L ×100", False),
)


@dataclass
class KaRouting(RoutingConfig):
    """The ka method's routing: the paper's M = 4, λ = 0.05; k_s null means E − 1."""

    mode: Literal["ka"] = "ka"
    samples: int = 4


@dataclass
class Variant:
    """A method beyond the named ones: a cache made with its own settings, or the teacher in the loop."""

    routing: dict[str, Any] = field(default_factory=lambda: {"mode": "topk"})  # the cache's routing
    cache: dict[str, Any] = field(default_factory=dict)  # the cache's settings, on top of the study's `cache`
    online: dict[str, Any] | None = None  # instead of a cache: `moekd train` with teacher= and these settings


@dataclass
class Config:
    output: str  # the study directory
    teacher: str  # the MoE teacher (local directory)
    student: str  # the student's initialisation (local directory)
    train_data: str  # `moekd prepare` output: the training rows (the data budget)
    heldout_data: str  # `moekd prepare` output: the held-out rows every model is scored on
    cache_root: str | None = None  # where the teacher caches go (null: <output>/cache)
    runs_root: str | None = None  # where the training runs go, as <method>-seed<seed> (null: <output>/runs)
    # Another study's or the demo's directories reuse what they hold where the settings are the same:
    # `moekd cache` finds a cache complete, `moekd train` a run finished.
    train_config: str | None = None  # a `moekd train` YAML whose settings every run takes (paths aside)
    heldout_top_k: int | None = None  # the held-out cache's k (null: `cache`'s); the vocabulary size: exact KL
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    variants: dict[str, Variant] = field(default_factory=dict)  # more methods, by name (e.g. other cache storages)
    baseline: str = "kd"  # the method every other is compared with
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ka: KaRouting = field(default_factory=KaRouting)
    top_p: float = 0.9  # the top_p method's router mass
    train: dict[str, Any] = field(default_factory=dict)  # settings every run takes, on top of train_config's
    sar: dict[str, Any] = field(default_factory=dict)  # `moekd sar` settings on top of `train`'s
    cache: dict[str, Any] = field(default_factory=dict)  # `moekd cache` settings shared by every cache
    eval: dict[str, Any] = field(default_factory=dict)  # `moekd eval` settings
    replicates: int = 4000  # bootstrap replicates

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {self.methods}")
        clash = sorted(set(self.variants) & set(METHODS))
        if clash:
            raise ValueError(f"variant {clash[0]!r} has the name of a method; name it otherwise")
        if self.baseline not in self.compared:
            raise ValueError(f"baseline {self.baseline!r} is not among methods or variants {self.compared}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")

    @property
    def compared(self) -> list[str]:
        """Every method of the study: the named ones, then the variants."""
        return list(self.methods) + list(self.variants)


def overrides(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested settings as the command line's `a.b=value` overrides (values as JSON, which YAML reads)."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def run_stage(*args: str) -> None:
    print(f"\n== moekd {' '.join(args)}", flush=True)
    if moekd(list(args)) != 0:
        raise MoekdError(f"`moekd {' '.join(args)}` failed (its error is above); fix it and re-run the study")


def routing(config: Config, method: str, num_experts: int) -> dict:
    if method == "ka":
        ka = {k: v for k, v in config.ka.__dict__.items() if k != "k_s"}
        return ka | {"k_s": config.ka.k_s or num_experts - 1}
    return {"mode": {"kd": "topk", "all": "all", "top_p": "top_p"}[method]} | (
        {"top_p": config.top_p} if method == "top_p" else {})


def num_experts(teacher: str) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(teacher, local_files_only=True)
    return next(getattr(c, key) for key in ("num_experts", "num_local_experts", "n_routed_experts")
                if getattr(c, key, None))


def run_settings(config: Config) -> list[str]:
    """The overrides every training run takes: `train_config`'s settings (its paths aside), then `train`."""
    settings = {}
    if config.train_config:
        settings = yaml.safe_load(Path(config.train_config).read_text()) or {}
        settings = {k: v for k, v in settings.items() if k not in ("output", "student", "cache", "data", "teacher")}
    return overrides(settings) + overrides(config.train)


def run_study(config: Config) -> dict:
    """Caches, training runs, evaluation, then the report; each reused when already done."""
    out = Path(config.output)
    caches = Path(config.cache_root) if config.cache_root else out / "cache"
    runs = Path(config.runs_root) if config.runs_root else out / "runs"
    experts = num_experts(config.teacher)
    k = config.heldout_top_k
    heldout_cache = caches / ("heldout" if k is None else f"heldout-top{k}")
    run_stage("cache", str(heldout_cache), "--teacher", config.teacher, "--data", config.heldout_data,
              *overrides({"routing": {"mode": "topk"}} | config.cache | ({} if k is None else {"top_k": k})))
    models = {"teacher": config.teacher, "start": config.student}
    for method in config.compared:
        variant = config.variants.get(method)
        cached = method in CACHED or (variant is not None and variant.online is None)
        if cached:
            settings = config.cache | variant.cache if variant else config.cache
            route = variant.routing if variant else routing(config, method, experts)
            run_stage("cache", str(caches / method), "--teacher", config.teacher, "--data", config.train_data,
                      *overrides({"routing": route} | settings))
        for seed in config.seeds:
            run = runs / f"{method}-seed{seed}"
            common = ["--student", config.student, *run_settings(config), f"seed={seed}"]
            if variant is not None and variant.online is not None:
                run_stage("train", str(run), "--data", config.train_data, "--teacher", config.teacher, *common,
                          *overrides(variant.online))
            elif method == "sar":
                run_stage("sar", str(run), "--teacher", config.teacher, "--data", config.train_data,
                          *common, *overrides(config.sar))
            elif method == "sft":
                run_stage("train", str(run), "--data", config.train_data, *common, "loss.alpha=0")
            else:
                run_stage("train", str(run), "--cache", str(caches / method), *common)
            models[f"{method}-seed{seed}"] = str(run / "final")
    sizes = {method: cache_size(caches / method) for method in config.compared if (caches / method).is_dir()}
    evaluation = out / "eval"
    run_stage("eval", "--output", str(evaluation), "--cache", str(heldout_cache),
              "data=" + json.dumps([config.heldout_data]), "models=" + json.dumps(models), *overrides(config.eval))
    from pipeline.cache_format import Manifest

    encoding = Manifest.load(heldout_cache).identity["encoding"]
    kl_over = ("the whole vocabulary" if encoding["k"] == encoding["vocab_size"]
               else f"the teacher's top-{encoding['k']} and the rest as one outcome")
    report = summarize(config, evaluation, runs) | {"cache_bytes_per_token": sizes, "kl_over": kl_over}
    write_report(out, report)
    plot(config, out, report)
    return report


# ---------------------------------------------------------------- the report

def predictions(evaluation: Path, model: str, split: str) -> list[dict]:
    from stages.eval import file_name

    path = evaluation / "predictions" / file_name(model) / f"{file_name(split)}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def measured(rows_per_seed: list[list[dict]], num: str, den: str | None) -> Measured:
    nums = [[row[num] for row in rows] for rows in rows_per_seed]
    dens = [[row[den] if den else 1.0 for row in rows] for rows in rows_per_seed]
    return Measured(np.array(nums), np.array(dens))


def summarize(config: Config, evaluation: Path, runs: Path) -> dict:
    """Per method: mean and std over seeds; vs the baseline: paired difference and 95% CI; per metric."""
    split = Path(config.heldout_data).name
    rows = {m: [predictions(evaluation, f"{m}-seed{s}", split) for s in config.seeds] for m in config.compared}
    references = {name: predictions(evaluation, name, split) for name in ("teacher", "start")}
    report = {"seeds": config.seeds, "examples": len(references["teacher"]), "baseline": config.baseline,
              "methods": {}, "references": {}}
    for name, ref_rows in references.items():
        report["references"][name] = {key: measured([ref_rows], num, den).per_seed()[0].item()
                                      for key, num, den, _, _ in METRICS}
    for method in config.compared:
        entry = {}
        for key, num, den, _, _ in METRICS:
            values = measured(rows[method], num, den)
            mean, std = spread(values)
            entry[key] = {"mean": mean, "std": std, "per_seed": values.per_seed().tolist()}
            if method != config.baseline:
                difference, low, high = paired_difference(values, measured(rows[config.baseline], num, den),
                                                          config.replicates)
                entry[key] |= {"vs_baseline": difference, "ci": [low, high]}
        report["methods"][method] = entry
    report["curves"] = {m: [curve(runs / f"{m}-seed{s}") for s in config.seeds] for m in config.compared}
    return report


def cache_size(cache: Path) -> dict[str, float]:
    """Bytes per stored position of a cache: all of it, and its teacher columns alone (without the rows'
    input_ids, positions and seq_id, which every storage shares)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cache_format import Manifest

    manifest = Manifest.load(cache)
    total = teacher = tokens = 0
    for index, info in manifest.shards.items():
        metadata = pq.ParquetFile(pa.BufferReader(manifest.shard_bytes(index))).metadata
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                if chunk.path_in_schema.split(".")[0] not in ("seq_id", "input_ids", "positions"):
                    teacher += chunk.total_compressed_size
        total, tokens = total + info.bytes, tokens + info.tokens
    return {"all": total / max(tokens, 1), "teacher": teacher / max(tokens, 1)}


def curve(run: Path) -> list[float]:
    """A run's training cross-entropy on the labels (metrics.jsonl "ce"), one value per step: every method
    logs it, whatever else its loss holds."""
    return [json.loads(line)["ce"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def write_report(out: Path, report: dict) -> None:
    base = report["baseline"]
    lines = [f"# Quality study: {len(report['seeds'])} seeds, {report['examples']} held-out examples", "",
             f"Mean ± standard deviation over seeds; Δ vs {base}: the paired difference (mean over seeds) "
             "with its 95% bootstrap CI over held-out examples and seeds. KL(teacher ‖ student) over "
             f"{report['kl_over']}.", "",
             "| method | " + " | ".join(f"{title} | Δ vs {base} [95% CI]" for _, _, _, title, _ in METRICS) + " |",
             "|---|" + "---:|---:|" * len(METRICS)]
    for name, values in report["references"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[key]:.3f} | " for key, *_ in METRICS) + " |")
    for method, entry in report["methods"].items():
        cells = []
        for key, *_ in METRICS:
            m = entry[key]
            delta = "—" if method == base else f"{m['vs_baseline']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]"
            cells.append(f"{m['mean']:.3f} ± {m['std']:.3f} | {delta}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    sizes = report.get("cache_bytes_per_token", {})
    if sizes:
        lines += ["", "Cache size, bytes per stored position (all M samples together): the whole cache, and its "
                  "teacher columns alone (every cache also stores each row's input_ids and positions).", "",
                  "| method | bytes / position | teacher columns |", "|---|---:|---:|"]
        lines += [f"| {m} | {v['all']:.1f} | {v['teacher']:.1f} |" for m, v in sizes.items()]
    atomic_write_bytes(out / "study.md", ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "study.json", report)
    print("\n" + "\n".join(lines))


def plot(config: Config, out: Path, report: dict) -> None:
    """study.png: the training curves (mean over seeds, min-max band) and the held-out comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 1 + len(METRICS), figsize=(5 * (1 + len(METRICS)), 8.4))
    axes, deltas = grid[0], grid[1, 1:]
    grid[1, 0].axis("off")
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(report["methods"])}
    ax = axes[0]
    window = 5  # steps per moving average: one step's batch is 8 sequences
    for method, runs in report["curves"].items():
        smooth = np.array([np.convolve(r, np.ones(window) / window, mode="valid") for r in runs])
        steps = np.arange(window, window + smooth.shape[1])
        ax.plot(steps, smooth.mean(0), label=method, color=colors[method])
        ax.fill_between(steps, smooth.min(0), smooth.max(0), color=colors[method], alpha=0.2)
    ax.set(xlabel="optimizer step", ylabel=f"training cross-entropy on the labels ({window}-step mean)",
           title="learning curves (mean over seeds, min-max band)")
    ax.legend(fontsize=8)
    for ax, (key, _, _, title, lower) in zip(axes[1:], METRICS):
        names = list(report["methods"])
        for x, name in enumerate(names):
            entry = report["methods"][name][key]
            ax.errorbar([x], [entry["mean"]], yerr=[entry["std"]], fmt="o", capsize=5, color=colors[name])
            ax.scatter([x] * len(entry["per_seed"]), entry["per_seed"], color=colors[name], s=10, alpha=0.5)
        for ref, style in (("teacher", "--"), ("start", ":")):
            ax.axhline(report["references"][ref][key], color="black", linestyle=style, label=ref)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=f"{title}, {'lower' if lower else 'higher'} is better")
        ax.legend(fontsize=8)
    base = report["baseline"]
    for ax, (key, _, _, title, _) in zip(deltas, METRICS):
        names = [m for m in report["methods"] if m != base]
        for x, name in enumerate(names):
            entry = report["methods"][name][key]
            low, high = entry["ci"]
            ax.errorbar([x], [entry["vs_baseline"]], yerr=[[entry["vs_baseline"] - low], [high - entry["vs_baseline"]]],
                        fmt="o", capsize=5, color=colors[name])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=f"{title}: method − {base}, 95% CI")
    fig.suptitle(f"held-out, {report['examples']} examples; {len(config.seeds)} seeds per method: mean ± std "
                 "(error bars) and each seed (dots)")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv[argv.index("--config") + 1] if "--config" in argv else None
    rest = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
    start = time.perf_counter()
    try:
        run_study(load_config(Config, path, rest))
    except MoekdError as e:
        print(f"quality study: error: {e}", file=sys.stderr)
        return 2
    print(f"\nquality study finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
