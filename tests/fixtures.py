"""Small real inputs for tests and benchmarks, built locally (nothing from a hub).

- a byte-level BPE tokenizer trained on Python's own docstrings, with a
  ChatML template like SmolLM2's;
- tiny random MoE causal LMs for each supported family, and a tiny dense student;
- instruction data with learnable structure (copy, reverse, count, ...).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

_COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
FAMILY_CONFIGS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=64, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=8,
    ),
    "olmoe": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        head_dim=8, rope_parameters=_ROPE,
    ),
    "gpt_oss": dict(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"], rope_parameters=_ROPE,
    ),
    # sigmoid routers (vLLM parity): GLM-4.5's grouped top-k with a selection bias and a routed scale,
    # AFMoE's bias and scale without groups, Llama-4's routing function
    "glm4_moe": dict(
        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0,
        head_dim=8, rope_parameters=_ROPE,
    ),
    "afmoe": dict(intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  num_shared_experts=1, num_dense_layers=0, global_attn_every_n_layers=1, head_dim=8,
                  route_scale=2.0),
    "llama4_text": dict(
        intermediate_size=32, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1, head_dim=8,
        interleave_moe_layer_step=1, no_rope_layers=[1, 1],
    ),
}


def training_corpus() -> list[str]:
    """Real English text available offline: docstrings of the standard library."""
    import collections
    import email
    import json as json_mod
    import logging
    import pathlib
    import random as random_mod
    import string
    import textwrap

    texts = []
    for module in (collections, email, json_mod, logging, pathlib, random_mod, string, textwrap):
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts.append(doc)
    texts += [f"{i} {i + 1} {i * 2} count copy reverse sort list words" for i in range(200)]
    return texts


def make_tokenizer(directory: Path) -> Path:
    """Train and save a small byte-level BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def tiny_moe_config(family: str, vocab_size: int, **overrides):
    """A transformers config for a tiny random MoE model of `family`."""
    from transformers import AutoConfig

    params = {**_COMMON, **FAMILY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(
        family, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, **params
    )


def make_model(directory: Path, config, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Instantiate a random model from `config` (seeded), save it (and the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves routers near zero for some families; give them real spread
    # so routing decisions differ between tokens.
    for name, param in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")):
            torch.nn.init.normal_(param, std=1.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def make_moe(directory: Path, family: str, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    return make_model(directory, tiny_moe_config(family, VOCAB_SIZE, **overrides), tokenizer_dir, seed)


def make_student(directory: Path, tokenizer_dir: Path, seed: int = 1, **overrides) -> Path:
    """A tiny dense Llama student sharing the tokenizer."""
    from transformers import LlamaConfig

    params = dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    params.update(overrides)
    return make_model(directory, LlamaConfig(**params), tokenizer_dir, seed)


TASKS = {
    "copy": ("Repeat the words exactly.", lambda w: " ".join(w)),
    "reverse": ("Write the words in reverse order.", lambda w: " ".join(reversed(w))),
    "sort": ("Sort the words alphabetically.", lambda w: " ".join(sorted(w))),
    "count": ("How many words are there?", lambda w: str(len(w))),
    "first": ("Give the first word.", lambda w: w[0]),
}
WORDS = "list copy sort word count reverse first module string value object file path".split()


def instruction_records(n: int, seed: int = 0, tasks: tuple[str, ...] = tuple(TASKS)) -> list[dict]:
    """`n` instruction/context/response records from simple word tasks."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        instruction, solve = TASKS[task]
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        records.append(
            {"instruction": instruction, "context": " ".join(words), "response": solve(words), "task": task}
        )
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepared_records(root: Path, tokenizer_dir: Path, rows: int, seed: int = 0) -> Path:
    """`rows` instruction records (`instruction_records`) prepared with `moekd prepare` into root/prepared."""
    from stages import prepare

    jsonl = write_jsonl(root / "records.jsonl", instruction_records(rows, seed=seed))
    prepare.run(prepare.Config(inputs=[str(jsonl)], output=str(root / "prepared"), tokenizer=str(tokenizer_dir)))
    return root / "prepared"


# ---------------------------------------------------------------- interrupted runs

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def logged_steps(path: Path) -> list[int]:
    """The steps of a metrics.jsonl being written (a half-written last line is skipped)."""
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except json.JSONDecodeError:
                pass
    return steps


def kill_and_rerun(command: Callable[[Path], list[str]], directory: Path, kill_after: int,
                   absent_after_kill: tuple[str, ...] = ("final",)) -> int:
    """Run `command(directory / "reference")` to its end and `command(directory / "run")` until it
    has logged `kill_after` steps, SIGKILL the latter, then re-run it to its end.

    Checks that the kill left steps to redo after the newest checkpoint and none
    of `absent_after_kill`, and that the re-run resumed from that checkpoint;
    returns its step.
    """
    run, popen = directory / "run", dict(env=SUBPROCESS_ENV, cwd=REPO)
    reference = subprocess.Popen(command(directory / "reference"), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, **popen)
    victim = subprocess.Popen(command(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + 240
    while max(logged_steps(run / "metrics.jsonl"), default=0) < kill_after:
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not any((run / name).exists() for name in absent_after_kill)
    newest = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-????????"))
    assert max(logged_steps(run / "metrics.jsonl")) > newest  # steps the resumed run must redo
    resumed = subprocess.run(command(run), capture_output=True, text=True, timeout=300, **popen)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after step {newest}" in resumed.stdout
    assert reference.wait(timeout=300) == 0
    return newest


def shard_file(cache: Path, index: int) -> Path:
    """The committed file of shard `index` of a local cache."""
    from pipeline.cache.manifest import Manifest

    return Path(cache) / Manifest.load(cache).shards[index].file


def cache_files(directory: Path) -> dict[str, bytes]:
    """Every file of a local cache (manifest, commit records and shards) by relative path."""
    files = [directory / "manifest.json", *sorted((directory / "commits").glob("*.json")),
             *sorted((directory / "shards").glob("*.parquet"))]
    return {str(f.relative_to(directory)): f.read_bytes() for f in files}


def wait_for_commits(output: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until `process` has committed `count` shards to the local cache `output`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        committed = len(list((output / "commits").glob("*.json")))
        if committed >= count:
            return committed
        time.sleep(0.01)
    raise AssertionError(f"the cache process never committed {count} shards")
