"""`moekd train` on the fixtures' tiny models: offline = online KD, resume after SIGKILL, DDP, KD vs SFT, refusals.

The teacher is the fixture Mixtral trained briefly on the word tasks (with this
stage, SFT), so that its predictions are peaked and learnable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fixtures
from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import MoekdError
from pipeline.core.processes import Distributed
from pipeline.data.batch import collate_examples, collate_records, pack
from pipeline.data.prepared import PreparedData
from pipeline.data.reader import CacheShards, PreparedShards, Reader
from pipeline.models.loading import load_model
from pipeline.student.checkpoints import load_trainer_state
from pipeline.student.losses import LossConfig
from pipeline.student.trainer import OptimConfig, Trainer
from pipeline.teacher.routing import RoutingConfig
from pipeline.teacher.sources import OnlineTeacher
from stages import cache, prepare, train
from stages.cli import main

REPO, SUBPROCESS_ENV = fixtures.REPO, fixtures.SUBPROCESS_ENV
KA = RoutingConfig(mode="ka", samples=2, lam=0.5)
SHARD_SIZE = 32
PAD = 0  # <|endoftext|>, the fixture tokenizer's pad token
COMPARED = ("loss", "ce", "kd", "lr", "grad_norm", "tokens")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def splits(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    for name, rows, seed in (("train", 256, 0), ("test", 40, 9)):
        jsonl = fixtures.write_jsonl(root / f"{name}.jsonl", fixtures.instruction_records(rows, seed=seed))
        prepare.run(prepare.Config(inputs=[str(jsonl)], output=str(root / name), tokenizer=str(tokenizer_dir)))
    return {"train": root / "train", "test": root / "test"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, moe_dir, splits) -> Path:
    output = tmp_path_factory.mktemp("teacher")
    train.run(train.Config(output=str(output), student=str(moe_dir("mixtral")), data=str(splits["train"]),
                           loss=LossConfig(alpha=0), max_steps=150, batch_size=8, save_every=0, device="cpu",
                           optim=OptimConfig(lr=3e-3, warmup_steps=10)))
    return output / "final"


@pytest.fixture(scope="module")
def ka_cache(tmp_path_factory, teacher, splits) -> Path:
    """The teacher's KA cache of the training split: M = 2, λ = 0.5, top-32."""
    output = tmp_path_factory.mktemp("ka_cache")
    cache.run(cache.Config(output=str(output), teacher=str(teacher), data=str(splits["train"]), routing=KA, top_k=32,
                           shard_size=SHARD_SIZE, batch_size=16, device="cpu"))
    return output


@pytest.fixture(scope="module")
def test_cache(tmp_path_factory, teacher, splits) -> Path:
    """The held-out split's cache with the whole vocabulary, so eval_kl is the exact KL."""
    output = tmp_path_factory.mktemp("test_cache")
    cache.run(cache.Config(output=str(output), teacher=str(teacher), data=str(splits["test"]), routing=KA,
                           top_k=fixtures.VOCAB_SIZE, shard_size=64, batch_size=16, device="cpu"))
    return output


def run_train(output: Path, student: Path, **settings) -> list[dict]:
    """A run's metrics.jsonl records; small batches, few steps, CPU float32 unless overridden."""
    settings = dict(batch_size=4, max_steps=4, save_every=0, device="cpu", dtype="float32",
                    optim=OptimConfig(lr=3e-3, warmup_steps=2)) | settings
    paths = {key: str(value) for key, value in settings.items() if isinstance(value, Path)}
    train.run(train.Config(output=str(output), student=str(student), **(settings | paths)))
    return metrics(output)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------- equivalences

