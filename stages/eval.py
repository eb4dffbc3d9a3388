"""Compare models side by side: response loss and perplexity, KL to a teacher cache, exact match and ROUGE-L.

For every model (teacher, students: any causal LMs sharing the prepared
data's tokenizer) and every prepared split, per source (task / data set) and
overall:
- loss / ppl: mean cross-entropy over response tokens, and its exp;
- exact: the share (%) of generated responses (greedy unless do_sample)
  equal to a reference up to case, spacing and a trailing full stop;
- rougeL: ROUGE-L F-measure x100 of the generated response against the
  references, the best reference per example;
and, with `cache`, the mean sparse KL(teacher ‖ model) over the cached tokens
(averaged over the M cached KA samples).

Writes to `output`: results.json (everything), results.md (tables, models as
columns; also printed), predictions/<model>/<split>.jsonl (per example), and
computed/<key>.json, the store that lets a re-run reuse what was computed for
the same model weights, split and settings (`overwrite` recomputes).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.manifest import Manifest
from pipeline.core.config import config_hash, to_dict
from pipeline.core.files import atomic_write_bytes, atomic_write_json, read_json, remove_stale_temporaries
from pipeline.core.outputs import Output, Verdict, judge
from pipeline.core.processes import resolve_device
from pipeline.data.prepared import PreparedData
from pipeline.models.identity import check_tokenizer, content, model_identity
from pipeline.models.loading import (
    honours_remote_code, load_config, load_model, load_tokenizer, pad_token_id, resolve_dtype,
)
from pipeline.student.evaluation import (
    cache_kl, exact_match, example_losses, rouge_l, select_examples, summarize, summarize_by_source,
)
from pipeline.student.generation import generate

VERSION = 3  # of what is computed; a change makes earlier stored results stale
METRICS = (  # (key, table title, format), in the order results.md shows them
    ("exact", "Exact match (% of examples, higher is better)", "{:.1f}"),
    ("rougeL", "ROUGE-L (F-measure x100, higher is better)", "{:.2f}"),
    ("ppl", "Perplexity on response tokens (lower is better)", "{:.3f}"),
    ("loss", "Cross-entropy on response tokens, nats (lower is better)", "{:.4f}"),
)


@dataclass
class Config:
    """Settings of `moekd eval` (models, data and output are required)."""

    models: dict[str, str]  # display name -> local model directory; results.md keeps this order
    data: list[str]  # `moekd prepare` output directories (held-out splits)
    output: str  # the results directory
    cache: str | None = None  # a `moekd cache` directory or URI: adds KL(teacher ‖ model)
    max_examples: int | None = None  # per split, evenly spaced rows (i * rows // max_examples); null = all
    batch_size: int = 8
    generate: bool = True  # false: loss (and KL) only
    max_new_tokens: int = 64
    do_sample: bool = False  # false: greedy decoding
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only: nucleus mass kept
    seed: int = 0  # sampling only: prompt i draws from a generator seeded by (seed, i)
    kl_max_rows: int | None = None  # KL over the cache's first rows only; null = all
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"
    overwrite: bool = False  # recompute instead of reusing stored results
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        if not self.models:
            raise ValueError("models is empty: give at least one, as {display name: model directory}")
        for name, path in self.models.items():
            if not isinstance(path, str) or not str(name).strip():
                raise ValueError(f"models.{name} must map a display name to a model directory, got {path!r}")
        if not self.data:
            raise ValueError("data is empty: give at least one `moekd prepare` output directory")
        if len(set(self.data)) != len(self.data):
            raise ValueError(f"data lists a directory twice: {self.data}")
        for name in ("max_examples", "kl_max_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number or null, got {value}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be positive, got {self.batch_size} and "
                             f"{self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@honours_remote_code
def run(config: Config) -> dict:
    """Evaluate every model on every split (and the cache), write the results and print the tables."""
    splits = dict(zip(split_names(config.data), (PreparedData(d) for d in config.data)))
    cache = Manifest.load(config.cache, whole=True) if config.cache else None  # a KL needs every shard
    made_with = {str(data.directory): (data.tokenizer_fingerprint, None) for data in splits.values()}
    if cache is not None:
        made_with |= cache.identity.made_with(config.cache)
    tokenizers = {name: load_tokenizer(path) for name, path in config.models.items()}
    for name, path in config.models.items():
        check_tokenizer(f"model {name!r}", path, tokenizers[name], None, made_with)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    output = Path(config.output)
    for directory in (output, output / "computed"):
        if directory.is_dir():
            remove_stale_temporaries(directory)
    settings = eval_settings(config, str(dtype).removeprefix("torch."))
    cache_key = None if cache is None else cache_identity(cache)
    cache_data = None if cache is None else cache.identity.data_fingerprint  # the split it was made of
    models, rows = [], {}
    for name, path in config.models.items():
        entry, rows[name] = evaluate_model(name, path, tokenizers[name], splits, cache_key, cache_data, config,
                                           settings, device, dtype)
        models.append(entry)
    results = {  # lists where order matters: the JSON file's keys are sorted
        "settings": settings,
        "data": [{"name": split, "path": str(data.directory), "fingerprint": data.fingerprint, "rows": len(data)}
                 for split, data in splits.items()],
        "cache": None if cache_key is None else {"path": config.cache, "key": cache_key},
        "models": models,
        "config": to_dict(config),
    }
    write_results(output, results, rows)
    print((output / "results.md").read_text(), end="")
    return results


def cache_identity(cache: Manifest) -> str:
    """A hash of what the cache was built from and of its committed shards' contents."""
    shards = [cache.shards[i].sha256 for i in sorted(cache.shards)]
    return config_hash({"identity": cache.identity.json, "shards": shards})


