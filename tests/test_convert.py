"""`moekd convert`: moekd caches out to per-token top-k log-prob tables and DistillKit's format, and back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import fixtures
from pipeline.cache.manifest import Manifest
from pipeline.core.config import load_config
from pipeline.formats import distillkit
from stages import cache, convert, train
from stages.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
VECTORS = Path(__file__).parent / "data" / "distillkit_vectors.json"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir):
    return fixtures.prepared_records(tmp_path_factory.mktemp("prepared"), tokenizer_dir, 10, seed=7)


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, moe_dir, prepared) -> Path:
    output = tmp_path_factory.mktemp("topk") / "cache"
    cache.run(load_config(cache.Config, None, [f"output={output}", f"teacher={moe_dir('mixtral')}",
                                               f"data={prepared}", "shard_size=4", "top_k=8"]))
    return output


def run_convert(*args):
    config = load_config(convert.Config, None, [f"{a}" for a in args])
    convert.run(config)


def records(cache_dir: Path) -> list:
    manifest = Manifest.load(cache_dir, whole=True)
    return [r for index in sorted(manifest.shards) for r in manifest.read_shard(index)]


@pytest.mark.parametrize("fmt", ["topk_logprobs", "distillkit"])
def test_export_then_import_gives_the_cache_back(tmp_path, topk_cache, moe_dir, student_dir, fmt):
    exported, back = tmp_path / "exported", tmp_path / "back"
    run_convert(f"input={topk_cache}", f"output={exported}", f"format={fmt}")
    files = sorted((exported / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    run_convert(f"input={exported}", f"output={back}", f"format={fmt}", f"tokenizer={moe_dir('mixtral')}",
                "teacher_name=tiny-mixtral", "shard_size=3")
    original, imported = records(topk_cache), records(back)
    assert len(imported) == len(original) == 10
    for a, b in zip(original, imported):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)  # float16 values, exported exactly
    identity = Manifest.load(back).identity
    assert identity.teacher["name"] == "tiny-mixtral" and identity.teacher["imported"]["format"] == fmt
    assert (back / "README.md").is_file()
    # a student trains from the imported cache as from the original
    train.run(train.Config(output=str(tmp_path / "run"), student=str(student_dir), cache=str(back), max_steps=2,
                           batch_size=4, save_every=0, device="cpu", dtype="float32"))
    assert (tmp_path / "run" / "final").is_dir()
    # an export resumes: a missing file is written again, the others are kept
    files[1].unlink()
    kept = files[0].stat().st_mtime_ns
    run_convert(f"input={topk_cache}", f"output={exported}", f"format={fmt}")
    assert files[1].is_file() and files[0].stat().st_mtime_ns == kept


def test_the_exported_topk_table_is_what_axolotl_reads(tmp_path, topk_cache):
    run_convert(f"input={topk_cache}", f"output={tmp_path / 'out'}", "format=topk_logprobs")
    table = pq.read_table(tmp_path / "out" / "data" / "train-00000-of-00003.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    record = records(topk_cache)[0]
    L, k = len(row["input_ids"]), 8
    assert len(row["target_token_ids"]) == len(row["target_logprobs"]) == len(row["target_mask"]) == L
    masked = [t for t in range(L) if any(row["target_mask"][t])]
    assert masked == record.positions.tolist()
    assert [t for t in range(L) if row["labels"][t] != -100] == [p + 1 for p in masked]  # row t predicts t + 1
    first = masked[0]
    assert row["target_logprobs"][first] == sorted(row["target_logprobs"][first], reverse=True)
    assert sorted(row["target_token_ids"][first]) == record.topk_ids[0, 0].tolist()
    assert row["target_logprobs"][0 if first else L - 1] == [-np.inf] * k


def test_distillkit_bytes_decode_as_distillkit_decodes_them_and_a_dataset_imports(tmp_path, moe_dir):
    """Rows DistillKit's own code compressed (tests/data: its bytes and its decoder's output) import as it
    decodes them, every configuration: exact values, polynomial tails, residual bins, deltas."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(moe_dir("mixtral")).vocab_size
    for case in json.loads(VECTORS.read_text())["cases"]:
        config = distillkit.CompressionConfig.from_mapping(case["config"], case["name"])
        values = [bytes.fromhex(h) for h in case["compressed_logprobs_hex"]]
        ids = [bytes.fromhex(h) for h in case["bytepacked_indices_hex"]]
        decoded_ids, decoded = distillkit.decode(config, values, ids)
        np.testing.assert_array_equal(decoded_ids, case["decoded_token_ids"])
        np.testing.assert_allclose(decoded, case["decoded_logprobs"], atol=2e-4, rtol=0)

    # a small DistillKit dataset in our tokenizer's vocabulary, compressed with the first vector's settings
    case = json.loads(VECTORS.read_text())["cases"][0]
    config = distillkit.CompressionConfig.from_mapping(dict(case["config"], d=vocab, k=8, exact_k=8,
                                                            polynomial_terms=[]), "test")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, vocab)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logprobs, axis=-1)[:, :8]
    values, packed = distillkit.encode(distillkit.lossless(vocab, 8), top, np.take_along_axis(logprobs, top, -1))
    source = tmp_path / "dk"
    source.mkdir()
    pq.write_table(pa.table({"input_ids": pa.array([list(range(10, 16))], pa.list_(pa.uint64())),
                             "compressed_logprobs": pa.array([[list(v) for v in values]], pa.list_(pa.list_(pa.uint8()))),
                             "bytepacked_indices": pa.array([[list(p) for p in packed]], pa.list_(pa.list_(pa.uint8())))}),
                   source / "data_0.parquet")
    (source / distillkit.CONFIG_FILE).write_text(yaml.safe_dump(distillkit.lossless(vocab, 8).as_mapping()))
    run_convert(f"input={source}", f"output={tmp_path / 'cache'}", "format=distillkit",
                f"tokenizer={moe_dir('mixtral')}")
    record = records(tmp_path / "cache")[0]
    assert record.positions.tolist() == [0, 1, 2, 3, 4]  # every row but the last (its target is not in the data)
    np.testing.assert_array_equal(record.topk_ids[0], np.sort(top[:5], axis=-1))
    expected = np.take_along_axis(logprobs[:5], np.sort(top[:5], axis=-1), -1)
    np.testing.assert_allclose(record.topk_logprobs[0], expected, rtol=2**-11)
    other = tmp_path / "other.yaml"  # settings the data was not written with: refused, not misread
    other.write_text(yaml.safe_dump(dict(distillkit.lossless(vocab, 8).as_mapping(), exact_dtype="float16")))
    assert main(["convert", str(source), str(tmp_path / "cache2"), "--format", "distillkit", "--tokenizer",
                 str(moe_dir("mixtral")), "--compression-config", str(other)]) == 2
    assert not (tmp_path / "cache2").exists()


