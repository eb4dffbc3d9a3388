"""The quality study (bench/quality.py) end to end on the fixtures' tiny models: every method, two seeds."""

import json
import sys
from pathlib import Path

import pytest

import fixtures
from stages import prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def test_a_small_study_reports_every_method_against_the_baseline_and_resumes(
    tmp_path, tokenizer_dir, student_dir, capsys,
):
    # A teacher with peaked distributions (the default init's are nearly uniform), so KD has something to learn.
    teacher = fixtures.make_moe(tmp_path / "teacher", "qwen2_moe", tokenizer_dir, initializer_range=0.3)
    for split, seed in (("train", 1), ("heldout", 2)):
        records = fixtures.instruction_records(16, seed=seed)
        jsonl = fixtures.write_jsonl(tmp_path / f"{split}.jsonl", records)
        prepare.run(prepare.Config(inputs=[str(jsonl)], output=str(tmp_path / split), tokenizer=str(tokenizer_dir)))
    args = ["output=" + str(tmp_path / "study"), f"teacher={teacher}", f"student={student_dir}",
            f"train_data={tmp_path / 'train'}", f"heldout_data={tmp_path / 'heldout'}", "seeds=[0, 1]",
            "replicates=200", "ka.samples=2", "cache.top_k=16", "heldout_top_k=384",
            "train={batch_size: 4, max_steps: 6, save_every: 0, device: cpu, dtype: float32, optim: {lr: 0.01, warmup_steps: 0}}",
            "eval={max_new_tokens: 3, batch_size: 8, device: cpu, dtype: float32}",
            "variants={kd_sampled: {cache: {storage: sampled, draws: 8}}, full: {online: {top_k: 384}}}"]
    assert quality.main(args) == 0
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    assert set(report["methods"]) == {*quality.METHODS, "kd_sampled", "full"} and report["examples"] == 16
    sizes = report["cache_bytes_per_token"]
    assert set(sizes) == {"kd", "ka", "all", "top_p", "kd_sampled"}  # the online variant has no cache
    assert sizes["kd_sampled"]["teacher"] < sizes["kd"]["teacher"] / 2, sizes  # 8 draws vs the top-16
    for method, entry in report["methods"].items():
        for key in ("ce", "kl", "rougeL"):
            assert len(entry[key]["per_seed"]) == 2 and entry[key]["std"] >= 0
            if method == "kd":
                assert "vs_baseline" not in entry[key]
            else:
                low, high = entry[key]["ci"]
                assert low <= entry[key]["vs_baseline"] <= high
        assert len(report["curves"][method]) == 2 and len(report["curves"][method][0]) == 6
    # SFT never sees the teacher: it ends further from it than KD, which learns it.
    sft = report["methods"]["sft"]["kl"]
    assert sft["ci"][0] > 0 and report["methods"]["kd"]["kl"]["mean"] < report["references"]["start"]["kl"]
    table = (tmp_path / "study" / "study.md").read_text()
    assert "KL(teacher ‖ student) over the whole vocabulary." in table  # heldout_top_k = the vocabulary
    assert "| teacher |" in table and "| sar |" in table and (tmp_path / "study" / "study.png").stat().st_size > 10_000
    # A second run trains and evaluates nothing again: it only rebuilds the report.
    capsys.readouterr()
    assert quality.main(args) == 0
    printed = capsys.readouterr().out
    assert "steps done" not in printed and printed.count("reusing") == 2 * (2 + 8 * 2)
    assert json.loads((tmp_path / "study" / "study.json").read_text()) == report
