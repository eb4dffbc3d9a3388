"""Checkpoints of a training run: writing them, their records, checking them, resuming from one.

- A checkpoint is a directory `step-NNNNNNNN/`: the student (save_pretrained,
  so `moekd eval` can load it), its tokenizer, `trainer.pt` (the whole
  optimizer state by parameter name, step, the reader's position, every
  rank's RNG states, ...), whatever the ranks and their kind, so it resumes
  on any number of ranks and with either kind, and, written last,
  `checkpoint.json`: its step and each of its files' size and sha256. Rank 0
  gathers and writes it all under a temporary name, fsynced and renamed.
- A checkpoint is trusted by what it holds, not by its name: rank 0, holding
  the run's lock, resumes from the newest one whose record checks out (its
  own step, exactly its files, their sizes and digests) and passes over
  newer ones that do not, with a warning; every rank then checks that the
  trainer state it loads is that step's.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.core.errors import MoekdError, first_line
from pipeline.core.files import (
    atomic_directory, disk_full, json_bytes, open_confined, parse_json, read_confined, sha256_file,
)
from pipeline.core.processes import Distributed
from pipeline.core.seeding import derive_seed, rng_state, seed_everything, set_rng_state

TRAINER_STATE = "trainer.pt"
CHECKPOINT_RECORD = "checkpoint.json"  # a checkpoint's step and its files' sizes and sha256, written last
RECORD_LIMIT = 1 << 20  # bytes: a record lists a few files (a sharded student's thousands fit)
CHECKPOINT_NAME = re.compile(r"step-(\d{8})")


# The reader's next (epoch, batch, the changes of world size in that epoch: (ranks before, batches each took))
Position = tuple[int, int, tuple[tuple[int, int], ...]]


def checkpoint_entries(directory: Path) -> list[Path]:
    """Every entry of `directory` named like a checkpoint (`step-NNNNNNNN`), whatever it is, oldest first."""
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if CHECKPOINT_NAME.fullmatch(p.name))


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's name says."""
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name)[1])


def remove_entry(path: Path) -> None:
    """Delete `path`: a directory with its contents; a link itself, never what it points to."""
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def save_checkpoint(directory: Path, step: int, model, tokenizer, state: dict, keep: int,
                    weights: dict | None = None) -> Path:
    """Write checkpoint `step` (the model, with `weights` where it does not hold them whole, its tokenizer,
    `state` and, last, its record), then drop all but the newest `keep`. A failed write leaves the earlier
    checkpoints as they were and is one line (a full disk: `files.disk_full`'s)."""
    path = Path(directory) / f"step-{step:08d}"
    try:
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            with open(tmp / TRAINER_STATE, "wb") as f:  # torch.save on a path loses a failed write's errno
                torch.save(state, f)
            # last, and plainly: the directory's rename commits it with the rest
            (tmp / CHECKPOINT_RECORD).write_bytes(json_bytes(checkpoint_record(tmp, step)))
    except (OSError, RuntimeError, SafetensorError) as e:  # each writer reports a failed write its own way
        if failed_errno(e) == errno.ENOSPC:
            raise disk_full(path) from None
        raise MoekdError(f"could not write checkpoint {path} ({type(e).__name__}: {first_line(e)}); the earlier "
                         "checkpoints are intact: re-run the same command to resume") from None
    for old in checkpoint_entries(directory)[:-keep]:
        remove_entry(old)
    return path


