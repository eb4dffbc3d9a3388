"""Branch-Train-MiX (`moekd mix`) and the teacher diagnostics (`moekd diagnose`) on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fixtures
from pipeline.core.config import load_config
from pipeline.core.errors import MoekdError
from pipeline.embedded import mixture
from pipeline.models.loading import load_model
from pipeline.teacher import diagnostics
from stages import diagnose, mix, prepare, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)
DOMAINS = ("reverse", "count")


@pytest.fixture(scope="module")
def material(tmp_path_factory, tokenizer_dir, student_dir):
    """Two branches of the tiny student, each fine-tuned on its own task, and the records and held-out data."""
    root = tmp_path_factory.mktemp("btx")
    records = fixtures.instruction_records(96, seed=5, tasks=DOMAINS)
    for r in records:
        r["source"] = f"{r['task']}/words"
    jsonl = fixtures.write_jsonl(root / "train.jsonl", records)
    heldout = fixtures.write_jsonl(root / "heldout.jsonl", fixtures.instruction_records(32, seed=6, tasks=DOMAINS))
    branches = {}
    for domain in DOMAINS:
        prepare.run(prepare.Config(inputs=[str(jsonl)], output=str(root / f"prepared-{domain}"),
                                   tokenizer=str(tokenizer_dir), select={"task": [domain]}))
        train.run(load_config(train.Config, None, [
            f"output={root / domain}", f"student={student_dir}", f"data={root / f'prepared-{domain}'}", "loss.alpha=0",
            "optim.lr=3e-3", "optim.warmup_steps=0", "batch_size=8", "epochs=6", "save_every=0", "device=cpu",
            "dtype=float32"]))
        branches[domain] = str(root / domain / "final")
    prepare.run(prepare.Config(inputs=[str(heldout)], output=str(root / "heldout"), tokenizer=str(tokenizer_dir),
                               source_field="task"))
    return root, jsonl, branches


def test_prepare_keeps_only_the_selected_records(material):
    root, _, _ = material
    meta = json.loads((root / "prepared-count" / "meta.json").read_text())
    assert meta["rows"] == 48 and meta["not_selected"] == 48


def test_identical_branches_mix_into_the_dense_model(tmp_path, student_dir, tokenizer_dir):
    """Every expert the same FFN, every averaged weight the same: the MoE is the dense model, whatever routes."""
    records = fixtures.instruction_records(40, seed=1)
    for i, r in enumerate(records):
        r["domain"] = ("a", "b")[i % 2]
    calibration = fixtures.write_jsonl(tmp_path / "calibration.jsonl", records)
    mix.run(mix.Config(branches={"a": str(student_dir), "b": str(student_dir)}, calibration=str(calibration),
                       output=str(tmp_path / "moe"), top_k=1, calibration_tokens=256, sequence_length=32))
    moe, dense = load_model(tmp_path / "moe", "float32", "cpu"), load_model(student_dir, "float32", "cpu")
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 2
    gate_up = moe.state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(gate_up[1], torch.cat([dense.state_dict()["model.layers.0.mlp.gate_proj.weight"],
                                                      dense.state_dict()["model.layers.0.mlp.up_proj.weight"]]))
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "moe" / "mix.json").read_text())
    assert report["experts"] == ["a", "b"] and len(report["layers"]) == moe.config.num_hidden_layers
    # The same settings reuse it; other settings are refused unless overwrite.
    mix.run(mix.Config(branches={"a": str(student_dir), "b": str(student_dir)}, calibration=str(calibration),
                       output=str(tmp_path / "moe"), top_k=1, calibration_tokens=256, sequence_length=32))
    with pytest.raises(MoekdError, match="already holds another model"):
        mix.run(mix.Config(branches={"a": str(student_dir), "b": str(student_dir)}, calibration=str(calibration),
                           output=str(tmp_path / "moe"), top_k=2, mass_outside=None, calibration_tokens=256,
                           sequence_length=32))


def test_a_calibration_label_naming_no_branch_is_refused(tmp_path, student_dir):
    records = [dict(r, domain="c") for r in fixtures.instruction_records(20)]
    calibration = fixtures.write_jsonl(tmp_path / "calibration.jsonl", records)
    with pytest.raises(MoekdError, match="have domain 'c', which names no branch"):
        mix.run(mix.Config(branches={"a": str(student_dir), "b": str(student_dir)}, calibration=str(calibration),
                           output=str(tmp_path / "moe"), calibration_tokens=256, sequence_length=32))
    assert not (tmp_path / "moe").exists()


def test_specialised_branches_show_a_dominant_diagonal(material, tmp_path, student_dir):
    """Planted specialisation: each branch learnt one task; the router tells them apart, and dropping a
    task's own expert costs that task more than dropping the other one."""
    root, jsonl, branches = material
    mix.run(mix.Config(branches=branches, calibration=str(jsonl), output=str(tmp_path / "moe"), label_field="task",
                       top_k=1, calibration_tokens=1024, sequence_length=64))
    fitted = json.loads((tmp_path / "moe" / "mix.json").read_text())
    assert fitted["mean_domain_accuracy"] > 0.7, fitted
    report = diagnose.run(diagnose.Config(teacher=str(tmp_path / "moe"), data=str(root / "heldout"),
                                          output=str(tmp_path / "diagnose"), student=str(student_dir),
                                          dense=branches["reverse"], group_by="source", device="cpu",
                                          dtype="float32", batch_size=8))
    assert report["expert_names"] == list(DOMAINS)  # read from mix.json
    special = report["specialisation"]
    for domain in DOMAINS:
        difference, se = special["per_group"][domain]["own_minus_others"]
        assert difference > 3 * se > 0, (domain, special)
    assert special["mean_own"] > special["mean_others"]
    assert min(report["mutual_information_bits"]) > 0.1  # of the 1 bit two equal groups hold
    assert len(report["mass_outside_topk"]) == 2 and all(0 <= m < 1 for m in report["mass_outside_topk"])
    assert list(report["ce_by_active_experts"]) == ["1", "2"]
    assert report["kl"]["student"] > report["kl"]["ka_sample"] >= 0
    assert "dense_ce" in report and "| reverse |" in (tmp_path / "diagnose" / "diagnose.md").read_text()
    assert (tmp_path / "diagnose" / "diagnose.png").stat().st_size > 10_000
    # A second run reuses the stored report.
    again = diagnose.run(diagnose.Config(teacher=str(tmp_path / "moe"), data=str(root / "heldout"),
                                         output=str(tmp_path / "diagnose"), student=str(student_dir),
                                         dense=branches["reverse"], group_by="source", device="cpu",
                                         dtype="float32", batch_size=8))
    assert again == json.loads((tmp_path / "diagnose" / "diagnose.json").read_text())


