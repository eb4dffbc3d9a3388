"""The routers file: a teacher's adapted router parameters (from `moekd sar`), and applying them.

The file is safetensors: the router parameters (float32) by their names in
the teacher, and metadata naming the teacher they were trained on
(`models.identity.model_identity` without the path), so `apply_routers` refuses to load
them into another teacher. Stage one applies them to cache the SAR-adapted
teacher; SAR's checkpoints restore router parameters with the same checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_write, parse_json
from pipeline.models.identity import content, model_identity, without_path

ROUTERS_FORMAT = "moekd-routers"
ROUTERS_VERSION = "1"


def set_router_parameters(teacher: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy `tensors` into the teacher's parameters of the same names, refusing other names or shapes."""
    params = dict(teacher.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            have = tuple(params[name].shape) if name in params else "no such parameter"
            raise MoekdError(f"{source} holds {name} of shape {tuple(tensor.shape)} but the teacher has {have}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save_routers(path: Path, routers: dict[str, nn.Parameter], teacher_identity: dict) -> None:
    """Write the router parameters (float32) and the teacher's identity to a safetensors file, atomically."""
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in routers.items()}
    metadata = {"format": ROUTERS_FORMAT, "version": ROUTERS_VERSION,
                "teacher": json.dumps(without_path(teacher_identity), sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_routers(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(router tensors by parameter name, identity of the teacher they were trained on) of a routers file."""
    path = Path(path)
    if not path.is_file():
        raise MoekdError(f"routers file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MoekdError(f"{path} is not a readable safetensors file: {e}") from None
    if metadata.get("format") != ROUTERS_FORMAT or metadata.get("version") != ROUTERS_VERSION:
        raise MoekdError(f"{path} is not a moekd routers file (version {ROUTERS_VERSION}); `moekd sar` writes them")
    trained_on = parse_json(metadata.get("teacher", ""), f"{path}'s teacher metadata")
    if not isinstance(trained_on, dict):
        raise MoekdError(f"{path}'s teacher metadata is not a JSON object; `moekd sar` writes one")
    return tensors, trained_on


def apply_routers(model: nn.Module, path: str | Path) -> None:
    """Load the adapted routers of a routers file into `model`, the teacher they were trained on.

    The model must come from its local directory (`models.loading.load_model`): its
    identity there (family, config hash, weights fingerprint, vocabulary) must
    be the file's, and the file's parameter names and shapes the model's.
    """
    tensors, trained_on = read_routers(path)
    directory = Path(model.name_or_path)
    if not directory.is_dir():
        raise MoekdError(f"applying {path} needs a teacher loaded from its local directory, to check that it "
                         f"is the teacher the routers were trained on (this one comes from {str(directory)!r})")
    identity = content(model_identity(directory, model))
    for key in identity:
        if identity[key] != trained_on.get(key):
            raise MoekdError(f"{path} holds routers trained on teacher {trained_on.get('name')!r}, not on {directory}: "
                             f"{key} is {trained_on.get(key)!r} there but {identity[key]!r} here")
    set_router_parameters(model, tensors, str(path))
