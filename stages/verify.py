"""Check a cache is complete and every shard matches the manifest (records, files, rows, sha256, schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.cache.manifest import REPAIR, verify_cache
from pipeline.core.errors import MoekdError


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("cache",)
    cache: str  # the cache: a directory or an fsspec URI (s3://bucket/prefix, ...)


def run(config: Config) -> None:
    """Print that the cache is whole and sound, or fail (exit 2) listing every problem, the first on the error's
    own line."""
    problems = verify_cache(config.cache)
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise MoekdError(f"{config.cache} failed verification ({count}): " + "\n  ".join(problems) + f"\n{REPAIR}.")
    print(f"{config.cache}: complete, every shard matches the manifest")
