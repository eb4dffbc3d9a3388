"""What a cache is: its identity (everything its shards depend on) and the encoding of its shards.

`CacheIdentity` is the one type of a cache's identity: built in one place
(`CacheIdentity.build`, by `moekd cache`), checked in one place
(`CacheIdentity.problem`, on every manifest read and every identity made), and
read through its fields everywhere else. Its `json` is exactly what the
manifest stores (`manifest.json`'s "identity"), so its bytes, its hash (each
commit record's "cache", a training run's input) and every existing cache stay
what they were. A cache another team wrote may say less: a field it does not
hold reads as None (`moekd inspect` shows '?').

The teacher in an identity is its model identity less its path
(`models.identity.model_identity`): its folder's name is recorded, as caches
always have, but, like the path, is no part of what is compared
(`comparable`: the teacher by content), so a cache resumes after its
teacher's folder is renamed.

`Encoding` is the shards' encoding (`encoding_spec`, also each shard's
Parquet metadata): top-k log-probs, or tokens drawn from the teacher
(`storage: sampled`). Any change to a spec changes the identity, so an old
cache is never resumed with a different encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from pipeline.core.config import config_hash
from pipeline.core.outputs import as_json
from pipeline.models.identity import MadeWith, by_content, without_path

TOPK_FORMAT, SAMPLED_FORMAT = 1, 2  # of a shard's layout, by storage
ZSTD_LEVEL = 3  # on real top-64 shards level 9 saves ~2% at 3-5x the write time, 19 saves 4-8% at 30-40x
COLUMN_ENCODINGS = {
    "seq_id": "PLAIN",
    "input_ids": "PLAIN",
    "positions": "DELTA_BINARY_PACKED",
    "topk_ids": "BYTE_STREAM_SPLIT",
    "topk_logprobs": "BYTE_STREAM_SPLIT",
    "agg_ids": "BYTE_STREAM_SPLIT",
    "agg_logprobs": "BYTE_STREAM_SPLIT",
    "sample_sizes": "DELTA_BINARY_PACKED",
    "sample_ids": "BYTE_STREAM_SPLIT",
    "sample_counts": "DELTA_BINARY_PACKED",
}
T = TypeVar("T")
ENCODING_FIELDS = {"topk": {"vocab_size": int, "k": int, "num_samples": int, "aggregate": bool},
                   "sampled": {"vocab_size": int, "num_samples": int, "draws": int}}


def encoding_spec(*, vocab_size: int, num_samples: int, k: int | None = None, with_aggregate: bool = False,
                  draws: int | None = None) -> dict:
    """The shard encoding, for the manifest identity and each shard's metadata: top-k (`k`) or sampled
    (`draws` per position, then `k` and `with_aggregate` do not apply)."""
    if draws is not None:
        return {
            "format_version": SAMPLED_FORMAT,
            "storage": "sampled",
            "vocab_size": vocab_size,
            "num_samples": num_samples,
            "draws": draws,
            "ids": "int32 distinct and ascending per position, delta-coded: first id, then differences",
            "counts": "int32 draws of each id, summing to `draws` per position",
            "compression": f"zstd level {ZSTD_LEVEL}",
            "encodings": {name: COLUMN_ENCODINGS[name] for name in _column_names({"storage": "sampled"})},
        }
    return {
        "format_version": TOPK_FORMAT,
        "vocab_size": vocab_size,
        "k": k,
        "num_samples": num_samples,
        "aggregate": with_aggregate,
        "order": "sample, position, rank",
        "ids": "int32 ascending per (sample, position), delta-coded: first id, then differences",
        "logprobs": "float16 values stored as float32, aligned with the ids",
        "compression": f"zstd level {ZSTD_LEVEL}",
        "encodings": {name: COLUMN_ENCODINGS[name] for name in _column_names({"aggregate": with_aggregate})},
    }


def sampled(spec: dict) -> bool:
    """Whether an encoding spec is a sampled cache's (a top-k spec has no "storage")."""
    return spec.get("storage") == "sampled"


def _column_names(spec: dict) -> list[str]:
    names = ["seq_id", "input_ids", "positions"]
    if sampled(spec):
        return names + ["sample_sizes", "sample_ids", "sample_counts"]
    names += ["topk_ids", "topk_logprobs"]
    return names + ["agg_ids", "agg_logprobs"] if spec["aggregate"] else names


