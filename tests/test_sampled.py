"""Sampled caches: tokens drawn from the teacher (the mixture of its KA samples), an unbiased forward-KL target."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import fixtures
from pipeline.cache.manifest import Manifest, verify_cache
from pipeline.cache.shards import read_shard, write_shard
from pipeline.core.errors import MoekdError
from pipeline.data.batch import collate_examples, collate_records
from pipeline.data.prepared import PreparedData
from pipeline.data.signals import Sampled
from pipeline.models.loading import load_model
from pipeline.student.losses import sampled_forward_kl
from pipeline.teacher.capture import MAX_DRAWS, mixture_logprobs, sample_hidden, teacher_draws
from pipeline.teacher.routing import RoutingConfig, RoutingHooks
from stages.cli import main
from test_cache import run_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)
SAMPLED = ["storage=sampled", "draws=16", "routing.mode=ka", "routing.samples=3", "routing.lam=0.5"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir):
    return fixtures.prepared_records(tmp_path_factory.mktemp("sampled"), tokenizer_dir, 30, seed=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, moe_dir, prepared):
    output = tmp_path_factory.mktemp("reference") / "cache"
    run_cache(output, moe_dir("mixtral"), prepared, *SAMPLED, "shard_size=2")
    return output


def test_the_gradient_is_unbiased_for_forward_kl():
    """Averaged over many caches' draws, the loss's gradient in the student's logits is KL(p ‖ q)'s."""
    g = torch.Generator().manual_seed(0)
    V, draws, repeats = 40, 16, 4000
    p = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    logits = (torch.randn(V, generator=g)).requires_grad_()
    exact = torch.softmax(logits, -1).detach() - p  # d KL(p ‖ softmax(logits)) / d logits
    gradients = []
    for _ in range(repeats):
        drawn = torch.multinomial(p, draws, replacement=True, generator=g)
        ids, counts = drawn.unique(return_counts=True)
        loss = sampled_forward_kl(torch.log_softmax(logits, -1)[None], ids[None], (counts / draws)[None])
        gradients.append(torch.autograd.grad(loss.sum(), logits)[0])
    gradients = torch.stack(gradients)
    z = (gradients.mean(0) - exact) / (gradients.std(0) / repeats**0.5 + 1e-12)
    assert z.abs().max() < 4.5, z  # Bonferroni over 40 coordinates at ~1e-4 per test
    # Power: the same test tells a biased target apart (the draws' distinct ids renormalised, equal weights).
    biased = []
    for _ in range(500):
        ids = torch.multinomial(p, draws, replacement=True, generator=g).unique()
        loss = sampled_forward_kl(torch.log_softmax(logits, -1)[None], ids[None], torch.full((1, len(ids)), 1 / len(ids)))
        biased.append(torch.autograd.grad(loss.sum(), logits)[0])
    biased = torch.stack(biased)
    assert ((biased.mean(0) - exact) / (biased.std(0) / 500**0.5 + 1e-12)).abs().max() > 10


def test_ka_draws_follow_the_mixture_of_the_samples(tmp_path, tokenizer_dir, prepared):
    """Draws at each target come from (1/M) Σ_m p^(m) of the routing samples (frequency test)."""
    # Large weights: peaked distributions that differ with the routing (the default init's are near uniform).
    directory = fixtures.make_moe(tmp_path / "teacher", "mixtral", tokenizer_dir, initializer_range=0.3)
    teacher = load_model(directory, dtype="float32", device="cpu")
    batch = collate_examples(PreparedData(prepared).rows(0, 2), 0)
    routing_config = RoutingConfig(mode="ka", samples=3, lam=1.0)
    draws = 20_000
    with RoutingHooks(teacher, routing_config) as routing:
        expected = mixture_logprobs(teacher, sample_hidden(teacher, routing, batch, 3)).exp()
        singles = [mixture_logprobs(teacher, sample_hidden(teacher, routing, batch, 3)[m : m + 1]).exp()
                   for m in range(3)]
        drawn = teacher_draws(teacher, routing, batch, num_samples=3, draws=draws, seed=0)
    sizes = np.concatenate([d[0] for d in drawn])
    ids, counts = np.concatenate([d[1] for d in drawn]), np.concatenate([d[2] for d in drawn])
    frequency = torch.zeros_like(expected)
    frequency[torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)), torch.from_numpy(ids)] = (
        torch.from_numpy(counts).float() / draws)
    def z(p):  # per (target, token) z-scores of the observed frequencies under p
        return ((frequency - p) / (p * (1 - p) / draws).sqrt().clamp_min(1e-6))[p > 1e-3].abs().max()

    assert z(expected) < 5.5
    assert min(z(single) for single in singles) > 8  # drawing from any one sample alone would be seen
    assert (counts > 0).all() and (np.add.reduceat(counts, np.cumsum(sizes) - sizes) == draws).all()


def test_a_sampled_cache_is_small_exact_on_rerun_and_verified(tmp_path, reference, moe_dir, prepared):
    manifest = Manifest.load(reference)
    assert manifest.identity.encoding.storage == "sampled" and verify_cache(reference) == []
    again = tmp_path / "again"
    absurd = [setting for setting in SAMPLED if not setting.startswith("draws=")] + [f"draws={MAX_DRAWS + 1}"]
    with pytest.raises(MoekdError, match=f"draws={MAX_DRAWS + 1} exceeds {MAX_DRAWS}, the most tokens per target"):
        run_cache(again, moe_dir("mixtral"), prepared, *absurd, "shard_size=2")
    assert not again.exists()  # refused before anything is written: it does not block the run below
    run_cache(again, moe_dir("mixtral"), prepared, *SAMPLED, "shard_size=2")
    assert fixtures.cache_files(again) == fixtures.cache_files(reference)
    run_cache(tmp_path / "split", moe_dir("mixtral"), prepared, *SAMPLED, "shard_size=2", "worker=1", "num_workers=2")
    run_cache(tmp_path / "split", moe_dir("mixtral"), prepared, *SAMPLED, "shard_size=2", "worker=0", "num_workers=2")
    assert fixtures.cache_files(tmp_path / "split") == fixtures.cache_files(reference)
    records = [r for i in sorted(manifest.shards) for r in manifest.read_shard(i)]
    assert all((np.add.reduceat(r.sample_counts, np.cumsum(r.sample_sizes) - r.sample_sizes) == 16).all()
               for r in records if len(r.positions))
    # round trip of the encoding, and damage caught
    info = write_shard(tmp_path / "copy", 0, records[:3], vocab_size=fixtures.VOCAB_SIZE, num_samples=3, draws=16)
    for a, b in zip(read_shard(tmp_path / "copy" / info.file), records[:3]):
        for name in ("sample_sizes", "sample_ids", "sample_counts", "positions", "input_ids"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    with pytest.raises(ValueError, match="must sum to 8"):
        write_shard(tmp_path / "bad", 0, records[:3], vocab_size=fixtures.VOCAB_SIZE, num_samples=3, draws=8)


def test_sigkill_then_resume_is_byte_identical(tmp_path, moe_dir, prepared, reference):
    command = [sys.executable, "-m", "stages.cli", "cache", str(tmp_path / "killed"), f"teacher={moe_dir('mixtral')}",
               f"data={prepared}", "shard_size=2", *SAMPLED]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=fixtures.SUBPROCESS_ENV)
    fixtures.wait_for_commits(tmp_path / "killed", 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= len(Manifest.load(tmp_path / "killed").committed()) < 15
    subprocess.run(command, check=True, capture_output=True, env=fixtures.SUBPROCESS_ENV)
    assert fixtures.cache_files(tmp_path / "killed") == fixtures.cache_files(reference)


def test_training_from_a_sampled_cache_and_its_refusals(tmp_path, reference, student_dir, capsys):
    args = ["train", str(tmp_path / "run"), "--student", str(student_dir), "--cache", str(reference), "--device", "cpu",
            "max_steps=4", "batch_size=4", "optim.lr=0.01", "optim.warmup_steps=0"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["kd"] > 0 for r in records)
    batch = collate_records(Manifest.load(reference).read_shard(0), 0)
    assert isinstance(batch.teacher, Sampled) and torch.allclose(batch.teacher.weights.sum(-1), torch.ones(1))
    for override in ("loss.divergence=reverse_kl", "loss.temperature=2", "ka_samples=one", "ka_samples=aggregate"):
        capsys.readouterr()
        assert main([*args[:2], *args[2:], override, "--output", str(tmp_path / override)]) == 2
        assert "is a sampled cache" in capsys.readouterr().err
    with pytest.raises(MoekdError, match="sampled cache: the KL to a teacher needs its probabilities"):
        from pipeline.student.evaluation import cache_kl
        cache_kl(load_model(student_dir, dtype="float32", device="cpu"), reference)


def test_inspect_shows_a_sampled_cache(reference, tokenizer_dir, capsys):
    assert main(["inspect", str(reference), "--seq", "3", "--tokenizer", str(tokenizer_dir)]) == 0
    printed = capsys.readouterr().out
    assert "16 tokens drawn per position from the mixture of M=3 samples" in printed and "drawn: " in printed
