"""DistillKit's compressed teacher log-probs ("distribution quantization"), written from its published description.

A DistillKit teacher dataset has, per sequence, `input_ids` and one row per
token `t` (the teacher's distribution computed at `t`, predicting
`input_ids[t + 1]`): `bytepacked_indices` (the `k` token ids, `ceil(log2 d)`
bits each, one most-significant-bit-first stream) and `compressed_logprobs`
(the `k` natural-log probabilities at temperature 1, in descending order):

    [exact_k values of exact_dtype][one coefficient of term_dtype per polynomial term]
    [per residual bin: its scale (scale_dtype), then num_elements codes of element_bits bits]

all little-endian. The values past the exact ones are a least-squares
polynomial over the ranks plus the bins' quantised residuals; with
`delta_encoding` the stored sequence is the first differences of the values.
The settings are not in the data: they are the capture's
`compression_config.yaml` (`CompressionConfig`). The tail mass outside the top
k is not stored (the values are log-probs over the whole vocabulary, so it is
1 - sum(exp)).

`decode` reads every configuration; `encode` writes the lossless one
(`exact_k = k`, no polynomial, no bins), which is what moekd exports: its
float16-rounded log-probs are stored exactly. Checked against vectors
DistillKit's own code produced (tests/data/distillkit_vectors.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.core.errors import MoekdError
from pipeline.formats import Sequence, checked_distributions, raise_at

DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "bfloat16": None}
TERMS = ("sqrt", "exp")  # besides integer powers


@dataclass(frozen=True)
class Bin:
    """Quantised residuals: `num_elements` codes of `element_bits` bits, scaled by one `scale_dtype` value."""

    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's `compression_config.yaml` (its `DistributionQuantizationConfig`)."""

    d: int  # vocabulary size: ids take ceil(log2 d) bits
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple = ()
    term_dtype: str = "float32"
    residual_bins: tuple[Bin, ...] = ()
    delta_encoding: bool = True
    normalize_t: bool = False
    error_diffusion: bool = False  # the encoder's; decoding is the same either way
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_mapping(cls, data, where: str) -> "CompressionConfig":
        """The config from a YAML mapping someone wrote, checked field by field (one-line errors)."""
        if not isinstance(data, dict):
            raise MoekdError(f"{where} must be a mapping of DistillKit's compression settings")
        known = {"d", "k", "exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins",
                 "delta_encoding", "normalize_t", "error_diffusion"}
        for key in ("d", "k", "exact_k"):
            if type(data.get(key)) is not int or data[key] < (0 if key == "exact_k" else 1):
                raise MoekdError(f"{where}: {key} must be a {'non-negative' if key == 'exact_k' else 'positive'} "
                                 "integer")
        for key in ("exact_dtype", "term_dtype"):
            if data.get(key, "float32") not in DTYPES:
                raise MoekdError(f"{where}: {key} must be one of {', '.join(DTYPES)}")
        terms = data.get("polynomial_terms") or []
        if not isinstance(terms, list) or any(not (type(t) is int and t >= 0) and t not in TERMS for t in terms):
            raise MoekdError(f"{where}: polynomial_terms must be a list of non-negative integers, 'sqrt' or 'exp'")
        bins = data.get("residual_bins") or []
        if not isinstance(bins, list) or not all(isinstance(b, dict) for b in bins):
            raise MoekdError(f"{where}: residual_bins must be a list of mappings")
        parsed = []
        for i, b in enumerate(bins):
            bits, count, scale = b.get("element_bits"), b.get("num_elements"), b.get("scale_dtype", "float32")
            if type(bits) is not int or not 1 <= bits <= 64 or type(count) is not int or count < 0 \
                    or scale not in DTYPES:
                raise MoekdError(f"{where}: residual_bins[{i}] needs element_bits 1-64, num_elements >= 0 and a "
                                 "scale_dtype")
            parsed.append(Bin(scale, bits, count))
        for key in ("delta_encoding", "normalize_t", "error_diffusion"):
            if key in data and type(data[key]) is not bool:
                raise MoekdError(f"{where}: {key} must be true or false")
        config = cls(d=data["d"], k=data["k"], exact_k=data["exact_k"],
                     exact_dtype=data.get("exact_dtype", "float32"), polynomial_terms=tuple(terms),
                     term_dtype=data.get("term_dtype", "float32"), residual_bins=tuple(parsed),
                     delta_encoding=data.get("delta_encoding", True), normalize_t=data.get("normalize_t", False),
                     error_diffusion=data.get("error_diffusion", False),
                     extra={key: value for key, value in data.items() if key not in known})
        if config.exact_k > config.k:
            raise MoekdError(f"{where}: exact_k ({config.exact_k}) exceeds k ({config.k})")
        if config.exact_k < config.k and not (terms or bins):
            raise MoekdError(f"{where}: exact_k < k needs polynomial_terms or residual_bins for the other values")
        if sum(b.num_elements for b in parsed) > config.k - config.exact_k:
            raise MoekdError(f"{where}: the residual bins hold more than k - exact_k values")
        return config

    def as_mapping(self) -> dict:
        """The YAML mapping DistillKit reads."""
        return {"d": self.d, "k": self.k, "exact_k": self.exact_k, "exact_dtype": self.exact_dtype,
                "polynomial_terms": list(self.polynomial_terms), "term_dtype": self.term_dtype,
                "residual_bins": [vars(b) for b in self.residual_bins], "delta_encoding": self.delta_encoding,
                "error_diffusion": self.error_diffusion, "normalize_t": self.normalize_t}

    @property
    def id_bits(self) -> int:
        return max((self.d - 1).bit_length(), 1)

    @property
    def id_bytes(self) -> int:
        return -(-self.k * self.id_bits // 8)

    @property
    def value_bytes(self) -> int:
        """Bytes of one `compressed_logprobs` row."""
        size = self.exact_k * _width(self.exact_dtype) + len(self.polynomial_terms) * _width(self.term_dtype)
        return size + sum(_width(b.scale_dtype) + -(-b.num_elements * b.element_bits // 8)
                          for b in self.residual_bins)


def lossless(d: int, k: int) -> CompressionConfig:
    """The configuration moekd exports: every value exact (float32), no polynomial, no deltas."""
    return CompressionConfig(d=d, k=k, exact_k=k, exact_dtype="float32", delta_encoding=False)


def decode(config: CompressionConfig, values: list[bytes], ids: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (N, k), log-probs float32 (N, k), descending) of N rows; a row of the wrong size is refused."""
    n = len(values)
    if len(ids) != n:
        raise MoekdError(f"{len(values)} compressed_logprobs rows but {len(ids)} bytepacked_indices rows")
    for name, rows, size in (("compressed_logprobs", values, config.value_bytes),
                             ("bytepacked_indices", ids, config.id_bytes)):
        wrong = next((i for i, row in enumerate(rows) if len(row) != size), None)
        if wrong is not None:
            raise MoekdError(f"{name} row {wrong} holds {len(rows[wrong])} bytes, but the compression config gives "
                             f"{size}: the config is not the one the data was written with")
    raw = np.frombuffer(b"".join(values), np.uint8).reshape(n, config.value_bytes)
    token_ids = _unpack_bits(np.frombuffer(b"".join(ids), np.uint8).reshape(n, config.id_bytes), config.id_bits,
                             config.k)
    E, M, T = config.exact_k, config.k - config.exact_k, len(config.polynomial_terms)
    offset, parts = 0, []
    exact, offset = _floats(raw, offset, E, config.exact_dtype)
    parts.append(exact)
    if M:
        coefficients, offset = _floats(raw, offset, T, config.term_dtype)
        residuals = np.zeros((n, M), np.float64)
        start = 0
        for b in config.residual_bins:
            scale, offset = _floats(raw, offset, 1, b.scale_dtype)
            width = -(-b.num_elements * b.element_bits // 8)
            codes = _unpack_bits(raw[:, offset:offset + width], b.element_bits, b.num_elements).astype(np.float64)
            offset += width
            q = 2 * codes - 1 if b.element_bits == 1 else codes - 2.0 ** (b.element_bits - 1)
            residuals[:, start:start + b.num_elements] = q * scale
            start += b.num_elements
        tail = residuals
        if T:
            p = np.linspace(0.0, 1.0, M) if config.normalize_t else np.arange(M, dtype=np.float64)
            basis = np.stack([np.sqrt(p) if t == "sqrt" else np.exp(p) if t == "exp" else p ** t
                              for t in config.polynomial_terms], axis=1)  # 0 ** 0 is 1
            tail = coefficients @ basis.T + residuals
        parts.append(tail)
    y = np.concatenate(parts, axis=1)
    if config.delta_encoding:  # DistillKit sums in float32 and rounds to the exact values' dtype
        logprobs = _round(np.cumsum(y.astype(np.float32), axis=1, dtype=np.float32), config.exact_dtype)
    else:
        logprobs = y
    return token_ids.astype(np.int64), logprobs.astype(np.float32)


def encode(config: CompressionConfig, token_ids: np.ndarray, logprobs: np.ndarray) -> tuple[list[bytes], list[bytes]]:
    """Rows (compressed_logprobs, bytepacked_indices) of (N, k) ids and log-probs, each row sorted descending by
    value (ties by id); only the lossless configuration (`lossless`)."""
    if config.exact_k != config.k or config.delta_encoding or config.exact_dtype != "float32":
        raise MoekdError("moekd writes DistillKit's format with every value exact (exact_k = k, float32, no deltas)")
    order = np.lexsort((token_ids, -logprobs), axis=-1)
    token_ids, logprobs = np.take_along_axis(token_ids, order, -1), np.take_along_axis(logprobs, order, -1)
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= config.d):
        raise MoekdError(f"token ids must be below d = {config.d}")
    values = logprobs.astype("<f4")
    packed = _pack_bits(token_ids.astype(np.uint64), config.id_bits)
    return [row.tobytes() for row in values], [row.tobytes() for row in packed]


def _width(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else DTYPES[dtype].itemsize


def _floats(raw: np.ndarray, offset: int, count: int, dtype: str) -> tuple[np.ndarray, int]:
    """`count` little-endian floats per row at byte `offset`, as float64; and the offset after them."""
    width = _width(dtype)
    chunk = np.ascontiguousarray(raw[:, offset:offset + count * width])
    if dtype == "bfloat16":  # the upper half of a float32
        values = (chunk.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = chunk.view(DTYPES[dtype])
    return values.astype(np.float64).reshape(len(raw), count), offset + count * width


def _round(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype` (the decoded values' precision)."""
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return bits.view(np.float32)
    return values.astype(DTYPES[dtype])


def _unpack_bits(rows: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`count` unsigned `bits`-bit integers per row from a most-significant-bit-first stream."""
    stream = np.unpackbits(rows, axis=1)[:, : count * bits].reshape(len(rows), count, bits).astype(np.uint64)
    weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (stream * weights).sum(-1, dtype=np.uint64)


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Each row of unsigned integers as a most-significant-bit-first stream of `bits` bits each, in bytes."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    stream = ((values[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(len(values), -1)
    return np.packbits(stream, axis=1)


NAME = "distillkit"
CONFIG_FILE = "compression_config.yaml"


def to_table(sequences: list[Sequence], config: CompressionConfig) -> pa.Table:
    """DistillKit rows of `sequences`: one distribution per token. The tokens moekd holds no distribution for
    (prompts) get a uniform placeholder row, and `labels` marks the rows that hold the teacher's: DistillKit
    masks row t with `labels[t] >= 0` (no shift), so `labels[t]` is `input_ids[t]` exactly there, else -100."""
    input_ids, labels, values, packed = [], [], [], []
    for seq in sequences:
        L = len(seq.input_ids)
        ids = np.tile(np.arange(config.k, dtype=np.int64), (L, 1))
        logprobs = np.full((L, config.k), -np.log(config.d), np.float32)
        ids[seq.positions], logprobs[seq.positions] = seq.ids, seq.logprobs
        marks = np.full(L, -100, np.int64)
        marks[seq.positions] = seq.input_ids[seq.positions]
        rows_values, rows_ids = encode(config, ids, logprobs)
        input_ids.append(seq.input_ids.astype(np.uint64))
        labels.append(marks)
        values.append(rows_values)
        packed.append(rows_ids)
    return pa.table({
        "input_ids": pa.array(input_ids, pa.list_(pa.uint64())),
        "labels": pa.array(labels, pa.list_(pa.int64())),
        "compressed_logprobs": pa.array([[list(r) for r in rows] for rows in values], pa.list_(pa.list_(pa.uint8()))),
        "bytepacked_indices": pa.array([[list(r) for r in rows] for rows in packed], pa.list_(pa.list_(pa.uint8()))),
    })


def from_table(table: pa.Table, config: CompressionConfig, vocab_size: int, where: str) -> list[Sequence]:
    """The sequences of a DistillKit table, checked. Positions: every row but each sequence's last (what it
    predicts is not in the data), or, with `labels`, the rows DistillKit would train on (`labels[t] >= 0`); a
    packed row (`attention_mask` holding segment ids 1, 2, ...) is split into its documents."""
    missing = [c for c in ("input_ids", "compressed_logprobs", "bytepacked_indices") if c not in table.column_names]
    if missing:
        raise_at(where, f"no column {', '.join(missing)}: not DistillKit's compressed format")
    if config.k < 1:
        raise_at(where, "k must be positive")
    columns = {name: table[name] for name in table.column_names}
    sequences = []
    for i in range(table.num_rows):
        at = f"{where} row {i}"
        tokens = np.asarray(columns["input_ids"][i].values, np.int64)
        values = [bytes(np.asarray(r, np.uint8)) for r in columns["compressed_logprobs"][i].as_py()]
        ids = [bytes(np.asarray(r, np.uint8)) for r in columns["bytepacked_indices"][i].as_py()]
        if len(values) != len(tokens):
            raise_at(at, f"{len(values)} rows of log-probs for {len(tokens)} tokens (DistillKit writes one per token)")
        try:
            top_ids, top_logprobs = decode(config, values, ids)
        except MoekdError as e:
            raise_at(at, str(e))
        keep = np.ones(len(tokens), bool)
        if "labels" in columns:
            keep = np.asarray(columns["labels"][i].values, np.int64) >= 0
        segments = np.asarray(columns["attention_mask"][i].values, np.int64) if "attention_mask" in columns \
            else np.ones(len(tokens), np.int64)
        for segment in np.unique(segments[segments > 0]):
            where_segment = np.flatnonzero(segments == segment)
            start, end = where_segment[0], where_segment[-1] + 1
            if not (where_segment == np.arange(start, end)).all():
                raise_at(at, f"segment {segment} of attention_mask is not contiguous")
            chosen = np.flatnonzero(keep[start:end - 1])
            checked_distributions(top_ids[start + chosen], top_logprobs[start + chosen], vocab_size, at)
            sequences.append(Sequence(tokens[start:end], chosen, top_ids[start + chosen],
                                      top_logprobs[start + chosen]))
    return sequences