# Rust's io::Error, which safetensors reports as text only, ends its message with "(os error N)".
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def failed_errno(error: BaseException | None) -> int | None:
    """The errno behind a failed write: an OSError's own, one in the exceptions it came from (torch.save on a
    file object raises a RuntimeError from the file's OSError), or one a library gave as text (safetensors)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        if match := OS_ERROR_IN_TEXT.search(str(error)):
            return int(match[1])
        error = error.__cause__ or error.__context__
    return None


def checkpoint_record(directory: Path, step: int) -> dict:
    """What a checkpoint says of itself: its step and every file it holds (relative path: size, sha256)."""
    files, _ = directory_files(directory)
    return {"step": step, "files": {name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
                                    for name, path in files.items() if name != CHECKPOINT_RECORD}}


def directory_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """(every regular file below `directory` by its relative path, the relative paths of what is neither a
    regular file nor a directory there: links, pipes, ...); links are not followed."""
    files, others = {}, []
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            relative = path.relative_to(directory).as_posix()
            if path.is_symlink() or not path.is_file():
                others.append(relative)
            else:
                files[relative] = path
    return files, sorted(others)


def check_checkpoint(path: Path) -> None:
    """Refuse (a MoekdError saying why) a checkpoint directory that does not check out: its record (written
    last) must name its own step and exactly the files it holds, each of that size and sha256, among them
    the trainer state and the student's config and safetensors weights."""
    try:
        raw = read_confined(path, CHECKPOINT_RECORD, "checkpoint record", RECORD_LIMIT)
    except FileNotFoundError:
        raise MoekdError(f"it has no {CHECKPOINT_RECORD} (written by a moekd that did not record what its "
                         "checkpoints hold, or not by moekd)") from None
    record = parse_json(raw, f"its {CHECKPOINT_RECORD}")
    if not (isinstance(record, dict) and type(record.get("step")) is int and isinstance(record.get("files"), dict)
            and all(isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str)
                    for entry in record["files"].values())):
        raise MoekdError(f"its {CHECKPOINT_RECORD} is not a record of a step and of its files' sizes and sha256")
    if record["step"] != checkpoint_step(path):
        raise MoekdError(f"its {CHECKPOINT_RECORD} is that of step {record['step']}")
    listed, (files, others) = record["files"], directory_files(path)
    files.pop(CHECKPOINT_RECORD, None)
    unlisted, absent = sorted(set(files) - set(listed)), sorted(set(listed) - set(files))
    if others:
        raise MoekdError(f"{others[0]} is a link, or not a regular file")
    if unlisted:
        raise MoekdError(f"it holds {unlisted[0]}, which its {CHECKPOINT_RECORD} does not list")
    if absent:
        raise MoekdError(f"it lacks {absent[0]}")
    if TRAINER_STATE not in listed or "config.json" not in listed or not any(
            name.endswith(".safetensors") for name in listed):
        raise MoekdError(f"its {CHECKPOINT_RECORD} lacks the trainer state, the config or the weights")
    for name in sorted(listed):  # every size before any hash: a cut file is found at once
        if files[name].stat().st_size != listed[name]["size"]:
            raise MoekdError(f"{name} is {files[name].stat().st_size} bytes, and its record says "
                             f"{listed[name]['size']}")
    for name in sorted(listed):
        with os.fdopen(open_confined(path, name, "checkpoint file"), "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != listed[name]["sha256"]:
                raise MoekdError(f"{name} is not the file its record gives the sha256 of")


def newest_sound_checkpoint(directory: Path) -> tuple[str | None, list[str]]:
    """(the newest checkpoint in `directory` that checks out (`check_checkpoint`), or None; one line for
    each newer checkpoint directory that does not). Entries that are not directories (a stray file or link
    named like a checkpoint) are no checkpoints."""
    skipped = []
    for path in reversed(checkpoint_entries(directory)):
        if path.is_dir() and not path.is_symlink():
            try:
                check_checkpoint(path)
                return str(path), skipped
            except (MoekdError, OSError) as e:  # OSError: a file went or cannot be read while it is checked
                skipped.append(f"{path} does not check out: {first_line(e)}")
    return None, skipped


def load_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer.pt: tensors and plain data only (weights_only), so a checkpoint someone hands
    you cannot run code; anything else is refused in one line."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise MoekdError(f"{path} is not a moekd trainer state holding only tensors and plain data "
                         f"({type(e).__name__}: {first_line(e)}); moekd does not load it") from None


def save_run_checkpoint(directory: Path, processes: Distributed, model, tokenizer, keep: int, parts: dict,
                        position: Position, tokens: int) -> None:
    """Checkpoint the step just taken: `model`, and in trainer.pt each part's state_dict() by its name, the
    reader's next `position`, the `tokens` so far and every rank's RNG states (every rank calls this; rank 0
    gathers and writes it all, its record included)."""
    epoch, first, history = position
    state = {"position": [epoch, first, [list(change) for change in history]], "world_size": processes.world_size,
             "tokens": tokens, "rng": processes.gather(rng_state())}
    state |= {name: part.state_dict() for name, part in parts.items()}
    weights = parts["trainer"].student_weights()
    if processes.rank == 0:
        save_checkpoint(directory, parts["trainer"].steps_done, model, tokenizer, state, keep, weights)


def resume(latest: str | None, processes: Distributed, seed: int, parts: dict) -> tuple[Position, int]:
    """(position, tokens) of checkpoint `latest`, after loading its states into `parts` and this rank's RNGs;
    without one, ((0, 0, ()), 0) after seeding this rank's RNGs from `seed`.

    Rank 0 checked the checkpoint before choosing it (`newest_sound_checkpoint`); every rank checks that the
    trainer state it loads is that of the checkpoint's step. A checkpoint of another number of ranks resumes
    too: the rest of its epoch is shared out among these ranks (`Reader.work`), whose RNGs are seeded afresh
    from (seed, rank, step)."""
    if latest is None:
        seed_everything(derive_seed(seed, "rank", processes.rank))
        return (0, 0, ()), 0
    state = load_trainer_state(latest)
    missing = sorted({"position", "world_size", "tokens", "rng", *parts} - set(state))
    if missing:
        raise MoekdError(f"{Path(latest) / TRAINER_STATE} lacks {', '.join(missing)}: it is not this run's")
    steps_done = state["trainer"].get("steps_done") if isinstance(state["trainer"], dict) else None
    if steps_done != checkpoint_step(latest):
        raise MoekdError(f"{Path(latest) / TRAINER_STATE} is the state after step {steps_done}, not after step "
                         f"{checkpoint_step(latest)}: it is not this checkpoint's")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    epoch, first, history = state["position"]
    history = tuple(tuple(change) for change in history)
    if state["world_size"] == processes.world_size:
        set_rng_state(state["rng"][processes.rank])
        return (epoch, first, history), state["tokens"]
    seed_everything(derive_seed(seed, "rank", processes.rank, "resumed", parts["trainer"].steps_done))
    return (epoch, 0, (*history, (state["world_size"], first))), state["tokens"]

