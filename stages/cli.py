"""The `moekd` command line: one subcommand per stage.

    moekd <stage> [POSITIONAL] [--config FILE] [--key value | --flag] [a.b=value ...]

`--config` loads a YAML file from `configs/`; `--key value` and `a.b=value`
override single fields (dashes become underscores). `moekd <stage> --help`
lists every field with its default.

The command sits above every stage (`STAGES`) and imports only the one it
runs, so that a stage that needs no model starts at once (`moekd verify`
without torch). `python -m stages.cli` is the same command (for torchrun).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing

from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import MoekdError

STAGES = {  # command -> its module (imported when it runs)
    "fetch": "stages.fetch",
    "upcycle": "stages.upcycle",
    "mix": "stages.mix",
    "student": "stages.student",
    "prepare": "stages.prepare",
    "cache": "stages.cache",
    "generate": "stages.generate",
    "inspect": "stages.inspect",
    "verify": "stages.verify",
    "convert": "stages.convert",
    "train": "stages.train",
    "eval": "stages.eval",
    "sar": "stages.sar",
    "diagnose": "stages.diagnose",
    "rounds": "stages.rounds",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"moekd: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(stage_help(name, importlib.import_module(STAGES[name])))
        return 0
    try:
        stage, config = configure(name, rest)
        stage.run(config)
    except MoekdError as e:
        print(f"moekd {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekd {name}: interrupted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130
    return 0


def configure(name: str, args: list[str]):
    """(the module of stage `name`, its config from command-line `args`); a `ConfigError` says what is wrong."""
    stage = importlib.import_module(STAGES[name])
    path, overrides = parse_args(stage.Config, args)
    return stage, load_config(stage.Config, path, overrides)


def parse_args(config_cls: type, args: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into the config path and `key=value` overrides."""
    hints = typing.get_type_hints(config_cls)
    positional = list(getattr(config_cls, "POSITIONAL", ()))
    path, overrides = None, []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key == "config":
                if not sep:
                    if i >= len(args):
                        raise ConfigError("--config needs a file path")
                    value, i = args[i], i + 1
                path = value
                continue
            negated = key.startswith("no_") and hints.get(key[3:]) is bool
            if negated:
                overrides.append(f"{key[3:]}=false")
                continue
            if key not in hints:
                raise ConfigError(f"unknown option --{arg[2:].split('=')[0]} (see --help)")
            if not sep:
                if hints[key] is bool:
                    value = "true"
                elif i < len(args):
                    value, i = args[i], i + 1
                else:
                    raise ConfigError(f"--{key.replace('_', '-')} needs a value")
            overrides.append(f"{key}={value}")
        elif "=" in arg:
            overrides.append(arg)
        elif positional:
            overrides.append(f"{positional.pop(0)}={arg}")
        else:
            raise ConfigError(f"unexpected argument {arg!r} (overrides take the form key=value)")
    return path, overrides


def usage() -> str:
    lines = [__doc__.strip(), "", "stages:"]
    for name, module in STAGES.items():
        lines.append(f"  {name:<8} {summary(module)}")
    return "\n".join(lines)


def summary(module_name: str) -> str:
    """First docstring line of a stage module, without importing torch-heavy code twice."""
    try:
        doc = importlib.import_module(module_name).__doc__ or ""
    except ImportError as e:
        return f"(unavailable: {e})"
    return doc.strip().splitlines()[0] if doc.strip() else ""


def stage_help(name: str, stage) -> str:
    positional = " ".join(p.upper() for p in getattr(stage.Config, "POSITIONAL", ()))
    lines = [
        f"usage: moekd {name} {positional + ' ' if positional else ''}[--config FILE] [--key value] [a.b=value ...]",
        "",
        (stage.__doc__ or "").strip(),
        "",
        "config fields (defaults):",
    ]
    lines += [f"  {key} = {value!r}" for key, value in flat_fields(stage.Config)]
    return "\n".join(lines)


def flat_fields(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """Every config field as (dotted.key, default), nested sections flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += flat_fields(hints[f.name], prefix + f.name + ".")
        elif f.default is not dataclasses.MISSING:
            rows.append((prefix + f.name, f.default))
        elif f.default_factory is not dataclasses.MISSING:
            rows.append((prefix + f.name, f.default_factory()))
        else:
            rows.append((prefix + f.name, "(required)"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
