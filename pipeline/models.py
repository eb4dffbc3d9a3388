"""Loading models and tokenizers from local directories, dtype/device choice, identities.

Nothing here downloads: every load passes `local_files_only=True`, so a path that
is not a local directory is an error, not a hub lookup. The identities are what
caches and checkpoints record to detect that a different teacher, student or
tokenizer is in use.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
import pickle
import stat
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import config_hash
from pipeline.errors import MoekdError, first_line
from pipeline.files import atomic_directory, atomic_write_json, not_regular, open_regular, parse_json, read_json

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Config keys that change with the transformers version or the load, not the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
# weights_fingerprint: files up to FULL_HASH_BYTES are hashed whole; larger ones are sampled.
FULL_HASH_BYTES = 256 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10
TENSOR_SAMPLE_BYTES = 4 << 10
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; a CUDA device without an index is this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MoekdError(f"device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MoekdError(f"device {device!r} was asked for but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is None:
        # torchrun starts one process per GPU and tells each which one in LOCAL_RANK.
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolved


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


def load_model(
    path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
    attention: str | None = None,
) -> PreTrainedModel:
    """The causal LM saved in local directory `path`, on `device` in `dtype`, in eval mode, with the attention
    implementation `attention` (transformers' attn_implementation; None: its default). Weights load safely
    (safetensors, or pickles of tensors only); code in the directory runs only under `honours_remote_code`
    with trust_remote_code set."""
    path = local_dir(path, "model")
    if not (path / "config.json").is_file():
        raise MoekdError(f"{path} has no config.json; is it a transformers model directory?")
    resolved = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=REMOTE_CODE.get())
        model = causal_lm_class(config).from_pretrained(
            path, config=config, dtype=resolve_dtype(dtype, resolved), device_map=resolved, local_files_only=True,
            trust_remote_code=REMOTE_CODE.get(), **({"attn_implementation": attention} if attention else {}),
        )
    except LOAD_ERRORS as e:
        raise MoekdError(f"cannot load a causal language model from {path}: {first_line(e)}") from None
    return model.eval()


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


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over what decides token ids and prompts: backend tokenizer, special tokens, chat template.

    The backend's truncation/padding settings are left out: transformers changes
    them on every call that truncates or pads, and they do not change ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = tokenizer.get_vocab()
    return config_hash({
        "backend": spec,
        "special_tokens": tokenizer.special_tokens_map,
        "chat_template": tokenizer.chat_template,
    })


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files, or its PyTorch .bin files when it has none."""
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))


def file_fingerprint(path: Path, full_hash_below: int) -> str:
    """sha256 of a small file; for a large one, of its size, safetensors header and sampled ranges."""
    with os.fdopen(open_regular(path, "weight file"), "rb") as f:  # a FIFO or device there is refused
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256(f"{path.name}:{size}".encode())
        if size <= full_hash_below:
            while block := f.read(1 << 20):
                h.update(block)
            return h.hexdigest()
        if path.suffix == ".safetensors":
            # An 8-byte little-endian length, then a JSON header of every tensor's
            # name, dtype, shape and byte offsets (relative to the end of the header).
            header_length = int.from_bytes(f.read(8), "little")
            if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise MoekdError(f"{path} is not a safetensors file (its header would be {header_length} bytes)")
            header = f.read(header_length)
            h.update(header)
            entries = parse_json(header, f"{path}'s safetensors header")
            try:
                for name, entry in sorted(entries.items()):
                    if name != "__metadata__":  # the first and last bytes of every tensor
                        begin, end = (8 + header_length + int(offset) for offset in entry["data_offsets"])
                        for start in (begin, max(end - TENSOR_SAMPLE_BYTES, begin)):
                            f.seek(start)
                            h.update(f.read(min(TENSOR_SAMPLE_BYTES, end - start)))
            except (AttributeError, KeyError, TypeError, ValueError):
                raise MoekdError(f"{path} is not a safetensors file (its header lists no tensor offsets)") from None
        for i in range(SAMPLES):
            f.seek(max(size - SAMPLE_BYTES, 0) * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def weights_fingerprint(directory: str | Path, full_hash_below: int = FULL_HASH_BYTES) -> str:
    """A fast identity of a checkpoint's weights; NOT a full hash of large files.

    Covers, for each weight file (`weight_files`): its name and size, and
      - files up to `full_hash_below` bytes (256 MiB): every byte;
      - larger files: the safetensors header (names, dtypes, shapes, offsets of
        every tensor), the first and last TENSOR_SAMPLE_BYTES (4 KiB) of every
        tensor, and SAMPLES ranges of SAMPLE_BYTES evenly spaced from the first
        byte to the last: about 1 MiB plus 8 KiB per tensor read per file.
    So a change to a large file that keeps its size and touches no sampled range
    goes unnoticed; a different dtype, shape, tensor set or size is always seen,
    and so is a change to any tensor's first or last values (training, pruning
    or refitting a tensor moves them).
    """
    directory = Path(directory)
    files = weight_files(directory)
    if not files:
        raise MoekdError(f"{directory} holds no *.safetensors or *.bin weight files")
    return config_hash([file_fingerprint(path, full_hash_below) for path in files])


def built_model(output: Path, report: str, identity: dict, overwrite: bool) -> bool:
    """Whether `output` already holds the model `identity` describes (its `report` JSON says so), so a stage
    that builds models reuses it; False when it is to be built (absent, or another model with `overwrite`).
    Another model there without `overwrite` is refused."""
    output = Path(output)
    if not output.exists():
        return False
    existing = read_json(output / report, "build report").get("identity") if (output / report).is_file() else None
    if existing == identity:
        return True
    if not overwrite:
        raise MoekdError(f"{output} already holds another model (or no {report}); use --overwrite or another output")
    return False


def content(identity: dict) -> dict:
    """A model identity without where the model lies: what it is, so a moved model is the same model."""
    return {k: v for k, v in identity.items() if k not in ("path", "name")}


def content_identity(path: str | Path, model_or_config) -> dict:
    """`model_identity` by content only (`content`)."""
    return content(model_identity(path, model_or_config))


def model_identity(path: str | Path, model_or_config) -> dict:
    """What identifies a model in manifests: its config hash, weights fingerprint and vocabulary."""
    config = getattr(model_or_config, "config", model_or_config)
    settings = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    path = Path(path)
    return {
        "path": str(path.resolve()),
        "name": path.resolve().name,
        "model_type": config.model_type,
        "config_hash": config_hash(settings),
        "weights_fingerprint": weights_fingerprint(path),
        "vocab_size": config.get_text_config().vocab_size,
    }
