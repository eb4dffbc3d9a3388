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
    other, other_run = tmp_path / "other" / "final", tmp_path / "other"  # a teacher the study builds first
    for split, seed in (("train", 1), ("heldout", 2)):
        records = fixtures.instruction_records(16, seed=seed)
        jsonl = fixtures.write_jsonl(tmp_path / f"{split}.jsonl", records)
        prepare.run(prepare.Config(inputs=[str(jsonl)], output=str(tmp_path / split), tokenizer=str(tokenizer_dir),
                                   source_field="task"))  # five tasks: the crossed interval has its tasks
    args = ["output=" + str(tmp_path / "study"), f"teacher={teacher}", f"student={student_dir}",
            f"train_data={tmp_path / 'train'}", f"heldout_data={tmp_path / 'heldout'}", "seeds=[0, 1]",
            "ka.samples=2", "cache.top_k=16", "heldout_top_k=384",
            "train={batch_size: 4, max_steps: 6, save_every: 0, device: cpu, dtype: float32, optim: {lr: 0.01, warmup_steps: 0}, "
            f"eval_every: 3, eval_data: {tmp_path / 'heldout'}}}",
            "eval={max_new_tokens: 3, batch_size: 8, device: cpu, dtype: float32}",
            f"variants={{kd_sampled: {{cache: {{storage: sampled, draws: 8}}}}, full: {{online: {{top_k: 384}}}}, "
            f"kd_other: {{teacher: {other}}}, onp: {{rounds: {{rounds: 2, generate: {{max_new_tokens: 4}}, "
            "cache: {top_k: 16}, train: {loss: {alpha: 1.0, divergence: reverse_kl}}}}}", "contrasts=[[onp, sft]]",
            f"before=[[train, {other_run}, --data, {tmp_path / 'train'}, --student, "
            f"{student_dir}, max_steps=2, loss.alpha=0, device=cpu, dtype=float32, save_every=0]]"]
    assert quality.main(args) == 0
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    assert set(report["methods"]) == {*quality.METHODS, "kd_sampled", "full", "kd_other", "onp"}
    assert report["examples"] == 16 and report["metrics"] == ["ce", "exact", "rougeL", "kl"]
    assert report["comparisons"] == (9 + 1) * 4  # against kd, and the contrast
    for key in report["metrics"]:
        low, high = report["contrasts"]["onp vs sft"][key]["ci"]
        assert low <= report["contrasts"]["onp vs sft"][key]["difference"] <= high
    costs = report["rounds"]["onp"]  # on-policy: the teacher scored the student's answers, each round timed
    assert costs["rounds"] == 2 and costs["teacher_tokens"] > 0 and all(t > 0 for t in costs["seconds"].values())
    sizes = report["cache_bytes_per_token"]
    assert set(sizes) == {"kd", "ka", "all", "top_p", "kd_sampled", "kd_other"}  # the online variant has no cache
    assert sizes["kd_sampled"]["teacher"] < sizes["kd"]["teacher"] / 2, sizes  # 8 draws vs the top-16
    for method, entry in report["methods"].items():
        for key in report["metrics"]:
            assert len(entry[key]["per_seed"]) == 2 and entry[key]["std"] >= 0
            if method == "kd":
                assert "vs_baseline" not in entry[key]
            else:
                for kind in ("vs_baseline", "vs_baseline_these_tasks"):
                    low, high = entry[key][kind]["ci"]
                    assert low <= entry[key][kind]["difference"] <= high and entry[key][kind]["mde"] >= 0
            share = entry[key].get("gap_share")
            if share is not None:  # None where the teacher and SFT tie (exact match 0 for both, at this size)
                assert share["ci"][0] <= share["share"] <= share["ci"][1]
        runs, rounds = report["curves"][method], 2 if method == "onp" else 1  # a rounds run's steps follow on
        assert len(runs) == 2 and len(runs[0]["ce"]) == 6 * rounds and runs[0]["eval_step"] == [3, 6, 9, 12][:2 * rounds]
    assert report["methods"]["kd"]["ce"]["gap_share"] is not None
    # SFT never sees the teacher: it ends further from it than KD, which learns it, on every seed.
    sft, kd = report["methods"]["sft"]["kl"], report["methods"]["kd"]["kl"]
    assert all(s > k for s, k in zip(sft["per_seed"], kd["per_seed"]))
    assert kd["mean"] < report["references"]["start"]["kl"]
    table = (tmp_path / "study" / "study.md").read_text()
    assert "KL(teacher ‖ student) over the whole vocabulary." in table  # heldout_top_k = the vocabulary
    assert "40 comparisons (against kd, and the contrasts)" in table and "| onp vs sft |" in table
    assert "| teacher |" in table and "| sar |" in table and (tmp_path / "study" / "study.png").stat().st_size > 10_000
    # A second run trains and evaluates nothing again: it only rebuilds the report.
    capsys.readouterr()
    assert quality.main(args) == 0
    printed = capsys.readouterr().out
    assert "steps done" not in printed and printed.count("reusing") == 2 * (2 + 10 * 2)
    assert json.loads((tmp_path / "study" / "study.json").read_text()) == report
