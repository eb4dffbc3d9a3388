"""Upcycling a dense Llama into a Qwen2-MoE teacher, and dropping layers to make the student.

Every model here is a tiny Llama built and saved by the tests. Its weights are
rescaled to unit scale (std 1/sqrt(fan_in), embeddings std 1) so that the FFNs
move the logits by O(1): with transformers' default init (std 0.02) the logits
are tiny and a broken FFN split would hide under any absolute tolerance.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

import fixtures
from pipeline.core.errors import MoekdError
from pipeline.core.files import read_json
from pipeline.data.template import calibration_ids
from pipeline.embedded.student_init import check_layers, make_student
from pipeline.embedded.upcycle import Layout, check_layout, check_source, upcycle
from pipeline.models.identity import tokenizer_fingerprint
from stages import student as student_stage
from stages import upcycle as upcycle_stage

HIDDEN, INTERMEDIATE, LAYERS = 32, 128, 3

# A zero-size shared expert makes torch warn that it cannot init an empty tensor.
pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
              pytest.mark.usefixtures("one_thread")]  # tiny models (conftest)


def tiny_llama(seed: int = 0, clusters: int = 0, family: str = "llama", **overrides):
    """A tiny LlamaForCausalLM (or Qwen2 / Mistral: `family`) with unit-scale random weights.

    With `clusters`, each layer's FFN neurons come in `clusters` groups whose
    gate rows share a direction (plus noise), so neurons of a group fire on the
    same tokens: an FFN with expert structure by construction.
    """
    params = dict(
        vocab_size=fixtures.VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    params.update(overrides)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family](**params)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2:
                scale = 1.0 if "embed_tokens" in name else 1 / math.sqrt(weight.shape[1])
                weight.copy_(torch.randn(weight.shape, generator=g) * scale)
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases: non-zero, so they must be copied
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
        if clusters:
            for layer in model.model.layers:
                directions = F.normalize(torch.randn(clusters, hidden, generator=g), dim=1)
                rows = directions.repeat_interleave(intermediate // clusters, 0) * 0.8 * math.sqrt(hidden)
                gate = (rows + 0.5 * torch.randn(intermediate, hidden, generator=g)) / math.sqrt(hidden)
                order = torch.randperm(intermediate, generator=g)
                layer.mlp.gate_proj.weight.copy_(gate[order])
                layer.mlp.true_clusters = order // (intermediate // clusters)  # each neuron's group
    return model


def save_dense(directory: Path, tokenizer_dir: Path, **kwargs) -> Path:
    model = tiny_llama(**kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def random_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, fixtures.VOCAB_SIZE, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `directory` with its mtime (ns) and bytes; the directory's own mtime too."""
    files = {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
             for p in sorted(directory.rglob("*")) if p.is_file()}
    files["."] = (directory.stat().st_mtime_ns, b"")
    return files


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny 3-layer dense Llama with the tiny tokenizer, saved to disk."""
    return save_dense(tmp_path_factory.mktemp("dense"), tokenizer_dir)


# ---------------------------------------------------------------- the partition is exact


@pytest.mark.parametrize(
    "family, shared_size, tie, dense_layers",
    [("llama", 0, True, []), ("llama", 32, False, []), ("llama", 64, True, [1]),
     ("qwen2", 32, False, []), ("mistral", 0, True, [])],
    ids=["no-shared", "shared-untied", "shared-dense-layer", "qwen2-source", "mistral-source"],
)
def test_uniform_router_with_all_experts_reproduces_the_dense_model(family, shared_size, tie, dense_layers):
    """ridge=None keeps the dense down projections; with top_k = E and zero routers each expert
    gets weight E * 1/E = 1 and the shared expert sigmoid(0) * 2 = 1, so the MoE is the dense model."""
    overrides = {"sliding_window": None} if family == "mistral" else {}
    dense = tiny_llama(seed=3, family=family, tie_word_embeddings=tie, **overrides)
    layout = Layout(num_experts=4, top_k=4, shared_size=shared_size, dense_layers=dense_layers)
    moe, report = upcycle(dense, random_ids(8, 16, seed=1), layout, seed=0, router_steps=10, ridge=None)

    assert moe.config.model_type == "qwen2_moe"
    assert moe.config.moe_intermediate_size == (INTERMEDIATE - shared_size) // 4
    assert moe.config.shared_expert_intermediate_size == shared_size
    # Each MoE layer's shared expert and experts partition the dense FFN's neurons.
    assert [layer["layer"] for layer in report] == list(range(LAYERS))
    for layer in report:
        if layer["layer"] in dense_layers:
            assert layer == {"layer": layer["layer"], "dense": True}
            continue
        neurons = layer["shared"] + [n for expert in layer["experts"] for n in expert]
        assert sorted(neurons) == list(range(INTERMEDIATE))
        assert len(layer["shared"]) == shared_size

    ids = random_ids(3, 20, seed=7)
    expected = logits(dense, ids)
    sparse = [layer.mlp for i, layer in enumerate(moe.model.layers) if i not in dense_layers]
    for i in dense_layers:
        assert type(moe.model.layers[i].mlp).__name__ == "Qwen2MoeMLP"
        for name in ("gate_proj", "up_proj", "down_proj"):
            mlp, dense_mlp = moe.model.layers[i].mlp, dense.model.layers[i].mlp
            assert torch.equal(getattr(mlp, name).weight, getattr(dense_mlp, name).weight)
    with torch.no_grad():
        # Control: a non-uniform router weights experts unevenly (E * softmax != 1) and the
        # MoE is no longer the dense model, far beyond the tolerance used below.
        for block in sparse:
            block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=torch.Generator().manual_seed(0)))
        assert (logits(moe, ids) - expected).abs().max() > 1e-2
        for block in sparse:
            block.gate.weight.zero_()
    torch.testing.assert_close(logits(moe, ids), expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- the router learns


def ffn_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """(N, H) the input of every layer's FFN block while `model` runs on `ids`."""
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, -2)))
             for layer in model.model.layers]
    try:
        logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def expert_energy(block, x: torch.Tensor) -> torch.Tensor:
    """(N, E) the squared norm of each routed expert's output, computed from the saved MoE weights."""
    gate, up = block.experts.gate_up_proj.chunk(2, dim=1)  # (E, m, H) each
    acts = F.silu(torch.einsum("nh,emh->nem", x, gate)) * torch.einsum("nh,emh->nem", x, up)
    return torch.einsum("nem,ehm->neh", acts, block.experts.down_proj).pow(2).sum(-1)


