"""The quality study: the paper's comparison of distillation methods, with seeds, calibrated intervals and power.

    python bench/quality.py --config configs/study/cpu.yaml [key=value ...]

One teacher, one student initialisation, one data budget; every method trains
the same student on the same rows for the same steps, once per seed (the seed
sets the data order and the training draws):

- `sft`: cross-entropy on the labels only (`moekd train`, loss.alpha 0);
- `kd`: the teacher's own routing (`moekd cache` routing.mode topk);
- `ka`: Knowledge Augmentation, M routing samples (`ka`: samples, lam, k_s;
  k_s null means E − 1, the paper's setting);
- `all`: every expert active; `top_p`: top-p routing (`top_p`);
- `sar`: the Student-Aware Router (`moekd sar`, online; `sar` overrides);
- `variants`: more methods by name, each a cache made with its own routing,
  settings or teacher (e.g. KA with another M, the parent dense model as the
  teacher, `storage: sampled`) or the teacher in the loop (`online`).

`before` runs `moekd` commands first (each reuses what it finished), e.g.
building a variant's teacher. Cached methods share one cache each (the
student's seed does not change the teacher). Then `moekd eval` scores every
model, the teacher and the untrained student on the held-out split:
cross-entropy, exact match and ROUGE-L of greedy generations, and
KL(teacher ‖ model) on a held-out cache of the teacher's own routing (over the
whole vocabulary with `heldout_top_k` set to its size). Every metric is
macro-averaged over the held-out tasks (each task weighs the same).

Per method the report gives the mean and standard deviation over seeds; against
`baseline`, the paired difference with two t intervals (`pipeline.student.statistics`):
over seeds and tasks as random (a claim about unseen tasks like these) and
over seeds alone (about these tasks), each with its minimum detectable effect
at `power`; and the share of the SFT → teacher gap each method closes, with
its interval. With periodic held-out evaluation in the training runs
(`train.eval_every`) it also plots how that share moves with steps:
`study.md`, `study.json` and `study.png` in `output`.

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

from pipeline.core.config import as_overrides, load_config  # noqa: E402
from pipeline.core.errors import MoekdError  # noqa: E402
from pipeline.core.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from pipeline.student.statistics import Comparison, Measured, compare, macro  # noqa: E402
from pipeline.teacher.routing import RoutingConfig  # noqa: E402
from stages.cli import main as moekd  # noqa: E402

CACHED = ("kd", "ka", "all", "top_p")
METHODS = ("sft", *CACHED, "sar")
METRICS = (  # (key, numerator in the predictions, denominator (None: 1), title, lower is better)
    ("ce", "nll", "tokens", "held-out cross-entropy (nats)", True),
    ("exact", "exact", None, "exact match (%)", False),
    ("rougeL", "rougeL", None, "ROUGE-L ×100", False),
    ("kl", "kl_sum", "kl_tokens", "KL(teacher ‖ student) (nats)", True),
)


@dataclass
class KaRouting(RoutingConfig):
    """The ka method's routing: the paper's best M = 2, λ = 0.05; k_s null means E − 1."""

    mode: Literal["ka"] = "ka"
    samples: int = 2


@dataclass
class Variant:
    """A method beyond the named ones: a cache made with its own settings or teacher, or the teacher in the loop."""

    routing: dict[str, Any] = field(default_factory=lambda: {"mode": "topk"})  # the cache's routing
    cache: dict[str, Any] = field(default_factory=dict)  # the cache's settings, on top of the study's `cache`
    teacher: str | None = None  # the cache's teacher (null: the study's), e.g. the parent dense model
    online: dict[str, Any] | None = None  # instead of a cache: `moekd train` with teacher= and these settings
    # instead of a cache: on-policy `moekd rounds` with these settings (`rounds` among them); the study's `train`
    # settings go to every round's training, and its training config is the rounds' train_config
    rounds: dict[str, Any] | None = None

    def __post_init__(self):
        if self.rounds is not None and (self.online is not None or not isinstance(self.rounds.get("rounds"), int)):
            raise ValueError("a rounds variant names its number of rounds (rounds: {rounds: R, ...}) and is not "
                             "also online")

    def final(self, run: Path) -> Path:
        """Where a run of this variant leaves its student."""
        return run / f"round-{self.rounds['rounds']}" / "train" / "final" if self.rounds is not None else run / "final"

    def training_runs(self, run: Path) -> list[Path]:
        """The run directories whose metrics make its curves (each round's, for a rounds variant)."""
        if self.rounds is None:
            return [run]
        return [run / f"round-{r}" / "train" for r in range(1, self.rounds["rounds"] + 1)]


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
    before: list[list[str]] = field(default_factory=list)  # `moekd` commands run first, e.g. building a teacher
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    variants: dict[str, Variant] = field(default_factory=dict)  # more methods, by name
    baseline: str = "kd"  # the method every other is compared with
    contrasts: list[list[str]] = field(default_factory=list)  # more paired comparisons: [method, against], ...
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ka: KaRouting = field(default_factory=KaRouting)
    top_p: float = 0.9  # the top_p method's router mass
    train: dict[str, Any] = field(default_factory=dict)  # settings every run takes, on top of train_config's
    sar: dict[str, Any] = field(default_factory=dict)  # `moekd sar` settings on top of `train`'s
    cache: dict[str, Any] = field(default_factory=dict)  # `moekd cache` settings shared by every cache
    eval: dict[str, Any] = field(default_factory=dict)  # `moekd eval` settings
    level: float = 0.95  # the intervals' confidence level
    power: float = 0.8  # the power at which the minimum detectable effect is given

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {self.methods}")
        clash = sorted(set(self.variants) & set(METHODS))
        if clash:
            raise ValueError(f"variant {clash[0]!r} has the name of a method; name it otherwise")
        if self.baseline not in self.compared:
            raise ValueError(f"baseline {self.baseline!r} is not among methods or variants {self.compared}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least two (the intervals are over seeds), got {self.seeds}")
        for pair in self.contrasts:
            if len(pair) != 2 or not set(pair) <= set(self.compared) or pair[0] == pair[1]:
                raise ValueError(f"a contrast is two different methods of the study, [method, against]; got {pair}")
        for command in self.before:
            if not command or not all(isinstance(part, str) for part in command):
                raise ValueError(f"before holds moekd commands as lists of strings, got {command!r}")

    def variant(self, method: str) -> Variant:
        """A method as a variant (a named method: the plain one, a cache or a run with a final/)."""
        return self.variants.get(method, Variant())

    @property
    def compared(self) -> list[str]:
        """Every method of the study: the named ones, then the variants."""
        return list(self.methods) + list(self.variants)

    @property
    def caches(self) -> Path:
        return Path(self.cache_root) if self.cache_root else Path(self.output) / "cache"

    @property
    def runs(self) -> Path:
        return Path(self.runs_root) if self.runs_root else Path(self.output) / "runs"

    @property
    def heldout_cache(self) -> Path:
        k = self.heldout_top_k
        return self.caches / ("heldout" if k is None else f"heldout-top{k}")


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
    return as_overrides(settings) + as_overrides(config.train)


@dataclass
class Step:
    """One `moekd` command of the study."""

    stage: str
    args: list[str]
    what: str


def models(config: Config) -> dict[str, str]:
    """Every model the evaluation scores, by display name: the teacher, the untrained student, each run."""
    return {"teacher": config.teacher, "start": config.student} | {
        f"{method}-seed{seed}": str(config.variant(method).final(config.runs / f"{method}-seed{seed}"))
        for method in config.compared for seed in config.seeds}


def plan(config: Config, experts: int) -> list[Step]:
    """Every `moekd` command of the study, in order (`experts`: the teacher's, for ka's k_s = E − 1)."""
    steps = [Step(command[0], command[1:], f"before[{i}]") for i, command in enumerate(config.before)]
    heldout = {"routing": {"mode": "topk"}} | config.cache
    if config.heldout_top_k is not None:
        heldout["top_k"] = config.heldout_top_k
    steps.append(Step("cache", [str(config.heldout_cache), "--teacher", config.teacher, "--data", config.heldout_data,
                                *as_overrides(heldout)], "the held-out cache"))
    for method in config.compared:
        variant = config.variants.get(method)
        cached = method in CACHED or (variant is not None and variant.online is None and variant.rounds is None)
        if cached:
            settings = config.cache | variant.cache if variant else config.cache
            route = variant.routing if variant else routing(config, method, experts)
            teacher = variant.teacher if variant and variant.teacher else config.teacher
            steps.append(Step("cache", [str(config.caches / method), "--teacher", teacher, "--data", config.train_data,
                                        *as_overrides({"routing": route} | settings)], f"method {method}'s cache"))
        for seed in config.seeds:
            run = str(config.runs / f"{method}-seed{seed}")
            common = ["--student", config.student, *run_settings(config), f"seed={seed}"]
            if variant is not None and variant.rounds is not None:
                settings = variant.rounds | {"train": config.train | variant.rounds.get("train", {})}
                stage, args = "rounds", [run, "--student", config.student, "--teacher", config.teacher, "--data",
                                         config.train_data, f"seed={seed}", *as_overrides(settings)]
                if config.train_config:
                    args.append(f"train_config={config.train_config}")
            elif variant is not None and variant.online is not None:
                stage, args = "train", [run, "--data", config.train_data, "--teacher", config.teacher, *common,
                                        *as_overrides(variant.online)]
            elif method == "sar":
                stage, args = "sar", [run, "--teacher", config.teacher, "--data", config.train_data, *common,
                                      *as_overrides(config.sar)]
            elif method == "sft":
                stage, args = "train", [run, "--data", config.train_data, *common, "loss.alpha=0"]
            else:
                stage, args = "train", [run, "--cache", str(config.caches / method), *common]
            steps.append(Step(stage, args, f"method {method}, seed {seed}"))
    steps.append(Step("eval", ["--output", str(Path(config.output) / "eval"), "--cache", str(config.heldout_cache),
                               "data=" + json.dumps([config.heldout_data]), "models=" + json.dumps(models(config)),
                               *as_overrides(config.eval)], "the evaluation"))
    return steps


def run_stage(step: Step) -> None:
    print(f"\n== moekd {step.stage} {' '.join(step.args)}", flush=True)
    if moekd([step.stage, *step.args]) != 0:
        raise MoekdError(f"{step.what}: `moekd {step.stage} {' '.join(step.args)}` failed (its error is above); "
                         "fix it and re-run the study")


def run_study(config: Config) -> dict:
    """Every step of `plan` (each reused when already done), then the report."""
    out = Path(config.output)
    for step in plan(config, num_experts(config.teacher)):
        run_stage(step)
    from pipeline.cache.manifest import Manifest

    sizes = {m: cache_size(config.caches / m) for m in config.compared if (config.caches / m).is_dir()}
    encoding = Manifest.load(config.heldout_cache).identity.encoding
    kl_over = ("the whole vocabulary" if encoding.k == encoding.vocab_size
               else f"the teacher's top-{encoding.k} and the rest as one outcome")
    report = summarize(config, out / "eval") | {"cache_bytes_per_token": sizes, "kl_over": kl_over,
                                                "rounds": rounds_costs(config)}
    write_report(out, report)
    plot(out, report)
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


def interval(c: Comparison) -> dict:
    return {"difference": c.difference, "ci": [c.low, c.high], "se": c.se, "df": c.df, "mde": c.mde}


def summarize(config: Config, evaluation: Path) -> dict:
    """Per method and metric: the macro metric per seed, mean and std; against the baseline, the paired
    difference with the crossed (seeds × tasks) and the per-seed interval and their minimum detectable
    effects; the share of the SFT → teacher gap closed, with the crossed interval's bounds."""
    split = Path(config.heldout_data).name
    rows = {m: [predictions(evaluation, f"{m}-seed{s}", split) for s in config.seeds] for m in config.compared}
    references = {name: predictions(evaluation, name, split) for name in ("teacher", "start")}
    tasks = [row["source"] for row in references["teacher"]]
    for method, per_seed in rows.items():
        if any([row["source"] for row in seed_rows] != tasks for seed_rows in per_seed):
            raise MoekdError(f"{method}'s predictions are not of the teacher's held-out examples, in its order")
    keys = [key for key, num, *_ in METRICS if all(num in row for row in references["teacher"])]
    crossed = tasks if len(set(tasks)) > 1 else None  # one task (a data set without sources): seeds alone
    report = {"seeds": config.seeds, "examples": len(tasks), "tasks": len(set(tasks)), "baseline": config.baseline,
              "level": config.level, "power": config.power, "metrics": keys, "methods": {}, "references": {}}
    for name, ref_rows in references.items():
        report["references"][name] = {key: float(macro(metric(key, [ref_rows]), tasks)[0]) for key in keys}
    for method in config.compared:
        entry = {}
        for key in keys:
            values = metric(key, rows[method])
            per_seed = macro(values, tasks)
            entry[key] = {"mean": float(per_seed.mean()), "std": float(per_seed.std(ddof=1)),
                          "per_seed": per_seed.tolist()}
            if method != config.baseline:
                base = metric(key, rows[config.baseline])
                entry[key] |= {"vs_baseline": interval(compare(values, base, crossed, config.level, config.power)),
                               "vs_baseline_these_tasks": interval(compare(values, base, None, config.level,
                                                                           config.power))}
            if "sft" in rows and method != "sft":
                versus = compare(values, metric(key, rows["sft"]), crossed, config.level, config.power)
                gap = report["references"]["teacher"][key] - float(macro(metric(key, rows["sft"]), tasks).mean())
                entry[key]["gap_share"] = None if gap == 0 else {  # no gap: nothing to close
                    "share": versus.difference / gap, "ci": sorted([versus.low / gap, versus.high / gap])}
        report["methods"][method] = entry
    report["contrasts"] = {f"{a} vs {b}": {key: interval(compare(metric(key, rows[a]), metric(key, rows[b]), crossed,
                                                                 config.level, config.power)) for key in keys}
                           for a, b in config.contrasts}
    report["comparisons"] = (len(config.compared) - 1 + len(config.contrasts)) * len(keys)
    report["curves"] = {m: [curve(config.variant(m).training_runs(config.runs / f"{m}-seed{s}")) for s in config.seeds]
                        for m in config.compared}
    return report


def metric(key: str, rows_per_seed: list[list[dict]]) -> Measured:
    _, num, den, _, _ = next(m for m in METRICS if m[0] == key)
    return measured(rows_per_seed, num, den)


def rounds_costs(config: Config) -> dict:
    """Per rounds variant, means over seeds: response tokens the teacher scored, and each stage's seconds summed
    over the rounds (`moekd rounds`'s times.json); beside them, the response tokens of the baseline's cache."""
    from pipeline.cache.manifest import Manifest

    costs = {}
    for method in config.compared:
        variant = config.variant(method)
        if variant.rounds is None:
            continue
        runs = [config.runs / f"{method}-seed{seed}" for seed in config.seeds]
        rounds = range(1, variant.rounds["rounds"] + 1)
        tokens = [sum(json.loads((run / f"round-{r}" / "responses" / "meta.json").read_text())["response_tokens"]
                      for r in rounds) for run in runs]
        times = [json.loads((run / "times.json").read_text()) for run in runs]
        seconds = {stage: float(np.mean([sum(t[f"round-{r}/{stage}"] for r in rounds) for t in times]))
                   for stage in ("generate", "cache", "train")}
        costs[method] = {"rounds": len(rounds), "teacher_tokens": float(np.mean(tokens)), "seconds": seconds}
    baseline = config.caches / config.baseline
    if costs and (baseline / "manifest.json").is_file():
        shards = Manifest.load(baseline).shards.values()
        costs[config.baseline] = {"teacher_tokens": float(sum(shard.tokens for shard in shards))}
    return costs


def cache_size(cache: Path) -> dict[str, float]:
    """Bytes per stored position of a cache: all of it, and its teacher columns alone (without the rows'
    input_ids, positions and seq_id, which every storage shares)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.cache.manifest import Manifest

    manifest = Manifest.load(cache, whole=True)
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


def curve(runs: list[Path]) -> dict[str, list[float]]:
    """A method's training cross-entropy on the labels per step (metrics.jsonl "ce": every method logs it), and
    its held-out loss at each periodic evaluation ("eval_loss", with `train.eval_every`): over its runs in order
    (one, or a rounds variant's rounds, whose steps follow on)."""
    lines, offset = [], 0
    for run in runs:
        these = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        lines += [line | {"step": line["step"] + offset} for line in these]
        offset = lines[-1]["step"] if lines else offset
    evaluations = [line for line in lines if line.get("eval_loss") is not None]
    return {"ce": [line["ce"] for line in lines], "eval_step": [line["step"] for line in evaluations],
            "eval_loss": [line["eval_loss"] for line in evaluations]}


def cell(m: dict) -> str:
    return f"{m['difference']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] | {m['mde']:.3f}"


def write_report(out: Path, report: dict) -> None:
    base, level = report["baseline"], round(100 * report["level"])
    lines = [f"# Quality study: {len(report['seeds'])} seeds, {report['examples']} held-out examples of "
             f"{report['tasks']} unseen tasks", "",
             f"Every metric is the mean over the held-out tasks (each task weighs the same) of the metric within the "
             f"task; per method, the mean ± standard deviation over seeds. Δ vs {base}: the paired difference "
             f"(by seed and example) with its {level}% t interval, first with seeds and tasks both random (a claim "
             "about unseen tasks like these), then with seeds alone (about these tasks); MDE: the difference each "
             f"design would detect with {round(100 * report['power'])}% power. Gap: the share of the SFT → teacher "
             "difference the method closes, with the bounds of its seeds × tasks interval. KL(teacher ‖ student) "
             f"over {report['kl_over']}. {report['comparisons']} comparisons "
             + (f"(against {base}, and the contrasts)" if report.get("contrasts") else f"against {base}")
             + f", each at {level}%: "
             f"about {report['comparisons'] * (1 - report['level']):.1f} would exclude zero by chance where no "
             "method differs.", ""]
    for key, _, _, title, lower in METRICS:
        if key not in report["metrics"]:
            continue
        lines += [f"## {title}, {'lower' if lower else 'higher'} is better", "",
                  f"| method | mean ± sd | Δ vs {base} [{level}% CI], seeds × tasks | MDE | Δ [{level}% CI], seeds "
                  "| MDE | gap closed [CI] |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, values in report["references"].items():
            lines.append(f"| {name} | {values[key]:.3f} | | | | | |")
        for method, entry in report["methods"].items():
            m = entry[key]
            if method == base:
                deltas = "— | | — | "
            else:
                deltas = f"{cell(m['vs_baseline'])} | {cell(m['vs_baseline_these_tasks'])}"
            share = m.get("gap_share")
            gap = "" if share is None else f"{100 * share['share']:.0f}% [{100 * share['ci'][0]:.0f}, " \
                                           f"{100 * share['ci'][1]:.0f}]"
            lines.append(f"| {method} | {m['mean']:.3f} ± {m['std']:.3f} | {deltas} | {gap} |")
        lines.append("")
    if report.get("contrasts"):
        lines += [f"## Contrasts: paired differences (by seed and example), {level}% t intervals over seeds × tasks",
                  "", "| contrast | " + " | ".join(f"{key} Δ [CI] | MDE" for key in report["metrics"]) + " |",
                  "|---|" + "---:|---:|" * len(report["metrics"])]
        lines += [f"| {name} | " + " | ".join(cell(entry[key]) for key in report["metrics"]) + " |"
                  for name, entry in report["contrasts"].items()]
        lines.append("")
    sizes = report.get("cache_bytes_per_token", {})
    if sizes:
        lines += ["Cache size, bytes per stored position (all M samples together): the whole cache, and its "
                  "teacher columns alone (every cache also stores each row's input_ids and positions).", "",
                  "| method | bytes / position | teacher columns |", "|---|---:|---:|"]
        lines += [f"| {m} | {v['all']:.1f} | {v['teacher']:.1f} |" for m, v in sizes.items()]
    costs = {m: c for m, c in report.get("rounds", {}).items() if "seconds" in c}
    if costs:
        baseline = report["rounds"].get(base, {}).get("teacher_tokens")
        lines += ["", "On-policy rounds, means over seeds: response tokens the teacher scored (all rounds"
                  + (f"; {base}'s cache: {baseline:.0f}" if baseline else "") + ") and seconds per stage, summed "
                  "over the rounds (`times.json`).", "",
                  "| method | rounds | teacher tokens | generate s | cache s | train s | total s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {m} | {c['rounds']} | {c['teacher_tokens']:.0f} | {c['seconds']['generate']:.0f} | "
                  f"{c['seconds']['cache']:.0f} | {c['seconds']['train']:.0f} | {sum(c['seconds'].values()):.0f} |"
                  for m, c in costs.items()]
    atomic_write_bytes(out / "study.md", ("\n".join(lines) + "\n").encode())
    atomic_write_json(out / "study.json", report)
    print("\n" + "\n".join(lines))


def plot(out: Path, report: dict) -> None:
    """study.png: held-out cross-entropy along training (or the training curves), each metric per method, and
    each method's difference to the baseline with both intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = report["metrics"]
    fig, grid = plt.subplots(2, 1 + len(keys), figsize=(4.6 * (1 + len(keys)), 8.4))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(report["methods"])}
    ax = grid[0, 0]
    periodic = all(run["eval_loss"] for runs in report["curves"].values() for run in runs)
    for method, runs in report["curves"].items():
        if periodic:
            steps, values = np.array(runs[0]["eval_step"]), np.array([r["eval_loss"] for r in runs])
        else:
            window = 5
            values = np.array([np.convolve(r["ce"], np.ones(window) / window, mode="valid") for r in runs])
            steps = np.arange(window, window + values.shape[1])
        ax.plot(steps, values.mean(0), label=method, color=colors[method])
        ax.fill_between(steps, values.min(0), values.max(0), color=colors[method], alpha=0.15)
    if periodic:
        ax.set(xlabel="optimizer step", ylabel="held-out cross-entropy (nats, token-weighted, a subset)",
               title="held-out loss along training (mean, min-max over seeds)")
    else:
        ax.set(xlabel="optimizer step", ylabel="training cross-entropy on the labels (5-step mean)",
               title="learning curves (mean, min-max over seeds)")
    ax.legend(fontsize=7)
    grid[1, 0].axis("off")
    base = report["baseline"]
    for column, key in enumerate(keys, 1):
        _, _, _, title, lower = next(m for m in METRICS if m[0] == key)
        ax = grid[0, column]
        names = list(report["methods"])
        for x, name in enumerate(names):
            entry = report["methods"][name][key]
            ax.errorbar([x], [entry["mean"]], yerr=[entry["std"]], fmt="o", capsize=5, color=colors[name])
            ax.scatter([x] * len(entry["per_seed"]), entry["per_seed"], color=colors[name], s=10, alpha=0.5)
        for ref, style in (("teacher", "--"), ("start", ":")):
            ax.axhline(report["references"][ref][key], color="black", linestyle=style, label=ref)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(title=f"{title}, {'lower' if lower else 'higher'} is better")
        ax.legend(fontsize=7)
        ax = grid[1, column]
        others = [m for m in names if m != base]
        for x, name in enumerate(others):
            for shift, kind, style in ((-0.12, "vs_baseline", "o"), (0.12, "vs_baseline_these_tasks", "s")):
                m = report["methods"][name][key][kind]
                ax.errorbar([x + shift], [m["difference"]], yerr=[[m["difference"] - m["ci"][0]],
                                                                  [m["ci"][1] - m["difference"]]],
                            fmt=style, capsize=4, color=colors[name])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(others)), others, rotation=30, ha="right")
        ax.set(title=f"method − {base}: seeds × tasks (o), seeds (s)")
    fig.suptitle(f"held-out, {report['examples']} examples of {report['tasks']} unseen tasks; "
                 f"{len(report['seeds'])} seeds per method: mean ± std (bars) and each seed (dots)")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=100)
    plt.close(fig)


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
