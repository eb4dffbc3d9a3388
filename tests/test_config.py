"""Config loading: YAML + overrides, type checks, clear errors, CLI flag mapping."""

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from pipeline.core.config import ConfigError, load_config
from stages.cli import main, parse_args


@dataclass
class Inner:
    lam: float = 0.05
    mode: Literal["topk", "ka"] = "topk"


@dataclass
class Outer:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("path",)
    path: str = ""
    steps: int = 10
    overwrite: bool = False
    tags: list[str] = field(default_factory=list)
    k_s: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 3\ninner:\n  lam: 1\n")
    cfg = load_config(Outer, cfg_file, ["inner.mode=ka", "tags=[a, b]", "k_s=7"])
    assert cfg.steps == 3 and cfg.inner.lam == 1.0 and isinstance(cfg.inner.lam, float)
    assert cfg.inner.mode == "ka" and cfg.tags == ["a", "b"] and cfg.k_s == 7


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `3e-4` as a string; a float field takes it as the number it means."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("inner:\n  lam: 5e-2\n")
    assert load_config(Outer, cfg_file, []).inner.lam == 0.05
    assert load_config(Outer, None, ["inner.lam=3e-4"]).inner.lam == 3e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", "unknown config key stepz"),
        ("inner.lamb=1", "unknown config key inner.lamb"),
        ("steps=three", "steps must be an integer"),
        ("inner.lam=high", "inner.lam must be a finite number"),
        ("inner.lam=.inf", "inner.lam must be a finite number, got inf"),
        ("inner.lam=.nan", "inner.lam must be a finite number, got nan"),
        ("inner.lam=-inf", "inner.lam must be a finite number"),
        ("inner.mode=all", "inner.mode must be one of"),
        ("overwrite=1", "overwrite must be true or false"),
        ("steps", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_required_keys_and_scalar_lists():
    @dataclass
    class Needs:
        output: str
        inputs: list[str] = field(default_factory=list)

    with pytest.raises(ConfigError, match="missing required config key output"):
        load_config(Needs, None, [])
    assert load_config(Needs, None, ["output=o", "inputs=a.jsonl"]).inputs == ["a.jsonl"]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)


def test_cli_flags_become_overrides():
    path, overrides = parse_args(Outer, ["cache/", "--config", "x.yaml", "--overwrite", "--steps", "4", "inner.lam=0.5"])
    assert path == "x.yaml"
    assert overrides == ["path=cache/", "overwrite=true", "steps=4", "inner.lam=0.5"]
    assert parse_args(Outer, ["--no-overwrite"])[1] == ["overwrite=false"]
    with pytest.raises(ConfigError, match="unknown option --bogus"):
        parse_args(Outer, ["--bogus", "1"])


def test_cli_unknown_command(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err
