"""The whole tiny pipeline, through the CLI, writes the same bytes, numbers and messages every time it runs
(`tests/digest.py`, the check a change that must keep every byte runs before and after itself)."""

from __future__ import annotations

import pytest

import digest

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def test_the_pipeline_writes_the_same_bytes_twice(tmp_path, capsys):
    digest.digest(tmp_path / "work")
    first = capsys.readouterr().out
    digest.digest(tmp_path / "work")
    assert capsys.readouterr().out == first
    for made in ("cache/ka/manifest.json", "cache/sampled/shards/", "runs/sar/routers.safetensors",
                 "runs/online/final/model.safetensors", "eval/results.json", "mixed/model.safetensors"):
        assert made in first, made
    assert "the run is finished; nothing to do" in first and "nothing left to write" in first
