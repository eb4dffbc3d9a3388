"""`moekd generate`: a model's own responses as prepared data (seeded, batch-invariant, resumable), the GKD mix of
on-policy and dataset rows, and stage one and two over them."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import fixtures
from pipeline.cache.manifest import Manifest
from pipeline.core.errors import MoekdError
from pipeline.data.prepared import PreparedData
from pipeline.models.identity import content_identity
from pipeline.models.loading import load_config as load_model_config
from pipeline.student.losses import LossConfig
from pipeline.teacher.routing import RoutingConfig
from stages import cache, generate, inspect, train


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.make_student(tmp_path_factory.mktemp("student"), tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.prepared_records(tmp_path_factory.mktemp("prompts"), tokenizer_dir, 12, seed=4)


def generated(output: Path, student: Path, prompts: Path, **settings) -> Path:
    settings = dict(samples=2, max_new_tokens=10, part_size=5) | settings
    generate.run(generate.Config(output=str(output), model=str(student), data=str(prompts), **settings))
    return output


def rows(directory: Path) -> list[dict]:
    return pq.read_table(directory / "data.parquet").to_pylist()


def test_responses_are_the_models_and_do_not_depend_on_the_batch(tmp_path, student, prompts):
    one = generated(tmp_path / "one", student, prompts, batch_size=1)
    many = generated(tmp_path / "many", student, prompts, batch_size=7)
    assert rows(one) == rows(many)
    source = PreparedData(prompts).rows(0, 12)
    out = PreparedData(one).rows(0, 24)
    assert len(out) == 24  # 12 prompts x 2 samples, in prompt order
    for i, row in enumerate(out):
        prompt = source[i // 2]
        assert row.prompt_length == prompt.prompt_length
        assert np.array_equal(row.input_ids[: row.prompt_length], prompt.input_ids[: prompt.prompt_length])
        assert not row.response_mask[: row.prompt_length].any() and row.response_mask[row.prompt_length :].all()
        assert 1 <= len(row.input_ids) - row.prompt_length <= 10
        assert row.references == prompt.references and row.source == prompt.source
    # the two samples of a prompt draw differently; a greedy run gives one answer twice
    assert any(not np.array_equal(a.input_ids, b.input_ids) for a, b in zip(out[::2], out[1::2]))
    greedy = PreparedData(generated(tmp_path / "greedy", student, prompts, temperature=0)).rows(0, 24)
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(greedy[::2], greedy[1::2]))


def test_seeds_change_the_draws_and_a_prompt_keeps_its_own(tmp_path, student, prompts):
    base = rows(generated(tmp_path / "base", student, prompts))
    assert rows(generated(tmp_path / "seed1", student, prompts, seed=1)) != base
    # every other prompt (stride 2): the same responses those prompts had in the whole run
    half = rows(generated(tmp_path / "half", student, prompts, stride=2, offset=1))
    assert half == [row for i, row in enumerate(base) if (i // 2) % 2 == 1]


def test_the_on_policy_share_mixes_in_the_datasets_rows(tmp_path, student, prompts):
    source = pq.read_table(prompts / "data.parquet").to_pylist()
    assert rows(generated(tmp_path / "off", student, prompts, on_policy=0.0)) == source
    mixed = rows(generated(tmp_path / "mixed", student, prompts, on_policy=0.5))
    kept = [row for row in source if row in mixed]
    assert 0 < len(kept) < 12 and len(mixed) == len(kept) + 2 * (12 - len(kept))
    assert rows(generated(tmp_path / "mixed2", student, prompts, on_policy=0.5)) == mixed


def test_meta_names_the_generator_and_a_finished_output_is_reused(tmp_path, student, prompts, capsys):
    out = generated(tmp_path / "out", student, prompts, temperature=0.7, top_p=0.9)
    meta = json.loads((out / "meta.json").read_text())
    generator = meta["generator"]
    assert generator["model"]["name"] == student.name and "path" not in generator["model"]
    assert generator["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 10, "seed": 0}
    assert generator["data"] == PreparedData(prompts).fingerprint and not (out / "parts").exists()
    before = (out / "data.parquet").stat().st_mtime_ns
    generated(out, student, prompts, temperature=0.7, top_p=0.9)
    assert "up to date" in capsys.readouterr().out and (out / "data.parquet").stat().st_mtime_ns == before
    with pytest.raises(MoekdError, match="already holds responses generated with other settings.*temperature"):
        generated(out, student, prompts, temperature=0.5, top_p=0.9)
    generated(out, student, prompts, temperature=0.5, top_p=0.9, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["generator"]["sampling"]["temperature"] == 0.5


def test_what_generate_cannot_use_is_refused_in_one_line(tmp_path, student, prompts, tokenizer_dir):
    other = shutil.copytree(student, tmp_path / "other")
    AutoTokenizer.from_pretrained(tokenizer_dir, eos_token="<|endoftext|>").save_pretrained(other)
    with pytest.raises(MoekdError, match="the generating model .* has a tokenizer .* other than the one"):
        generated(tmp_path / "a", other, prompts)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(MoekdError, match="holds something other than moekd generate's responses"):
        generated(tmp_path / "b", student, prompts)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    with pytest.raises(MoekdError, match="has 12 rows: none is 20 modulo stride=30, so there is no prompt"):
        generated(tmp_path / "d", student, prompts, stride=30, offset=20)
    for settings, message in [({"on_policy": 1.5}, "on_policy must be in"), ({"offset": 2, "stride": 2}, "offset"),
                              ({"temperature": -1}, "temperature must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            generated(tmp_path / "c", student, prompts, **settings)


def test_sigkill_then_resume_gives_the_uninterrupted_bytes(tmp_path, student, tokenizer_dir):
    data = fixtures.prepared_records(tmp_path, tokenizer_dir, 60, seed=5)

    def command(output: Path) -> list[str]:
        return [sys.executable, "-m", "stages.cli", "generate", str(output), f"model={student}", f"data={data}",
                "samples=4", "max_new_tokens=48", "part_size=4", "batch_size=4"]

    popen = dict(env=fixtures.SUBPROCESS_ENV, cwd=fixtures.REPO)
    subprocess.run(command(tmp_path / "reference"), check=True, capture_output=True, **popen)
    victim = subprocess.Popen(command(tmp_path / "run"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    parts = tmp_path / "run" / "parts"
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.parquet"))) < 2:
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "meta.json").exists()
    done = len(list(parts.glob("part-*.parquet")))
    resumed = subprocess.run(command(tmp_path / "run"), capture_output=True, text=True, **popen)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done} of 15 parts already done" in resumed.stdout
    assert (tmp_path / "run" / "data.parquet").read_bytes() == (tmp_path / "reference" / "data.parquet").read_bytes()
    metas = [json.loads((tmp_path / name / "meta.json").read_text()) for name in ("run", "reference")]
    assert [m["config"].pop("output") for m in metas] == [str(tmp_path / "run"), str(tmp_path / "reference")]
    assert metas[0] == metas[1]


def test_a_cache_of_generated_data_names_its_generator_and_trains_on_policy(tmp_path, student, prompts, moe_dir):
    out = generated(tmp_path / "responses", student, prompts)
    generator = json.loads((out / "meta.json").read_text())["generator"]
    config = cache.Config(output=str(tmp_path / "cache"), teacher=str(moe_dir("mixtral")), data=str(out),
                          top_k=8, shard_size=8, dtype="float32", device="cpu")
    cache.run(config)
    manifest = Manifest.load(tmp_path / "cache")
    assert manifest.identity.generator == generator
    assert manifest.identity.data_fingerprint == PreparedData(out).fingerprint
    records = [r for index in sorted(manifest.shards) for r in manifest.read_shard(index)]
    for record, row in zip(records, PreparedData(out).rows(0, 24), strict=True):
        assert np.array_equal(record.input_ids, row.input_ids)
        assert np.array_equal(record.positions, np.flatnonzero(row.response_mask[1:]))
    assert f"generated by {student.name} (llama" in inspect.summary(manifest)
    for divergence in ("reverse_kl", "jsd"):
        last = train.run(train.Config(output=str(tmp_path / divergence), student=str(student),
                                      cache=str(tmp_path / "cache"), max_steps=2, batch_size=4,
                                      loss=LossConfig(alpha=1.0, divergence=divergence)))
        assert np.isfinite(last["kd"]) and last["kd"] > 0
    # any routing and either storage: KA's samples, drawn tokens
    ka = dataclasses.replace(config, output=str(tmp_path / "ka"), storage="sampled", draws=16,
                             routing=RoutingConfig(mode="ka", samples=2, lam=0.5))
    cache.run(ka)
    identity = Manifest.load(tmp_path / "ka").identity
    assert identity.generator == generator and identity.encoding.sampled and identity.encoding.num_samples == 2


# ---------------------------------------------------------------- moekd rounds

def rounds_config(tmp_path: Path, student: Path, teacher: Path, prompts: Path) -> Path:
    settings = {"student": str(student), "teacher": str(teacher), "data": str(prompts), "rounds": 2,
                "generate": {"max_new_tokens": 8, "part_size": 2, "batch_size": 2},
                "cache": {"top_k": 8, "shard_size": 1, "batch_size": 2, "dtype": "float32", "device": "cpu"},
                "train": {"batch_size": 2, "save_every": 1, "loss": {"alpha": 1.0, "divergence": "reverse_kl"}}}
    path = tmp_path / "rounds.yaml"
    path.write_text(json.dumps(settings))
    return path


def rounds_command(config: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "rounds", str(output), "--config", str(config)]


def files_of(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_each_round_learns_from_the_teachers_scores_of_the_last_rounds_answers(tmp_path, student, prompts, moe_dir):
    from stages import rounds
    from pipeline.core.config import load_config

    config = load_config(rounds.Config, rounds_config(tmp_path, student, moe_dir("mixtral"), prompts),
                         [f"output={tmp_path / 'out'}"])
    rounds.run(config)
    out = tmp_path / "out"
    first, second = (json.loads((out / f"round-{r}" / "responses" / "meta.json").read_text()) for r in (1, 2))
    for meta, model in ((first, student), (second, out / "round-1" / "train" / "final")):
        assert meta["generator"]["model"] == content_identity(model, load_model_config(model)) | {"name": model.name}
    assert (first["generator"]["stride"], first["generator"]["offset"]) == (2, 0)
    assert (second["generator"]["stride"], second["generator"]["offset"]) == (2, 1)
    assert first["rows"] == second["rows"] == 6  # the 12 prompts, half each round
    assert Manifest.load(out / "round-2" / "cache").identity.generator == second["generator"]
    run = json.loads((out / "round-2" / "train" / "run.json").read_text())
    assert str(out / "round-1" / "train" / "final") in json.dumps(run)
    times = json.loads((out / "times.json").read_text())
    assert set(times) == {f"round-{r}/{s}" for r in (1, 2) for s in ("generate", "cache", "train")}
    before = files_of(out)
    rounds.run(config)  # finished: nothing is redone
    after = files_of(out)
    assert after == before


def test_rounds_refuse_bad_settings_before_anything_runs(tmp_path, student, prompts, moe_dir):
    from stages import rounds
    from pipeline.core.config import ConfigError, load_config

    path = rounds_config(tmp_path, student, moe_dir("mixtral"), prompts)
    config = load_config(rounds.Config, path, [f"output={tmp_path / 'out'}", "train.loss.divergence=kl"])
    with pytest.raises(ConfigError, match="loss.divergence must be one of"):
        rounds.run(config)
    assert not (tmp_path / "out").exists()
    config = load_config(rounds.Config, path, [f"output={tmp_path / 'out'}", f"train_config={tmp_path / 'no.yaml'}"])
    with pytest.raises(MoekdError, match="train_config not found: .*no.yaml"):
        rounds.run(config)
    with pytest.raises(ConfigError, match="generate.model is set by each round"):
        load_config(rounds.Config, path, [f"output={tmp_path / 'out'}", f"generate.model={student}"])


def test_sigkill_in_any_stage_of_a_round_resumes_to_the_uninterrupted_student(tmp_path, student, prompts, moe_dir):
    config = rounds_config(tmp_path, student, moe_dir("mixtral"), prompts)
    popen = dict(env=fixtures.SUBPROCESS_ENV, cwd=fixtures.REPO)
    reference = subprocess.Popen(rounds_command(config, tmp_path / "reference"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, **popen)
    run = tmp_path / "run"
    # killed while round 1 trains (a checkpoint written), round 2 generates (a part written), round 2's teacher
    # scores (a shard committed)
    for sign in ("round-1/train/checkpoints/step-*/checkpoint.json", "round-2/responses/parts/part-*.parquet",
                 "round-2/cache/commits/*.json"):
        victim = subprocess.Popen(rounds_command(config, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  **popen)
        deadline = time.monotonic() + 240
        while not list(run.glob(sign)):
            assert victim.poll() is None and time.monotonic() < deadline, f"the run ended before {sign} appeared"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert len(list(run.glob("round-2/cache/commits/*.json"))) < 6  # shards left to score
    resumed = subprocess.run(rounds_command(config, run), capture_output=True, text=True, timeout=300, **popen)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"cache: 6 shards of 1 sequences, [1-5] already committed", resumed.stdout)
    assert reference.wait(timeout=300) == 0
    for name in ("round-2/responses/data.parquet", "round-2/train/final/model.safetensors"):
        assert (run / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
