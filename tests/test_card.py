"""A cache's card: written once the cache is complete, read by the Hub's card parser and by `datasets`."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import fixtures
from pipeline.cache.card import summary
from pipeline.cache.manifest import Manifest
from pipeline.core.config import load_config
from stages import cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir):
    return fixtures.prepared_records(tmp_path_factory.mktemp("prepared"), tokenizer_dir, 12, seed=5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, moe_dir) -> Path:
    """The tiny teacher with a model card that names its license."""
    directory = tmp_path_factory.mktemp("carded") / "teacher"
    shutil.copytree(moe_dir("mixtral"), directory)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A tiny MoE\n")
    return directory


def run_cache(output, teacher, data, *extra):
    cache.run(load_config(cache.Config, None, [f"output={output}", f"teacher={teacher}", f"data={data}",
                                               "shard_size=5", "top_k=6", *extra]))


def run_reading_snippet(card: str, cache_dir: Path) -> dict:
    """The names the card's python snippet defines, run in the cache as the card says."""
    namespace, cwd = {}, os.getcwd()
    try:
        os.chdir(cache_dir)
        exec(re.search(r"```python\n(.*?)```", card, re.S)[1], namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_the_card_comes_when_the_cache_is_complete_and_hub_tooling_reads_it(tmp_path, teacher, prepared, capsys):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    output = tmp_path / "cache"
    run_cache(output, teacher, prepared, "worker=0", "num_workers=2")
    assert not (output / "README.md").exists()  # shards 0 and 2 of 3: not complete
    run_cache(output, teacher, prepared, "worker=1", "num_workers=2")
    assert "its card is" in capsys.readouterr().out
    text = (output / "README.md").read_text()

    manifest = Manifest.load(output)
    card = DatasetCard(text)
    assert card.data.license == "apache-2.0"  # the teacher's card's
    assert card.data.size_categories == ["n<1K"] and "knowledge-distillation" in card.data.tags
    files = card.data.configs[0]["data_files"][0]["path"]
    assert files == [manifest.shards[i].file for i in range(3)]
    assert summary(manifest).split("\n")[1:] == summary(manifest, located=False).split("\n")
    assert summary(manifest, located=False) in text and str(output) not in text  # the card travels with the cache

    rows = load_dataset(str(output), split="train", cache_dir=str(tmp_path / "hf"))
    assert rows.num_rows == 12 and rows["seq_id"] == list(range(12))
    record = manifest.read_shard(1, rows=[2])[0]  # seq 7
    M, T = record.topk_ids.shape[:2]
    row = rows[7]
    np.testing.assert_array_equal(np.cumsum(np.reshape(row["topk_ids"], (M, T, 6)), axis=-1), record.topk_ids)

    namespace = run_reading_snippet(text, output)
    first = manifest.read_shard(0, rows=[0])[0]
    np.testing.assert_array_equal(namespace["ids"], first.topk_ids)
    np.testing.assert_allclose(namespace["logprobs"], first.topk_logprobs)


def test_a_sampled_cache_card_reads_its_draws(tmp_path, teacher, prepared):
    output = tmp_path / "sampled"
    run_cache(output, teacher, prepared, "storage=sampled", "draws=16", "routing.mode=ka", "routing.samples=2",
              "license=cc-by-4.0")
    text = (output / "README.md").read_text()
    assert "license: cc-by-4.0" in text and "16 tokens drawn" in text
    namespace = run_reading_snippet(text, output)
    first = Manifest.load(output).read_shard(0, rows=[0])[0]
    np.testing.assert_array_equal(namespace["ids"], first.sample_ids)
    np.testing.assert_array_equal(namespace["counts"], first.sample_counts)


def test_overwriting_a_cache_removes_its_card_until_the_new_one_is_complete(tmp_path, teacher, moe_dir, prepared):
    output = tmp_path / "cache"
    run_cache(output, teacher, prepared)
    assert "top-6 of vocab" in (output / "README.md").read_text()
    other = moe_dir("mixtral")  # the same weights without a card
    run_cache(output, other, prepared, "top_k=4", "overwrite=true", "worker=0", "num_workers=2")
    assert not (output / "README.md").exists()
    run_cache(output, other, prepared, "top_k=4", "worker=1", "num_workers=2")
    text = (output / "README.md").read_text()
    assert "top-4 of vocab" in text and "top-6" not in text and "license: unknown" in text