def test_offline_kd_from_the_cache_equals_online_kd(tmp_path, splits, teacher, ka_cache, student_dir):
    common = dict(max_steps=5, batch_size=8)
    offline = run_train(tmp_path / "offline", student_dir, cache=ka_cache, **common)
    online = run_train(tmp_path / "online", student_dir, data=splits["train"], teacher=teacher, routing=KA, top_k=32,
                       shard_size=SHARD_SIZE, **common)
    # The cache keeps log-probs at float16 precision, a relative error below 2**-11 in each; the KL
    # moves by less than that relative to itself (measured: < 7e-5 over these steps).
    for off, on in zip(offline, online, strict=True):
        assert off["tokens"] == on["tokens"]
        assert off["ce"] == pytest.approx(on["ce"], rel=2.0**-11) and off["kd"] == pytest.approx(on["kd"], rel=2.0**-11)


def test_the_teacher_in_the_loop_computes_the_cached_records(splits, teacher, ka_cache):
    settings = dict(batch_size=8, shuffle_shards=4, seed=0)
    cached = next(Reader(CacheShards(ka_cache), collate=functools.partial(collate_records, pad_id=PAD), **settings)
                  .batches(0))
    prepared = next(Reader(PreparedShards(PreparedData(splits["train"]), SHARD_SIZE),
                           collate=functools.partial(collate_examples, pad_id=PAD), **settings).batches(0))
    assert prepared.seq_ids == cached.seq_ids and torch.equal(prepared.targets, cached.targets)
    computed = {}
    for seed in (KA.seed, KA.seed + 1):
        routing = RoutingConfig(mode="ka", samples=2, lam=0.5, seed=seed)
        with contextlib.ExitStack() as stack:
            online = OnlineTeacher(data=str(splits["train"]), shard_size=SHARD_SIZE, teacher=str(teacher),
                                   routing=routing, top_k=32, aggregate=False, dtype=torch.float32,
                                   device=torch.device("cpu"), stack=stack).teach(prepared)
        order = online.teacher.ids.argsort(-1)  # the cache stores each token's ids in ascending order
        computed[seed] = (online.teacher.ids.gather(-1, order), online.teacher.logprobs.gather(-1, order))
    ids, logprobs = computed[KA.seed]
    assert torch.equal(ids, cached.teacher.ids)
    assert ((logprobs - cached.teacher.logprobs).abs() <= 2.0**-11 * logprobs.abs() + 2.0**-25).all()
    other_ids, other_logprobs = computed[KA.seed + 1]  # other KA draws: other distributions
    assert not torch.equal(other_ids, ids) and (other_logprobs - logprobs).abs().max() > 0.1


def test_micro_batches_step_like_one_batch(ka_cache, student_dir):
    records = CacheShards(ka_cache).read(0)[:7]
    after = []
    for batches in ([records[:2], records[2:]], [records]):  # 2 + 5 sequences, unequal token counts
        model = load_model(student_dir, dtype="float32", device="cpu").train()
        trainer = Trainer(model, optim=OptimConfig(lr=1.0, warmup_steps=0, grad_clip=0), loss=LossConfig(),
                          total_steps=1, processes=Distributed("cpu"))
        # Plain SGD at lr 1 moves each weight by exactly its gradient (AdamW's first step is about
        # lr * sign(gradient), which would hide a wrongly scaled gradient).
        trainer.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        result = trainer.step([collate_records(b, PAD) for b in batches])
        after.append((result, model.state_dict()))
    (split, split_weights), (whole, whole_weights) = after
    for key in ("loss", "ce", "kd", "grad_norm"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6)
    assert_same_weights(split_weights, whole_weights, atol=1e-6)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_both_ranks_batches(tmp_path, ka_cache, student_dir, parallel):
    steps, accum, batch_size = 3, 2, 2
    optim = OptimConfig(lr=3e-3, warmup_steps=1, grad_accum=accum)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stages.cli", "train", str(tmp_path / "ddp"), "--student", str(student_dir),
               "--cache", str(ka_cache), "--max-steps", str(steps), "--batch-size", str(batch_size),
               "--shuffle-shards", "1", "--device", "cpu", "--dtype", "float32", "optim.lr=0.003",
               "optim.warmup_steps=1", f"optim.grad_accum={accum}", f"parallel={parallel}"]
    done = subprocess.run(command, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "ddp/run.json").read_text())["world_size"] == 2

    readers = [Reader(CacheShards(ka_cache), batch_size=batch_size, shuffle_shards=1, seed=0, rank=rank,
                      world_size=2, collate=functools.partial(collate_records, pad_id=PAD)) for rank in range(2)]
    streams = [list(reader.batches(0, 0, steps * accum)) for reader in readers]
    model = load_model(student_dir, dtype="float32", device="cpu").train()
    trainer = Trainer(model, optim=optim, loss=LossConfig(), total_steps=steps, processes=Distributed("cpu"))
    for step, logged in enumerate(metrics(tmp_path / "ddp")):
        mine = slice(step * accum, (step + 1) * accum)
        expected = trainer.step(streams[0][mine] + streams[1][mine])  # both ranks' micro-batches in one process
        assert logged["tokens"] - (metrics(tmp_path / "ddp")[step - 1]["tokens"] if step else 0) == expected["tokens"]
        for key in ("loss", "ce", "kd", "grad_norm", "lr"):
            assert logged[key] == pytest.approx(expected[key], rel=1e-5), key
        assert len(logged["peak_memory_mib"]) == 2  # each rank's
    assert_same_weights(weights(tmp_path / "ddp/final"), model.state_dict(), atol=1e-5)