@dataclass(frozen=True)
class Encoding:
    """How a cache's shards hold the teacher, read from its `spec` (`encoding_spec`; checked by
    `CacheIdentity.problem` before any is read)."""

    spec: dict

    @property
    def storage(self) -> Literal["topk", "sampled"]:
        return "sampled" if sampled(self.spec) else "topk"

    @property
    def sampled(self) -> bool:
        """Tokens drawn from the teacher (counts per distinct id), not top-k log-probs."""
        return sampled(self.spec)

    @property
    def vocab_size(self) -> int:
        return self.spec["vocab_size"]

    @property
    def num_samples(self) -> int:
        """M: the routing samples the cache holds (a sampled cache's draws mix them)."""
        return self.spec["num_samples"]

    @property
    def k(self) -> int | None:
        """Top-k: the log-probs stored per position and sample (None for a sampled cache)."""
        return None if self.sampled else self.spec["k"]

    @property
    def aggregate(self) -> bool:
        """Top-k: whether the top-k of the samples' mean is stored too."""
        return not self.sampled and self.spec["aggregate"]

    @property
    def draws(self) -> int | None:
        """Sampled: tokens drawn per position (None for a top-k cache)."""
        return self.spec["draws"] if self.sampled else None

    @staticmethod
    def problem(spec) -> str | None:
        """What is wrong with an encoding spec someone wrote, or None."""
        if not isinstance(spec, dict):
            return "identity.encoding must be an object"
        for key, kind in ENCODING_FIELDS["sampled" if sampled(spec) else "topk"].items():
            value = spec.get(key)
            if type(value) is not kind or (kind is int and value < 1):
                return f"identity.encoding.{key} must be a {'positive integer' if kind is int else kind.__name__}"
        return None


class Field(Generic[T]):
    """A field of a `CacheIdentity`: its JSON's value under the field's name where it is of `kind`, else None
    (a foreign manifest may not say)."""

    def __init__(self, kind: type[T], doc: str):
        self.kind, self.__doc__ = kind, doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, identity: "CacheIdentity | None", owner: type | None = None) -> T | None:
        if identity is None:
            return self  # type: ignore[return-value]  (the class's attribute is the field itself)
        value = identity.json.get(self.name)
        return value if isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool)) else None


