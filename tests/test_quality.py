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
            f"kd_other: {{teacher: {other}}}}}", f"before=[[train, {other_run}, --data, {tmp_path / 'train'}, --student, "
            f"{student_dir}, max_steps=2, loss.alpha=0, device=cpu, dtype=float32, save_every=0]]"]
    assert quality.main(args) == 0
    report = json.loads((tmp_path / "study" / "study.json").read_text())
    assert set(report["methods"]) == {*quality.METHODS, "kd_sampled", "full", "kd_other"} and report["examples"] == 16
    assert report["metrics"] == ["ce", "exact", "rougeL", "kl"] and report["comparisons"] == 8 * 4
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
        runs = report["curves"][method]
        assert len(runs) == 2 and len(runs[0]["ce"]) == 6 and runs[0]["eval_step"] == [3, 6]
    assert report["methods"]["kd"]["ce"]["gap_share"] is not None
    # SFT never sees the teacher: it ends further from it than KD, which learns it, on every seed.
    sft, kd = report["methods"]["sft"]["kl"], report["methods"]["kd"]["kl"]
    assert all(s > k for s, k in zip(sft["per_seed"], kd["per_seed"]))
    assert kd["mean"] < report["references"]["start"]["kl"]
    table = (tmp_path / "study" / "study.md").read_text()
    assert "KL(teacher ‖ student) over the whole vocabulary." in table  # heldout_top_k = the vocabulary
    assert "32 comparisons against kd" in table
    assert "| teacher |" in table and "| sar |" in table and (tmp_path / "study" / "study.png").stat().st_size > 10_000
    # A second run trains and evaluates nothing again: it only rebuilds the report.
    capsys.readouterr()
    assert quality.main(args) == 0
    printed = capsys.readouterr().out
    assert "steps done" not in printed and printed.count("reusing") == 2 * (2 + 9 * 2)
    assert json.loads((tmp_path / "study" / "study.json").read_text()) == report