def topk_overlap(router_logits: torch.Tensor, energy: torch.Tensor, k: int) -> float:
    chosen = router_logits.topk(k, dim=-1).indices
    oracle = energy.topk(k, dim=-1).indices
    return (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean().item()


@torch.no_grad()
@pytest.mark.parametrize("clusters, margin", [(8, 0.35), (0, 0.2)], ids=["clustered-ffn", "random-ffn"])
def test_router_picks_the_experts_with_most_output_on_held_out_tokens(clusters, margin):
    """With k < E the fitted router's top-k, on a batch it was not fitted on, overlaps the k experts
    with the largest output energy (the oracle, computed from the saved expert weights) far more
    often than chance (k/E = 0.25).

    "clustered-ffn": the dense model's FFN neurons are clustered by construction (see
    `tiny_llama`), so there is real expert structure to find: the k-means partition must recover
    the true groups and the router scores about 0.75-0.8. "random-ffn": a plain unit-scale random
    FFN has weaker structure (about 0.55 measured), tested with a smaller margin.
    A control router (the fitted rows assigned to the wrong experts) must score much lower, so
    the measure itself tells a good router from a bad one.
    """
    num_experts, top_k = 8, 2
    dense = tiny_llama(seed=5, clusters=clusters)
    layout = Layout(num_experts=num_experts, top_k=top_k, shared_size=0)
    moe, report = upcycle(dense, random_ids(64, 32, seed=11), layout, seed=0, router_steps=100, ridge=None)
    chance = top_k / num_experts
    held_out = random_ids(16, 32, seed=12)  # not the calibration ids
    for i, (layer, x) in enumerate(zip(moe.model.layers, ffn_inputs(moe, held_out))):
        block = layer.mlp
        energy = expert_energy(block, x)
        router = block.gate.weight
        overlap = topk_overlap(x @ router.T, energy, top_k)
        wrong = topk_overlap(x @ router.roll(1, dims=0).T, energy, top_k)
        assert overlap > chance + margin, (i, overlap, chance)
        assert wrong < overlap - margin, (i, wrong, overlap)
        assert report[i]["chance_overlap"] == chance
        assert report[i]["router_topk_overlap"] > chance + margin
        if clusters:  # most of each expert's neurons come from one true group
            groups = dense.model.layers[i].mlp.true_clusters
            experts = torch.tensor(report[i]["experts"])
            purity = sum(torch.bincount(groups[e], minlength=clusters).max().item() for e in experts) / experts.numel()
            assert purity >= 0.75, (i, purity)


# ---------------------------------------------------------------- bad input


def test_source_that_qwen2_moe_cannot_reproduce_is_refused():
    with pytest.raises(MoekdError, match="model_type 'mixtral'"):
        check_source(fixtures.tiny_moe_config("mixtral", fixtures.VOCAB_SIZE))
    with pytest.raises(MoekdError, match="attention or MLP biases"):
        check_source(LlamaConfig(attention_bias=True))
    with pytest.raises(MoekdError, match="attention or MLP biases"):
        check_source(LlamaConfig(mlp_bias=True))
    with pytest.raises(MoekdError, match="hidden_act 'gelu'"):
        check_source(LlamaConfig(hidden_act="gelu"))
    with pytest.raises(MoekdError, match="sliding-window attention"):
        check_source(MistralConfig(sliding_window=4096, max_position_embeddings=32768))
    with pytest.raises(MoekdError, match="sliding-window attention"):
        check_source(Qwen2Config(use_sliding_window=True, sliding_window=64))
    with pytest.raises(MoekdError, match="rope_type 'linear'"):
        check_source(LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    # These a Qwen2-MoE computes exactly.
    check_source(LlamaConfig())
    check_source(MistralConfig(sliding_window=None))
    check_source(MistralConfig(sliding_window=4096, max_position_embeddings=4096))
    check_source(Qwen2Config())


def test_biased_llama_is_refused_by_upcycle():
    dense = tiny_llama(num_hidden_layers=1, attention_bias=True)
    with pytest.raises(MoekdError, match="cannot upcycle this source model: it has attention or MLP biases"):
        upcycle(dense, random_ids(2, 8, seed=0), Layout(4, 2, 0), seed=0, router_steps=1)


@pytest.mark.parametrize("layout, message", [
    (Layout(5, 2, 32), r"num_experts 5 must be at least 2 and divide the 96 routed neurons"),
    (Layout(3, 2, 0), r"num_experts 3 must be at least 2 and divide the 128 routed neurons"),
    (Layout(1, 1, 0), r"num_experts 1 must be at least 2"),
    (Layout(4, 5, 0), r"top_k 5 must be in \[1, num_experts=4\]"),
    (Layout(4, 0, 0), r"top_k 0 must be in \[1, num_experts=4\]"),
    (Layout(4, 2, 128), r"shared_size 128 must be in \[0, 128\)"),
    (Layout(4, 2, 0, dense_layers=[3]), r"dense_layers has 3, not a layer of this 3-layer model"),
])
def test_bad_layout_is_refused(layout, message):
    with pytest.raises(MoekdError, match=message):
        check_layout(layout, tiny_llama().config)


# ---------------------------------------------------------------- the upcycle stage


def stage_config(dense_dir: Path, calibration: Path, output: Path, **overrides) -> upcycle_stage.Config:
    settings = dict(
        source=str(dense_dir), calibration=str(calibration), output=str(output),
        layout=Layout(num_experts=4, top_k=2, shared_size=32),
        calibration_tokens=1024, sequence_length=32, router_steps=20,
    )
    settings.update(overrides)
    return upcycle_stage.Config(**settings)


def test_upcycle_stage_writes_a_loadable_teacher_and_reuses_it(tmp_path, dense_dir, instructions_jsonl, capsys):
    output = tmp_path / "teacher"
    config = stage_config(dense_dir, instructions_jsonl, output)
    upcycle_stage.run(config)
    assert "router picks the top experts" in capsys.readouterr().out

    teacher = AutoModelForCausalLM.from_pretrained(output).eval()
    assert teacher.config.model_type == "qwen2_moe"
    assert (teacher.config.num_experts, teacher.config.num_experts_per_tok) == (4, 2)
    assert teacher.config.shared_expert_intermediate_size == 32
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(output)) == tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(dense_dir))

    # The saved teacher is the in-memory build of the same settings.
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    calibration = calibration_ids(Path(config.calibration), AutoTokenizer.from_pretrained(dense_dir),
                                  config.calibration_tokens, config.sequence_length)
    assert calibration.shape == (1024 // 32, 32)
    built, layers = upcycle(dense, calibration, config.layout, config.seed, config.router_steps,
                            config.ridge, config.follow_dense)
    ids = random_ids(2, 24, seed=3)
    torch.testing.assert_close(logits(teacher, ids), logits(built, ids), rtol=1e-5, atol=1e-5)

    report = read_json(output / upcycle_stage.REPORT)
    assert report["calibration_tokens"] == 1024
    assert report["expert_size"] == (INTERMEDIATE - 32) // 4
    assert report["active_fraction"] == (32 + 2 * 24) / INTERMEDIATE
    assert [layer["experts"] for layer in report["layers"]] == [layer["experts"] for layer in layers]
    assert set(report["identity"]) == {"source", "calibration_sha256", "settings_hash"}

    before = snapshot(output)
    upcycle_stage.run(config)
    assert "already holds this teacher; nothing to do" in capsys.readouterr().out
    assert snapshot(output) == before


def test_upcycle_stage_refuses_a_different_build_without_overwrite(tmp_path, dense_dir, instructions_jsonl, capsys):
    output = tmp_path / "teacher"
    upcycle_stage.run(stage_config(dense_dir, instructions_jsonl, output))
    before = snapshot(output)

    changed = stage_config(dense_dir, instructions_jsonl, output, layout=Layout(num_experts=4, top_k=1, shared_size=32))
    with pytest.raises(MoekdError, match="already holds another model.*--overwrite"):
        upcycle_stage.run(changed)
    other_data = fixtures.write_jsonl(tmp_path / "other.jsonl", fixtures.instruction_records(64, seed=1))
    with pytest.raises(MoekdError, match="already holds another model"):
        upcycle_stage.run(stage_config(dense_dir, other_data, output))
    # Even with overwrite, a build that fails leaves the old teacher in place.
    with pytest.raises(MoekdError, match="top_k 5 must be in"):
        upcycle_stage.run(stage_config(dense_dir, instructions_jsonl, output, layout=Layout(4, 5, 32), overwrite=True))
    assert snapshot(output) == before

    changed.overwrite = True
    upcycle_stage.run(changed)
    assert AutoModelForCausalLM.from_pretrained(output).config.num_experts_per_tok == 1
    assert read_json(output / upcycle_stage.REPORT)["config"]["layout"]["top_k"] == 1
    capsys.readouterr()
    changed.overwrite = False
    upcycle_stage.run(changed)  # the rebuilt teacher is now the one asked for
    assert "nothing to do" in capsys.readouterr().out


def test_upcycle_stage_refuses_a_directory_that_is_not_a_teacher(tmp_path, dense_dir, instructions_jsonl):
    output = tmp_path / "teacher"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(MoekdError, match=r"already holds another model \(or no upcycle.json\)"):
        upcycle_stage.run(stage_config(dense_dir, instructions_jsonl, output))
    assert (output / "notes.txt").read_text() == "mine"


def test_upcycle_stage_bad_inputs(tmp_path, dense_dir, instructions_jsonl, moe_dir):
    output = tmp_path / "teacher"
    with pytest.raises(MoekdError, match="calibration data not found: .*missing.jsonl"):
        upcycle_stage.run(stage_config(dense_dir, tmp_path / "missing.jsonl", output))

    few = fixtures.write_jsonl(tmp_path / "few.jsonl", fixtures.instruction_records(2))
    with pytest.raises(MoekdError, match=r"few.jsonl holds \d+ tokens, fewer than one sequence of 256"):
        upcycle_stage.run(stage_config(dense_dir, few, output, sequence_length=256))

    with pytest.raises(MoekdError, match="calibration_tokens 16 is less than sequence_length 32"):
        upcycle_stage.run(stage_config(dense_dir, instructions_jsonl, output, calibration_tokens=16))

    with pytest.raises(MoekdError, match="num_experts 5 must be at least 2 and divide the 96 routed neurons"):
        upcycle_stage.run(stage_config(dense_dir, instructions_jsonl, output, layout=Layout(5, 2, 32)))

    with pytest.raises(MoekdError, match=r"top_k 5 must be in \[1, num_experts=4\]"):
        upcycle_stage.run(stage_config(dense_dir, instructions_jsonl, output, layout=Layout(4, 5, 32)))

    with pytest.raises(MoekdError, match="cannot upcycle this source model: it has model_type 'mixtral'"):
        upcycle_stage.run(stage_config(moe_dir("mixtral"), instructions_jsonl, output))

    biased = save_dense(tmp_path / "biased", dense_dir, num_hidden_layers=1, mlp_bias=True)
    with pytest.raises(MoekdError, match="attention or MLP biases"):
        upcycle_stage.run(stage_config(biased, instructions_jsonl, output))
    assert not output.exists()


# ---------------------------------------------------------------- the student


def test_keep_layers_keeps_the_chosen_layers_exactly():
    source = tiny_llama(seed=2, tie_word_embeddings=False)
    student = make_student(source, [0, 2])
    assert student.config.num_hidden_layers == 2
    assert type(student) is type(source)
    src, dst = source.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2]):
        names = [k for k in src if k.startswith(f"model.layers.{old}.")]
        assert names
        for name in names:
            assert torch.equal(dst[name.replace(f"layers.{old}.", f"layers.{new}.", 1)], src[name]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(dst[name], src[name])
    assert not any(k.startswith("model.layers.2.") for k in dst)

    # It computes what the source computes with only those layers.
    pruned = copy.deepcopy(source)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[0], pruned.model.layers[2]])
    pruned.config.num_hidden_layers = 2
    ids = random_ids(2, 12, seed=4)
    torch.testing.assert_close(logits(student, ids), logits(pruned, ids), rtol=0, atol=0)


