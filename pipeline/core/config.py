"""Typed stage configs: dataclasses loaded from YAML, overridden by `key=value`.

Each stage defines its own `Config` dataclass; the dataclass defaults are the one
place a default lives. YAML files in `configs/` and command-line overrides only
replace values, and every key is checked against the dataclass so a typo is an
error rather than a silently ignored setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.core.errors import MoekdError

T = TypeVar("T")


class ConfigError(MoekdError):
    """A config file or override that does not fit the stage's config."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build `cls` from an optional YAML file plus `a.b=value` overrides (YAML-typed values)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        set_nested(data, key.split("."), parse_value(raw))
    return from_dict(cls, data)


def as_overrides(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested settings as the command line's `a.b=value` overrides (values as JSON, which YAML reads back):
    what `load_config` takes, for a driver that runs stages through their command line."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += as_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def parse_value(raw: str) -> Any:
    """Read an override's value as YAML (so `3`, `0.5`, `true`, `[1, 2]` are typed)."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def set_nested(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = data.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
        data = child
    data[keys[-1]] = value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Construct dataclass `cls` from a mapping, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (valid keys: {', '.join(sorted(fields))})"
        )
    missing = [name for name, f in fields.items() if name not in data and is_required(f)]
    if missing:
        raise ConfigError(f"missing required config key {where}{missing[0]} (set it in the YAML or as {where}{missing[0]}=...)")
    kwargs = {name: coerce(data[name], hints[name], where + name) for name in fields if name in data}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}") from None


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type hint `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where + ".")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--inputs a.jsonl` means a one-item list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        (_, value_tp) = typing.get_args(tp) or (Any, Any)
        return {key: coerce(item, value_tp, f"{where}.{key}") for key, item in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):  # .inf or .nan would train NaN weights
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def to_dict(config: Any) -> dict:
    """The config as plain data (for manifests, checkpoints and logs)."""
    return dataclasses.asdict(config)


def config_hash(data: Any) -> str:
    """A stable sha256 of JSON-serialisable data (sorted keys)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