def test_what_a_format_cannot_hold_is_refused(tmp_path, moe_dir, prepared, capsys):
    ka = tmp_path / "ka"
    cache.run(load_config(cache.Config, None, [f"output={ka}", f"teacher={moe_dir('mixtral')}", f"data={prepared}",
                                               "top_k=4", "routing.mode=ka", "routing.samples=2"]))
    assert main(["convert", str(ka), str(tmp_path / "out"), "--format", "distillkit"]) == 2
    assert "M=2 routing samples" in capsys.readouterr().err
    sampled = tmp_path / "sampled"
    cache.run(load_config(cache.Config, None, [f"output={sampled}", f"teacher={moe_dir('mixtral')}",
                                               f"data={prepared}", "storage=sampled", "draws=8"]))
    assert main(["convert", str(sampled), str(tmp_path / "out"), "--format", "topk_logprobs"]) == 2
    assert "storage: sampled" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (lambda row: row["target_logprobs"][row["target_mask"].index([1] * 8)].__setitem__(0, 2.5), "logits, not log-probs"),
    (lambda row: row["target_token_ids"][row["target_mask"].index([1] * 8)].__setitem__(0, 10**6), "outside the vocabulary"),
    (lambda row: row["target_token_ids"][row["target_mask"].index([1] * 8)].__setitem__(
        1, row["target_token_ids"][row["target_mask"].index([1] * 8)][0]), "repeats"),
    (lambda row: row["target_logprobs"].pop(), "moekd reads the tokenized shape"),
])
def test_a_table_that_is_not_top_k_log_probs_is_refused_in_one_line(tmp_path, topk_cache, moe_dir, capsys, change,
                                                                     message):
    run_convert(f"input={topk_cache}", f"output={tmp_path / 'out'}", "format=topk_logprobs")
    rows = pq.read_table(tmp_path / "out" / "data" / "train-00000-of-00003.parquet").to_pylist()
    change(rows[1])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    assert main(["convert", str(bad), str(tmp_path / "cache"), "--format", "topk_logprobs",
                 "--tokenizer", str(moe_dir("mixtral"))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moekd convert: error")]
    assert len(errors) == 1 and message in errors[0] and "row 1" in errors[0]
    assert not (tmp_path / "cache").exists()
