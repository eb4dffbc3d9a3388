"""Streaming training batches out of a teacher cache (or prepared data), shuffled, length-grouped, read ahead.

Rows come in shards: a cache's shards, or, for prepared data without a cache
(SFT, online KD), row ranges of `shard_size` rows ("pseudo-shards"). Each
epoch follows a plan built from metadata only (rows per shard; then, for each
window as it is read, seq ids and the number of training targets T per row,
`Manifest.read_shard_index`), seeded by (seed, epoch):

1. shuffle the shard order (a cache followed while it is written: index
   order in the first epoch); rank r of W takes shards r, r + W, ... of it,
   so ranks never share a row;
2. cut the rank's shards into windows of `shuffle_shards` shards: a window is
   the shuffle buffer, decoded whole;
3. inside a window, shuffle the rows, sort them by T (stable, so ties stay
   shuffled), cut them into batches of `batch_size` (the last may be short)
   and shuffle the batch order.

Sorting by T keeps a batch's sequences alike in the number of loss tokens,
which is what the vocabulary projection costs, and mostly in length. A
position in the stream is (epoch, batch index): resuming plans the epoch
again and skips straight to the window holding that batch, without decoding
earlier windows. Every rank can plan every other rank's epoch, so all agree
on `num_batches(epoch)`, the smallest rank's count, without talking. A run
resumed on another number of ranks splits what the earlier ranks had left of
the epoch among the new ones (`work`), then plans the next epochs afresh.

A background thread fetches and decodes windows (one window ahead, its
shards side by side) and collates batches (`pipeline.data.batch`) into a bounded
queue; an error there is raised in the consumer. The number of batches of an
epoch follows from the rows alone, so a run can plan, schedule its learning
rate and resume before a followed cache's shards exist.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from pipeline.cache.manifest import Manifest
from pipeline.cache.shards import TeacherRecord
from pipeline.core.errors import MoekdError
from pipeline.core.seeding import derive_seed
from pipeline.data.prepared import PreparedData, PreparedExample

# ---------------------------------------------------------------- shard sources

class CacheShards:
    """The committed shards of a teacher cache (or a `subset` of their indices), in shard-index order; a row
    is a TeacherRecord. Every read is checked against the shard's commit record (`Manifest.read_shard`).

    `follow`: the cache may still be being written. The shards are all those its identity announces, and
    `index` and `read` wait (polling every `poll_seconds`) until a shard is committed; `timeout` seconds
    without a new commit is an error (re-running resumes): one clock for every thread that waits, so a window
    whose shards are all missing gives up after `timeout`, not after `timeout` per shard. A record that
    is not trusted is an error at once. The first epoch then reads the shards in index order, the order
    writers commit them in (`in_order`).
    """

    concurrent = True  # each read fetches and decodes its own bytes: a window's shards are read side by side

    def __init__(self, cache: str | Manifest, *, subset: list[int] | None = None, follow: bool = False,
                 poll_seconds: float = 2.0, timeout: float = 3600.0):
        """`cache`: its location (refused unless whole, or with `follow` unless what it holds is trusted), or its
        manifest already loaded."""
        self.manifest = cache if isinstance(cache, Manifest) else Manifest.load(cache, whole=not follow)
        if follow and self.manifest.layout is None:
            raise MoekdError(f"follow: teacher cache {self.manifest.location} does not say how its rows are "
                             "sharded (identity.rows and identity.shard_size); it was not written by `moekd cache`")
        everything = range(len(self.manifest.layout)) if follow else self.manifest.shards
        self.indices = sorted(everything if subset is None else set(subset))
        self.in_order, self.poll_seconds, self.timeout = follow, poll_seconds, timeout
        self.lock, self.waiting_for = threading.Lock(), None
        self.last_commit_seen = -math.inf  # when a wait last saw a new commit

    def __len__(self) -> int:
        return len(self.indices)

    def rows(self, shard: int) -> int:
        """Rows of the shard, known before it is committed: shard s holds rows [s * shard_size, ...)."""
        index = self.indices[shard]
        if index in self.manifest.shards:
            return self.manifest.shards[index].rows
        return self.manifest.layout[index]

    def index(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(seq_ids, target counts T) of the shard's rows, from its small columns only."""
        return self.manifest.read_shard_index(self.committed(shard))

    def read(self, shard: int) -> list[TeacherRecord]:
        return self.manifest.read_shard(self.committed(shard))

    def committed(self, shard: int) -> int:
        """The cache's index of `shard`, once it is committed. The wait is timed from when it was asked for or
        from the last new commit, whichever is later, on one clock for all threads: a thread that waited for
        the lock while another timed out does not wait `timeout` again."""
        index, asked = self.indices[shard], time.monotonic()
        with self.lock:
            while index not in self.manifest.shards:
                progress = (f"shard {index} of the teacher cache {self.manifest.location} "
                            f"({len(self.manifest.shards)} of {len(self.manifest.layout)} committed)")
                if time.monotonic() - max(asked, self.last_commit_seen) > self.timeout:
                    raise MoekdError(f"waited {self.timeout:.0f}s for {progress}; is `moekd cache` still writing "
                                     "it? Re-run this command to resume once it is.")
                if self.waiting_for != index:  # say once per shard
                    print(f"follow: waiting for {progress}", flush=True)
                    self.waiting_for = index
                time.sleep(self.poll_seconds)
                committed = len(self.manifest.shards)
                self.manifest.gather()
                self.manifest.require(whole=False)
                if len(self.manifest.shards) > committed:
                    self.last_commit_seen = time.monotonic()
        return index