@dataclass(frozen=True)
class CacheIdentity:
    """Everything a cache's shards depend on: `json` as its manifest stores it, read through the fields below."""

    json: dict

    def __post_init__(self):
        object.__setattr__(self, "json", as_json(self.json))  # as it reads back: tuples are lists
        problem = self.problem(self.json)
        if problem:
            raise ValueError(f"not a cache identity: {problem}")

    @classmethod
    def build(cls, *, teacher: dict, routers: str | None, tokenizer_fingerprint: str, data_fingerprint: str,
              rows: int, routing: dict, shard_size: int, batch_size: int, dtype: str, encoding: dict,
              backend: dict | None, generator: dict | None = None) -> CacheIdentity:
        """The identity `moekd cache` writes: `teacher` (its `model_identity`, recorded less its path) with the
        sha256 of the routers file it runs with (`routers`; absent without, as before routers existed), the
        prepared data (fingerprints, rows), the routing, the layout (`shard_size`), what changes float rounding
        (`batch_size`, `dtype`), the `encoding` (`encoding_spec`), the backend's settings (None: the
        transformers backend, absent, so its caches keep their identity) and, for data a model generated
        (`moekd generate`), that `generator` (absent for a dataset's own responses)."""
        recorded = without_path(teacher)
        if routers is not None:
            recorded["routers"] = routers
        json = {
            "teacher": recorded,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "data_fingerprint": data_fingerprint,
            "rows": rows,
            "routing": routing,
            "shard_size": shard_size,
            "num_shards": math.ceil(rows / shard_size),
            "batch_size": batch_size,  # batch composition changes float rounding
            "dtype": dtype,
            "encoding": encoding,
        }
        if backend is not None:
            json["backend"] = backend
        if generator is not None:
            json["generator"] = generator
        return cls(json)

    @classmethod
    def imported(cls, *, teacher: dict, tokenizer_fingerprint: str, data_fingerprint: str, rows: int,
                 shard_size: int, encoding: dict) -> CacheIdentity:
        """The identity `moekd convert` writes for teacher log-probs another tool made: the `teacher` as the
        import names it (its name, the source format and the source files' sha256), the tokenizer and the
        imported sequences (fingerprints, rows), the layout and the encoding. The routing is the teacher's own
        (topk, one sample); how the teacher was run (dtype, batch size) is not known and not said."""
        return cls({"teacher": teacher, "tokenizer_fingerprint": tokenizer_fingerprint,
                    "data_fingerprint": data_fingerprint, "rows": rows,
                    "routing": {"mode": "topk", "samples": 1, "lam": 0.0, "k_s": None, "seed": 0, "top_p": None},
                    "shard_size": shard_size, "num_shards": math.ceil(rows / shard_size), "encoding": encoding})

    @staticmethod
    def problem(json) -> str | None:
        """What is wrong with an identity someone wrote (a manifest's), or None: the encoding must be whole, and
        the fields it holds of the right types, its layout consistent."""
        if not isinstance(json, dict):
            return "identity must be a JSON object"
        problem = Encoding.problem(json.get("encoding"))
        if problem:
            return problem
        for key, kind in (("num_shards", int), ("tokenizer_fingerprint", str), ("data_fingerprint", str)):
            if key in json and type(json[key]) is not kind:
                return f"identity.{key} must be a {kind.__name__}"
        for key, least in (("rows", 0), ("shard_size", 1)):  # the layout: shard s holds rows [s * shard_size, ...)
            if key in json and not (type(json[key]) is int and json[key] >= least):
                return f"identity.{key} must be an integer of at least {least}"
        if {"rows", "shard_size", "num_shards"} <= set(json) \
                and json["num_shards"] != -(-json["rows"] // json["shard_size"]):
            return (f"identity.num_shards is {json['num_shards']}, but {json['rows']} rows in shards of "
                    f"{json['shard_size']} make {-(-json['rows'] // json['shard_size'])}")
        return None

    teacher = Field(dict, "the teacher's model identity, less its path (with \"routers\": the routers file's sha256)")
    tokenizer_fingerprint = Field(str, "the tokenizer the data was prepared with")
    data_fingerprint = Field(str, "the prepared data the cache was made of (`PreparedData.fingerprint`)")
    rows = Field(int, "prepared rows the cache covers")
    shard_size = Field(int, "rows per shard: shard s holds rows [s * shard_size, (s + 1) * shard_size)")
    num_shards = Field(int, "shards the identity announces")
    batch_size = Field(int, "rows per teacher forward (it changes float rounding)")
    dtype = Field(str, "the teacher's dtype")
    routing = Field(dict, "the routing the teacher ran with (`RoutingConfig` as a dict)")
    backend = Field(dict, "the backend's settings (\"name\" and its own); None for the transformers backend")
    generator = Field(dict, "what generated the data's responses (`moekd generate`: the model less its path, the "
                            "sampling, the backend); None for a dataset's own responses")

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.json["encoding"])

    @property
    def hash(self) -> str:
        """The identity's sha256: each commit record's "cache", and a cache by content (a training run's input)."""
        return config_hash(self.json)

    @property
    def layout(self) -> list[int] | None:
        """Rows of each shard the identity announces, by index (shard s holds prepared rows [s * shard_size,
        (s + 1) * shard_size) of `rows`); None where the identity does not say (a foreign cache: its records are
        then all there is to it)."""
        rows, size = self.rows, self.shard_size
        if rows is None or size is None:
            return None
        return [min(size, rows - start) for start in range(0, rows, size)]

    def made_with(self, location: str) -> MadeWith:
        """What the cache's teacher was made with: its tokenizer and vocabulary, which a model that learns from
        it or is measured on it must share (`models.identity.check_tokenizer`)."""
        return {location: (self.tokenizer_fingerprint, self.encoding.vocab_size)}

    def comparable(self) -> dict:
        """The identity as two caches are compared (`core.outputs.judge`): the teacher, and the model that
        generated the data, by content."""
        compared = by_content(self.json, "teacher")
        return compared if self.generator is None else compared | {"generator": by_content(self.generator, "model")}
