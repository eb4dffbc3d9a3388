"""Check every cache shard against the manifest (files, rows, sha256, schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.cache_format import verify_cache
from pipeline.errors import MoekdError


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("cache",)
    cache: str  # the cache: a directory or an fsspec URI (s3://bucket/prefix, ...)


def run(config: Config) -> None:
    problems = verify_cache(config.cache)
    if problems:
        raise MoekdError(f"{config.cache} failed verification:\n  " + "\n  ".join(problems))
    print(f"{config.cache}: every shard matches the manifest")
