"""Run the MoE teacher over prepared data and write the teacher-logit cache (top-k or sampled).

For every response token and every routing sample it stores the teacher's
top-k token ids and log-probabilities (normalised over the full vocabulary),
or (`storage: sampled`) `draws` tokens drawn from the teacher's distribution
(the mixture of the M samples) as distinct ids and counts: several times
smaller, whatever M, and an unbiased target for forward KL. Both go to
zstd-compressed Parquet shards with a manifest, in a directory or at any
fsspec URI (`s3://bucket/prefix`), each shard committed by its own record
without locks (`pipeline.cache_format`). Shard `s` always holds prepared rows
`[s * shard_size, (s + 1) * shard_size)`, so re-running resumes at the first
uncommitted shard and any number of workers (`--worker i --num-workers n` or
torchrun) fill one cache without overlap. Writers started without a split may
both compute a shard neither has committed: the first commit wins and the
cache is the same.

`backend=vllm` runs the teacher in a vLLM engine instead of the transformers
forward (`pipeline.vllm_teacher`): the same shards, routing modes and KA
draws, at engine speed on GPUs; it is part of the cache's identity.

Settings are checked before anything is written: the config's own checks,
then those only the teacher can make (the routing hooks on the model, or the
vLLM engine started with the routing override: vLLM's checks of its settings
and the override's refusals). A run refused on its settings leaves no
manifest or claim behind, so a run with other settings into the same output
is not blocked. (Resuming this very cache, the engine starts only once there
is a shard to write.)

`routers` (a `moekd sar` routers file) runs the teacher with the routers SAR
adapted to a student, loaded onto the original teacher after it is read
(`pipeline.routers.apply_routers`, which refuses a file trained on another
teacher); the file's sha256 is part of the cache identity (teacher.routers),
so such a cache is never mixed with one from the original teacher or from
other routers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from tqdm import tqdm

from pipeline.batch import collate_examples
from pipeline.cache_format import CLAIMS, COMMITS, SHARDS, Manifest, encoding_spec, write_shard
from pipeline.capture import MAX_DRAWS, capture_batch
from pipeline.config import to_dict
from pipeline.data import PreparedData
from pipeline.distributed import owned, worker_slot
from pipeline.errors import MoekdError
from pipeline.files import sha256_file
from pipeline.logprobs import config_vocab_size, vocab_size
from pipeline.models import (
    honours_remote_code, load_config, load_model, load_tokenizer, model_identity, pad_token_id, resolve_device,
    resolve_dtype,
)
from pipeline.routers import apply_routers
from pipeline.routing import RoutingConfig, RoutingHooks
from pipeline.teacher import check_tokenizer
from pipeline.vllm_teacher import EngineConfig, VllmTeacher


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    output: str  # where the cache goes: a directory or an fsspec URI (s3://bucket/prefix, ...)
    teacher: str  # local Hugging Face directory of the (MoE) teacher
    data: str  # a `moekd prepare` output directory
    routers: str | None = None  # a `moekd sar` routers file for this teacher: cache the SAR-adapted teacher
    backend: Literal["transformers", "vllm"] = "transformers"  # vllm: the teacher in a vLLM engine (optional)
    engine: EngineConfig = field(default_factory=EngineConfig)  # backend=vllm: the engine's settings
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    storage: Literal["topk", "sampled"] = "topk"  # top-k log-probs, or tokens drawn from the teacher
    top_k: int = 64  # topk: log-probs stored per token and sample
    aggregate: bool = False  # topk: also store the top-k of the mean of the M samples
    draws: int = 64  # sampled: tokens drawn per token from the teacher (the mixture of the M samples)
    shard_size: int = 256  # sequences per shard
    batch_size: int = 8  # sequences per teacher forward
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"
    worker: int | None = None
    num_workers: int | None = None
    overwrite: bool = False  # replace a cache made with another teacher/data/config
    verify: bool = False  # on resume, check every committed shard as `moekd verify` does (else its size only)
    trust_remote_code: bool = False  # let the model/tokenizer directories run their own Python code (off: never)

    def __post_init__(self):
        if self.top_k < 1 or self.shard_size < 1 or self.batch_size < 1 or self.draws < 1:
            raise ValueError("top_k, draws, shard_size and batch_size must be positive")
        if self.storage == "sampled" and self.draws > MAX_DRAWS:
            raise ValueError(f"draws={self.draws} exceeds {MAX_DRAWS}, the most tokens per target the sampler draws "
                             "(it holds them in memory)")
        if self.aggregate and self.routing.mode != "ka":
            raise ValueError("aggregate=true needs routing.mode=ka (it averages the KA samples)")
        if self.storage == "sampled" and self.aggregate:
            raise ValueError("aggregate=true is top-k storage's: a sampled cache's draws already mix the M samples")
        if self.backend == "vllm" and (self.storage == "sampled" or self.aggregate or self.routers):
            raise ValueError("backend=vllm returns top-k log-probs only: storage=sampled and aggregate=true need the "
                             "full distributions, and routers= the transformers model; use backend=transformers")
        if self.backend != "vllm" and self.engine != EngineConfig():
            raise ValueError("engine settings apply to backend=vllm only")

    def encoding(self, vocab_size: int) -> dict:
        """`cache_format.encoding_spec`'s arguments for this storage."""
        if self.storage == "sampled":
            return dict(vocab_size=vocab_size, num_samples=self.routing.samples, draws=self.draws)
        return dict(vocab_size=vocab_size, num_samples=self.routing.samples, k=self.top_k,
                    with_aggregate=self.aggregate)


