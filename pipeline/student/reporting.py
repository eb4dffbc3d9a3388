"""Where a run's metrics go beside metrics.jsonl: TensorBoard and Weights & Biases (`report_to`).

Each reporter gets every step's record with metrics.jsonl's keys (the numbers
among them), at the record's step. A resumed run goes back to its checkpoint:
TensorBoard is told to forget the later steps it saw (`purge_step`), as
metrics.jsonl drops them; Weights & Biases resumes the same run (its id is
derived from the run directory and its settings) and gets the redone steps
again (online, it keeps the values a step was first logged with; a resumed
run recomputes them alike).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pipeline.core.errors import MoekdError

REPORTERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # in the run directory
WANDB_DIR = "wandb"  # where wandb keeps its files of the run (it names the folder itself)


def check_report_to(report_to: tuple[str, ...]) -> None:
    """Refuse an unknown reporter in one line."""
    unknown = [name for name in report_to if name not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to: unknown {', '.join(map(repr, unknown))}; choose among {', '.join(REPORTERS)}")


class Reporters:
    """The run's reporters, opened by rank 0 once it knows the step it starts after."""

    def __init__(self, report_to: tuple[str, ...], *, output: Path, steps_done: int, settings: dict):
        self.tensorboard = self.wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MoekdError("report_to: tensorboard needs the tensorboard package "
                                 "(pip install tensorboard, or moekd's `report` extra)") from None
            self.tensorboard = SummaryWriter(str(Path(output) / TENSORBOARD_DIR),
                                             purge_step=steps_done + 1 if steps_done else None)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise MoekdError("report_to: wandb needs the wandb package (pip install wandb; then `wandb login`, "
                                 "or WANDB_MODE=offline)") from None
            # One wandb run per run directory and settings: a resumed run continues it, a replaced one does not.
            named = json.dumps({"output": str(Path(output).resolve()), "settings": settings}, sort_keys=True)
            run_id = hashlib.sha256(named.encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "moekd"), name=Path(output).name,
                                    id=run_id, resume="allow", dir=str(output), config=settings)

    def log(self, record: dict) -> None:
        """One step's record: its finite numbers, at its step."""
        step = record["step"]
        numbers = {key: float(value) for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
