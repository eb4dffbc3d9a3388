"""Stage one's teacher behind one interface: a backend turns a shard's prepared rows into teacher records.

Every backend is a `capture.TeacherBackend`: a `models.backend.Backend`
(made without starting anything costly, used as a context, `start`ed once
there is work, progress reported to the caller) whose work is
`records(examples, progress)`: one `TeacherRecord` per prepared row, with
the teacher's top-k log-probs per routing sample (or draws from their
mixture) at the row's training targets, as `capture.Capture` asks. The
backends give the same records for the same settings:

- `TransformersTeacher`: the model in this process, routed by hooks
  (`routing.RoutingHooks`), captured by `capture.capture_batch`; every
  storage, routing mode and a routers file;
- `VllmTeacher` (`teacher.vllm`): the model in a vLLM engine, its routing
  overridden inside it; top-k only, at engine speed on GPUs.

`BACKENDS` names them: `moekd cache backend=NAME` picks one by name and
asks it (`refusal`) what it cannot do; nothing else depends on which it is.
A new backend is a `TeacherBackend` and an entry in `BACKENDS`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.cache.shards import TeacherRecord
from pipeline.data.batch import collate_examples
from pipeline.data.prepared import PreparedExample
from pipeline.models.backend import EngineConfig, Progress, no_progress
from pipeline.models.identity import model_identity
from pipeline.models.loading import Placement, input_device, load_model
from pipeline.models.logprobs import vocab_size
from pipeline.teacher.capture import Capture, TeacherBackend, capture_batch
from pipeline.teacher.routers import apply_routers
from pipeline.teacher.routing import RoutingHooks
from pipeline.teacher.vllm import VllmTeacher


class TransformersTeacher(TeacherBackend):
    """The teacher as a transformers model in this process: its routing by hooks, batches of rows of like length
    (a fixed plan, so that the numbers never depend on how workers split the shards)."""

    name = "transformers"

    def __init__(self, *, teacher: str, capture: Capture, dtype: torch.dtype, device: torch.device, pad_id: int,
                 routers: str | None = None, engine: EngineConfig | None = None, placement: Placement | None = None):
        """Load the teacher on `device`, or over several as `placement` says (and the `routers` a `moekd sar` run
        adapted, after checking it is their teacher)."""
        self.model = load_model(teacher, dtype=dtype, device=device, placement=placement)
        self.device = input_device(self.model)
        if routers:
            apply_routers(self.model, routers)
        self.identity = model_identity(teacher, self.model)
        self.vocab_size = vocab_size(self.model)
        self.capture, self.pad_id = capture, pad_id
        self.routing: RoutingHooks | None = None

    @classmethod
    def refusal(cls, capture: Capture, *, routers: str | None, engine: EngineConfig,
                placement: Placement | None = None) -> str | None:
        return "engine settings apply to backend=vllm only" if engine != EngineConfig() else None

    def __enter__(self) -> TransformersTeacher:
        """Install the routing hooks: a routing the model's family cannot take is refused here."""
        self.routing = RoutingHooks(self.model, self.capture.routing)
        return self

    def close(self) -> None:
        if self.routing is not None:
            self.routing.remove()
            self.routing = None

    def records(self, examples: list[PreparedExample], progress: Progress = no_progress) -> list[TeacherRecord]:
        capture = self.capture
        order = sorted(examples, key=lambda e: (len(e.input_ids), e.seq_id))
        records = []
        for start in range(0, len(order), capture.batch_size):
            batch = collate_examples(order[start : start + capture.batch_size], self.pad_id).to(self.device)
            records += capture_batch(self.model, self.routing, batch, num_samples=capture.routing.samples,
                                     k=capture.top_k, aggregate=capture.aggregate, seed=capture.routing.seed,
                                     draws=capture.draws if capture.storage == "sampled" else None)
            progress(batch.tokens)
        return sorted(records, key=lambda r: r.seq_id)


BACKENDS: dict[str, type[TeacherBackend]] = {backend.name: backend for backend in (TransformersTeacher, VllmTeacher)}


def open_teacher(name: str, *, teacher: str | Path, capture: Capture, dtype: torch.dtype, device: torch.device,
                 pad_id: int, routers: str | None = None, engine: EngineConfig | None = None,
                 placement: Placement | None = None) -> TeacherBackend:
    """The backend `name` for `teacher` (a local model directory), made from the stage's settings."""
    return BACKENDS[name](teacher=str(teacher), capture=capture, dtype=dtype, device=device, pad_id=pad_id,
                          routers=routers, engine=engine or EngineConfig(), placement=placement)
