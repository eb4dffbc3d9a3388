"""The one output lifecycle (`core.outputs.judge`) and the one model identity: what an output holds is reused,
resumed, refused naming what differs, or replaced; a model is compared by content, wherever it lies."""

from __future__ import annotations

import shutil

import pytest

import fixtures
from pipeline.cache.manifest import Manifest
from pipeline.core.errors import MoekdError
from pipeline.core.outputs import FOREIGN, Output, Verdict, differences, judge
from pipeline.models.identity import by_content, content, model_identity
from pipeline.models.loading import load_config
from test_cache import KA, prepared, reference, run_cache  # noqa: F401 - fixtures

WANTED = {"settings": {"lr": 0.001, "layers": [1, 2]}, "data": "abc"}
OUT = Output("out", holds="holds another thing", side="the output", unrecorded="holds something unrecorded")


def test_nothing_there_is_made_and_the_same_is_reused_even_with_overwrite():
    assert judge(OUT, None, WANTED, overwrite=False) is Verdict.NEW
    assert judge(OUT, {"settings": {"lr": 0.001, "layers": (1, 2)}, "data": "abc"}, WANTED, False) is Verdict.SAME
    assert judge(OUT, WANTED, WANTED, overwrite=True) is Verdict.SAME  # overwrite replaces another, not this


def test_another_is_refused_naming_what_differs_or_replaced_with_overwrite():
    other = {"settings": {"lr": 0.003, "layers": [1, 2]}}
    with pytest.raises(MoekdError) as error:
        judge(OUT, other, WANTED, overwrite=False)
    message = str(error.value)
    assert message.startswith("out holds another thing; use --overwrite (overwrite=true) to replace it")
    assert "settings.lr is 0.003 in the output but 0.001 now" in message
    assert "data is '<absent>' in the output but 'abc' now" in message and "layers" not in message
    assert judge(OUT, other, WANTED, overwrite=True) is Verdict.REPLACE


def test_an_output_that_records_nothing_is_foreign():
    with pytest.raises(MoekdError, match="^out holds something unrecorded; use --overwrite"):
        judge(OUT, FOREIGN, WANTED, overwrite=False)
    assert judge(OUT, FOREIGN, WANTED, overwrite=True) is Verdict.REPLACE


def test_differences_go_down_to_the_dotted_key():
    assert differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}, "the run") == ["a.c is 2 in the run but 3 now"]


def test_a_model_is_its_content_wherever_it_lies(tmp_path, moe_dir):
    teacher = moe_dir("mixtral")
    moved = tmp_path / "renamed"
    shutil.copytree(teacher, moved)
    here, there = model_identity(teacher, load_config(teacher)), model_identity(moved, load_config(moved))
    assert here != there and here["name"] != there["name"]
    assert content(here) == content(there) and "path" not in content(here) and "name" not in content(here)
    assert by_content({"source": here, "x": 1}, "source") == by_content({"source": there, "x": 1}, "source")


def test_a_cache_resumes_after_its_teachers_folder_is_renamed(tmp_path, reference, moe_dir, prepared):  # noqa: F811
    copy, renamed = tmp_path / "cache", tmp_path / "renamed-teacher"
    shutil.copytree(reference, copy)
    shutil.copytree(moe_dir("mixtral"), renamed)
    before = fixtures.cache_files(copy)
    stats = run_cache(copy, renamed, prepared, *KA)
    assert stats["shards"] == 0 and fixtures.cache_files(copy) == before  # resumed, found complete, untouched
    assert Manifest.load(copy).identity.teacher["name"] == moe_dir("mixtral").name  # as first recorded
