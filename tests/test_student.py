"""Width pruning in `moekd student`: FFN neurons and attention heads ranked by importance on calibration data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import fixtures
from pipeline.core.errors import MoekdError
from pipeline.core.files import read_json
from pipeline.data.template import Template, calibration_ids
from pipeline.embedded.student_init import Width, choose_width, importance, make_student, refit_down
from stages import student as student_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def encode(records, tokenizer) -> list[tuple[list[int], int]]:
    template = Template(tokenizer, "chat")
    return [template.encode(r["instruction"], r["context"], r["response"]) for r in records]


def response_loss(model, examples) -> float:
    """Mean cross-entropy over the response tokens of `examples` [(ids, prompt length)]."""
    total = count = 0
    with torch.no_grad():
        for ids, prompt_length in examples:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, prompt_length - 1 : -1]
            total += F.cross_entropy(logits, torch.tensor(ids[prompt_length:]), reduction="sum").item()
            count += len(ids) - prompt_length
    return total / count


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """A small Llama trained on the fixture tasks (so its neurons do different jobs), saved with calibration
    records (the training data) and held-out examples of the same tasks."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = fixtures.instruction_records(240, seed=3)
    train, heldout = encode(records[:200], tokenizer), encode(records[200:], tokenizer)
    config = LlamaConfig(vocab_size=fixtures.VOCAB_SIZE, hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        ids, prompt_length = train[step % len(train)]
        labels = torch.tensor([-100] * prompt_length + ids[prompt_length:])
        loss = model(torch.tensor([ids]), labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("trained")
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    calibration = fixtures.write_jsonl(directory.parent / "calibration.jsonl", records[:200])
    return directory, calibration, heldout


def test_full_width_reproduces_the_source_exactly(trained, tokenizer_dir):
    directory, calibration, heldout = trained
    source = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = calibration_ids(calibration, AutoTokenizer.from_pretrained(tokenizer_dir), 1024, 64)
    scores = importance(source, ids)
    full = choose_width(scores, ffn_size=128, heads=4, groups=2)
    student = make_student(source, None, full)
    assert student.config.intermediate_size == 128 and student.config.num_attention_heads == 4
    batch = torch.tensor([heldout[0][0]])
    with torch.no_grad():
        assert torch.equal(student(batch).logits, source(batch).logits)
        refit_down(source, full, scores, ridge=0.1)  # with every neuron kept the refit is the identity
        torch.testing.assert_close(make_student(source, None, full)(batch).logits, source(batch).logits,
                                   rtol=1e-4, atol=1e-4)


def test_importance_beats_random_neurons_and_the_refit_helps(trained, tokenizer_dir):
    directory, calibration, heldout = trained
    source = AutoModelForCausalLM.from_pretrained(directory).eval()
    scores = importance(source, calibration_ids(calibration, AutoTokenizer.from_pretrained(tokenizer_dir), 4096, 64))
    by_importance = choose_width(scores, ffn_size=32, heads=None, groups=2)
    ranked = response_loss(make_student(source, None, by_importance), heldout)
    g = torch.Generator().manual_seed(0)
    random_losses = []
    for _ in range(8):
        chosen = Width(neurons=[torch.randperm(128, generator=g)[:32].sort().values for _ in range(2)])
        random_losses.append(response_loss(make_student(source, None, chosen), heldout))
    print(f"source {response_loss(source, heldout):.3f}; 32 of 128 neurons: importance {ranked:.3f}, "
          f"random {min(random_losses):.3f}..{max(random_losses):.3f}")
    assert ranked < min(random_losses)
    refit_down(source, by_importance, scores, ridge=0.01)
    assert response_loss(make_student(source, None, by_importance), heldout) < ranked


def test_heads_keep_grouped_query_layout(trained, tokenizer_dir):
    directory, calibration, heldout = trained
    source = AutoModelForCausalLM.from_pretrained(directory).eval()
    scores = importance(source, calibration_ids(calibration, AutoTokenizer.from_pretrained(tokenizer_dir), 1024, 64))
    scores.heads[0] = torch.tensor([4.0, 1.0, 2.0, 3.0])  # groups (0, 1) and (2, 3): keep 0 and 3
    width = choose_width(scores, ffn_size=None, heads=2, groups=2)
    assert width.heads[0].tolist() == [0, 3]
    student = make_student(source, None, width)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 2
    assert student.config.head_dim == source.config.hidden_size // source.config.num_attention_heads
    q, o = source.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.o_proj.weight
    d = student.config.head_dim
    attention = student.model.layers[0].self_attn
    assert torch.equal(attention.q_proj.weight, torch.cat([q[0:d], q[3 * d : 4 * d]]))
    assert torch.equal(attention.o_proj.weight, torch.cat([o[:, 0:d], o[:, 3 * d : 4 * d]], 1))
    assert torch.equal(attention.k_proj.weight, source.model.layers[0].self_attn.k_proj.weight)
    assert math.isfinite(response_loss(student, heldout[:4]))


def test_student_stage_prunes_width_and_depth_and_refuses_bad_widths(tmp_path, trained, capsys):
    directory, calibration, _ = trained
    output = tmp_path / "student"
    config = student_stage.Config(source=str(directory), output=str(output), keep_layers=[1], ffn_size=64,
                                  heads=2, calibration=str(calibration), calibration_tokens=1024,
                                  sequence_length=64)
    student_stage.run(config)
    assert "1 of 2 layers, FFN 64 of 128 neurons, 2 of 4 heads" in capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(output)
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (1, 64)
    report = read_json(output / student_stage.REPORT)
    assert len(report["kept"]["neurons"]) == 2 and len(report["kept"]["neurons"][1]) == 64
    student_stage.run(config)
    assert "already holds this student; nothing to do" in capsys.readouterr().out

    def refused(message, **changes):
        with pytest.raises(MoekdError, match=message):
            student_stage.run(student_stage.Config(**{**config.__dict__, "output": str(tmp_path / "bad"), **changes}))
        assert not (tmp_path / "bad").exists()

    refused(r"ffn_size 129 must be in \[1, 128\]", ffn_size=129)
    refused("heads 3 must be a multiple of the 2 key/value heads, at most 4", heads=3)
    refused("rank neurons and heads on calibration data: set calibration", calibration=None)
    refused("calibration data not found", calibration=str(tmp_path / "missing.jsonl"))


def test_width_pruning_refuses_families_it_cannot_cut(tmp_path, moe_dir):
    config = student_stage.Config(source=str(moe_dir("mixtral")), output=str(tmp_path / "s"), ffn_size=8,
                                  calibration="unused.jsonl")
    with pytest.raises(MoekdError, match="width pruning supports llama, mistral, qwen2 models, not 'mixtral'"):
        student_stage.run(config)
