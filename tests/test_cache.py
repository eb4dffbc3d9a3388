"""The teacher stage end to end: determinism, worker splits, resume after SIGKILL or a full disk, refusals."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fixtures
from pipeline.cache.manifest import Manifest, verify_cache
from pipeline.cache.shards import read_shard
from pipeline.core.config import load_config
from pipeline.core.errors import MoekdError
from pipeline.data.prepared import PreparedData, target_positions
from stages import cache, prepare
from stages.cli import main

KA = ["routing.mode=ka", "routing.samples=3", "routing.lam=0.5", "aggregate=true", "top_k=8"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, moe_dir):
    directory = tmp_path_factory.mktemp("prepared")
    data = fixtures.write_jsonl(directory / "train.jsonl", fixtures.instruction_records(30, seed=3))
    teacher = moe_dir("mixtral")
    prepare.run(load_config(prepare.Config, None, [f"inputs={data}", f"output={directory / 'out'}", f"tokenizer={teacher}"]))
    return directory / "out"


def run_cache(output, teacher, data, *extra):
    config = load_config(cache.Config, None, [f"output={output}", f"teacher={teacher}", f"data={data}", "shard_size=4", *extra])
    return cache.run(config)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, moe_dir, prepared):
    """An uninterrupted single-worker KA cache to compare every other run against."""
    output = tmp_path_factory.mktemp("reference") / "cache"
    run_cache(output, moe_dir("mixtral"), prepared, *KA)
    return output


def test_cache_contents_match_the_teacher(reference, prepared):
    manifest = Manifest.load(reference)
    data = PreparedData(prepared)
    assert manifest.committed() == set(range(8)) and manifest.identity.rows == len(data) == 30
    record = read_shard(fixtures.shard_file(reference, 1), rows=[2])[0]
    example = data.rows(6, 7)[0]
    assert record.seq_id == 6
    np.testing.assert_array_equal(record.input_ids, example.input_ids)
    np.testing.assert_array_equal(record.positions, target_positions(example.response_mask))
    assert record.topk_ids.shape == record.topk_logprobs.shape == (3, len(record.positions), 8)
    assert record.agg_ids.shape == (len(record.positions), 8)
    assert (np.exp(record.topk_logprobs).sum(-1) <= 1 + 1e-3).all()
    # lambda = 0.5 over 2 layers: the samples genuinely differ somewhere
    assert not np.array_equal(record.topk_logprobs[0], record.topk_logprobs[1])


def test_same_seed_gives_identical_bytes(tmp_path, reference, moe_dir, prepared):
    run_cache(tmp_path / "again", moe_dir("mixtral"), prepared, *KA)
    assert fixtures.cache_files(tmp_path / "again") == fixtures.cache_files(reference)
    run_cache(tmp_path / "seed", moe_dir("mixtral"), prepared, *KA, "routing.seed=1")
    assert fixtures.shard_file(tmp_path / "seed", 0).read_bytes() != fixtures.shard_file(reference, 0).read_bytes()


def test_worker_splits_give_the_same_cache(tmp_path, reference, moe_dir, prepared):
    for worker in range(3):
        run_cache(tmp_path / "split", moe_dir("mixtral"), prepared, *KA, f"worker={worker}", "num_workers=3")
    assert fixtures.cache_files(tmp_path / "split") == fixtures.cache_files(reference)


def test_torchrun_environment_selects_the_worker(tmp_path, monkeypatch, moe_dir, prepared):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_cache(tmp_path / "rank1", moe_dir("mixtral"), prepared, *KA)
    assert Manifest.load(tmp_path / "rank1").committed() == {1, 3, 5, 7}


def cache_command(output, teacher, data, *extra) -> list[str]:
    args = [f"teacher={teacher}", f"data={data}", "shard_size=2", *KA, *extra]
    return [sys.executable, "-m", "stages.cli", "cache", str(output), *args]


@pytest.fixture(scope="module")
def reference_small_shards(tmp_path_factory, moe_dir, prepared):
    """The reference cache again, in shards of 2 sequences (the subprocess tests' layout)."""
    output = tmp_path_factory.mktemp("small") / "cache"
    run_cache(output, moe_dir("mixtral"), prepared, *KA, "shard_size=2")
    return output


def test_sigkill_then_resume_is_byte_identical(tmp_path, moe_dir, prepared, reference_small_shards):
    teacher = moe_dir("mixtral")
    process = subprocess.Popen(cache_command(tmp_path / "killed", teacher, prepared), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    fixtures.wait_for_commits(tmp_path / "killed", 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(Manifest.load(tmp_path / "killed").committed())
    assert 3 <= committed < 15, "the kill must land mid-run for this test to mean anything"
    resumed = subprocess.run(cache_command(tmp_path / "killed", teacher, prepared), check=True, capture_output=True, text=True)
    assert f"{committed} already committed" in resumed.stdout
    assert fixtures.cache_files(tmp_path / "killed") == fixtures.cache_files(reference_small_shards)
    assert not list((tmp_path / "killed" / "shards").glob("*.tmp"))


def test_concurrent_writers_share_the_work(tmp_path, moe_dir, prepared, reference_small_shards):
    teacher = moe_dir("mixtral")
    command = cache_command(tmp_path / "shared", teacher, prepared)
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate()[0] for p in processes]
    assert all(p.returncode == 0 for p in processes)
    written = [int(out.split("wrote ")[1].split(" shards")[0]) if "wrote " in out else 0 for out in outputs]
    assert sum(written) == 15  # each shard committed once, by one of the two
    computed_twice = sum(out.count("committed it first") for out in outputs)
    assert computed_twice <= 2  # at most the shard the other was computing when one ran out of unclaimed ones
    assert fixtures.cache_files(tmp_path / "shared") == fixtures.cache_files(reference_small_shards)


def test_a_teacher_spread_over_devices_gives_the_single_device_cache(tmp_path, reference, moe_dir, prepared):
    """The CPU holds what max_memory lets it, the other layers wait on disk (accelerate's offload, read back layer
    by layer): several placements, KA's hooks on each, and the same bytes."""
    teacher = moe_dir("mixtral")
    half = (teacher / "model.safetensors").stat().st_size // 2
    offload = tmp_path / "offload"
    run_cache(tmp_path / "spread", teacher, prepared, *KA, "placement.device_map=sequential",
              f"placement.max_memory.cpu={half}", f"placement.offload_folder={offload}")
    assert any(offload.iterdir())  # some weights were placed on disk
    assert fixtures.cache_files(tmp_path / "spread") == fixtures.cache_files(reference)


def test_full_disk_keeps_committed_shards_and_resumes(tmp_path, monkeypatch, reference, moe_dir, prepared):
    real_write = Path.write_bytes
    calls = []

    def write_until_disk_full(path, data):
        if ".parquet" in path.name:
            calls.append(path)
        if len(calls) == 3:  # the third shard: half a file, then the disk is full
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", write_until_disk_full)
    with pytest.raises(MoekdError, match="disk full while writing .*shard-00002-"):
        run_cache(tmp_path / "full", moe_dir("mixtral"), prepared, *KA)
    assert Manifest.load(tmp_path / "full").committed() == {0, 1}
    assert not list((tmp_path / "full" / "shards").glob("*.tmp"))
    monkeypatch.setattr(Path, "write_bytes", real_write)
    run_cache(tmp_path / "full", moe_dir("mixtral"), prepared, *KA)
    assert fixtures.cache_files(tmp_path / "full") == fixtures.cache_files(reference)


def test_corrupted_shard_fails_verify_by_name(tmp_path, reference, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    shard = copy / Manifest.load(copy).shards[5].file
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "shard-00005" in err and "shard-00004" not in err
    assert main(["verify", str(reference)]) == 0


def test_a_different_teacher_or_data_is_refused(tmp_path, reference, moe_dir, prepared):
    import shutil

    other = fixtures.make_moe(tmp_path / "other", "mixtral", moe_dir("mixtral"), seed=7)
    with pytest.raises(MoekdError, match="teacher.weights_fingerprint"):
        run_cache(reference, other, prepared, *KA)
    with pytest.raises(MoekdError, match="routing.lam"):
        run_cache(reference, moe_dir("mixtral"), prepared, *KA, "routing.lam=0.2")
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    run_cache(copy, other, prepared, *KA, "overwrite=true")
    assert Manifest.load(copy).identity.teacher["weights_fingerprint"] != Manifest.load(reference).identity.teacher["weights_fingerprint"]


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, prepared, tokenizer_dir):
    from transformers import AutoTokenizer

    retokenized = tmp_path / "tok"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(retokenized)
    teacher = fixtures.make_moe(tmp_path / "teacher", "mixtral", retokenized)
    with pytest.raises(MoekdError, match="the teacher .* has a tokenizer .* other than the one .* was made with"):
        run_cache(tmp_path / "c", teacher, prepared)


def test_dense_teacher_topk_only(tmp_path, student_dir, prepared):
    output = tmp_path / "cache"
    with pytest.raises(MoekdError, match="dense model; KA/SAR need an MoE teacher"):
        run_cache(output, student_dir, prepared, *KA)
    assert not output.exists()  # refused before anything is written: it does not block the run below
    run_cache(output, student_dir, prepared, "top_k=8")
    assert Manifest.load(output).committed() == set(range(8))


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_every_family_caches_with_ka(tmp_path, moe_dir, family, prepared):
    teacher = moe_dir(family)
    run_cache(tmp_path / family, teacher, prepared, *KA, "routing.k_s=3", "shard_size=16")
    record = read_shard(fixtures.shard_file(tmp_path / family, 0), rows=[0])[0]
    assert np.isfinite(record.topk_logprobs).all() and record.topk_ids.shape[0] == 3
    assert verify_cache(tmp_path / family) == []