@honours_remote_code
def run(config: Config) -> dict:
    worker, num_workers = worker_slot(config.worker, config.num_workers)
    data = PreparedData(config.data)
    tokenizer = load_tokenizer(config.teacher)
    check_tokenizer("the teacher", config.teacher, tokenizer, None, {config.data: (data.tokenizer_fingerprint, None)})
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.backend == "vllm":  # the engine loads the weights; moekd reads the config only
        model, model_config = None, load_config(config.teacher)
        teacher = {key: value for key, value in model_identity(config.teacher, model_config).items() if key != "path"}
        vocabulary = config_vocab_size(model_config)
    else:
        model = load_model(config.teacher, dtype=dtype, device=device)
        teacher = {key: value for key, value in model_identity(config.teacher, model).items() if key != "path"}
        vocabulary = vocab_size(model)
    if config.routers:
        apply_routers(model, config.routers)
        teacher["routers"] = sha256_file(Path(config.routers))  # absent without: older caches keep their identity
    if config.storage == "topk" and config.top_k > vocabulary:
        raise MoekdError(f"top_k={config.top_k} exceeds the teacher's vocabulary ({vocabulary})")
    num_samples = config.routing.samples
    num_shards = math.ceil(len(data) / config.shard_size)
    identity = {
        "teacher": teacher,
        "tokenizer_fingerprint": data.tokenizer_fingerprint,
        "data_fingerprint": data.fingerprint,
        "rows": len(data),
        "routing": to_dict(config.routing),
        "shard_size": config.shard_size,
        "num_shards": num_shards,
        "batch_size": config.batch_size,  # batch composition changes float rounding
        "dtype": str(dtype).removeprefix("torch."),
        "encoding": encoding_spec(**config.encoding(vocabulary)),
    }
    if config.backend == "vllm":  # absent for transformers: its caches keep their identity
        identity["backend"] = {"name": "vllm", **to_dict(config.engine)}
    info = {"teacher_path": config.teacher, "routers_path": config.routers, "data_path": config.data,
            "device": device.type}
    with contextlib.ExitStack() as stack:
        # Settings only the teacher can check are checked before the manifest is written, so a run that fails on
        # them leaves nothing that a run with other settings would have to overwrite.
        if config.backend == "vllm":
            engine = functools.cache(lambda: VllmTeacher(config.teacher, config.routing, config.engine,
                                                         str(dtype).removeprefix("torch."), config.top_k))
            if writes_manifest(config.output, identity, config.overwrite):
                engine()  # else it starts once there is a shard to write: a finished cache costs no start-up

            def records(examples, bar):
                out = engine().records(examples, num_samples)
                bar.update(sum(len(r.positions) for r in out))
                return out
        else:
            routing = stack.enter_context(RoutingHooks(model, config.routing))
            records = functools.partial(teacher_records, config, model, routing, num_samples, pad_token_id(tokenizer))
        manifest = Manifest.open(config.output, identity, info, config.overwrite, config.verify)
        todo = [s for s in owned(range(num_shards), worker, num_workers) if s not in manifest.committed()]
        print(
            f"cache: {num_shards} shards of {config.shard_size} sequences, {len(manifest.committed())} already "
            f"committed; worker {worker}/{num_workers} has {len(todo)} to write "
            f"(routing={config.routing.mode}, M={num_samples}, "
            + (f"{config.draws} draws)" if config.storage == "sampled" else f"k={config.top_k})")
        )
        if config.backend == "vllm" and todo:
            engine()  # before any shard is claimed
        stats = write_shards(config, data, records, manifest, todo, vocabulary)
    print_summary(stats, num_samples)
    return stats


