"""Stage one on vLLM (`backend=vllm`), in vLLM's CPU build (`.venv-vllm`, scripts/setup_vllm.sh), fp32, tiny
random models: the transformers cache again (every routing mode), the same cache from a tensor-parallel engine,
the same KA draws however the engine batches, the KA distribution, resume after SIGKILL, refusals (which write
nothing).

vLLM runs in its own environment (it pins its own transformers), so each test runs `moekd cache` or
`tests/vllm_probe.py` there as a subprocess and compares with the transformers backend run here.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures
from pipeline.cache.manifest import Manifest
from pipeline.core.config import load_config
from pipeline.data.prepared import PreparedData
from pipeline.teacher.routing import RoutingConfig, ka_draws
from pipeline.teacher.families import VLLM_CHECKED, backends_table
from stages import cache
from test_routing import inclusion_probabilities

VLLM_PYTHON = fixtures.REPO / ".venv-vllm" / "bin" / "python"
# Shapes vLLM's CPU kernels take (head_dim 32, sizes multiples of 32); 8 experts, top-2.
SHAPES = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=64)
EXPERTS = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "glm4_moe": "n_routed_experts",
           "llama4_text": "num_local_experts", "afmoe": "num_experts"}
YARN = {"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 256, "rope_theta": 10000.0}  # vLLM's GPT-OSS needs yarn
VLLM_CONFIG = {  # what vLLM's model classes read from a config beside what transformers writes
    "gpt_oss": {"rope_parameters": YARN},
    "afmoe": {"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1},
}
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]
# sigmoid scores with a selection bias, grouped top-k and a routed scale (GLM-4.5's rule, DeepSeek-V3's
# without MLA), sigmoid with a bias and a scale, no groups (AFMoE: MiniMax-M2's rule, which vLLM's CPU build does
# not run: its router takes sigmoid scores only with groups), Llama-4's routing function (the sigmoid of the
# chosen logits, not renormalised)
SIGMOID_FAMILIES = ["glm4_moe", "afmoe", "llama4_text"]
ENV = fixtures.SUBPROCESS_ENV | {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
FP16_STEP = 2.0**-10  # two values a float16 rounding apart differ by at most this, relatively
KA = ["routing.mode=ka", "routing.samples=2", "routing.lam=0.5", "routing.seed=3"]


@pytest.fixture(scope="module", autouse=True)
def vllm_environment():
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `bash scripts/setup_vllm.sh` (scripts/test.sh does)")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer_dir):
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            extra = {EXPERTS.get(family, "num_experts"): 8} | VLLM_CONFIG.get(family, {})
            made[family] = with_selection_bias(fixtures.make_moe(tmp_path_factory.mktemp(family), family,
                                                                 tokenizer_dir, **SHAPES, **extra))
        return made[family]

    return get


def with_selection_bias(teacher: Path) -> Path:
    """Give a teacher's selection biases (zeros as initialised) real values, so that choosing by score plus bias
    and weighing by score alone differ."""
    from safetensors.torch import load_file, save_file

    path = teacher / "model.safetensors"
    weights = load_file(path)
    biases = [name for name in weights if name.endswith(("e_score_correction_bias", "expert_bias"))]
    generator = torch.Generator().manual_seed(0)
    for name in biases:
        weights[name] = torch.randn(weights[name].shape, generator=generator) * 0.3
    if biases:
        save_file(weights, path, metadata={"format": "pt"})
    return teacher


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.prepared_records(tmp_path_factory.mktemp("vllm"), tokenizer_dir, 16, seed=2)


@pytest.fixture(scope="module")
def vllm_caches(tmp_path_factory):
    """Factory: `vllm_caches(teacher, data, *settings)` is the vLLM cache made with those settings, made once per
    module (tests compare several runs against the same one)."""
    made = {}

    def get(teacher: Path, data: Path, *extra: str) -> Path:
        key = (str(teacher), str(data), extra)
        if key not in made:
            output = tmp_path_factory.mktemp("vllm") / "cache"
            result = vllm_cache(output, teacher, data, *extra)
            assert result.returncode == 0, result.stderr[-3000:]
            made[key] = output
        return made[key]

    return get


def vllm_cache(output: Path, teacher: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(VLLM_PYTHON), "-m", "stages.cli", "cache", str(output), f"teacher={teacher}", f"data={data}",
               "backend=vllm", "top_k=8", "shard_size=4", "dtype=float32", "device=cpu", *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


def transformers_cache(output: Path, teacher: Path, data: Path, **settings) -> Path:
    cache.run(cache.Config(output=str(output), teacher=str(teacher), data=str(data), top_k=8, shard_size=4,
                           batch_size=4, dtype="float32", device="cpu", **settings))
    return output


def records(directory: Path) -> list:
    manifest = Manifest.load(directory)
    return [r for index in sorted(manifest.shards) for r in manifest.read_shard(index)]


def assert_same_distributions(a: Path, b: Path) -> None:
    """Same rows and positions; at each, the same top-k ids (ties aside) and log-probs equal up to 1e-4 and one
    float16 rounding step (the caches round the same values, which differ in the last float32 bits)."""
    pairs = list(zip(records(a), records(b), strict=True))
    for x, y in pairs:
        assert x.seq_id == y.seq_id and np.array_equal(x.positions, y.positions)
        assert x.topk_ids.shape == y.topk_ids.shape
    same = [np.array_equal(x.topk_ids, y.topk_ids) for x, y in pairs]
    assert np.mean(same) > 0.9, "top-k ids differ beyond ties"
    for x, y in (pair for pair, equal in zip(pairs, same) if equal):
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=FP16_STEP, atol=1e-4)


def test_the_backends_table_claims_what_these_tests_check():
    """VLLM_CHECKED (the README's table) lists exactly the (family, mode) cells this module's parity tests compare."""
    tested = {(family, "topk") for family in FAMILIES} | {("mixtral", "ka"), ("olmoe", "all"), ("olmoe", "top_p")}
    tested |= {(family, mode) for family in SIGMOID_FAMILIES for mode in ("topk", "ka", "all")}
    tested -= {("llama4_text", "all")}  # refused: vLLM weighs Llama-4's expert input, one expert per token
    assert {(family, mode) for family, modes in VLLM_CHECKED.items() for mode in modes} == tested
    assert backends_table() in (fixtures.REPO / "README.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_routing_gives_the_transformers_cache(tmp_path, teachers, prepared, vllm_caches, family):
    reference = transformers_cache(tmp_path / "transformers", teachers(family), prepared)
    engine = vllm_caches(teachers(family), prepared)
    assert_same_distributions(reference, engine)
    identity = Manifest.load(engine).identity
    assert identity.backend["name"] == "vllm" and "backend" not in Manifest.load(reference).identity.json


@pytest.mark.parametrize("routing", [[], KA, ["routing.mode=all"]], ids=["topk", "ka", "all"])
@pytest.mark.parametrize("family", SIGMOID_FAMILIES)
def test_sigmoid_biased_and_grouped_routers_give_the_transformers_cache(tmp_path, teachers, prepared, vllm_caches,
                                                                       family, routing):
    teacher = teachers(family)
    if family == "llama4_text" and routing != KA and routing:  # vLLM weighs Llama-4's expert input: one expert
        result = vllm_cache(tmp_path / "refused", teacher, prepared, *routing)
        assert "for one expert per token only; routing.mode=all chooses several" in refusal(result)
        return
    expected = tmp_path / "transformers"
    cache.run(load_config(cache.Config, None, [f"output={expected}", f"teacher={teacher}", f"data={prepared}", "top_k=8",
                                               "shard_size=4", "batch_size=4", "dtype=float32", "device=cpu", *routing]))
    assert_same_distributions(vllm_caches(teacher, prepared, *routing), expected)


@pytest.mark.parametrize("mode", ["all", "top_p"])
def test_every_expert_or_top_p_gives_the_transformers_cache(tmp_path, teachers, prepared, mode):
    # OLMoE: weights not renormalised over the chosen experts, the rule that differs most from `all` = 1
    routing = RoutingConfig(mode=mode, top_p=0.7)
    reference = transformers_cache(tmp_path / "transformers", teachers("olmoe"), prepared, routing=routing)
    result = vllm_cache(tmp_path / "vllm", teachers("olmoe"), prepared, f"routing.mode={mode}", "routing.top_p=0.7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_distributions(reference, tmp_path / "vllm")


def test_ka_gives_the_transformers_cache_with_the_same_draws(tmp_path, teachers, prepared, vllm_caches):
    reference = transformers_cache(tmp_path / "transformers", teachers("mixtral"), prepared,
                                   routing=RoutingConfig(mode="ka", samples=2, lam=0.5, seed=3))
    assert_same_distributions(reference, vllm_caches(teachers("mixtral"), prepared, *KA))
    without = transformers_cache(tmp_path / "topk", teachers("mixtral"), prepared)
    assert not all(np.allclose(x.topk_logprobs[0], y.topk_logprobs[0], atol=1e-2)  # KA really moved something
                   for x, y in zip(records(without), records(reference)))


@pytest.mark.parametrize("routing", [[], KA], ids=["topk", "ka"])
def test_a_tensor_parallel_engine_gives_the_single_worker_cache(tmp_path, teachers, prepared, vllm_caches, routing):
    """Two worker processes, each with half of every layer: the routing override reaches both (KA's choices
    must agree across them, or their halves would mix different experts) and the cache is the one-worker one."""
    result = vllm_cache(tmp_path / "tp2", teachers("mixtral"), prepared, *routing, "engine.tensor_parallel_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in result.stderr  # nothing was pickled to reach the workers
    assert_same_distributions(vllm_caches(teachers("mixtral"), prepared, *routing), tmp_path / "tp2")
    assert Manifest.load(tmp_path / "tp2").identity.backend["tensor_parallel_size"] == 2


def probe(tmp_path: Path, teacher: Path, data: Path, routing: dict, engine: dict) -> dict:
    out = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}.json"
    command = [str(VLLM_PYTHON), str(fixtures.REPO / "tests" / "vllm_probe.py"), str(teacher), str(data),
               json.dumps(routing), json.dumps(engine), str(out)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_ka_draws_do_not_depend_on_how_the_engine_batches(tmp_path, teachers, prepared):
    routing = dict(mode="ka", samples=3, lam=0.5, seed=7)
    batched = probe(tmp_path, teachers("mixtral"), prepared, routing, {})
    # one request at a time, in chunks of 16 tokens (chunked prefill splits the longer rows)
    alone = probe(tmp_path, teachers("mixtral"), prepared, routing, {"max_num_seqs": 1, "max_num_batched_tokens": 16})
    chosen = {tuple(c[:4]): c[4] for c in batched["choices"]}
    assert chosen == {tuple(c[:4]): c[4] for c in alone["choices"]}
    # every choice is the top-k of the router logits plus the noise ka_draws keys by (seq, sample, layer, position)
    config, lengths = RoutingConfig(**routing), {}
    for seq_id, sample, layer, position, ids, logits in batched["choices"]:
        lengths[seq_id] = max(lengths.get(seq_id, 0), position + 1)
    for seq_id, sample, layer, position, ids, logits in batched["choices"]:
        sampled, noise = ka_draws(config, seq_id, sample, lengths[seq_id], [8, 8])[layer]
        scores = torch.tensor(logits)
        if position in sampled.tolist():
            scores = scores + noise[sampled.tolist().index(position)]
        assert sorted(ids) == sorted(scores.topk(2).indices.tolist())


def test_ka_with_lambda_one_samples_experts_without_replacement(tmp_path, teachers, prepared):
    """λ=1: each expert is chosen with its exact inclusion probability under softmax(router logits)."""
    choices = probe(tmp_path, teachers("qwen3_moe"), prepared, dict(mode="ka", samples=8, lam=1.0, seed=11),
                    {})["choices"]
    observed, expected, variance = (torch.zeros(2, 8, dtype=torch.float64) for _ in range(3))
    for _, _, layer, _, ids, logits in choices:
        incl = inclusion_probabilities(torch.softmax(torch.tensor([logits], dtype=torch.float64), -1), 2)[0]
        observed[layer, ids] += 1
        expected[layer] += incl
        variance[layer] += incl * (1 - incl)
    z = (observed - expected) / variance.sqrt()
    assert len(choices) > 1000 and z.abs().max() < 4.0, z


def test_sigkill_then_resume_gives_the_uninterrupted_vllm_cache(tmp_path, teachers, prepared):
    teacher, args = teachers("mixtral"), ["shard_size=1", "routing.mode=ka", "routing.samples=2"]
    assert vllm_cache(tmp_path / "whole", teacher, prepared, *args).returncode == 0
    command = [str(VLLM_PYTHON), "-m", "stages.cli", "cache", str(tmp_path / "killed"), f"teacher={teacher}",
               f"data={prepared}", "backend=vllm", "top_k=8", "dtype=float32", "device=cpu", *args]
    victim = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fixtures.wait_for_commits(tmp_path / "killed", 3, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    committed = len(Manifest.load(tmp_path / "killed").committed())
    assert 3 <= committed < 16, "the kill must land mid-run for this test to mean anything"
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and f"{committed} already committed" in resumed.stdout, resumed.stderr[-2000:]
    assert fixtures.cache_files(tmp_path / "killed") == fixtures.cache_files(tmp_path / "whole")


def test_what_vllm_cannot_do_is_refused_in_one_line(tmp_path, teachers, prepared, moe_dir):
    result = vllm_cache(tmp_path / "c", teachers("mixtral"), prepared, "storage=sampled")
    assert result.returncode == 2 and "backend=vllm returns top-k log-probs only" in result.stderr
    result = vllm_cache(tmp_path / "c", moe_dir("deepseek_v3"), prepared)
    assert result.returncode == 2 and "does not take model type 'deepseek_v3'" in result.stderr
    with pytest.raises(ValueError, match="engine settings apply to backend=vllm only"):
        cache.Config(output="x", teacher="t", data="d", engine={"max_num_seqs": 4})


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a `moekd cache` run refused with exit status 2 (vLLM logs around it)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("moekd cache: error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_settings_vllm_refuses_write_nothing(tmp_path, teachers, prepared, tokenizer_dir):
    """Refused by vLLM's own checks, or inside a tensor-parallel engine's workers: a one-line error, no manifest
    and no claim, so a run with sane settings into the same output is not blocked."""
    output = tmp_path / "cache"
    result = vllm_cache(output, teachers("mixtral"), prepared, "engine.max_num_batched_tokens=16")
    assert refusal(result).endswith("vLLM refuses these engine settings: max_num_batched_tokens (16) must be "
                                    "greater than or equal to max_num_seqs (256).")
    assert not output.exists()
    result = vllm_cache(output, teachers("mixtral"), prepared, "engine.tensor_parallel_size=2",
                        "engine.enable_expert_parallel=true")
    assert "vLLM's CPU build crashes under expert parallelism" in refusal(result)
    assert not output.exists()
    dense = fixtures.make_student(tmp_path / "dense", tokenizer_dir, **SHAPES)  # no router for KA to override
    result = vllm_cache(output, dense, prepared, "routing.mode=ka", "engine.tensor_parallel_size=2")
    assert "has no MoE router moekd can override: routing.mode=ka needs one" in refusal(result)
    assert not output.exists()
    transformers_cache(output, dense, prepared)
    assert Manifest.load(output).committed() == set(range(4))


# ---------------------------------------------------------------- moekd generate on vLLM

@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.make_student(tmp_path_factory.mktemp("llama"), tokenizer_dir, hidden_size=64, intermediate_size=64,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def vllm_generate(output: Path, model: Path, data: Path, *extra: str) -> Path:
    command = [str(VLLM_PYTHON), "-m", "stages.cli", "generate", str(output), f"model={model}", f"data={data}",
               "backend=vllm", "samples=2", "max_new_tokens=12", "part_size=8", "device=cpu", *extra]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def generated_rows(directory: Path) -> list:
    return [(list(r.input_ids), list(r.response_mask)) for r in PreparedData(directory).rows(0, 10**6)]


def test_vllm_greedy_responses_are_the_transformers_ones(tmp_path, llama, prepared):
    from stages import generate

    ours = vllm_generate(tmp_path / "vllm", llama, prepared, "temperature=0")
    generate.run(generate.Config(output=str(tmp_path / "hf"), model=str(llama), data=str(prepared), samples=2,
                 max_new_tokens=12, part_size=8, temperature=0))
    assert generated_rows(ours) == generated_rows(tmp_path / "hf")
    assert json.loads((ours / "meta.json").read_text())["generator"]["backend"]["name"] == "vllm"


def test_vllm_sampling_is_seeded_per_response_whatever_the_engine_batches(tmp_path, llama, prepared):
    wide = generated_rows(vllm_generate(tmp_path / "wide", llama, prepared, "temperature=1"))
    narrow = generated_rows(vllm_generate(tmp_path / "narrow", llama, prepared, "temperature=1",
                                          "engine.max_num_seqs=3", "part_size=5"))
    assert wide == narrow
    assert any(a != b for a, b in zip(wide[::2], wide[1::2]))  # a prompt's two samples differ