def split_names(paths: list[str]) -> list[str]:
    """Each split is named by its directory's name, or by its path where two names clash."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def eval_settings(config: Config, dtype: str) -> dict:
    """What, besides the model and the data, decides the numbers: "split" for loss and generation, "kl"
    for the KL; "common" for both. Each stored result's key holds the parts it depends on."""
    generation = None
    if config.generate:
        generation = {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample}
        if config.do_sample:
            generation |= {"temperature": config.temperature, "top_p": config.top_p, "seed": config.seed}
    return {
        # batch composition changes float rounding, so batch_size is part of the result's identity
        "common": {"version": VERSION, "dtype": dtype, "batch_size": config.batch_size},
        "split": {"max_examples": config.max_examples, "generation": generation},
        "kl": {"max_rows": config.kl_max_rows},
    }


def evaluate_model(name, path, tokenizer, splits, cache_key, cache_data, config, settings, device, dtype):
    """(results.json entry, example rows per split) of one model, reusing stored results where they match."""
    identity = model_identity(path, load_config(path))
    weights = content(identity)  # moving a model keeps its results
    model = functools.cache(lambda: load_model(path, dtype=dtype, device=device))  # only if something is computed
    store = Path(config.output) / "computed"
    pad_id = pad_token_id(tokenizer)
    kl = None
    if cache_key:
        key = config_hash({"model": weights, "cache": cache_key, **settings["common"], **settings["kl"]})
        kl = stored(store, key, config.overwrite, f"{name} KL")
        if kl is None:
            kl = cache_kl(model(), config.cache, config.kl_max_rows, config.batch_size, pad_id, f"{name} kl")
            atomic_write_json(store / f"{key}.json", kl)
    rows = {}
    for split, data in splits.items():
        # The cache's own split: cross-entropy comes from the KL pass (the same targets), one forward fewer.
        from_cache = kl is not None and data.fingerprint == cache_data and config.kl_max_rows is None
        key = config_hash({"model": weights, "data": data.fingerprint, **settings["common"], **settings["split"],
                           "losses": cache_key if from_cache else "data"})
        rows[split] = stored(store, key, config.overwrite, f"{name} on {split}")
        if rows[split] is None:
            losses = {seq_id: (nll, tokens) for seq_id, _, tokens, nll in kl["examples"]} if from_cache else None
            rows[split] = evaluate_split(model(), tokenizer, data, settings, pad_id, f"{name} {split}", losses)
            atomic_write_json(store / f"{key}.json", rows[split])
    if kl is not None:
        attach_kl(rows, splits, cache_data, kl)
    every_row = [row for split_rows in rows.values() for row in split_rows]
    entry = {
        "name": name,
        "path": path,
        "identity": identity,
        "splits": {split: {"overall": summarize(r), "sources": summarize_by_source(r)} for split, r in rows.items()},
        "overall": summarize(every_row),
        "kl": None if kl is None else {k: v for k, v in kl.items() if k != "examples"},  # per row: predictions/
    }
    return entry, rows


def attach_kl(rows: dict[str, list[dict]], splits: dict[str, PreparedData], cache_data: str | None, kl: dict) -> None:
    """Give the rows of the split the cache was made of their own KL: kl_sum (nats, summed over the row's
    cached positions) and kl_tokens, for per-example statistics."""
    per_row = {seq_id: (kl_sum, tokens) for seq_id, kl_sum, tokens, _ in kl["examples"]}
    for split, data in splits.items():
        if data.fingerprint == cache_data:
            for row in rows[split]:
                if row["seq_id"] in per_row:
                    row["kl_sum"], row["kl_tokens"] = per_row[row["seq_id"]]


