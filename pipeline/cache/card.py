"""A cache's card: what a person (and the Hugging Face Hub's dataset tooling) reads about a cache.

`summary` is the few lines `moekd inspect` prints: teacher, data, whose
responses, routing, storage, shards, status, tokens and bytes. A complete
cache also gets `README.md` (`write_card`): YAML front matter in the Hub's
dataset-card fields (license, task, size, tags, and a `configs` entry that
lists the committed shard files, so `datasets.load_dataset(<cache>)` and the
Hub's viewer read exactly the committed rows), then the summary, how to
verify the cache and how to read it with pyarrow alone.

The card is derived from the manifest and the commit records only, so every
writer of a cache writes the same bytes, and it is no part of the identity: it
never blocks a resume, and a cache without one (an older moekd's, or another
tool's) reads as before. It is written once the cache is complete; overwriting
the cache removes it first (`records.remove_cache`).
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from pipeline.cache.identity import Encoding
from pipeline.cache.manifest import Manifest
from pipeline.cache.records import CARD

UNKNOWN_LICENSE = "unknown"  # a Hub license identifier: the cache's terms are those of its teacher and data
SIZE_CATEGORIES = ["n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                   "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"]


def summary(manifest: Manifest, located: bool = True) -> str:
    """What the cache is, in lines of `name  value`; '?' for whatever a foreign manifest does not say. Not
    `located`: without the line naming where it is (the card, which travels with the cache)."""
    identity, shards = manifest.identity, list(manifest.shards.values())
    encoding = identity.encoding  # checked by Manifest.load; the rest may be absent in a foreign cache
    tokens = sum(s.tokens for s in shards)
    size = sum(s.bytes for s in shards)
    samples = encoding.num_samples
    teacher = identity.teacher
    lines = [
        *([f"cache      {manifest.location}"] if located else []),
        f"teacher    {said(manifest.info, 'teacher_path')} ({said(teacher, 'model_type')}, "
        f"weights {str(said(teacher, 'weights_fingerprint'))[:12]})",
        f"data       {said(manifest.info, 'data_path')} (fingerprint {str(known(identity.data_fingerprint))[:12]}, "
        f"{known(identity.rows)} sequences)",
        f"responses  {generator_text(identity.generator)}",
        f"routing    {routing_text(identity.routing)}",
        f"stored     {stored(encoding)}, dtype {known(identity.dtype)}",
        f"shards     {len(shards)}/{known(identity.num_shards)} committed, {known(identity.shard_size)} "
        "sequences each",
        f"status     {status(manifest)}",
        f"tokens     {tokens} response tokens, {size / 1e6:.2f} MB"
        + (f", {size / tokens:.1f} bytes/token, {size / (tokens * samples):.1f} bytes/token/sample" if tokens else ""),
    ]
    return "\n".join(lines)


def card(manifest: Manifest) -> str:
    """The text of a complete cache's `README.md`."""
    identity, shards = manifest.identity, [manifest.shards[i] for i in sorted(manifest.shards)]
    encoding = identity.encoding
    rows = sum(s.rows for s in shards)
    front = {
        "license": manifest.info.get("license") or UNKNOWN_LICENSE,
        "task_categories": ["text-generation"],
        "tags": ["moekd", "knowledge-distillation", "teacher-logits", "mixture-of-experts"],
        "size_categories": [SIZE_CATEGORIES[min(max(int(math.log10(max(rows, 1))) - 2, 0), len(SIZE_CATEGORIES) - 1)]],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": [s.file for s in shards]}]}],
    }
    teacher = str(said(identity.teacher, "name"))
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# Teacher-logit cache of {teacher}", "",
        "A moekd cache: the distributions of a Mixture-of-Experts teacher over "
        "the response tokens of a prepared dataset, for offline knowledge distillation "
        "(`moekd train cache=<this cache>`). The license above is the one given when the cache was written "
        f"({UNKNOWN_LICENSE!r} when none was); a cache's terms are also those of its teacher and data.", "",
        "```", summary(manifest, located=False), "```", "",
        "## Verify", "",
        "Every shard against its commit record (size, sha256, schema, rows):", "",
        "```", "moekd verify <this directory or URI>", "```", "",
        "## Read", "",
        reading(encoding), "",
        "`manifest.json` holds the identity (teacher weights fingerprint, data fingerprint, routing, encoding); "
        "`commits/shard-NNNNN.json` commit each shard; only committed files (listed above) count.", "",
    ]
    return "\n".join(lines)