class PreparedShards:
    """Prepared data as pseudo-shards of `shard_size` consecutive rows; a row is a PreparedExample."""

    in_order = False
    concurrent = False  # the rows come from one Parquet file, which is not read from several threads at once

    def __init__(self, data: PreparedData, shard_size: int):
        self.data, self.shard_size = data, shard_size
        self.counts = data.target_counts()

    def __len__(self) -> int:
        return -(-len(self.data) // self.shard_size)

    def rows(self, shard: int) -> int:
        return min(self.shard_size, len(self.data) - shard * self.shard_size)

    def index(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        start = shard * self.shard_size
        stop = min(start + self.shard_size, len(self.data))
        return np.arange(start, stop, dtype=np.int64), self.counts[start:stop]

    def read(self, shard: int) -> list[PreparedExample]:
        return self.data.rows(shard * self.shard_size, (shard + 1) * self.shard_size)


# ---------------------------------------------------------------- the reader

@dataclass(kw_only=True)
class Window:
    """A shuffle buffer: the shards decoded together and the batches made of their rows. The batches are
    arranged from the shards' index when first needed (for a followed cache, once the shards exist); how many
    there are is known before, from the rows alone."""

    shards: list[int]
    seed: int
    num_batches: int
    arrange: Callable[["Window"], list] = field(compare=False, repr=False)

    @functools.cached_property
    def batches(self) -> list[list[tuple[int, int]]]:
        """Per batch, (shard, row within the shard) per sequence."""
        return self.arrange(self)


class ShardIndex(dict):
    """shard -> (seq_ids, T per row), read from a shard source when first asked."""

    def __init__(self, shards):
        super().__init__()
        self.shards = shards

    def __missing__(self, shard: int):
        self[shard] = self.shards.index(shard)
        return self[shard]


class ReaderFailure:
    """An exception raised in the reader thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


DONE = object()  # the reader thread's last queue item


class Reader:
    """Seeded, resumable epochs of batches over a shard source (CacheShards or PreparedShards).

    `collate` turns a batch's rows into what `batches` yields; it runs in the
    reader thread.
    """

    def __init__(
        self, shards, *, batch_size: int, shuffle_shards: int, seed: int, collate: Callable[[list], object],
        rank: int = 0, world_size: int = 1, prefetch: int = 8,
    ):
        self.shards, self.collate = shards, collate
        self.batch_size, self.shuffle_shards, self.seed = batch_size, shuffle_shards, seed
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.index = ShardIndex(shards)
        self.rows = [shards.rows(s) for s in range(len(shards))]

    def plan(self, epoch: int, rank: int | None = None, world_size: int | None = None) -> list[Window]:
        """The windows of `rank` of `world_size` (default: this reader's) in `epoch`; a function of metadata,
        seed and epoch. A followed cache's first epoch takes the shards in index order, as they are written."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if epoch == 0 and self.shards.in_order:
            order = np.arange(len(self.rows))
        else:
            order = np.random.default_rng(derive_seed(self.seed, "shard order", epoch)).permutation(len(self.rows))
        mine = order[rank::world_size].tolist()
        size = self.shuffle_shards
        windows = [(mine[i : i + size], derive_seed(self.seed, "window", epoch, rank, i // size))
                   for i in range(0, len(mine), size)]
        return [Window(shards=shards, seed=seed, num_batches=-(-sum(self.rows[s] for s in shards) // self.batch_size),
                       arrange=self.arrange)
                for shards, seed in windows]

    def arrange(self, window: Window) -> list[list[tuple[int, int]]]:
        """The window's batches: its rows shuffled, sorted by T, cut into batches, the batches shuffled."""
        rng = np.random.default_rng(window.seed)
        shards = window.shards
        shard_of = np.concatenate([np.full(len(self.index[s][0]), s) for s in shards])
        row_of = np.concatenate([np.arange(len(self.index[s][0])) for s in shards])
        counts = np.concatenate([self.index[s][1] for s in shards])
        order = rng.permutation(len(counts))
        order = order[np.argsort(counts[order], kind="stable")]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(batches) != window.num_batches:
            raise MoekdError(f"shards {shards} hold {len(counts)} rows, not the {sum(self.rows[s] for s in shards)} "
                             "their commit records or the cache's identity promise")
        return [[(int(shard_of[j]), int(row_of[j])) for j in batches[b]] for b in rng.permutation(len(batches))]

    def work(self, epoch: int, rank: int | None = None, world_size: int | None = None,
             history: tuple[tuple[int, int], ...] = ()) -> list[tuple[Window, int]]:
        """(window, batch index) of each batch of `rank` in `epoch`.

        `history` lists the changes of world size within the epoch, oldest
        first: (ranks before, batches each had taken). At a change, what the
        earlier ranks had left of the epoch, in rank order, is cut into one
        contiguous share per rank, so the epoch still reads each row at most once.
        """
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if not history:
            return [(w, b) for w in self.plan(epoch, rank, world_size) for b in range(w.num_batches)]
        *earlier, (before, taken) = history
        lists = [self.work(epoch, k, before, tuple(earlier)) for k in range(before)]
        taken_to = min(map(len, lists))  # the earlier ranks read up to their fewest
        rest = [item for items in lists for item in items[taken:taken_to]]
        share = len(rest) // world_size
        return rest[rank * share : (rank + 1) * share]

    def num_batches(self, epoch: int, history: tuple[tuple[int, int], ...] = ()) -> int:
        """Batches every rank yields in `epoch`: the fewest any rank has, so all take the same steps."""
        return min(len(self.work(epoch, rank, history=history)) for rank in range(self.world_size))

    def batches(self, epoch: int, start: int = 0, stop: int | None = None,
                history: tuple[tuple[int, int], ...] = ()) -> Iterator:
        """Collated batches [start, stop) of this rank's `epoch` (stop defaults to `num_batches`); windows
        wholly before `start` are never read."""
        stop = self.num_batches(epoch, history) if stop is None else stop
        work: list[tuple[Window, int, int]] = []
        for window, b in self.work(epoch, history=history)[start:stop]:
            if work and work[-1][0] is window and work[-1][2] == b:
                work[-1] = (window, work[-1][1], b + 1)
            else:
                work.append((window, b, b + 1))
        return self.stream(work)

    def stream(self, work: list[tuple[Window, int, int]]) -> Iterator:
        items: queue.Queue = queue.Queue(self.prefetch)
        stopping = threading.Event()
        thread = threading.Thread(target=self.produce, args=(work, items, stopping), daemon=True, name="reader")
        thread.start()
        try:
            while (item := items.get()) is not DONE:
                if isinstance(item, ReaderFailure):
                    raise item.error
                yield item
        finally:
            stopping.set()
            thread.join()

    def produce(self, work: list[tuple[Window, int, int]], items: queue.Queue, stopping: threading.Event) -> None:
        """Reader thread: decode window i + 1 while collating window i's batches into `items`."""

        def put(item) -> bool:
            while not stopping.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(self.read_window, work[0][0]) if work else None
                for i, (window, lo, hi) in enumerate(work):
                    rows = pending.result()
                    pending = pool.submit(self.read_window, work[i + 1][0]) if i + 1 < len(work) else None
                    for batch in window.batches[lo:hi]:
                        if not put(self.collate([rows[shard][row] for shard, row in batch])):
                            return
            put(DONE)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the consumer
            put(ReaderFailure(e))

    def read_window(self, window: Window) -> dict[int, list]:
        """The rows of the window's shards, fetched and decoded side by side (a remote store serves several
        requests at once; decoding releases the GIL), and their index, which `arrange` needs next."""
        with ThreadPoolExecutor(len(window.shards) if self.shards.concurrent else 1) as pool:
            rows = dict(zip(window.shards, pool.map(self.shards.read, window.shards)))
            list(pool.map(self.index.__getitem__, window.shards))
        return rows
