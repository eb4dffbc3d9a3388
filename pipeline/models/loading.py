"""Loading and saving models and tokenizers from local directories, dtype choice, remote code.

Nothing here downloads: every load passes `local_files_only=True`, so a path that
is not a local directory is an error, not a hub lookup.
"""

from __future__ import annotations

import contextvars
import functools
import os
import pickle
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.core.errors import MoekdError, first_line
from pipeline.core.files import atomic_directory, atomic_write_json, not_regular
from pipeline.core.outputs import FOREIGN, Output, Verdict, judge, recorded_in
from pipeline.core.processes import resolve_device
from pipeline.models.identity import by_content

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere; otherwise a name from DTYPES (or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoekdError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# Whether models and tokenizers may run Python code shipped in their directories (transformers'
# trust_remote_code). False unless a stage's `trust_remote_code` setting says so; never asked on stdin.
REMOTE_CODE = contextvars.ContextVar("trust_remote_code", default=False)


# What a weights file that is not plain tensors raises when loaded safely (pickled code is refused).
LOAD_ERRORS = (OSError, ValueError, pickle.UnpicklingError, EOFError)


def honours_remote_code(run):
    """Decorate a stage's `run(config)`: models it loads may run their own code iff config.trust_remote_code."""

    @functools.wraps(run)
    def wrapper(config, *args, **kwargs):
        token = REMOTE_CODE.set(bool(config.trust_remote_code))
        try:
            return run(config, *args, **kwargs)
        finally:
            REMOTE_CODE.reset(token)

    return wrapper


def local_dir(path: str | Path, what: str) -> Path:
    """`path` as a local `what` directory to hand to transformers, which opens its files itself: refused unless
    a directory, and if anything in it is neither a file nor a directory (a FIFO would block the open)."""
    path = Path(path)
    if not path.is_dir():
        raise MoekdError(f"{what} directory not found: {path} (models are read from local directories only)")
    for entry in os.scandir(path):
        try:
            mode = entry.stat().st_mode  # links followed: a hub cache's files are links into its blob store
        except FileNotFoundError:  # a dangling link: transformers names it if it needs it
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise not_regular(Path(entry.path), mode, "in a model directory")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in local directory `path`."""
    path = local_dir(path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=REMOTE_CODE.get())
    except LOAD_ERRORS as e:
        raise MoekdError(
            f"{path} does not hold a usable tokenizer (tokenizer.json / tokenizer_config.json): {first_line(e)}"
        ) from None


def load_config(path: str | Path):
    """The model config saved in local directory `path` (no weights read)."""
    from transformers import AutoConfig

    directory = local_dir(path, "model")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=REMOTE_CODE.get())
    except LOAD_ERRORS as e:
        raise MoekdError(f"cannot read the model config in {directory}: {first_line(e)}") from None


@dataclass
class Placement:
    """Where the layers of a model larger than one device go: transformers' big-model loading (accelerate)
    places them over the GPUs, the CPU and disk, within `max_memory`, and moves activations between them.
    Unset (`device_map` null): the whole model on the stage's `device`."""

    device_map: str | None = None  # auto, balanced, balanced_low_0 or sequential
    max_memory: dict[str, str] | None = None  # per device ("0", "1", ..., "cpu"): the most it may hold, e.g. "70GiB"
    offload_folder: str | None = None  # where the weights that fit on no device wait (read back layer by layer)

    def __post_init__(self):
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"placement.device_map must be auto, balanced, balanced_low_0 or sequential, got "
                             f"{self.device_map!r}")
        if (self.max_memory or self.offload_folder) and self.device_map is None:
            raise ValueError("placement.max_memory and placement.offload_folder need placement.device_map")

    def options(self) -> dict:
        """from_pretrained's arguments for this placement."""
        digits = lambda text: int(text) if str(text).isdigit() else text  # noqa: E731 - GPU indices, bytes
        memory = None if self.max_memory is None else \
            {digits(key): digits(value) for key, value in self.max_memory.items()}
        return {"device_map": self.device_map, "max_memory": memory, "offload_folder": self.offload_folder}


def load_model(
    path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
    attention: str | None = None, placement: Placement | None = None,
) -> PreTrainedModel:
    """The causal LM saved in local directory `path`, on `device` (or spread as `placement` says) in `dtype`,
    in eval mode, with the attention implementation `attention` (transformers' attn_implementation; None: its
    default). Weights load safely (safetensors, or pickles of tensors only); code in the directory runs only
    under `honours_remote_code` with trust_remote_code set."""
    path = local_dir(path, "model")
    if not (path / "config.json").is_file():
        raise MoekdError(f"{path} has no config.json; is it a transformers model directory?")
    resolved = resolve_device(device)
    where = placement.options() if placement and placement.device_map else {"device_map": resolved}
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=REMOTE_CODE.get())
        model = causal_lm_class(config).from_pretrained(
            path, config=config, dtype=resolve_dtype(dtype, resolved), local_files_only=True,
            trust_remote_code=REMOTE_CODE.get(), **where, **({"attn_implementation": attention} if attention else {}),
        )
    except LOAD_ERRORS as e:
        raise MoekdError(f"cannot load a causal language model from {path}: {first_line(e)}") from None
    return model.eval()


def input_device(model: PreTrainedModel) -> torch.device:
    """Where a model's inputs go: its embedding's device (with a placement, the device of its first layers;
    weights offloaded to disk compute on the CPU)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def causal_lm_class(config) -> type:
    """What loads `config` as a causal LM: AutoModelForCausalLM, or, where its mapping has no entry, the
    transformers `*ForCausalLM` class the config's `architectures` name (Mistral 4's is registered only
    under multimodal auto classes). Never a class from outside transformers."""
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if name.endswith("ForCausalLM") else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return AutoModelForCausalLM  # whose error names what it cannot load


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the pad token, else eos (many causal LMs define no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def save_model(directory: str | Path, model, tokenizer, reports: dict[str, dict] | None = None,
               replace: bool = False, state_dict: dict | None = None) -> None:
    """Write `model` (with `state_dict`'s weights where given) and `tokenizer` (save_pretrained) and each of
    `reports` as a JSON file to `directory`, which appears complete or not at all (`files.atomic_directory`;
    `replace` swaps out an existing one)."""
    with atomic_directory(Path(directory), replace=replace) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, report in (reports or {}).items():
            atomic_write_json(tmp / name, report)


def built_model(output: Path, report: str, identity: dict, overwrite: bool, *, models: tuple[str, ...] = (),
                key: str | None = "identity", what: str = "another model") -> bool:
    """Whether `output` already holds the model `identity` describes (its `report` records it, under `key`, or
    as the report's own keys), so a stage that builds models reuses it; False when it is to be built (absent, or
    another model with `overwrite`). The lifecycle is `core.outputs.judge`'s: another model there, or a
    directory without `report`, is refused without `overwrite`; the model identities under `models` are
    compared by content (`identity.by_content`), so a source moved elsewhere is the same source."""
    recorded = recorded_in(Path(output), report)
    if recorded:
        recorded = (recorded.get(key) if key else {k: recorded.get(k) for k in identity}) or FOREIGN
    where = Output(output, holds=f"already holds {what}", unrecorded=f"already holds {what} (or no {report})")
    return judge(where, by_content(recorded, *models), by_content(identity, *models), overwrite) is Verdict.SAME
