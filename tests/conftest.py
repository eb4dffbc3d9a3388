"""Session-wide fixtures: a tokenizer, tiny models and instruction data on local disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return fixtures.make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, tokenizer_dir):
    """Factory: `moe_dir(family)` is the directory of a tiny random MoE of that family."""
    made: dict[str, Path] = {}

    def get(family: str = "mixtral") -> Path:
        if family not in made:
            made[family] = fixtures.make_moe(tmp_path_factory.mktemp(family), family, tokenizer_dir)
        return made[family]

    return get


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.make_student(tmp_path_factory.mktemp("student"), tokenizer_dir)


@pytest.fixture(scope="session")
def instructions_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return fixtures.write_jsonl(path, fixtures.instruction_records(64))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a busy machine a second intra-op thread only waits (50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Instruction records as plain text, for forwards of the tiny teachers."""
    return [
        f"{r['instruction']}\n{r['context']}\n{r['response']}" for r in fixtures.instruction_records(48, seed=3)
    ]


@pytest.fixture(scope="session")
def encode(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def encode(batch_texts):
        """Right-padded (input_ids, attention_mask) of real instruction text."""
        rows = [tokenizer(t)["input_ids"] for t in batch_texts]
        length = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (length - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        return ids, mask

    return encode