def test_the_diagnostics_arithmetic():
    top = diagnostics.Sums(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    worse = diagnostics.Sums(top.nll + np.array([0.5, 1.0, 1.5]), top.tokens)  # +0.5 nats on every token
    change, se = diagnostics.ratio_change(worse, top, np.ones(3, dtype=bool))
    assert change == pytest.approx(0.5) and se == pytest.approx(0.0)
    assert diagnostics.mutual_information(np.array([[10.0, 0.0], [0.0, 10.0]])) == pytest.approx(1.0)
    assert diagnostics.mutual_information(np.array([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(0.0)


def test_routers_are_softened_to_the_mass_asked_for_without_changing_their_choice():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    labels = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # four separable domains
    weight, report = mixture.fit_router(x, labels, 4, l2=1e-3, top_k=1, mass_outside=0.4)
    assert report["fitted_mass_outside_topk"] < 0.4 < report["temperature"] * 0.4
    assert mixture.outside_topk(x @ weight.T, 1) == pytest.approx(0.4, abs=1e-3)
    fitted, _ = mixture.fit_router(x, labels, 4, 1e-3, 1, None)
    assert torch.equal((x @ weight.T).argmax(-1), (x @ fitted.T).argmax(-1)) and report["domain_accuracy"] > 0.9
    soft, report = mixture.fit_router(x, labels, 4, 1e-3, 1, 0.0)  # already softer than asked: kept
    assert report["temperature"] == 1.0 and torch.equal(soft, fitted)
