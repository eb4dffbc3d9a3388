"""A training run's directory: its settings record, its metrics log, and what it holds when a run opens it.

A run directory holds run.json (the settings that decide the numbers, the
ranks it last ran on, and the run's inputs by content), run.lock (held by
the process running it), metrics.jsonl, checkpoints/, final/ and, with
report_to: tensorboard/ and wandb/. A re-run
with the same settings resumes from the newest checkpoint (or finds the run
finished), wherever the directory now lies and whichever `parallel`; other
settings are refused unless overwrite, which starts afresh (the lifecycle of
every output, `core.outputs.judge`); other inputs (another cache, data,
teacher or starting student) always. Entries named like
checkpoints that are not directories are none, and whatever is named like a
later checkpoint than the one resumed goes when the run goes on. A run none of
whose checkpoints checks out (or whose checkpoints have no record: an older
moekd's) is refused unless overwrite, which starts it afresh.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

from pipeline.core.config import to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write_bytes, atomic_write_json, parse_json, read_json, remove_stale_directories
from pipeline.core.outputs import FOREIGN, Output, Verdict, judge
from pipeline.student.checkpoints import checkpoint_entries, checkpoint_step, newest_sound_checkpoint, remove_entry
from pipeline.student.reporting import TENSORBOARD_DIR, WANDB_DIR

RUN_FILE = "run.json"
RUN_LOCK = "run.lock"  # held by the one process that runs in the directory
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
FINISHED = "finished"


# Settings that change neither the losses nor the weights: a run may resume with other values. `output` is
# where the run lies (a run directory moved or copied resumes; its inputs are compared by content), and
# `parallel` how its ranks hold the student (checkpoints hold the whole state either way; the number of
# ranks may change too).
RESUMABLE_WITH_CHANGES = ("output", "parallel", "overwrite", "save_every", "keep_checkpoints",
                          "keep_checkpoints_at_end", "prefetch", "trust_remote_code", "follow_timeout", "report_to")


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step ("step" = steps done).

    A log rather than a commit: lines are appended and flushed as steps end.
    A resumed run first cuts it back to its checkpoint (atomically), so no
    step is ever listed twice; a line that is not a JSON object with an
    integer step (not UTF-8, torn, ...) goes then: silently when it is the
    last line (what a kill mid-write leaves), with a warning naming it when
    it is another (the file was damaged), so that it never blocks a resume.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def keep_until(self, step: int, warn: Callable[[str], None]) -> None:
        """Keep the lines of steps 1 to `step` (none: a run starting afresh), dropping damaged ones."""
        kept = []
        lines = self.path.read_bytes().splitlines() if step and self.path.is_file() else []
        for number, line in enumerate(lines, 1):
            record = metrics_record(line)
            if record is None and number < len(lines):
                warn(f"{self.path} line {number} is not a JSON object with a step; it is dropped")
            if record is not None and record["step"] <= step:
                kept.append(line + b"\n")
        atomic_write_bytes(self.path, b"".join(kept))

    def append(self, record: dict) -> None:
        """Append one line of strict JSON (a non-finite number, e.g. an empty evaluation's, becomes null)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(finite(record), allow_nan=False) + "\n")


def metrics_record(line: bytes) -> dict | None:
    """A metrics.jsonl line as its record, or None if it is not a JSON object with an integer step."""
    try:
        record = parse_json(line, "a metrics line")
    except MoekdError:
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def finite(value):
    """`value` with every non-finite float replaced by None, through lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def run_identity(config, resumable_with_changes: tuple[str, ...]) -> dict:
    """What a run resumes only with: the config, less the fields a run may resume with changed (the number
    of ranks may change too)."""
    settings = {key: value for key, value in to_dict(config).items() if key not in resumable_with_changes}
    return json.loads(json.dumps({"config": settings}))  # tuples as JSON reads them


def inspect_output(output: Path, identity: dict, overwrite: bool, warn: Callable[[str], None]) -> str | None:
    """Rank 0, read-only: FINISHED, the newest checkpoint to resume from, or None to start afresh.

    The output's lifecycle is `core.outputs.judge`'s: a run made with other settings is refused unless
    `overwrite`, which starts afresh, and so are training outputs without a run.json. Newer checkpoints that
    do not check out are passed over, each named by `warn`; a run none of whose checkpoints checks out is
    refused unless `overwrite` (it is never restarted behind its owner's back).
    """
    verdict = judge(run_output(output), recorded_settings(output, identity), identity, overwrite)
    if verdict is not Verdict.SAME:
        return None
    if (Path(output) / FINAL).is_dir():
        return FINISHED
    latest, skipped = newest_sound_checkpoint(Path(output) / CHECKPOINTS)
    if latest is None and skipped and not overwrite:
        raise MoekdError(f"no checkpoint of {output} checks out ({len(skipped)} found; {skipped[0]}); put back "
                         "one that does, or set overwrite=true to start the run afresh")
    for line in skipped:
        warn(f"{line}; it is passed over")
    return latest


def run_output(output: Path) -> Output:
    """A run directory, as a refusal names it."""
    return Output(output, holds="holds a run with other settings", side="the run",
                  unrecorded=f"holds training outputs but no {RUN_FILE}")


def recorded_settings(output: Path, identity: dict) -> dict | None:
    """The settings the run in `output` recorded, as `identity` has them (`FOREIGN`: training outputs without a
    run.json; None: no run)."""
    run_file = Path(output) / RUN_FILE
    if not run_file.is_file():
        return FOREIGN if any((Path(output) / name).exists() for name in (CHECKPOINTS, FINAL, METRICS_FILE)) else None
    recorded = read_json(run_file, "run settings")
    recorded = {key: recorded.get(key) for key in identity} if isinstance(recorded, dict) else dict.fromkeys(identity)
    if isinstance(recorded.get("config"), dict):  # recorded before some of its settings became resumable
        recorded["config"] = {key: value for key, value in recorded["config"].items()
                              if key not in RESUMABLE_WITH_CHANGES}
    return recorded


def start_output(output: Path, identity: dict, latest: str | None, warn: Callable[[str], None],
                 also_clear: tuple[str, ...] = ()) -> None:
    """Rank 0: record the settings and take the run back to `latest`: the metrics after it, and whatever
    is named like a later checkpoint (passed over, or a stray entry), go.

    Without `latest` the old run's checkpoints, final/ and the files in `also_clear` go.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if latest is None:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(output / FINAL, ignore_errors=True)
        for reported in (TENSORBOARD_DIR, WANDB_DIR):  # the replaced run's, in the run directory
            shutil.rmtree(output / reported, ignore_errors=True)
        for name in also_clear:
            (output / name).unlink(missing_ok=True)
    remove_stale_directories(output)
    remove_stale_directories(output / CHECKPOINTS)
    step = checkpoint_step(latest) if latest else 0
    for entry in checkpoint_entries(output / CHECKPOINTS):
        if checkpoint_step(entry) > step:
            remove_entry(entry)
    atomic_write_json(output / RUN_FILE, identity)
    MetricsLog(output / METRICS_FILE).keep_until(step, warn)