def reading(encoding: Encoding) -> str:
    """How to read this cache's rows with pyarrow and numpy."""
    if encoding.sampled:
        decode = ["sizes = np.asarray(table['sample_sizes'][0].values)  # distinct ids per position",
                  "deltas = np.asarray(table['sample_ids'][0].values)  # delta-coded within each position",
                  "starts = np.cumsum(sizes) - sizes",
                  "ids = np.concatenate([np.cumsum(deltas[s:s + n]) for s, n in zip(starts, sizes)])",
                  f"counts = np.asarray(table['sample_counts'][0].values)  # each position's sum to {encoding.draws}"]
        what = (f"Each row is a sequence; per stored position, {encoding.draws} tokens drawn from the teacher "
                f"(the mixture of its M={encoding.num_samples} routing samples), as distinct ids and counts.")
    else:
        decode = [f"M, k, T = {encoding.num_samples}, {encoding.k}, len(table['positions'][0])",
                  "ids = np.cumsum(np.asarray(table['topk_ids'][0].values).reshape(M, T, k), axis=-1)",
                  "logprobs = np.asarray(table['topk_logprobs'][0].values).reshape(M, T, k)",
                  "tail = 1 - np.exp(logprobs).sum(-1)  # the teacher's mass outside the top-k"]
        what = (f"Each row is a sequence; per stored position and routing sample (M={encoding.num_samples}), the "
                f"teacher's top-{encoding.k} token ids (ascending, delta-coded) and log-probabilities over the full "
                f"vocabulary ({encoding.vocab_size}).")
    return "\n".join([
        what + " `positions[t]` indexes `input_ids`; its distribution predicts `input_ids[positions[t] + 1]`.", "",
        "```python", "import json, numpy as np, pyarrow.parquet as pq",
        "record = json.load(open('commits/shard-00000.json'))", "table = pq.read_table(record['file'])",
        *decode, "```", "",
        "Or with `datasets` (the raw columns): `datasets.load_dataset('<this directory, or ORG/NAME on the Hub>')`.",
    ])


def write_card(manifest: Manifest) -> bool:
    """Write (or bring up to date) the card of a complete cache; False, writing nothing, if it is not complete."""
    manifest.gather()
    if manifest.problems():
        return False
    text = card(manifest).encode()
    try:
        current = manifest.store.read(CARD, len(text) + 1)
    except FileNotFoundError:
        current = None
    if current != text:
        manifest.store.put(CARD, text)
    return True


def model_card_license(model: str | Path) -> str | None:
    """The `license` of a local model directory's card (README.md front matter), or None."""
    from huggingface_hub.repocard import metadata_load

    try:
        license = (metadata_load(Path(model) / "README.md") or {}).get("license")
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return license if isinstance(license, str) else None


def generator_text(generator) -> str:
    """Whose responses the data holds: the dataset's, or a model's (`moekd generate`)."""
    if generator is None:
        return "the dataset's"
    model, sampling = generator.get("model"), generator.get("sampling")
    return (f"generated by {said(model, 'name')} ({said(model, 'model_type')}, weights "
            f"{str(said(model, 'weights_fingerprint'))[:12]}), temperature {said(sampling, 'temperature')}, "
            f"top_p {said(sampling, 'top_p')}, on_policy {said(generator, 'on_policy')}")


def status(manifest: Manifest) -> str:
    """Whether the cache is complete, as `Manifest.problems` judges it."""
    if manifest.layout is None:
        return "? (the manifest does not say how many shards it has)"
    problems = manifest.problems()
    return f"incomplete: {'; '.join(problems)}" if problems else "complete"


def stored(encoding: Encoding) -> str:
    if encoding.sampled:
        return (f"{encoding.draws} tokens drawn per position from the mixture of M={encoding.num_samples} "
                f"samples, vocab {encoding.vocab_size}")
    return (f"top-{encoding.k} of vocab {encoding.vocab_size}, M={encoding.num_samples} samples"
            + (" + aggregate" if encoding.aggregate else ""))


def said(section, key: str):
    """What a manifest section says under `key`, or '?'."""
    return section.get(key, "?") if isinstance(section, dict) else "?"


def known(value):
    """A field of the identity, or '?' where the manifest does not say."""
    return "?" if value is None else value


def routing_text(routing) -> str:
    if not isinstance(routing, dict) or not {"mode", "samples", "lam", "k_s", "seed", "top_p"} <= set(routing):
        return "?"
    mode = routing["mode"]
    if mode == "ka":
        k_s = routing["k_s"] if routing["k_s"] is not None else "k"
        return f"ka (M={routing['samples']}, lambda={routing['lam']}, k_s={k_s}, seed={routing['seed']})"
    return f"top_p (p={routing['top_p']})" if mode == "top_p" else mode