def writes_manifest(output: str, identity: dict, overwrite: bool) -> bool:
    """Whether `Manifest.open` will write a manifest at `output` (there is none readable, or with `overwrite`
    another cache's, to replace) rather than resume this cache or refuse another's."""
    try:
        stored = Manifest.load(output, with_shards=False).identity
    except MoekdError:  # none there, or unreadable: created, or (unreadable, without overwrite) refused
        return True
    return overwrite and stored != json.loads(json.dumps(identity))  # compared as it reads back from JSON


def write_shards(config, data, records, manifest, todo, vocab_size) -> dict:
    """Compute (`records(examples, bar)`) and commit each shard in `todo` that no other process has committed.
    Shards another process claimed come last: by then they are committed, or their writer died or is slow,
    and this one computes them."""
    stats = {"shards": 0, "tokens": 0, "bytes": 0, "seconds": 0.0, "lost": 0}
    counts = data.target_counts()
    tokens = {s: int(counts[s * config.shard_size : (s + 1) * config.shard_size].sum()) for s in todo}
    for folder in (SHARDS, COMMITS, CLAIMS):  # what writers killed on this host left half-written
        manifest.store.remove_dead_temporaries(folder)
    start = time.perf_counter()
    line = [(index, True) for index in todo]  # (shard, first time in line)
    with tqdm(total=sum(tokens.values()), unit="tok", desc="teacher", dynamic_ncols=True) as bar:
        for index, first in line:  # a shard another process claimed goes to the back of the line, once
            manifest.gather()
            if index in manifest.committed():
                bar.update(tokens[index])
                continue
            if first and not manifest.claim(index):
                line.append((index, False))
                continue
            examples = data.rows(index * config.shard_size, (index + 1) * config.shard_size)
            shard = write_shard(manifest.store, index, records(examples, bar), **config.encoding(vocab_size))
            if not manifest.commit(shard):
                stats["lost"] += 1
                bar.write(f"shard {index}: another process committed it first; its result is kept")
                continue
            stats["shards"] += 1
            stats["tokens"] += shard.tokens
            stats["bytes"] += shard.bytes
            bar.set_postfix(tok_s=f"{stats['tokens'] / (time.perf_counter() - start):.0f}")
    manifest.drop_stale_claims()
    stats["seconds"] = time.perf_counter() - start
    return stats


def teacher_records(config, model, routing, num_samples, pad_id, examples, bar) -> list:
    """The transformers backend's records of a shard's examples, batched by length (a fixed plan, so numbers
    never depend on workers)."""
    order = sorted(examples, key=lambda e: (len(e.input_ids), e.seq_id))
    records = []
    for start in range(0, len(order), config.batch_size):
        batch = collate_examples(order[start : start + config.batch_size], pad_id).to(model.device)
        records += capture_batch(model, routing, batch, num_samples=num_samples, k=config.top_k,
                                 aggregate=config.aggregate, seed=config.routing.seed,
                                 draws=config.draws if config.storage == "sampled" else None)
        bar.update(batch.tokens)
    return sorted(records, key=lambda r: r.seq_id)


def print_summary(stats: dict, num_samples: int) -> None:
    if not stats["tokens"]:
        print("cache: nothing left to write; the cache is complete" if not stats["lost"] else
              "cache: other processes committed the remaining shards")
        return
    per_sample = stats["bytes"] / (stats["tokens"] * num_samples)
    print(
        f"cache: wrote {stats['shards']} shards, {stats['tokens']} tokens x {num_samples} samples in "
        f"{stats['seconds']:.1f}s ({stats['tokens'] / stats['seconds']:.0f} tok/s), "
        f"{stats['bytes'] / 1e6:.2f} MB, {per_sample:.1f} bytes/token/sample on {socket.gethostname()}"
    )
