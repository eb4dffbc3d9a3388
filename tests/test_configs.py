"""The shipped configs (every YAML file under configs/): each names the command that uses it and loads into it.

A stage config (`# moekd <stage> --config <its path>`) is loaded as the CLI loads it (`cli.parse_args`, then
`config.load_config` into the stage's Config), so every key, type and `__post_init__` check runs; paths need
not exist, nothing is read but the YAML. A quality study (`# python bench/quality.py --config <its path>`)
is loaded into `quality.Config`, and then every `moekd` command the study would run (`quality.plan`: its
`before` commands, the held-out cache, each method's cache and training runs, the evaluation) is loaded the
same way, so a wrong key or value in `before`, `train`, `train_config`, `sar`, `cache`, `eval` or a variant
fails here, not hours into a study.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, load_config
from stages import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402

CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*") if p.suffix in (".yaml", ".yml"))
HEADER = re.compile(r"# (?:moekd (?P<stage>\S+)|(?P<study>python bench/quality\.py)) --config (?P<path>\S+)(?:\s|$)")
STUDY_EXPERTS = 6  # the teacher's routed experts (ka's k_s null is E - 1): a study reads them from the teacher


def test_there_are_configs():
    assert len(CONFIGS) >= 4, CONFIGS  # the glob finds them


@pytest.mark.parametrize("path", CONFIGS)
def test_config_names_its_command_and_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the paths configs name (train_config) are relative to the repository
    lines = (ROOT / path).read_text().splitlines()
    header = HEADER.match(lines[0] if lines else "")
    if not (header and header["path"] == path):
        pytest.fail(f"{path} must start with a comment line naming the command that uses it: "
                    f"`# moekd <stage> --config {path}` for a stage config (stage one of {', '.join(cli.STAGES)}), or "
                    f"`# python bench/quality.py --config {path}` for a quality study; its first line is "
                    f"{lines[0] if lines else '(empty file)'!r}", pytrace=False)
    if header["study"]:
        study = load_config(quality.Config, path, [])  # as quality.main loads it
        if study.train_config and not Path(study.train_config).is_file():
            pytest.fail(f"{path}: train_config {study.train_config} not found", pytrace=False)
        for step in quality.plan(study, STUDY_EXPERTS):
            load_stage(step.stage, step.args, f"{path}: {step.what}")
    else:
        if header["stage"] not in cli.STAGES:
            pytest.fail(f"{path}'s header names `moekd {header['stage']}`, which is not a stage "
                        f"({', '.join(cli.STAGES)})", pytrace=False)
        load_stage(header["stage"], ["--config", path], path)


def load_stage(stage: str, args: list[str], what: str):
    """`moekd <stage> <args>`'s config, loaded as the CLI loads it (every check that needs no files)."""
    config_cls = importlib.import_module(cli.STAGES[stage]).Config
    try:
        path, overrides = cli.parse_args(config_cls, args)
        return load_config(config_cls, path, overrides)
    except ConfigError as e:
        error = e
    pytest.fail(f"{what}: `moekd {stage} {' '.join(args)}` is refused: {error}", pytrace=False)


def test_a_study_with_a_wrong_setting_is_caught(tmp_path, monkeypatch):
    """The study check reaches the stages: settings quality.Config takes as plain dicts are still checked."""
    monkeypatch.chdir(ROOT)
    base = {"output": "o", "teacher": "t", "student": "s", "train_data": "d", "heldout_data": "h",
            "methods": ["kd", "sar"], "seeds": [0, 1]}
    for extra, message in [({"train": {"eval_every": 10}}, "eval_every needs eval_data or eval_cache"),
                           ({"sar": {"routing": {"samples": 2}}}, "routing.samples=2"),
                           ({"cache": {"top_k": 0}}, "must be positive"),
                           ({"eval": {"batchsize": 8}}, "unknown config key batchsize")]:
        path = tmp_path / "study.yaml"
        path.write_text(json.dumps(base | extra))
        study = load_config(quality.Config, path, [])
        with pytest.raises(pytest.fail.Exception, match=re.escape(message)):
            for step in quality.plan(study, STUDY_EXPERTS):
                load_stage(step.stage, step.args, step.what)
