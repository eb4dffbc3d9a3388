"""`moekd sar` on the fixtures' tiny models: only routers move, the KL falls, resume after SIGKILL, the routers file.

The teachers are the fixture MoEs with initializer_range 0.3: their experts'
outputs are large enough that the routing moves the teacher's distribution
(with the default 0.02 the logits are nearly uniform whatever the routing).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fixtures
from pipeline.cache.manifest import Manifest
from pipeline.cache.shards import read_shard
from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import MoekdError
from pipeline.core.files import sha256_file
from pipeline.core.processes import Distributed
from pipeline.core.seeding import generator
from pipeline.data.batch import collate_examples
from pipeline.data.prepared import PreparedData
from pipeline.data.reader import PreparedShards, Reader
from pipeline.models.identity import model_identity
from pipeline.models.loading import load_model, load_tokenizer
from pipeline.models.logprobs import target_logprobs
from pipeline.student.checkpoints import load_trainer_state
from pipeline.student.generation import generate_ids, stop_token_ids
from pipeline.student.sar import (
    RouterConfig, RouterOptimConfig, RouterTrainer, SarRoutingConfig, checkpoint_teacher_layers, on_policy_examples,
    train_routers_only,
)
from pipeline.student.trainer import Trainer
from pipeline.teacher.families import find_routers
from pipeline.teacher.routers import apply_routers, read_routers, save_routers
from pipeline.teacher.routing import RoutingHooks
from stages import cache, sar
from stages.cli import main

REPO, SUBPROCESS_ENV = fixtures.REPO, fixtures.SUBPROCESS_ENV
PAD = 0  # <|endoftext|>, the fixture tokenizer's pad token
FAST = RouterOptimConfig(lr=3e-2, warmup_steps=0, schedule="constant")
COMPARED = ("loss", "ce", "kd", "grad_norm", "tokens", "router_loss", "kl", "balance", "router_grad_norm",
            "router_entropy", "topk_load", "router_prob")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.prepared_records(tmp_path_factory.mktemp("sar_data"), tokenizer_dir, 32, seed=5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    """Factory: `teacher_dir(family, seed)`, a fixture MoE whose routing matters (see the module docstring)."""
    made: dict[tuple, Path] = {}

    def get(family: str = "mixtral", seed: int = 0) -> Path:
        if (family, seed) not in made:
            made[family, seed] = fixtures.make_moe(tmp_path_factory.mktemp(f"{family}-{seed}"), family, tokenizer_dir,
                                                   seed=seed, initializer_range=0.3)
        return made[family, seed]

    return get


@pytest.fixture(scope="module")
def batch(prepared):
    return collate_examples(PreparedData(prepared).rows(0, 8), PAD)


@pytest.fixture(scope="module")
def student_logprobs(student_dir, batch) -> torch.Tensor:
    with torch.no_grad():
        return target_logprobs(load_model(student_dir, dtype="float32", device="cpu"), batch)


def router_trainer(directory: Path, **router) -> RouterTrainer:
    teacher = load_model(directory, dtype="float32", device="cpu")
    routing = RoutingHooks(teacher, SarRoutingConfig())
    routers = train_routers_only(teacher, routing.routers)
    return RouterTrainer(teacher, routing, routers, config=RouterConfig(**{"optim": FAST} | router), total_steps=100,
                         processes=Distributed("cpu"))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


# ---------------------------------------------------------------- the router step

@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_router_steps_change_the_routers_and_nothing_else(teacher_dir, family, batch, student_logprobs):
    trainer = router_trainer(teacher_dir(family))
    before = snapshot(trainer.teacher)
    for _ in range(3):
        trainer.step([batch], [student_logprobs])
    after = snapshot(trainer.teacher)
    names = {f"{r.name}.{kind}" for r in find_routers(trainer.teacher) for kind in ("weight", "bias")} & set(before)
    assert set(trainer.routers) == names and any(n.endswith("bias") for n in names) == (family == "gpt_oss")
    for name in before:  # experts, attention, norms, embeddings, DeepSeek's correction bias (a buffer)
        assert torch.equal(before[name], after[name]) != (name in names), name
    assert set(trainer.optimizer.state) == set(trainer.routers.values())  # optimizer state for routers only


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_router_steps_bring_the_teacher_closer_to_the_student(teacher_dir, family, batch, student_logprobs):
    trainer = router_trainer(teacher_dir(family))
    kl = [trainer.step([batch], [student_logprobs])["kl"] for _ in range(30)]
    # Measured: the last KL is 0.85-0.90 of the first (the routers can only re-mix fixed experts).
    assert kl[-1] < 0.93 * kl[0]
    assert all(later < earlier for earlier, later in zip(kl[::5], kl[5::5]))


def test_micro_batches_step_the_routers_like_one_batch(teacher_dir, prepared, student_logprobs):
    rows = PreparedData(prepared).rows(0, 7)
    updated = []
    for parts in ([rows[:2], rows[2:]], [rows]):  # unequal token counts
        trainer = router_trainer(teacher_dir("mixtral"), balance=0.0)  # L_balance is a mean over micro-batches
        trainer.optimizer = torch.optim.SGD(trainer.routers.values(), lr=1.0)  # moves each weight by its gradient
        batches = [collate_examples(part, PAD) for part in parts]
        logprobs = list(student_logprobs[: sum(b.tokens for b in batches)].split([b.tokens for b in batches]))
        result = trainer.step(batches, logprobs)
        updated.append((result, {n: p.detach().clone() for n, p in trainer.routers.items()}))
    (split, split_routers), (whole, whole_routers) = updated
    assert split["kl"] == pytest.approx(whole["kl"], rel=1e-6)
    assert split["router_grad_norm"] == pytest.approx(whole["router_grad_norm"], rel=1e-5)
    for name in whole_routers:
        torch.testing.assert_close(split_routers[name], whole_routers[name], rtol=0, atol=1e-6)


def test_teacher_gradient_checkpointing_recomputes_and_changes_nothing(teacher_dir, batch, student_logprobs):
    results = []
    for recompute in (False, True):
        trainer = router_trainer(teacher_dir("qwen2_moe"))
        if recompute:
            checkpoint_teacher_layers(trainer.teacher)
        calls = []
        trainer.routing.routers[0].module.register_forward_hook(lambda *args: calls.append(1))
        metrics = [trainer.step([batch], [student_logprobs]) for _ in range(2)]
        results.append((len(calls), metrics, {n: p.detach().clone() for n, p in trainer.routers.items()}))
    (plain_calls, plain, plain_routers), (calls, recomputed, recomputed_routers) = results
    assert (plain_calls, calls) == (2, 4)  # the first layer's router ran again in each backward
    for a, b in zip(plain, recomputed):
        assert a["router_loss"] == pytest.approx(b["router_loss"], rel=1e-6)
        assert a["router_entropy"] == pytest.approx(b["router_entropy"], rel=1e-6)
    for name in plain_routers:
        torch.testing.assert_close(plain_routers[name], recomputed_routers[name], rtol=1e-5, atol=1e-7)


def test_a_router_without_parameters_is_refused(teacher_dir):
    teacher = load_model(teacher_dir("mixtral"), dtype="float32", device="cpu")
    routers = find_routers(teacher)
    for router in routers:  # as if the weights had been stored as constants
        weight = router.module.weight.data
        del router.module.weight
        router.module.register_buffer("weight", weight)
    with pytest.raises(MoekdError, match="router modules .* hold no parameters to train"):
        train_routers_only(teacher, routers)


# ---------------------------------------------------------------- the routers file

def test_applied_routers_reproduce_the_adapted_teacher_and_another_teacher_is_refused(
    tmp_path, teacher_dir, batch, student_logprobs,
):
    directory = teacher_dir("mixtral")
    trainer = router_trainer(directory)
    for _ in range(3):
        trainer.step([batch], [student_logprobs])
    path = tmp_path / "routers.safetensors"
    save_routers(path, trainer.routers, model_identity(directory, trainer.teacher))
    trainer.routing.remove()  # compare the teachers under their own top-k routing
    original = load_model(directory, dtype="float32", device="cpu")
    logits = {}
    for name, model in (("adapted", trainer.teacher), ("original", original)):
        with torch.no_grad():
            logits[name] = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    apply_routers(original, path)
    with torch.no_grad():
        applied = original(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(applied, logits["adapted"]) and not torch.equal(applied, logits["original"])
    tensors, _ = read_routers(path)
    assert set(tensors) == set(trainer.routers)

    same_config = load_model(teacher_dir("mixtral", seed=1), dtype="float32", device="cpu")
    with pytest.raises(MoekdError, match="trained on teacher .* weights_fingerprint is"):
        apply_routers(same_config, path)
    with pytest.raises(MoekdError, match="model_type is 'mixtral' there but 'qwen2_moe' here"):
        apply_routers(load_model(teacher_dir("qwen2_moe"), dtype="float32", device="cpu"), path)


def test_a_cache_of_the_adapted_teacher_is_its_own(tmp_path, teacher_dir, prepared, batch, student_logprobs):
    directory = teacher_dir("mixtral")
    files = {}
    for steps in (3, 4):
        trainer = router_trainer(directory)
        for _ in range(steps):
            trainer.step([batch], [student_logprobs])
        files[steps] = tmp_path / f"routers-{steps}.safetensors"
        save_routers(files[steps], trainer.routers, model_identity(directory, trainer.teacher))

    def run_cache(output: Path, *extra: str) -> Manifest:
        cache.run(load_config(cache.Config, None, [f"output={output}", f"teacher={directory}", f"data={prepared}",
                                                   "shard_size=16", "top_k=8", "device=cpu", *extra]))
        return Manifest.load(output)

    plain, adapted = run_cache(tmp_path / "plain"), run_cache(tmp_path / "adapted", f"routers={files[3]}")
    assert "routers" not in plain.identity.teacher
    assert adapted.identity.teacher == plain.identity.teacher | {"routers": sha256_file(files[3])}
    records = {name: read_shard(fixtures.shard_file(tmp_path / name, 0), rows=[0])[0]
               for name in ("plain", "adapted")}
    teacher = load_model(directory, dtype="float32", device="cpu")
    apply_routers(teacher, files[3])
    record = records["adapted"]
    with torch.no_grad():  # the adapted teacher under its own top-k routing, as the cache stage runs it
        logits = teacher(input_ids=torch.as_tensor(record.input_ids)[None].long()).logits[0, record.positions]
    top = torch.log_softmax(logits, dim=-1).topk(8)
    ids, order = top.indices.sort(dim=-1)  # the cache keeps each top-k sorted by id, in float16 precision
    expected = top.values.gather(-1, order)
    assert torch.equal(torch.as_tensor(record.topk_ids[0]).long(), ids)
    torch.testing.assert_close(torch.as_tensor(record.topk_logprobs[0]), expected, rtol=2e-3, atol=1e-5)
    plain = records["plain"]
    assert not (np.array_equal(plain.topk_ids, record.topk_ids) and np.allclose(plain.topk_logprobs,
                                                                                 record.topk_logprobs, atol=1e-2))

    with pytest.raises(MoekdError, match="teacher.routers is '[0-9a-f]{64}' in the cache but '[0-9a-f]{64}' now"):
        run_cache(tmp_path / "adapted", f"routers={files[4]}")
    with pytest.raises(MoekdError, match="teacher.routers is '[0-9a-f]{64}' in the cache but '<absent>' now"):
        run_cache(tmp_path / "adapted")
    with pytest.raises(MoekdError, match="routers trained on teacher .* weights_fingerprint"):
        run_cache(tmp_path / "other", f"teacher={teacher_dir('mixtral', seed=1)}", f"routers={files[3]}")


# ---------------------------------------------------------------- on-policy sequences

def test_on_policy_responses_are_the_students_samples(student_dir, prepared):
    student = load_model(student_dir, dtype="float32", device="cpu")
    examples = PreparedData(prepared).rows(0, 6)
    stop_ids = stop_token_ids(load_tokenizer(student_dir), student)
    sample = functools.partial(on_policy_examples, student, examples, stop_ids=stop_ids, pad_id=PAD,
                               max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0)
    sampled = sample(step=3)
    prompts = [e.input_ids[: e.prompt_length] for e in examples]
    drawn = generate_ids(student, prompts, stop_ids, PAD, 12,
                         generators=[generator(0, "on-policy", 3, e.seq_id) for e in examples])
    for example, prompt, response, tokens in zip(sampled, prompts, drawn, [e.input_ids for e in examples]):
        assert example.input_ids.tolist() == prompt.tolist() + response
        assert example.response_mask.tolist() == [False] * len(prompt) + [True] * len(response)
    batch = collate_examples(sampled, PAD)
    assert batch.targets.tolist() == [token for response in drawn for token in response]  # the generated tokens
    assert batch.tokens > 0 and [e.input_ids.tolist() for e in sampled] != [e.input_ids.tolist() for e in examples]
    assert [e.input_ids.tolist() for e in sample(step=3)] == [e.input_ids.tolist() for e in sampled]
    assert [e.input_ids.tolist() for e in sample(step=4)] != [e.input_ids.tolist() for e in sampled]


# ---------------------------------------------------------------- the stage

def run_sar(output: Path, teacher: Path, student: Path, data: Path, **settings) -> list[dict]:
    settings = dict(batch_size=4, max_steps=4, save_every=2, device="cpu", dtype="float32", router=RouterConfig(
        optim=FAST)) | settings
    sar.run(sar.Config(output=str(output), teacher=str(teacher), student=str(student), data=str(data), **settings))
    return metrics(output)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_the_stage_writes_the_student_the_routers_and_metrics(tmp_path, teacher_dir, student_dir, prepared, capsys):
    records = run_sar(tmp_path, teacher_dir("mixtral"), student_dir, prepared, keep_checkpoints_at_end=True)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    experts, layers = 4, 2
    for record in records:
        assert len(record["router_entropy"]) == layers and len(record["topk_load"][0]) == experts
        assert sum(record["router_prob"][0]) == pytest.approx(1.0)
        assert sum(record["topk_load"][1]) == pytest.approx(2.0)  # every token's top-2
    tensors, trained_on = read_routers(tmp_path / "routers.safetensors")
    last = load_trainer_state(tmp_path / "checkpoints/step-00000004")["router"]["parameters"]
    assert tensors.keys() == last.keys() and all(torch.equal(tensors[n], last[n]) for n in tensors)
    assert trained_on["model_type"] == "mixtral"
    original = load_model(teacher_dir("mixtral"), dtype="float32", device="cpu")
    assert not all(torch.equal(tensors[n], p) for n, p in original.named_parameters() if n in tensors)
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert run_sar(tmp_path, teacher_dir("mixtral"), student_dir, prepared) == records
    assert "the run is finished; nothing to do" in capsys.readouterr().out


def test_bfloat16_and_recomputation_keep_float32_routers(tmp_path, teacher_dir, student_dir, prepared):
    plain = run_sar(tmp_path / "plain", teacher_dir("olmoe"), student_dir, prepared, max_steps=2)
    bf16 = run_sar(tmp_path / "bf16", teacher_dir("olmoe"), student_dir, prepared, max_steps=2, dtype="bfloat16",
                   gradient_checkpointing=True, teacher_gradient_checkpointing=True)
    for a, b in zip(plain, bf16, strict=True):
        for key in ("loss", "router_loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=2e-2) and a[key] != b[key]
    tensors, _ = read_routers(tmp_path / "bf16/routers.safetensors")
    teacher = load_model(teacher_dir("olmoe"), dtype="bfloat16", device="cpu")
    original = {name: p.detach().clone() for name, p in teacher.named_parameters() if name in tensors}
    apply_routers(teacher, tmp_path / "bf16/routers.safetensors")
    params = dict(teacher.named_parameters())
    for name, tensor in tensors.items():  # trained as float32 master weights, applied in the teacher's dtype
        assert tensor.dtype == torch.float32 and not torch.equal(tensor.bfloat16(), original[name])
        assert torch.equal(params[name], tensor.bfloat16())


def cli_sar(output: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "sar", str(output), *args]


def test_sigkill_then_rerun_gives_the_uninterrupted_on_policy_run(tmp_path, teacher_dir, prepared, tokenizer_dir):
    # Dropout makes the losses depend on the RNG states the checkpoints carry.
    student = fixtures.make_student(tmp_path / "student", tokenizer_dir, attention_dropout=0.2)
    args = ["--teacher", str(teacher_dir("gpt_oss")), "--student", str(student), "--data", str(prepared),
            "--sequences", "student", "--max-new-tokens", "8", "--max-steps", "40", "--save-every", "5",
            "--batch-size", "4", "--device", "cpu", "--dtype", "float32", "optim.lr=0.003", "optim.warmup_steps=5",
            "router.optim.lr=0.01"]
    fixtures.kill_and_rerun(lambda output: cli_sar(output, *args), tmp_path, kill_after=12,
                            absent_after_kill=("final", "routers.safetensors"))
    interrupted, uninterrupted = metrics(tmp_path / "run"), metrics(tmp_path / "reference")
    assert [m["step"] for m in interrupted] == list(range(1, 41))
    assert [{k: m[k] for k in COMPARED} for m in interrupted] == [{k: m[k] for k in COMPARED} for m in uninterrupted]
    assert all(m["tokens"] - p["tokens"] <= 4 * 8 for p, m in zip(interrupted, interrupted[1:]))  # generated only
    assert (tmp_path / "run/final/model.safetensors").read_bytes() == (
        tmp_path / "reference/final/model.safetensors").read_bytes()
    (routers, trained_on), (expected, expected_on) = (read_routers(tmp_path / d / "routers.safetensors")
                                                      for d in ("run", "reference"))
    assert trained_on == expected_on and routers.keys() == expected.keys()
    assert all(torch.equal(routers[name], expected[name]) for name in routers)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_both_ranks_batches(
    tmp_path, teacher_dir, student_dir, prepared, parallel,
):
    steps, batch_size, shard_size = 3, 2, 8
    common = ["--teacher", str(teacher_dir("mixtral")), "--student", str(student_dir), "--data", str(prepared),
              "--max-steps", str(steps), "--batch-size", str(batch_size), "--shard-size", str(shard_size),
              "--shuffle-shards", "1", "--device", "cpu", "--dtype", "float32", "optim.lr=0.003",
              "optim.warmup_steps=1", "router.optim.lr=0.01", "router.optim.warmup_steps=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stages.cli", "sar", str(tmp_path / "ddp"), *common, f"parallel={parallel}"]
    done = subprocess.run(command, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    config = load_config(sar.Config, None, [f"output={tmp_path / 'one'}", f"teacher={teacher_dir('mixtral')}",
                                            f"student={student_dir}", f"data={prepared}", "device=cpu",
                                            "dtype=float32", "optim.lr=0.003", "optim.warmup_steps=1",
                                            "optim.grad_accum=2", "router.optim.lr=0.01",
                                            "router.optim.warmup_steps=1"])
    readers = [Reader(PreparedShards(PreparedData(prepared), shard_size), batch_size=batch_size, shuffle_shards=1,
                      seed=0, rank=rank, world_size=2, collate=functools.partial(collate_examples, pad_id=PAD))
               for rank in range(2)]
    streams = [list(reader.batches(0, 0, steps)) for reader in readers]
    student = load_model(student_dir, dtype="float32", device="cpu").train()
    trainer = Trainer(student, optim=config.optim, loss=config.loss, total_steps=steps, processes=Distributed("cpu"))
    teacher = load_model(teacher_dir("mixtral"), dtype="float32", device="cpu")
    routing = RoutingHooks(teacher, config.routing)
    routers, adapted = sar.adapt(config, teacher, routing, contextlib.nullcontext)  # the stage's own wiring
    router_trainer = RouterTrainer(teacher, routing, routers, config=config.router, total_steps=steps,
                                   processes=Distributed("cpu"))
    step = sar.Step(config=config, student=student, trainer=trainer, teacher=adapted, router_trainer=router_trainer,
                    pad_id=PAD, stop_ids=stop_token_ids(load_tokenizer(student_dir), student),
                    autocast=contextlib.nullcontext)
    for index, logged in enumerate(metrics(tmp_path / "ddp")):
        expected = step([streams[0][index], streams[1][index]])  # both ranks' batches in one process
        for key in ("loss", "ce", "kd", "grad_norm", "router_loss", "kl", "balance", "router_grad_norm"):
            assert logged[key] == pytest.approx(expected[key], rel=1e-5), key
        torch.testing.assert_close(torch.tensor(logged["router_prob"]), torch.tensor(expected["router_prob"]))
    tensors, _ = read_routers(tmp_path / "ddp/routers.safetensors")
    for name, param in routers.items():
        torch.testing.assert_close(tensors[name], param.detach(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- refusals and settings

def test_a_dense_teacher_and_other_tokenizers_or_vocabularies_are_refused(
    tmp_path, teacher_dir, student_dir, prepared, tokenizer_dir,
):
    with pytest.raises(MoekdError, match="is a dense model; KA/SAR need an MoE teacher"):
        run_sar(tmp_path / "dense", student_dir, student_dir, prepared)
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(student_dir, other_tokenizer)
    AutoTokenizer.from_pretrained(tokenizer_dir, eos_token="<|endoftext|>").save_pretrained(other_tokenizer)
    with pytest.raises(MoekdError, match=f"the student \\({other_tokenizer}\\) has a tokenizer .* other than the one "
                                         f"{prepared} was made with"):
        run_sar(tmp_path / "tokenizer", teacher_dir("mixtral"), other_tokenizer, prepared)
    bigger = fixtures.make_student(tmp_path / "bigger", tokenizer_dir, vocab_size=fixtures.VOCAB_SIZE + 16)
    with pytest.raises(MoekdError, match=f"the student .* has a vocabulary of {fixtures.VOCAB_SIZE + 16} but "
                                         f"{teacher_dir('mixtral')} has {fixtures.VOCAB_SIZE}"):
        run_sar(tmp_path / "vocabulary", teacher_dir("mixtral"), bigger, prepared)


@pytest.mark.parametrize("overrides, message", [
    (["routing.mode=ka", "routing.samples=2"], "SAR runs one teacher sample per step"),
    (["router.optim.grad_accum=2"], "router.optim.grad_accum must stay 1"),
    (["router.jsd_beta=1"], "router.jsd_beta must be in \\(0, 1\\), got 1"),
    (["sequences=teacher"], "sequences must be one of 'data', 'student'"),
    (["sequences=student", "parallel=fsdp"], "a sharded student cannot"),
])
def test_config_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sar.Config, None, ["output=o", "teacher=t", "student=s", "data=d", *overrides])


def test_help_lists_the_sar_defaults(capsys):
    assert main(["sar", "--help"]) == 0
    text = capsys.readouterr().out
    for field in ("routing.mode = 'all'", "router.divergence = 'forward_kl'", "router.balance = 0.01",
                  "router.optim.weight_decay = 0.0", "sequences = 'data'", "loss.alpha = 0.5"):
        assert field in text
    config = load_config(sar.Config, None, ["output=o", "teacher=t", "student=s", "data=d", "routing.lam=0",
                                            "routing.mode=ka", "routing.k_s=3"])
    assert (config.routing.mode, config.routing.k_s) == ("ka", 3)
    example = load_config(sar.Config, REPO / "configs/sar.yaml")
    assert (example.routing.mode, example.router.optim.lr, example.router.optim.weight_decay) == ("all", 5e-6, 0.0)