def test_a_refusal_on_two_ranks_ends_both_cleanly(tmp_path, ka_cache, student_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/run.json").write_text('{"config": {}}')  # another run's directory
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stages.cli", "train", str(tmp_path / "taken"), "--student", str(student_dir),
               "--cache", str(ka_cache), "--max-steps", "1", "--device", "cpu"]
    done = subprocess.run(command, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.count("holds a run with other settings") == 2  # each rank's one line
    assert "terminate called" not in done.stderr and "SIGABRT" not in done.stderr  # the process group was left


def test_a_sharded_run_resumes_on_two_ranks_as_it_ran_and_on_one_with_the_rest_of_the_epoch(
        tmp_path, splits, ka_cache, student_dir):
    steps, accum, batch_size, at = 5, 2, 2, 2
    args = ["--student", str(student_dir), "--cache", str(ka_cache), "--max-steps", str(steps), "--batch-size",
            str(batch_size), "--shuffle-shards", "1", "--device", "cpu", "--dtype", "float32", "optim.lr=0.003",
            "optim.warmup_steps=1", f"optim.grad_accum={accum}", "parallel=fsdp", "save_every=1",
            "keep_checkpoints=10", "keep_checkpoints_at_end=true", f"eval_data={splits['test']}", "eval_every=2",
            "eval_max_examples=8"]
    on_two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "stages.cli", "train"]
    run = lambda launcher, output: subprocess.run([*launcher, str(output), *args], env=SUBPROCESS_ENV,  # noqa: E731
                                                  cwd=REPO, capture_output=True, text=True, timeout=300)
    for name, launcher in (("two", on_two), ("one", [sys.executable, "-m", "stages.cli", "train"])):
        done = run(on_two, tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "two":
            whole, whole_weights = metrics(tmp_path / name), weights(tmp_path / name / "final")
            assert [m["step"] for m in whole] == list(range(1, steps + 1)) and "eval_loss" in whole[1]
        # interrupted after step `at`: its checkpoint is all that is left
        shutil.rmtree(tmp_path / name / "final")
        for later in range(at + 1, steps + 1):
            shutil.rmtree(tmp_path / name / f"checkpoints/step-{later:08d}")
        done = run(launcher, tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [m["step"] for m in metrics(tmp_path / name)] == list(range(1, steps + 1))
    # on two ranks as it ran; on one, the steps take what the two ranks had left of the epoch
    for a, b in zip(metrics(tmp_path / "two"), whole, strict=True):
        assert {k: a[k] for k in COMPARED} == pytest.approx({k: b[k] for k in COMPARED}, rel=1e-6)
    assert_same_weights(weights(tmp_path / "two/final"), whole_weights, atol=1e-6)
    checkpoint = tmp_path / f"one/checkpoints/step-{at:08d}"
    model = load_model(checkpoint, dtype="float32", device="cpu").train()
    trainer = Trainer(model, optim=OptimConfig(lr=3e-3, warmup_steps=1, grad_accum=accum), loss=LossConfig(),
                      total_steps=steps, processes=Distributed("cpu"))
    trainer.load_state_dict(load_trainer_state(checkpoint)["trainer"])
    reader = Reader(CacheShards(ka_cache), batch_size=batch_size, shuffle_shards=1, seed=0,
                    collate=functools.partial(collate_records, pad_id=PAD))
    rest = list(reader.batches(0, 0, (steps - at) * accum, history=((2, at * accum),)))
    for i, logged in enumerate(metrics(tmp_path / "one")[at:]):
        expected = trainer.step(rest[i * accum : (i + 1) * accum])
        for key in ("loss", "ce", "kd", "grad_norm", "lr"):
            assert logged[key] == pytest.approx(expected[key], rel=1e-5), key
    assert_same_weights(weights(tmp_path / "one/final"), model.state_dict(), atol=1e-5)


def test_a_run_resumes_with_the_other_kind_of_parallelism_both_ways(tmp_path, splits, student_dir):
    steps = 3
    args = ["--student", str(student_dir), "--data", str(splits["train"]), f"shard_size={SHARD_SIZE}", "loss.alpha=0",
            "--max-steps", str(steps), "--batch-size", "2", "--shuffle-shards", "1", "--device", "cpu", "--dtype",
            "float32", "optim.lr=0.003", "optim.warmup_steps=1", "save_every=1", "keep_checkpoints=3",
            "keep_checkpoints_at_end=true"]
    on_two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "stages.cli", "train", str(tmp_path / "run"), *args]
    whole = None
    for parallel, at in (("fsdp", steps), ("ddp", 1), ("fsdp", 2)):  # fsdp's checkpoint resumed by ddp, and back
        if whole is not None:  # interrupted after step `at`
            shutil.rmtree(tmp_path / "run/final")
            for later in range(at + 1, steps + 1):
                shutil.rmtree(tmp_path / f"run/checkpoints/step-{later:08d}")
        done = subprocess.run([*on_two, f"parallel={parallel}"], env=SUBPROCESS_ENV, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        if whole is None:
            whole, whole_weights = metrics(tmp_path / "run"), weights(tmp_path / "run/final")
        else:
            assert f"resuming after step {at}" in done.stdout
            for a, b in zip(metrics(tmp_path / "run"), whole, strict=True):
                assert {k: a[k] for k in COMPARED} == pytest.approx({k: b[k] for k in COMPARED}, rel=1e-6)
            assert_same_weights(weights(tmp_path / "run/final"), whole_weights, atol=1e-6)


def test_gradient_checkpointing_changes_nothing_and_bfloat16_runs_on_cpu(tmp_path, ka_cache, student_dir):
    plain = run_train(tmp_path / "plain", student_dir, cache=ka_cache)
    recomputed = run_train(tmp_path / "checkpointing", student_dir, cache=ka_cache, gradient_checkpointing=True)
    bf16 = run_train(tmp_path / "bf16", student_dir, cache=ka_cache, dtype="bfloat16")
    for a, b, c in zip(plain, recomputed, bf16):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["loss"] == pytest.approx(c["loss"], rel=2e-2) and a["loss"] != c["loss"]


# ---------------------------------------------------------------- interruption

def cli_train(output: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "train", str(output), *args]


def test_training_on_the_top_entries_of_a_cache_equals_training_on_a_cache_of_that_k(
        tmp_path, teacher, splits, ka_cache, student_dir):
    small = tmp_path / "top8"
    cache.run(cache.Config(output=str(small), teacher=str(teacher), data=str(splits["train"]), routing=KA, top_k=8,
                           shard_size=SHARD_SIZE, batch_size=16, device="cpu"))
    subset = run_train(tmp_path / "subset", student_dir, cache=ka_cache, cache_top_k=8)
    made = run_train(tmp_path / "made", student_dir, cache=small)
    # Equal up to ties: the cache ranks the exact log-probs, the subset their stored float16 roundings.
    for a, b in zip(subset, made, strict=True):
        assert {k: a[k] for k in COMPARED} == pytest.approx({k: b[k] for k in COMPARED}, rel=1e-4)
    rows = CacheShards(ka_cache).read(0)
    kept = collate_records(rows, PAD, top_k=8)
    stored = collate_records(CacheShards(small).read(0), PAD)
    same = (kept.teacher.ids == stored.teacher.ids).all(-1)
    assert same.float().mean() > 0.95  # the same 8 ids at almost every target, and then the same log-probs
    assert torch.equal(kept.teacher.logprobs[same], stored.teacher.logprobs[same])
    # elsewhere the same 8 values, the last of them tied with the id it replaces
    assert torch.equal(kept.teacher.logprobs.sort(-1).values, stored.teacher.logprobs.sort(-1).values)
    full = run_train(tmp_path / "full", student_dir, cache=ka_cache)
    assert abs(full[-1]["kd"] - subset[-1]["kd"]) > 1e-2  # the subset really changed the teacher
    with pytest.raises(MoekdError, match="cache_top_k=64: teacher cache .* holds the top 32; give at most its k"):
        run_train(tmp_path / "too_many", student_dir, cache=ka_cache, cache_top_k=64)


def test_training_on_some_shards_of_a_cache_reads_those_only(tmp_path, ka_cache, student_dir):
    records = run_train(tmp_path / "run", student_dir, cache=ka_cache, cache_shards=[2], max_steps=None, epochs=1)
    shard = CacheShards(ka_cache, subset=[2])
    assert len(shard) == 1 and records[-1]["tokens"] == int(shard.index(0)[1].sum())  # every target, once
    assert len(records) == -(-len(shard.index(0)[0]) // 4)  # its rows in batches of 4
    with pytest.raises(MoekdError, match="cache_shards: teacher cache .* has no shard 99"):
        run_train(tmp_path / "missing", student_dir, cache=ka_cache, cache_shards=[99])


def test_training_while_the_cache_is_written_equals_training_on_the_finished_cache(
        tmp_path, ka_cache, student_dir, capsys):
    growing = Path(shutil.copytree(ka_cache, tmp_path / "growing"))
    later = tmp_path / "later"
    later.mkdir()
    for record in sorted((growing / "commits").iterdir())[2:]:  # shards 2 to 7 are not committed yet
        shutil.move(record, later / record.name)
    with pytest.raises(MoekdError, match="is incomplete: 2 of 8 shards committed; .* follow=true"):
        run_train(tmp_path / "refused", student_dir, cache=growing)

    def write_the_rest():
        for record in sorted(later.iterdir()):
            time.sleep(0.3)
            os.rename(record, growing / "commits" / record.name)  # a commit appears whole, as from `moekd cache`

    writer = threading.Thread(target=write_the_rest)
    writer.start()
    settings = dict(follow=True, max_steps=None, epochs=2, shuffle_shards=2)
    followed = run_train(tmp_path / "followed", student_dir, cache=growing, **settings)
    writer.join()
    assert "follow: waiting for shard" in capsys.readouterr().out
    finished = run_train(tmp_path / "finished", student_dir, cache=ka_cache, **settings)
    assert [{k: m[k] for k in COMPARED} for m in followed] == [{k: m[k] for k in COMPARED} for m in finished]
    assert followed[-1]["tokens"] == 2 * sum(int(CacheShards(ka_cache).index(s)[1].sum()) for s in range(8))
    assert_same_weights(weights(tmp_path / "followed/final"), weights(tmp_path / "finished/final"))
    shutil.move(growing / "commits" / "shard-00007.json", later)
    with pytest.raises(MoekdError, match=r"waited 1s for shard 7 of the teacher cache .* \(7 of 8 committed\)"):
        run_train(tmp_path / "stalled", student_dir, cache=growing, follow=True, follow_timeout=1, max_steps=None)


def test_a_finished_run_drops_its_checkpoints_unless_told_to_keep_them(tmp_path, ka_cache, student_dir):
    run_train(tmp_path / "dropped", student_dir, cache=ka_cache, save_every=2)
    run_train(tmp_path / "kept", student_dir, cache=ka_cache, save_every=2, keep_checkpoints_at_end=True)
    assert (tmp_path / "dropped/final").is_dir() and not (tmp_path / "dropped/checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "kept/checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_report_to_tensorboard_logs_each_step_once_through_a_resume(tmp_path, splits, ka_cache, student_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    settings = dict(cache=ka_cache, save_every=2, keep_checkpoints_at_end=True, report_to=("tensorboard",),
                    eval_data=splits["test"], eval_every=2, eval_max_examples=8)
    run_train(output, student_dir, **settings)
    shutil.rmtree(output / "final")
    shutil.rmtree(output / "checkpoints" / "step-00000004")
    records = run_train(output, student_dir, **settings)  # resumes after step 2: steps 3 and 4 again
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    for key in ("loss", "kd", "lr", "grad_norm", "tokens", "eval_loss"):
        logged = [(s.step, s.value) for s in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records if key in r], key


def test_report_to_wandb_logs_each_step_to_one_run_through_a_resume(tmp_path, monkeypatch, ka_cache, student_dir):
    """wandb itself (offline): every step's numbers at its step, and a resumed run continues the same wandb run."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, runs, init = [], [], wandb.init

    def recording_init(**kwargs):  # the real run, its log calls recorded on the way
        run = init(**kwargs)
        runs.append(kwargs["id"])
        log = run.log
        monkeypatch.setattr(run, "log", lambda data, step: (logged.append((step, data)), log(data, step=step)))
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    output = tmp_path / "run"
    settings = dict(cache=ka_cache, save_every=2, keep_checkpoints_at_end=True, report_to=("wandb",))
    run_train(output, student_dir, **settings)
    shutil.rmtree(output / "final")
    shutil.rmtree(output / "checkpoints" / "step-00000004")
    records = run_train(output, student_dir, **settings)  # resumes after step 2
    assert len(runs) == 2 and runs[0] == runs[1]  # one wandb run, resumed
    assert [step for step, _ in logged] == [1, 2, 3, 4, 3, 4]  # the redone steps again
    for step, data in logged[-2:]:
        assert data == {k: float(v) for k, v in records[step - 1].items() if k != "step" and isinstance(v, (int, float))}
    assert list((output / "wandb").glob(f"offline-run-*-{runs[0]}"))  # written by wandb itself


def test_sigkill_then_rerun_gives_the_uninterrupted_run(tmp_path, ka_cache, tokenizer_dir):
    # Dropout makes the losses depend on the RNG states the checkpoints carry.
    student = fixtures.make_student(tmp_path / "student", tokenizer_dir, attention_dropout=0.2)
    args = ["--student", str(student), "--cache", str(ka_cache), "--max-steps", "100", "--save-every", "10",
            "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "ka_samples=one", "optim.lr=0.003",
            "optim.warmup_steps=5", "keep_checkpoints_at_end=true"]
    fixtures.kill_and_rerun(lambda output: cli_train(output, *args), tmp_path, kill_after=25)
    interrupted, uninterrupted = metrics(tmp_path / "run"), metrics(tmp_path / "reference")
    assert [m["step"] for m in interrupted] == list(range(1, 101))
    assert [{k: m[k] for k in COMPARED} for m in interrupted] == [{k: m[k] for k in COMPARED} for m in uninterrupted]
    assert_same_weights(weights(tmp_path / "run/final"), weights(tmp_path / "reference/final"))
    assert len(list((tmp_path / "run/checkpoints").iterdir())) == 2  # keep_checkpoints


# ---------------------------------------------------------------- does KD work

def test_kd_brings_the_student_closer_to_the_teacher_than_sft(tmp_path, splits, ka_cache, test_cache, student_dir):
    common = dict(max_steps=200, batch_size=8, eval_cache=test_cache, eval_data=splits["test"],
                  optim=OptimConfig(lr=3e-3, warmup_steps=10))
    kd = run_train(tmp_path / "kd", student_dir, cache=ka_cache, loss=LossConfig(alpha=0.5), **common)[-1]
    sft = run_train(tmp_path / "sft", student_dir, data=splits["train"], loss=LossConfig(alpha=0), **common)[-1]
    # Measured: KD 0.13 nats, SFT 0.21 (with a top-k teacher cache, over four data / student seeds:
    # KD 0.10-0.13, SFT 0.16-0.23).
    assert kd["eval_kl"] < 0.8 * sft["eval_kl"]
    assert sft["kd"] == 0 and kd["kd"] > 0


# ---------------------------------------------------------------- refusals and reruns

def test_a_student_with_another_tokenizer_or_vocabulary_is_refused(tmp_path, ka_cache, student_dir, tokenizer_dir):
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(student_dir, other_tokenizer)
    AutoTokenizer.from_pretrained(tokenizer_dir, eos_token="<|endoftext|>").save_pretrained(other_tokenizer)
    with pytest.raises(MoekdError, match=f"the student \\({other_tokenizer}\\) has a tokenizer .* other than the one "
                                         f"{ka_cache} was made with"):
        run_train(tmp_path / "a", other_tokenizer, cache=ka_cache)
    assert not (tmp_path / "a").exists()  # refused before writing: a corrected re-run starts cleanly
    bigger = fixtures.make_student(tmp_path / "bigger", tokenizer_dir, vocab_size=fixtures.VOCAB_SIZE + 16)
    with pytest.raises(MoekdError, match=f"vocabulary of {fixtures.VOCAB_SIZE + 16} but {ka_cache} "
                                         f"has {fixtures.VOCAB_SIZE}"):
        run_train(tmp_path / "b", bigger, cache=ka_cache)


def test_a_cache_that_fails_verification_is_refused(tmp_path, ka_cache, student_dir):
    damaged = tmp_path / "cache"
    shutil.copytree(ka_cache, damaged)
    shard = fixtures.shard_file(damaged, 3)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MoekdError, match=f"teacher cache {damaged} failed verification .*shard 3"):
        run_train(tmp_path / "run", student_dir, cache=damaged)
    with pytest.raises(MoekdError, match="stores no aggregate"):
        run_train(tmp_path / "aggregate", student_dir, cache=ka_cache, ka_samples="aggregate")


def test_other_settings_are_refused_unless_overwrite_and_a_finished_run_is_a_no_op(
    tmp_path, ka_cache, student_dir, capsys,
):
    first = run_train(tmp_path, student_dir, cache=ka_cache, max_steps=2)
    assert run_train(tmp_path, student_dir, cache=ka_cache, max_steps=2, save_every=1) == first
    assert "the run is finished; nothing to do" in capsys.readouterr().out
    with pytest.raises(MoekdError, match="optim.lr is 0.003 in the run but 0.001 now"):
        run_train(tmp_path, student_dir, cache=ka_cache, max_steps=2, optim=OptimConfig(lr=1e-3, warmup_steps=2))
    replaced = run_train(tmp_path, student_dir, cache=ka_cache, max_steps=3, overwrite=True)
    assert [m["step"] for m in replaced] == [1, 2, 3]
    assert {k: replaced[0][k] for k in COMPARED} == {k: first[0][k] for k in COMPARED}


@pytest.mark.parametrize("overrides, message", [
    (["cache=c", "data=d"], "give exactly one of cache"),
    (["data=d"], "loss.alpha=0.5 needs a teacher"),
    (["data=d", "loss.alpha=0", "ka_samples=one"], "ka_samples=one picks teacher samples"),
    (["cache=c", "routing.mode=ka"], "routing and top_k apply to online KD"),
    (["cache=c", "eval_every=10"], "eval_every needs eval_data or eval_cache"),
    (["cache=c", "pack_length=0"], "pack_length must be at least 1"),
    (["cache=c", "parallel=zero3"], "parallel must be one of 'ddp', 'fsdp'"),
])
def test_config_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(train.Config, None, ["output=o", "student=s", *overrides])


def test_help_lists_the_fields(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for field in ("student = '(required)'", "cache = None", "ka_samples = 'mean'", "loss.alpha = 0.5",
                  "optim.lr = 5e-05", "optim.grad_accum = 1", "routing.mode = 'topk'", "eval_every = 0"):
        assert field in text


# ---------------------------------------------------------------- packing

def test_packing_keeps_every_target_and_gives_each_row_its_own_positions(ka_cache):
    reader = Reader(CacheShards(ka_cache), batch_size=8, shuffle_shards=1, seed=0,
                    collate=functools.partial(collate_records, pad_id=PAD))
    batch = next(iter(reader.batches(0, 0, 1)))
    lengths = batch.attention_mask.sum(1)
    packed = pack(batch, pack_length=int(lengths.max()) * 2)
    assert len(packed.input_ids) < len(batch.input_ids)  # rows did share sequences
    assert torch.equal(packed.input_ids[packed.rows, packed.cols], batch.input_ids[batch.rows, batch.cols])
    assert torch.equal(packed.input_ids[packed.rows, packed.cols + 1], batch.targets)
    assert torch.equal(packed.position_ids[packed.rows, packed.cols], batch.cols)  # a row starts at 0
    starts = (packed.position_ids == 0).sum()  # every row, and the padding at the end of a pack
    assert len(batch.input_ids) <= starts <= len(batch.input_ids) + len(packed.input_ids)


def test_packed_rows_train_as_the_padded_ones(tmp_path, ka_cache, student_dir):
    padded = run_train(tmp_path / "padded", student_dir, cache=ka_cache, batch_size=8)
    for name, attention in (("packed", None), ("packed-eager", "eager")):  # transformers' default is sdpa
        packed = run_train(tmp_path / name, student_dir, cache=ka_cache, batch_size=8, pack_length=128,
                           attention=attention)
        for a, b in zip(padded, packed, strict=True):
            for key in ("loss", "ce", "kd", "grad_norm", "tokens"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
            assert len(a["peak_memory_mib"]) == 1 and a["peak_memory_mib"][0] > 0  # one rank
        assert_same_weights(weights(tmp_path / name / "final"), weights(tmp_path / "padded/final"), atol=1e-5)
    assert load_model(student_dir, device="cpu", attention="eager").config._attn_implementation == "eager"


def test_a_student_that_lets_packed_rows_see_each_other_is_refused(tmp_path, ka_cache, tokenizer_dir):
    from transformers import MambaConfig  # a state-space model: its state runs on from one row into the next

    student = fixtures.make_model(tmp_path / "mamba", MambaConfig(vocab_size=fixtures.VOCAB_SIZE, hidden_size=32,
                                                                  state_size=4, num_hidden_layers=2, pad_token_id=0,
                                                                  bos_token_id=1, eos_token_id=2),
                                  tokenizer_dir, seed=1)
    with pytest.raises(MoekdError, match=r"the student \(mamba\) does not keep packed rows apart"):
        run_train(tmp_path / "run", student, cache=ka_cache, pack_length=128)
    assert run_train(tmp_path / "padded", student, cache=ka_cache, max_steps=1)  # unpacked, it trains
