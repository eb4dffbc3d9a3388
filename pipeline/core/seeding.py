"""Reproducible randomness: seeds derived from named parts, and RNG state capture.

A seed derived from (run seed, sequence id, sample index) is the same whichever
worker, batch or resumed run computes it, which is what makes KA caches and
training runs reproducible across splits and interruptions.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on `parts` (stable across processes and runs)."""
    blob = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded with `derive_seed(*parts)`."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states (python, numpy, torch CPU and CUDA), for checkpoints: tensors and plain data
    only, so a checkpoint loads with torch.load(weights_only=True) and can never carry code."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