@pytest.mark.parametrize("keep, message", [
    ([], "keep_layers is empty"),
    ([0, 3], "keep_layers has 3, not a layer of the 3-layer source model"),
    ([-1, 0], "keep_layers has -1"),
    ([2, 0], r"keep_layers must be increasing without repeats, got \[2, 0\]"),
    ([0, 0], r"keep_layers must be increasing without repeats, got \[0, 0\]"),
])
def test_bad_keep_layers_are_refused(keep, message):
    with pytest.raises(MoekdError, match=message):
        check_layers(keep, 3)


def test_student_stage_writes_a_loadable_student_and_reuses_it(tmp_path, dense_dir, capsys):
    output = tmp_path / "student"
    config = student_stage.Config(source=str(dense_dir), output=str(output), keep_layers=[0, 2])
    student_stage.run(config)
    assert "2 of 3 layers, FFN 128 of 128 neurons" in capsys.readouterr().out

    student = AutoModelForCausalLM.from_pretrained(output).eval()
    source = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    assert student.config.model_type == "llama" and student.config.num_hidden_layers == 2
    expected = make_student(source, [0, 2]).state_dict()
    assert set(student.state_dict()) == set(expected)
    for name, value in student.state_dict().items():
        assert torch.equal(value, expected[name]), name
    tokenizer, source_tokenizer = AutoTokenizer.from_pretrained(output), AutoTokenizer.from_pretrained(dense_dir)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(source_tokenizer)
    text = "Sort the words alphabetically."
    assert tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]
    report = read_json(output / student_stage.REPORT)
    assert report["settings"]["keep_layers"] == [0, 2]
    assert report["parameters"] < report["source_parameters"]

    before = snapshot(output)
    student_stage.run(config)
    assert "already holds this student; nothing to do" in capsys.readouterr().out
    assert snapshot(output) == before

    other = student_stage.Config(source=str(dense_dir), output=str(output), keep_layers=[1])
    with pytest.raises(MoekdError, match="already holds something else than this student; use --overwrite"):
        student_stage.run(other)
    bad = student_stage.Config(source=str(dense_dir), output=str(output), keep_layers=[2, 1], overwrite=True)
    with pytest.raises(MoekdError, match="keep_layers must be increasing"):
        student_stage.run(bad)  # a failed rebuild leaves the old student in place
    assert snapshot(output) == before
    other.overwrite = True
    student_stage.run(other)
    assert AutoModelForCausalLM.from_pretrained(output).config.num_hidden_layers == 1

    with pytest.raises(MoekdError, match="keep_layers has 3, not a layer of the 3-layer source model"):
        student_stage.run(student_stage.Config(source=str(dense_dir), output=str(tmp_path / "bad"), keep_layers=[3]))
    assert not (tmp_path / "bad").exists()


