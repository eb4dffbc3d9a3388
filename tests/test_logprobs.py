"""One path from hidden states to log-probs: training, evaluation and SAR see the logits the model produces.

The student is a tiny Gemma 2, whose head soft-caps its logits (tanh(logits / cap) * cap): a path that
projected the hidden states without the cap would train, score and adapt against other logits.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config

import fixtures
from pipeline.data.batch import collate_examples, pack
from pipeline.data.prepared import PreparedData
from pipeline.data.signals import TopK
from pipeline.models.logprobs import target_hidden, target_logprobs, vocab_logits
from pipeline.student.evaluation import example_losses
from pipeline.student.losses import LossConfig
from pipeline.student.trainer import StudentLoss
from stages import prepare


@pytest.fixture(scope="module")
def gemma():
    config = Gemma2Config(vocab_size=fixtures.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          final_logit_softcapping=2.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)  # logits of several units, so the cap at 2 bites (init: ~0.1)
    return model


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tokenizer_dir, instructions_jsonl):
    output = tmp_path_factory.mktemp("prepared") / "data"
    prepare.run(prepare.Config(inputs=[str(instructions_jsonl)], output=str(output), tokenizer=str(tokenizer_dir)))
    return PreparedData(output).rows(0, 6)


def model_logprobs(model, batch) -> torch.Tensor:
    """What the model itself says at the batch's targets: its forward's (soft-capped) logits."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return F.log_softmax(logits[batch.rows, batch.cols].float(), -1)


def test_the_head_is_soft_capped(gemma, batch):
    collated = collate_examples(batch, 0)
    expected = model_logprobs(gemma, collated)
    with torch.no_grad():
        raw = gemma.get_output_embeddings()(gemma.get_decoder()(input_ids=collated.input_ids,
                                                                attention_mask=collated.attention_mask)
                                            .last_hidden_state[collated.rows, collated.cols])
    assert (raw.abs() > 2.0).any()  # the cap matters here: uncapped logits would differ
    assert not torch.allclose(F.log_softmax(raw, -1), expected, atol=1e-3)


def test_training_evaluation_and_sar_use_the_models_own_logits(gemma, batch):
    collated = collate_examples(batch, 0)
    expected = model_logprobs(gemma, collated)
    # SAR's full distributions
    with torch.no_grad():
        torch.testing.assert_close(target_logprobs(gemma, collated), expected, rtol=1e-5, atol=1e-5)
    nll = -expected.gather(-1, collated.targets[:, None])[:, 0]
    # training: the student's loss (SFT and KD against a teacher that is the model itself)
    module = StudentLoss(gemma, LossConfig(alpha=0.5))
    teacher = expected.topk(16, -1)
    packed = pack(collated, pack_length=collated.input_ids.shape[1] * 2)
    assert len(packed.input_ids) < len(collated.input_ids)
    for inputs in [(collated.input_ids, collated.attention_mask, None, collated.rows, collated.cols),
                   (packed.input_ids, None, packed.position_ids, packed.rows, packed.cols)]:  # padded, packed
        with torch.no_grad():
            loss, sums = module(*inputs, collated.targets, TopK(teacher.indices[None], teacher.values[None]), 1.0)
        ce, kd = sums.tolist()
        assert ce == pytest.approx(nll.sum().item(), rel=1e-5)
        assert abs(kd) < 1e-4  # the model's own distribution is no distance from itself
    # evaluation: per-example cross-entropy
    losses = example_losses(gemma, batch, batch_size=4)
    per_row = torch.zeros(len(batch)).index_add_(0, collated.rows, nll)
    assert [total for total, _ in losses] == pytest.approx(per_row.tolist(), rel=1e-5)


@pytest.mark.parametrize("family, head", [("cohere", {"logit_scale": 0.3}), ("granite", {"logits_scaling": 4.0})])
def test_a_family_scaling_its_logits_is_projected_as_its_head_does(family, head, batch):
    config = AutoConfig.for_model(family, vocab_size=fixtures.VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **head)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    collated = collate_examples(batch, 0)
    with torch.no_grad():
        hidden = target_hidden(model, collated.input_ids, collated.attention_mask, collated.rows, collated.cols)
        got = F.log_softmax(vocab_logits(model, hidden), -1)
    torch.testing.assert_close(got, model_logprobs(model, collated), rtol=1e-5, atol=1e-5)
