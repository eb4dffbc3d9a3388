"""What the teacher says at a batch's targets, whether read from a cache or computed now: one interface.

A training run reads its rows through a teacher (`shards`, `collate`) and
hands every batch to `teach`, which returns the same `pipeline.data.batch.Batch`
with the teacher's signal at the batch's targets (`pipeline.data.signals`):

- `Labels`: no teacher, prepared rows and their labels (SFT);
- `CachedTeacher`: a `moekd cache` directory; its records are the rows and
  already carry the teacher's top-k (or draws);
- `OnlineTeacher`: a teacher model and its routing, run on every batch as
  stage one would run it (the same top-k and KA draws as a cache made with
  those settings, before the cache's float16 rounding);
- `AdaptedTeacher`: SAR's, the teacher under routers being trained; its
  full-vocabulary log-probs at the targets.

Each records what it was made with (tokenizer fingerprint, vocabulary size)
in `made_with`, which `models.identity.check_tokenizer` holds a model to;
what it is, by content, in `inputs` (the data's fingerprint, the cache's
identity hash, the teacher's `content`), which a run records so that it never
resumes against another teacher; and what it is in a line, `description`.
Every constructor of more than three settings takes them by keyword.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Callable

import torch

from pipeline.cache.manifest import REPAIR, Manifest, verify_cache
from pipeline.cache.storage import open_store
from pipeline.core.errors import MoekdError
from pipeline.data.batch import Batch, collate_examples, collate_records
from pipeline.data.prepared import PreparedData
from pipeline.data.reader import CacheShards, PreparedShards
from pipeline.data.signals import Dense, TopK
from pipeline.models.identity import MadeWith, check_tokenizer, content_identity, tokenizer_fingerprint
from pipeline.models.loading import load_model, load_tokenizer
from pipeline.models.logprobs import target_logprobs, vocab_size
from pipeline.teacher.capture import teacher_topk
from pipeline.teacher.routing import RoutingConfig, RoutingHooks


class Labels:
    """No teacher: the rows of a prepared directory in pseudo-shards of `shard_size`, batches unchanged."""

    def __init__(self, data: str, shard_size: int):
        self.data, self.shard_size = PreparedData(data), shard_size
        self.made_with: MadeWith = {data: (self.data.tokenizer_fingerprint, None)}
        self.inputs = {"data": self.data.fingerprint}
        self.description = f"SFT on {data}"

    def shards(self) -> PreparedShards:
        return PreparedShards(self.data, self.shard_size)

    def collate(self, rows: list, pad_id: int) -> Batch:
        return collate_examples(rows, pad_id)

    def verify(self) -> None:
        """Checks worth running once, on one process, before a run starts (none here)."""

    def teach(self, batch: Batch) -> Batch:
        return batch


class CachedTeacher:
    """A `moekd cache` (directory or URI): rows are its records, with all M samples or their aggregate."""

    def __init__(self, cache: str, *, aggregate: bool = False, top_k: int | None = None,
                 shards: list[int] | None = None, follow: float | None = None):
        """`top_k`: keep the most probable `top_k` of each stored distribution's k (the tail mass stays exact:
        the log-probs are normalised over the vocabulary); `shards`: read these shard indices only; `follow`:
        the cache may still be being written: wait up to this many seconds for each next shard."""
        manifest = Manifest.load(cache, refuse=False)
        if follow is not None and manifest.layout is None:
            raise MoekdError(f"follow: teacher cache {cache} does not say how many shards it will have "
                             "(identity.rows and identity.shard_size); it was not written by `moekd cache`")
        manifest.require(whole=follow is None, remedy="finish it with `moekd cache` first, or train while it is "
                                                      "written with follow=true")
        encoding = manifest.identity.encoding
        self.sampled = encoding.sampled
        if aggregate and (self.sampled or not encoding.aggregate):
            raise MoekdError(f"ka_samples=aggregate but teacher cache {cache} " + (
                "is a sampled cache: its draws already mix the KA samples (use ka_samples=mean)" if self.sampled else
                "stores no aggregate (build it with aggregate=true, or use ka_samples=mean)"))
        if top_k is not None and (self.sampled or top_k > encoding.k):
            held = "draws, not a top-k" if self.sampled else f"the top {encoding.k}"
            raise MoekdError(f"cache_top_k={top_k}: teacher cache {cache} holds {held}; give at most its k")
        known = range(len(manifest.layout)) if follow is not None else manifest.shards
        missing = sorted(set(shards or ()) - set(known))
        if missing:
            raise MoekdError(f"cache_shards: teacher cache {cache} has no shard {missing[0]} "
                             f"(it has {len(known)}: 0 to {max(known, default=-1)})")
        self.cache, self.aggregate, self.top_k, self.subset, self.follow = cache, aggregate, top_k, shards, follow
        self.manifest = manifest  # its commit records gathered once (a round trip each on a remote store)
        self.made_with = manifest.identity.made_with(cache)
        self.inputs = {"cache": manifest.identity.hash}  # the cache by content
        self.description = f"offline KD from {cache}" + (" (following it as it is written)" if follow else "")

    def shards(self) -> CacheShards:
        if self.follow is None:
            return CacheShards(self.manifest, subset=self.subset)
        return CacheShards(self.manifest, subset=self.subset, follow=True, timeout=self.follow)

    def collate(self, rows: list, pad_id: int) -> Batch:
        return collate_records(rows, pad_id, self.aggregate, self.top_k)

    def verify(self) -> None:
        """Hash and check every committed shard of a local cache; refuse a cache that fails. (Every read checks
        its shard anyway: a remote cache is not fetched twice, and a followed one's later shards do not exist
        yet.)"""
        if open_store(self.cache).remote:
            print(f"{self.cache}: each shard is checked against its commit record as it is read")
            return
        start = time.perf_counter()
        problems = verify_cache(self.cache, whole=self.follow is None)
        if problems:
            raise MoekdError(f"teacher cache {self.cache} failed verification ({len(problems)} problems, e.g. "
                             f"{problems[0]}); `moekd verify {self.cache}` lists them; {REPAIR}")
        size = sum(s.bytes for s in Manifest.load(self.cache).shards.values())
        print(f"verified {self.cache} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")

    def teach(self, batch: Batch) -> Batch:
        return batch


class OnlineTeacher(Labels):
    """A teacher model run on every batch of prepared rows with `routing`, keeping `top_k` log-probs per
    target and sample (or of their aggregate): what a cache made with those settings would hold."""

    def __init__(self, *, data: str, shard_size: int, teacher: str, routing: RoutingConfig, top_k: int,
                 aggregate: bool, dtype: torch.dtype, device: torch.device, stack: contextlib.ExitStack):
        super().__init__(data, shard_size)
        tokenizer = load_tokenizer(teacher)
        check_tokenizer("the teacher", teacher, tokenizer, None, self.made_with)
        self.model = load_model(teacher, dtype=dtype, device=device)
        if top_k > vocab_size(self.model):
            raise MoekdError(f"top_k={top_k} exceeds the vocabulary of the teacher ({teacher}): "
                             f"{vocab_size(self.model)}")
        self.routing = stack.enter_context(RoutingHooks(self.model, routing))
        self.top_k, self.num_samples, self.aggregate = top_k, routing.samples, aggregate
        self.made_with[teacher] = (tokenizer_fingerprint(tokenizer), vocab_size(self.model))
        self.inputs["teacher"] = content_identity(teacher, self.model)
        self.description = f"online KD from {teacher} on {data} (routing={routing.mode})"

    def teach(self, batch: Batch) -> Batch:
        top = teacher_topk(self.model, self.routing, batch, k=self.top_k, num_samples=self.num_samples,
                           aggregate=self.aggregate)
        ids, logprobs = (top[2][None], top[3][None]) if self.aggregate else top[:2]
        return replace(batch, teacher=TopK(ids=ids, logprobs=logprobs))


class AdaptedTeacher(Labels):
    """SAR's teacher: `model` routed by `routing` (its routers being trained), over prepared rows; it
    teaches its full-vocabulary log-probs (1, N, V) at the targets."""

    def __init__(self, *, data: str, shard_size: int, teacher: str, model, routing: RoutingHooks,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        super().__init__(data, shard_size)
        check_tokenizer("the teacher", teacher, load_tokenizer(teacher), None, self.made_with)
        self.model, self.routing, self.autocast = model, routing, autocast
        self.made_with[teacher] = (self.made_with[data][0], vocab_size(model))
        self.inputs["teacher"] = content_identity(teacher, model)
        self.description = f"SAR with {teacher} on {data}"

    def teach(self, batch: Batch) -> Batch:
        with torch.no_grad(), self.autocast(), self.routing.sequences(batch.seq_ids, 0, batch.attention_mask):
            return replace(batch, teacher=Dense(logprobs=target_logprobs(self.model, batch)[None]))
