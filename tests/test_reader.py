"""pipeline.data.reader: seeded epoch plans, rank splits, resume positions, length grouping, the reader thread."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.cache.identity import CacheIdentity, encoding_spec
from pipeline.cache.manifest import Manifest
from pipeline.cache.shards import write_shard
from pipeline.core.errors import MoekdError
from pipeline.data.batch import collate_examples, collate_records, one_sample_per_sequence
from pipeline.data.prepared import PreparedData, target_positions
from pipeline.data.reader import CacheShards, PreparedShards, Reader
from stages import prepare
from test_cache_format import make_records

SHARD_ROWS = [10, 10, 10, 10, 10, 7, 10]  # a short shard, so ranks end up with different row counts
ROWS = sum(SHARD_ROWS)
M, K, VOCAB = 3, 4, 50


def write_cache(directory, aggregate=False):
    encoding = dict(vocab_size=VOCAB, k=K, num_samples=M, with_aggregate=aggregate)
    manifest = Manifest.open(directory, CacheIdentity({"encoding": encoding_spec(**encoding)}), {}, overwrite=False)
    first = 0
    for index, rows in enumerate(SHARD_ROWS):
        records = make_records(rows, M=M, k=K, vocab=VOCAB, min_T=0, max_T=12, seed=index, first_id=first,
                               aggregate=aggregate)
        manifest.commit(write_shard(directory, index, records, **encoding))
        first += rows
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"))


class CountingShards(CacheShards):
    """CacheShards that remembers which shards were decoded."""

    def __init__(self, cache_dir):
        super().__init__(cache_dir)
        self.decoded = []

    def read(self, shard):
        self.decoded.append(shard)
        return super().read(shard)


def make_reader(cache, shards=None, **settings) -> Reader:
    settings = dict(batch_size=3, shuffle_shards=2, seed=0, collate=list) | settings
    return Reader(shards or CacheShards(cache), **settings)


def seq_ids(batch) -> list[int]:
    return [r.seq_id for r in batch]


def planned_seq_ids(reader: Reader, epoch: int, rank: int) -> list[list[int]]:
    return [[int(reader.index[s][0][row]) for s, row in batch]
            for window in reader.plan(epoch, rank) for batch in window.batches]


def consume(iterator, seconds: float = 60.0) -> list:
    """Drain `iterator` in a thread, so that a hang fails the test instead of stalling it."""
    out: dict = {}

    def drain():
        try:
            out["items"] = list(iterator)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    thread = threading.Thread(target=drain)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the reader hung"
    if "error" in out:
        raise out["error"]
    return out["items"]


# ---------------------------------------------------------------- plans

def test_the_plan_is_a_function_of_seed_and_epoch(cache):
    reader = make_reader(cache)
    assert reader.plan(0) == make_reader(cache).plan(0)
    assert reader.plan(0) != reader.plan(1)
    assert reader.plan(0) != make_reader(cache, seed=1).plan(0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_every_row_once_per_epoch_and_ranks_disjoint(cache, world_size):
    readers = [make_reader(cache, rank=r, world_size=world_size) for r in range(world_size)]
    shards_of = [{s for w in reader.plan(0) for s in w.shards} for reader in readers]
    assert sorted(s for shards in shards_of for s in shards) == list(range(len(SHARD_ROWS)))  # shards split
    rows = [seq for reader in readers for batch in planned_seq_ids(reader, 0, reader.rank) for seq in batch]
    assert sorted(rows) == list(range(ROWS))
    for reader in readers:
        streamed = consume(reader.batches(0, 0, sum(len(w.batches) for w in reader.plan(0))))
        assert [seq_ids(b) for b in streamed] == planned_seq_ids(reader, 0, reader.rank)


def test_every_rank_takes_the_fewest_batches_any_rank_has(cache):
    readers = [make_reader(cache, rank=r, world_size=3) for r in range(3)]
    counts = [sum(len(w.batches) for w in reader.plan(0)) for reader in readers]
    assert len(set(counts)) > 1  # the short shard makes the ranks uneven
    for reader in readers:
        assert reader.num_batches(0) == min(counts)
        assert len(consume(reader.batches(0))) == min(counts)


def test_a_run_resumed_on_other_ranks_reads_the_rest_of_the_epoch_once(cache):
    three = [make_reader(cache, rank=r, world_size=3) for r in range(3)]
    read = [seq for reader in three for batch in consume(reader.batches(0, 0, 2)) for seq in seq_ids(batch)]
    left = 3 * (three[0].num_batches(0) - 2)  # batches the three ranks had left
    two = [make_reader(cache, rank=r, world_size=2) for r in range(2)]
    history = ((3, 2),)  # 3 ranks had each taken 2 batches of epoch 0
    assert two[0].num_batches(0, history) == two[1].num_batches(0, history) == left // 2
    read += [seq for reader in two for batch in consume(reader.batches(0, 0, 1, history)) for seq in seq_ids(batch)]
    # then one rank: what the two had left after one batch each
    history += ((2, 1),)
    one = make_reader(cache)
    read += [seq for batch in consume(one.batches(0, 0, None, history)) for seq in seq_ids(batch)]
    assert len(read) == len(set(read))  # no row twice
    assert set(read) <= set(range(ROWS)) and len(read) >= ROWS - 4 * 3  # the ranks' uneven ends and shares aside
    assert one.num_batches(1) == len(consume(one.batches(1)))  # the next epoch is planned afresh


def test_batches_are_length_sorted_inside_each_window(cache):
    reader = make_reader(cache, batch_size=4, shuffle_shards=3)
    for window in reader.plan(0):
        counts = [sorted(int(reader.index[s][1][row]) for s, row in batch) for batch in window.batches]
        counts.sort()
        assert all(a[-1] <= b[0] for a, b in zip(counts, counts[1:]))
        assert sorted(len(c) for c in counts)[1:] == [4] * (len(counts) - 1)  # all full but (maybe) one


def test_resume_skips_to_the_position_without_decoding_earlier_windows(cache):
    full = [seq_ids(b) for b in consume(make_reader(cache).batches(1))]
    shards = CountingShards(cache)
    reader = make_reader(cache, shards)
    first_window, *later = reader.plan(1)
    start = len(first_window.batches) + 1
    assert [seq_ids(b) for b in consume(reader.batches(1, start))] == full[start:]
    assert sorted(shards.decoded) == sorted(s for w in later for s in w.shards)
    assert [seq_ids(b) for b in consume(reader.batches(1, 2, 4))] == full[2:4]


# ---------------------------------------------------------------- the reader thread

def test_a_corrupt_shard_raises_in_the_consumer(tmp_path):
    cache = write_cache(tmp_path)
    reader = make_reader(cache, prefetch=1)
    broken = reader.plan(0)[1].shards[0]  # a shard of the second window
    path = cache / Manifest.load(cache).shards[broken].file
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MoekdError, match=f"shard-{broken:05d}"):
        consume(reader.batches(0))


def growing_cache(directory, committed: int, shards: int = 4, rows: int = 5):
    """A cache whose identity announces `shards` shards of `rows` rows, the first `committed` of them written."""
    encoding = dict(vocab_size=VOCAB, k=K, num_samples=M, with_aggregate=False)
    identity = {"encoding": encoding_spec(**encoding), "rows": shards * rows, "shard_size": rows,
                "num_shards": shards}
    manifest = Manifest.open(directory, CacheIdentity(identity), {}, overwrite=False)
    for index in range(committed):
        records = make_records(rows, M=M, k=K, vocab=VOCAB, max_T=4, seed=index, first_id=index * rows)
        manifest.commit(write_shard(directory, index, records, **encoding))
    return directory


def test_a_followed_cache_that_stops_growing_is_given_up_on_after_one_timeout(tmp_path):
    """The window after the committed ones has two missing shards, waited for by two threads: together they
    wait `timeout` once, not once each."""
    shards = CacheShards(growing_cache(tmp_path, committed=2), follow=True, poll_seconds=0.05, timeout=1.5)
    reader = make_reader(tmp_path, shards, shuffle_shards=2)
    started = time.monotonic()
    with pytest.raises(MoekdError, match=r"waited 2s for shard [23] of the teacher cache .* \(2 of 4 committed\)"):
        consume(reader.batches(0))
    assert 1.5 <= time.monotonic() - started < 2.5


def test_a_followed_cache_refuses_a_record_it_cannot_trust_at_once(tmp_path):
    shards = CacheShards(growing_cache(tmp_path, committed=2), follow=True, poll_seconds=0.05, timeout=60)
    growing_cache(tmp_path / "other", committed=3)  # the same identity: shard 2 as a writer would commit it
    record = json.loads((tmp_path / "other/commits/shard-00002.json").read_text()) | {"rows": 3}
    (tmp_path / "commits" / "shard-00002.json").write_text(json.dumps(record))
    started = time.monotonic()
    with pytest.raises(MoekdError, match="shard-00002.json says shard 2 has 3 rows, but the identity's rows"):
        consume(make_reader(tmp_path, shards, shuffle_shards=2).batches(0))
    assert time.monotonic() - started < 10


def test_a_collate_error_raises_in_the_consumer(cache):
    def collate(rows):
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        consume(make_reader(cache, collate=collate).batches(0))


def test_closing_the_stream_stops_the_thread(cache):
    stream = make_reader(cache, prefetch=1).batches(0)
    next(stream)
    assert any(t.name == "reader" for t in threading.enumerate())
    stream.close()
    assert not any(t.name == "reader" for t in threading.enumerate())


# ---------------------------------------------------------------- batches

def test_collated_targets_and_teacher_line_up_with_the_records(cache):
    records = CacheShards(cache).read(0)[:5]
    batch = collate_records(records, pad_id=0)
    assert batch.teacher.ids.shape == (M, batch.tokens, K) and batch.tokens == sum(len(r.positions) for r in records)
    for i, record in enumerate(records):
        mine = batch.rows == i
        assert batch.cols[mine].tolist() == record.positions.tolist()
        assert batch.targets[mine].tolist() == record.input_ids[record.positions + 1].tolist()
        assert torch.equal(batch.teacher.ids[:, mine], torch.from_numpy(record.topk_ids))
        assert torch.equal(batch.teacher.logprobs[:, mine], torch.from_numpy(record.topk_logprobs))
        assert batch.attention_mask[i].sum() == len(record.input_ids)


def test_the_aggregate_replaces_the_samples(tmp_path):
    records = CacheShards(write_cache(tmp_path, aggregate=True)).read(0)[:4]
    batch = collate_records(records, pad_id=0, aggregate=True)
    assert torch.equal(batch.teacher.ids[0], torch.from_numpy(np.concatenate([r.agg_ids for r in records])))
    assert batch.teacher.ids.shape[0] == 1


def test_one_sample_is_drawn_per_sequence_from_seed_step_and_seq_id(cache):
    records = CacheShards(cache).read(1)
    whole = collate_records(records, pad_id=0)
    picked = one_sample_per_sequence(whole, seed=7, step=3)
    choices = []
    for i, record in enumerate(records):
        mine = picked.rows == i
        matches = [m for m in range(M) if torch.equal(picked.teacher.ids[0, mine], torch.from_numpy(record.topk_ids[m]))]
        assert matches  # every token of a sequence comes from one of its samples
        choices.append(matches)
    assert len({tuple(c) for c in choices if len(c) == 1}) > 1  # not always the same sample
    alone = one_sample_per_sequence(collate_records(records[3:5], pad_id=0), seed=7, step=3)
    assert torch.equal(alone.teacher.ids, picked.teacher.ids[:, (picked.rows == 3) | (picked.rows == 4)])
    other_step = one_sample_per_sequence(whole, seed=7, step=4)
    assert not torch.equal(other_step.teacher.ids, picked.teacher.ids)


# ---------------------------------------------------------------- prepared data

def test_prepared_data_reads_as_pseudo_shards(tmp_path, tokenizer_dir, instructions_jsonl):
    prepare.run(prepare.Config(inputs=[str(instructions_jsonl)], output=str(tmp_path), tokenizer=str(tokenizer_dir)))
    data = PreparedData(tmp_path)
    shards = PreparedShards(data, shard_size=10)
    examples = data.rows(0, len(data))
    assert len(shards) == 7 and shards.index(6)[0].tolist() == list(range(60, 64))
    assert np.concatenate([shards.index(s)[1] for s in range(7)]).tolist() == [
        len(target_positions(e.response_mask)) for e in examples]
    reader = Reader(shards, batch_size=4, shuffle_shards=2, seed=0, collate=lambda rows: collate_examples(rows, 0))
    batches = consume(reader.batches(0))
    assert sorted(s for b in batches for s in b.seq_ids) == list(range(len(data)))
    for batch in batches:
        for i, seq_id in enumerate(batch.seq_ids):
            example = examples[seq_id]
            assert batch.examples[i].seq_id == seq_id
            assert batch.cols[batch.rows == i].tolist() == target_positions(example.response_mask).tolist()