def test_cli_runs_both_stages_with_nested_overrides(tmp_path, dense_dir, instructions_jsonl, capsys):
    from stages.cli import main

    teacher = tmp_path / "teacher"
    args = ["upcycle", "--source", str(dense_dir), "--calibration", str(instructions_jsonl), "--output", str(teacher),
            "layout.num_experts=4", "layout.top_k=2", "layout.shared_size=32", "layout.dense_layers=[1]",
            "ridge=null", "--calibration-tokens", "512", "--sequence-length", "32", "--router-steps", "5"]
    assert main(args) == 0
    config = read_json(teacher / upcycle_stage.REPORT)["config"]
    assert config["layout"] == {"num_experts": 4, "top_k": 2, "shared_size": 32, "dense_layers": [1]}
    assert config["ridge"] is None
    assert AutoModelForCausalLM.from_pretrained(teacher).config.mlp_only_layers == [1]
    assert main([*args, "layout.top_k=5", "--output", str(tmp_path / "other")]) == 2
    assert "moekd upcycle: error: top_k 5 must be in [1, num_experts=4]" in capsys.readouterr().err

    student = ["student", "--source", str(dense_dir), "--output", str(tmp_path / "student"), "keep_layers=[0,2]"]
    assert main(student) == 0
    assert main(student) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main([*student[:-1], "keep_layers=[]", "--output", str(tmp_path / "none")]) == 2
    assert "keep_layers is empty" in capsys.readouterr().err
