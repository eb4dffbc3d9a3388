"""What identifies a model, a tokenizer and their weights, and the one check that models share a tokenizer.

The identities are what caches, runs and reports record to detect that a
different teacher, student or tokenizer is in use. `model_identity` says where
a model lies and what it is; `content` is what it is, without where it lies:
every comparison of models goes through it, so a moved or renamed model is
the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pipeline.core.config import config_hash
from pipeline.core.errors import MoekdError
from pipeline.core.files import open_regular, parse_json

# Config keys that change with the transformers version or the load, not the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


# weights_fingerprint: files up to FULL_HASH_BYTES are hashed whole; larger ones are sampled.
FULL_HASH_BYTES = 256 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10
TENSOR_SAMPLE_BYTES = 4 << 10
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit


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


LOCATION = ("path", "name")  # where a model lies (its folder's name too): recorded, never compared


def model_identity(path: str | Path, model_or_config) -> dict:
    """The one identity of a model: where it lies (`LOCATION`) and what it is: its family, config hash, weights
    fingerprint and vocabulary. Outputs record it (caches and routers files less its path, as they always have);
    every comparison takes its `content`."""
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


def content(identity: dict) -> dict:
    """What a model is, without where it lies: the part of its identity every comparison takes, so that a moved
    or renamed model is the same model."""
    return {k: v for k, v in identity.items() if k not in LOCATION}


def content_identity(path: str | Path, model_or_config) -> dict:
    """`model_identity` by content only (`content`)."""
    return content(model_identity(path, model_or_config))


def without_path(identity: dict) -> dict:
    """A model identity as caches and routers files record it: less its path. (They keep the folder's name, as
    they always have; no comparison takes it: `content`.)"""
    return {key: value for key, value in identity.items() if key != "path"}


def by_content(identity: dict | None, *models: str) -> dict | None:
    """An output's identity as it is compared: the model identities under the keys `models` by their `content`."""
    if not identity:
        return identity
    return identity | {key: content(identity[key]) for key in models if isinstance(identity.get(key), dict)}


# What a model must agree with: a directory -> (its tokenizer fingerprint, its vocabulary size or None).
MadeWith = dict[str, tuple[str | None, int | None]]


def check_tokenizer(who: str, path, tokenizer, vocabulary: int | None, made_with: MadeWith) -> None:
    """Refuse model `who` (at `path`) unless its tokenizer, and its vocabulary size where both are known,
    are those every directory in `made_with` was made with."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    for directory, (expected, expected_vocabulary) in made_with.items():
        if fingerprint != expected:
            raise MoekdError(
                f"{who} ({path}) has a tokenizer (fingerprint {fingerprint[:12]}) other than the one {directory} "
                f"was made with ({str(expected)[:12]}): teacher, student and data must share one tokenizer "
                "(prepare the data with the teacher's)"
            )
        if None not in (vocabulary, expected_vocabulary) and vocabulary != expected_vocabulary:
            raise MoekdError(f"{who} ({path}) has a vocabulary of {vocabulary} but {directory} has "
                             f"{expected_vocabulary}; they must match")
