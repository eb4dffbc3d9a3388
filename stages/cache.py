"""Run the MoE teacher over prepared data and write the teacher-logit cache (top-k or sampled).

For every response token and every routing sample it stores the teacher's
top-k token ids and log-probabilities (normalised over the full vocabulary),
or (`storage: sampled`) `draws` tokens drawn from the teacher's distribution
(the mixture of the M samples) as distinct ids and counts: several times
smaller, whatever M, and an unbiased target for forward KL. Both go to
zstd-compressed Parquet shards with a manifest, in a directory or at any
fsspec URI (`s3://bucket/prefix`), each shard committed by its own record
without locks (`pipeline.cache.manifest`). Shard `s` always holds prepared rows
`[s * shard_size, (s + 1) * shard_size)`, so re-running resumes at the first
uncommitted shard and any number of workers (`--worker i --num-workers n` or
torchrun) fill one cache without overlap. Writers started without a split may
both compute a shard neither has committed: the first commit wins and the
cache is the same.

`backend` picks what runs the teacher (`pipeline.teacher.backends`): the
transformers model in this process, or (`backend=vllm`) a vLLM engine: the
same shards, routing modes and KA draws, at engine speed on GPUs. The stage
asks the backend for each shard's records and owns the progress bar; a
backend's own settings (vLLM's `engine`) are part of the cache's identity.

Settings are checked before anything is written: the config's own checks,
then those only the teacher can make (the routing hooks on the model, or the
vLLM engine started with the routing override: vLLM's checks of its settings
and the override's refusals). A run refused on its settings leaves no
manifest or claim behind, so a run with other settings into the same output
is not blocked. (Resuming this very cache, the engine starts only once there
is a shard to write.)

`routers` (a `moekd sar` routers file) runs the teacher with the routers SAR
adapted to a student, loaded onto the original teacher after it is read
(`pipeline.teacher.routers.apply_routers`, which refuses a file trained on another
teacher); the file's sha256 is part of the cache identity (teacher.routers),
so such a cache is never mixed with one from the original teacher or from
other routers.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from tqdm import tqdm

from pipeline.cache.card import model_card_license, write_card
from pipeline.cache.identity import CacheIdentity, encoding_spec
from pipeline.cache.manifest import Manifest
from pipeline.cache.records import CARD, CLAIMS, COMMITS
from pipeline.cache.shards import SHARDS, write_shard
from pipeline.core.config import to_dict
from pipeline.core.errors import MoekdError
from pipeline.core.files import sha256_file
from pipeline.core.outputs import Verdict
from pipeline.core.processes import owned, resolve_device, worker_slot
from pipeline.data.prepared import PreparedData
from pipeline.models.backend import EngineConfig
from pipeline.models.identity import check_tokenizer
from pipeline.models.loading import Placement, honours_remote_code, load_tokenizer, pad_token_id, resolve_dtype
from pipeline.teacher.backends import BACKENDS, open_teacher
from pipeline.teacher.capture import MAX_DRAWS, Capture, TeacherBackend
from pipeline.teacher.routing import RoutingConfig


@dataclass
class Config:
    POSITIONAL: ClassVar[tuple[str, ...]] = ("output",)
    output: str  # where the cache goes: a directory or an fsspec URI (s3://bucket/prefix, ...)
    teacher: str  # local Hugging Face directory of the (MoE) teacher
    data: str  # a `moekd prepare` output directory
    routers: str | None = None  # a `moekd sar` routers file for this teacher: cache the SAR-adapted teacher
    backend: str = "transformers"  # what runs the teacher (`teacher.backends.BACKENDS`): transformers, or vllm
    engine: EngineConfig = field(default_factory=EngineConfig)  # backend=vllm: the engine's settings
    placement: Placement = field(default_factory=Placement)  # backend=transformers: a teacher over several devices
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
    license: str | None = None  # the cache card's license (a Hub identifier); default: the teacher card's, or unknown
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
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")
        refusal = BACKENDS[self.backend].refusal(self.capture(), routers=self.routers, engine=self.engine,
                                                 placement=self.placement)
        if refusal:
            raise ValueError(refusal)

    def capture(self) -> Capture:
        """What the backend captures of the teacher."""
        return Capture(routing=self.routing, storage=self.storage, top_k=self.top_k, aggregate=self.aggregate,
                       draws=self.draws, batch_size=self.batch_size)

    def encoding(self, vocab_size: int) -> dict:
        """`identity.encoding_spec`'s arguments for this storage."""
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
    backend = open_teacher(config.backend, teacher=config.teacher, capture=config.capture(), dtype=dtype,
                           device=device, pad_id=pad_token_id(tokenizer), routers=config.routers, engine=config.engine,
                           placement=config.placement)
    if config.storage == "topk" and config.top_k > backend.vocab_size:
        raise MoekdError(f"top_k={config.top_k} exceeds the teacher's vocabulary ({backend.vocab_size})")
    identity = CacheIdentity.build(
        teacher=backend.identity, routers=sha256_file(Path(config.routers)) if config.routers else None,
        tokenizer_fingerprint=data.tokenizer_fingerprint, data_fingerprint=data.fingerprint, rows=len(data),
        routing=to_dict(config.routing), shard_size=config.shard_size, batch_size=config.batch_size,
        dtype=str(dtype).removeprefix("torch."), encoding=encoding_spec(**config.encoding(backend.vocab_size)),
        backend=backend.settings(), generator=data.generator,
    )
    info = {"teacher_path": config.teacher, "routers_path": config.routers, "data_path": config.data,
            "device": device.type, "license": config.license or model_card_license(config.teacher)}
    # Settings only the teacher can check are checked before the manifest is written (the backend as a context,
    # then started), so a run that fails on them leaves nothing that a run with other settings would have to
    # overwrite; a finished cache starts no engine.
    with backend:
        if Manifest.verdict(config.output, identity, config.overwrite) is not Verdict.SAME:
            backend.start()
        manifest = Manifest.open(config.output, identity, info, config.overwrite, config.verify)
        num_shards, num_samples = identity.num_shards, config.routing.samples
        todo = [s for s in owned(range(num_shards), worker, num_workers) if s not in manifest.committed()]
        print(
            f"cache: {num_shards} shards of {config.shard_size} sequences, {len(manifest.committed())} already "
            f"committed; worker {worker}/{num_workers} has {len(todo)} to write "
            f"(routing={config.routing.mode}, M={num_samples}, "
            + (f"{config.draws} draws)" if config.storage == "sampled" else f"k={config.top_k})")
        )
        if todo:
            backend.start()  # before any shard is claimed
        stats = write_shards(config, data, backend, manifest, todo)
    print_summary(stats, num_samples)
    if write_card(manifest):
        print(f"cache: complete; its card is {manifest.store.url(CARD)}")
    return stats


def write_shards(config: Config, data: PreparedData, backend: TeacherBackend, manifest: Manifest,
                 todo: list[int]) -> dict:
    """Compute (`backend.records`) and commit each shard in `todo` that no other process has committed.
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
            shard = write_shard(manifest.store, index, backend.records(examples, bar.update),
                                **config.encoding(backend.vocab_size))
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