def stored(store: Path, key: str, overwrite: bool, what: str):
    """The stored result under `key`, or None when it must be computed (`core.outputs.judge`: a result is
    stored under the hash of what decides it, so one there is this one; `overwrite` here means recompute, so
    what is stored counts as nothing)."""
    path = store / f"{key}.json"
    recorded = {"key": key} if path.is_file() and not overwrite else None
    if judge(Output(path, holds="holds another result"), recorded, {"key": key}, overwrite) is not Verdict.SAME:
        return None
    print(f"eval: {what}: reusing {path}")
    return read_json(path, "stored eval result")


def evaluate_split(model, tokenizer, data: PreparedData, settings: dict, pad_id: int, desc: str,
                   known: dict[int, tuple[float, int]] | None = None) -> list[dict]:
    """One row per selected example: seq_id, source, nll, tokens; with generation also prompt, prediction,
    references and rougeL (x100). `known`: (nll, tokens) by seq_id, computed already."""
    examples = select_examples(data, settings["split"]["max_examples"])
    batch_size = settings["common"]["batch_size"]
    if known is not None:
        losses = [known[e.seq_id] for e in examples]
    else:
        losses = example_losses(model, examples, batch_size, pad_id, f"{desc} loss")
    rows = [{"seq_id": e.seq_id, "source": e.source, "nll": nll, "tokens": n} for e, (nll, n) in zip(examples, losses)]
    generation = settings["split"]["generation"]
    if generation:
        prompts = [e.input_ids[: e.prompt_length] for e in examples]
        predictions = generate(model, tokenizer, prompts, batch_size=batch_size, desc=f"{desc} generate",
                               **generation)
        for row, example, prompt, prediction in zip(rows, examples, prompts, predictions):
            row |= {"prompt": tokenizer.decode(prompt), "prediction": prediction, "references": example.references,
                    "rougeL": 100 * rouge_l(prediction, example.references),
                    "exact": 100 * exact_match(prediction, example.references)}
    return rows


# ---------------------------------------------------------------- outputs

def file_name(name: str) -> str:
    """A display or split name as one safe path component."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "_"


def write_results(output: Path, results: dict, rows: dict[str, dict[str, list[dict]]]) -> None:
    for model, splits in rows.items():
        for split, split_rows in splits.items():
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
            atomic_write_bytes(output / "predictions" / file_name(model) / f"{file_name(split)}.jsonl", lines.encode())
    atomic_write_json(output / "results.json", results)
    atomic_write_bytes(output / "results.md", markdown(results).encode())


def markdown(results: dict) -> str:
    """One table per metric: a row per (split, source), per split and overall; a column per model."""
    models = results["models"]
    names = " | ".join(m["name"] for m in models)
    first = models[0]
    lines = ["# moekd eval", ""]
    for key, title, fmt in METRICS:
        if key not in first["overall"]:
            continue
        lines += [f"## {title}", "", f"| split | source | examples | {names} |",
                  "|---|---|---:|" + "---:|" * len(models)]
        for split in (d["name"] for d in results["data"]):
            for source, summary in first["splits"][split]["sources"].items():
                values = [m["splits"][split]["sources"][source][key] for m in models]
                lines.append(table_row(split, source, summary["examples"], values, fmt))
            values = [m["splits"][split]["overall"][key] for m in models]
            lines.append(table_row(split, "**all**", first["splits"][split]["overall"]["examples"], values, fmt))
        values = [m["overall"][key] for m in models]
        lines += [table_row("**overall**", "", first["overall"]["examples"], values, fmt), ""]
    if results["cache"]:
        kl = " | ".join(f"{m['kl']['kl']:.4f}" for m in models)
        lines += ["## KL(teacher ‖ model) on the cache's tokens, nats (lower is closer)", "",
                  f"| cache | rows | tokens | {names} |", "|---|---:|---:|" + "---:|" * len(models),
                  f"| {results['cache']['path']} | {first['kl']['rows']} | {first['kl']['tokens']} | {kl} |", ""]
    return "\n".join(lines)


def table_row(split: str, source: str, examples: int, values: list[float], fmt: str) -> str:
    return f"| {split} | {source} | {examples} | " + " | ".join(fmt.format(v) for v in values) + " |"
