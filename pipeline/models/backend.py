"""A model run over prepared rows by some engine: the one interface every backend of moekd has.

Whatever runs the model (transformers in this process, a vLLM engine, a next
one) is a `Backend`, with one life:

- made from its settings, it reads what identifies the model (`identity`,
  `vocab_size`) and starts nothing costly; what it cannot do is refused
  before it is made (its class's `refusal`, asked by the stage's config);
- as a context (`with backend:`), it holds what it needs while in use
  (routing hooks, an engine) and lets it go at the end;
- `start()` starts what costs time (an engine) and checks what only that can
  check; called again, it does nothing. A stage calls it before it writes
  anything where there is work to do, and not at all for a finished output;
- `settings()` is what of the backend, beyond the model, decides what it
  computes: part of the output's identity (None: nothing);
- its work method takes prepared rows and reports progress through
  `progress(n)`: n more targets done. The caller owns the progress bar.

Stage one's teachers (`pipeline.teacher.backends`: `records`, the teacher's
distributions at a shard's training targets) are backends; a generation
backend (responses sampled for prepared prompts) is one more work method on
the same life.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

Progress = Callable[[int], None]  # n more targets (or rows) done


def no_progress(n: int) -> None:
    """A `Progress` that shows nothing."""


class Backend:
    """The life every backend shares (see the module docstring); subclasses add their work method."""

    name: ClassVar[str]  # what a stage's `backend` setting calls it
    identity: dict  # the model's `models.identity.model_identity`
    vocab_size: int

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start what costs time and check what only it can check; again, nothing. (Nothing to start here.)"""

    def close(self) -> None:
        """Let go of what the backend holds while in use. (Nothing here.)"""

    def settings(self) -> dict | None:
        """What of the backend decides its outputs beyond the model (None: nothing)."""
        return None


@dataclass
class EngineConfig:
    """The settings of an engine that serves the model (vLLM's; part of the identity of what it computes)."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    max_num_batched_tokens: int | None = None  # null: vLLM's default
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256  # requests in flight (each row and routing sample is one)

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.max_num_seqs < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("engine: tensor_parallel_size and max_num_seqs must be positive, "
                             "gpu_memory_utilization in (0, 1]")
