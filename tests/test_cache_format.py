"""Teacher-cache format: round trips, determinism, the documented schema, manifest, commit records, verify."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import pytest

from pipeline.cache import shards
from pipeline.cache.identity import CacheIdentity, encoding_spec
from pipeline.cache.manifest import Manifest, verify_cache
from pipeline.cache.shards import TeacherRecord, read_shard, read_shard_index, write_shard
from pipeline.cache.storage import LocalStore
from pipeline.core.errors import MoekdError
from pipeline.core.files import atomic_path
from test_files import no_hang

FP16_REL = 2.0**-11  # float16 round-to-nearest: half an ulp, relative
FP16_ABS = 2.0**-25  # below float16's smallest normal (2**-14), the error is absolute


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and log-probs of the k largest entries, in descending order (as a teacher emits them)."""
    ids = np.argpartition(-logprobs, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(logprobs, ids, -1)
    order = np.argsort(-values, axis=-1)
    ids, values = np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)
    return ids.astype(np.int64), values.astype(np.float32)


def make_records(
    n, *, M=2, k=8, vocab=500, aggregate=False, min_T=0, max_T=6, seed=0, first_id=0,
) -> list[TeacherRecord]:
    """Records whose M samples are similar peaked distributions, like KA samples of one teacher."""
    rng = np.random.default_rng(seed)
    records = []
    for seq_id in range(first_id, first_id + n):
        T = int(rng.integers(min_T, max_T + 1))
        L = T + int(rng.integers(2, 6))
        shared = rng.standard_normal((T, vocab)) * 3
        logprobs = log_softmax(shared + 0.5 * rng.standard_normal((M, T, vocab)))
        ids, values = top_k(logprobs, k)
        record = TeacherRecord(
            seq_id,
            rng.integers(0, vocab, L).astype(np.int32),
            np.sort(rng.choice(L - 1, T, replace=False)).astype(np.int32),
            topk_ids=ids, topk_logprobs=values,
        )
        if aggregate:
            record.agg_ids, record.agg_logprobs = top_k(np.log(np.exp(logprobs).mean(0)), k)
        records.append(record)
    return records


def spec_of(records: list[TeacherRecord], vocab: int, aggregate: bool) -> dict:
    M, _, k = records[0].topk_ids.shape
    return dict(vocab_size=vocab, k=k, num_samples=M, with_aggregate=aggregate)


def assert_matches_teacher(ids, logprobs, true_ids, true_logprobs):
    """Ids exact (sorted ascending per position), log-probs and tail mass within the float16 bounds."""
    order = np.argsort(true_ids, axis=-1)
    expected = np.take_along_axis(true_logprobs, order, -1)
    assert ids.dtype == np.int64 and logprobs.dtype == np.float32
    assert np.array_equal(ids, np.take_along_axis(true_ids, order, -1))
    assert np.all(np.abs(logprobs - expected) <= np.maximum(FP16_REL * np.abs(expected), FP16_ABS))
    p = np.exp(expected.astype(np.float64))
    entropy = -(p * expected).sum(-1)
    tail_error = np.abs(np.exp(logprobs.astype(np.float64)).sum(-1) - p.sum(-1))
    assert np.all(tail_error <= FP16_REL * entropy + 1e-9)


# ---------------------------------------------------------------- shards


def shard_file(directory, index):
    """The one object written for shard `index` in `directory`."""
    (path,) = (directory / "shards").glob(f"shard-{index:05d}-*.parquet")
    return path



@pytest.mark.parametrize("M, aggregate", [(1, False), (3, True)])
def test_round_trip(tmp_path, M, aggregate):
    records = make_records(20, M=M, aggregate=aggregate)
    assert any(len(r.positions) == 0 for r in records)  # empty rows are part of the round trip
    info = write_shard(tmp_path, 4, records, **spec_of(records, 500, aggregate))
    assert info.file == f"shards/shard-00004-{info.sha256[:16]}.parquet"
    assert (tmp_path / info.file).stat().st_size == info.bytes
    assert info.rows == 20 and info.tokens == sum(len(r.positions) for r in records)

    back = read_shard(shard_file(tmp_path, 4))
    assert [r.seq_id for r in back] == [r.seq_id for r in records]
    for r, b in zip(records, back):
        assert np.array_equal(b.input_ids, r.input_ids) and b.input_ids.dtype == np.int32
        assert np.array_equal(b.positions, r.positions) and b.positions.dtype == np.int32
        assert b.topk_ids.shape == (M, len(r.positions), 8)
        assert_matches_teacher(b.topk_ids, b.topk_logprobs, r.topk_ids, r.topk_logprobs)
        if aggregate:
            assert_matches_teacher(b.agg_ids, b.agg_logprobs, r.agg_ids, r.agg_logprobs)
        else:
            assert b.agg_ids is None and b.agg_logprobs is None


def test_vocabulary_beyond_16_bits(tmp_path):
    records = make_records(3, M=2, k=16, vocab=200_000, min_T=1, max_T=4, seed=1)
    assert max(r.topk_ids.max() for r in records) > 65_535
    write_shard(tmp_path, 0, records, **spec_of(records, 200_000, False))
    for r, b in zip(records, read_shard(shard_file(tmp_path, 0))):
        assert_matches_teacher(b.topk_ids, b.topk_logprobs, r.topk_ids, r.topk_logprobs)


def test_same_records_same_bytes(tmp_path):
    records = make_records(30, aggregate=True)
    a = write_shard(tmp_path / "a", 0, records, **spec_of(records, 500, True))
    b = write_shard(tmp_path / "b", 0, make_records(30, aggregate=True), **spec_of(records, 500, True))
    assert a == b
    assert shard_file(tmp_path / "a", 0).read_bytes() == shard_file(tmp_path / "b", 0).read_bytes()


def test_selected_rows_come_back_in_the_order_asked(tmp_path):
    records = make_records(3 * shards.ROW_GROUP_ROWS, M=1, max_T=2)
    write_shard(tmp_path, 0, records, **spec_of(records, 500, False))
    path = shard_file(tmp_path, 0)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    rows = [150, 3, 70, 3]
    picked = read_shard(path, rows)
    assert [r.seq_id for r in picked] == rows
    for i, r in zip(rows, picked):
        assert np.array_equal(r.positions, records[i].positions)
    assert read_shard(path, []) == []
    with pytest.raises(IndexError, match="192 rows"):
        read_shard(path, [192])


def test_shard_index_gives_seq_ids_and_token_counts(tmp_path):
    records = make_records(12, first_id=100)
    write_shard(tmp_path, 0, records, **spec_of(records, 500, False))
    seq_ids, tokens = read_shard_index(shard_file(tmp_path, 0))
    assert seq_ids.tolist() == list(range(100, 112))
    assert tokens.tolist() == [len(r.positions) for r in records]


def test_documented_pyarrow_decode(tmp_path, monkeypatch):
    """The module docstring's plain pyarrow + numpy snippet decodes a shard correctly."""
    records = make_records(4, M=3, aggregate=True, min_T=1, seed=2)
    manifest = Manifest.open(tmp_path, identity(encoding=encoding_spec(**spec_of(records, 500, True))), {}, False)
    manifest.commit(write_shard(tmp_path, 0, records, **spec_of(records, 500, True)))
    snippet = re.search(r"nothing but pyarrow and numpy:\n\n((?:    .*\n)+)", shards.__doc__).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {"json": json, "np": np, "pyarrow": pyarrow}
    exec(snippet.replace("\n    ", "\n").strip(), scope)
    assert_matches_teacher(scope["ids"], scope["logprobs"], records[0].topk_ids, records[0].topk_logprobs)


def test_write_rejects_records_that_do_not_fit_the_encoding(tmp_path):
    records = make_records(2, M=2, max_T=3, seed=4)
    with pytest.raises(ValueError, match="seq 0: topk_ids must have shape"):
        write_shard(tmp_path, 0, records, vocab_size=500, k=8, num_samples=3, with_aggregate=False)
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        write_shard(tmp_path, 0, records, vocab_size=100, k=8, num_samples=2, with_aggregate=False)
    with pytest.raises(ValueError, match="ascending seq_id order"):
        write_shard(tmp_path, 0, records[::-1], vocab_size=500, k=8, num_samples=2, with_aggregate=False)
    assert not (tmp_path / "shards").exists()


def test_failed_write_leaves_no_file_and_no_manifest_entry(tmp_path, monkeypatch):
    records = make_records(5)
    spec = spec_of(records, 500, False)
    manifest = Manifest.open(tmp_path, identity(), {}, overwrite=False)

    def write_half_then_fail(table, where, **kwargs):
        where.write(b"PAR1 half a shard")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        manifest.commit(write_shard(tmp_path, 0, records, **spec))
    assert not (tmp_path / "shards").exists()
    assert Manifest.load(tmp_path).committed() == set()
    assert verify_cache(tmp_path) == []


# ---------------------------------------------------------------- manifest


def identity(**changes) -> CacheIdentity:
    base = {
        "teacher": {"name": "moe", "sha": "abc"},
        "routing": {"mode": "ka", "lam": 0.05, "samples": 2},
        "shard_size": 4,
        "encoding": encoding_spec(vocab_size=500, k=8, num_samples=2, with_aggregate=False),
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            base[section] = {**base[section], field: value}
        else:
            base[key] = value
    return CacheIdentity(base)


def build_cache(directory, shards=2) -> Manifest:
    manifest = Manifest.open(directory, identity(), {"host": "here"}, overwrite=False)
    for index in range(shards):
        records = make_records(4, first_id=4 * index, seed=index)
        manifest.commit(write_shard(directory, index, records, **spec_of(records, 500, False)))
    return manifest


def test_manifest_resumes_same_identity_and_ignores_info(tmp_path):
    build_cache(tmp_path)
    again = Manifest.open(tmp_path, identity(), {"host": "elsewhere"}, overwrite=False)
    assert again.committed() == {0, 1}
    assert again.info == {"host": "here"}  # the first writer's info is kept


def test_identity_is_compared_as_json(tmp_path):
    Manifest.open(tmp_path, identity(layers=(1, 2)), {}, overwrite=False)
    Manifest.open(tmp_path, identity(layers=[1, 2]), {}, overwrite=False)  # a tuple reads back as a list
    with pytest.raises(MoekdError, match=r"layers is \[1, 2\] in the cache but \[1, 3\] now"):
        Manifest.open(tmp_path, identity(layers=[1, 3]), {}, overwrite=False)


def test_manifest_refuses_a_different_identity_naming_the_fields(tmp_path):
    build_cache(tmp_path)
    changed = identity(routing__lam=0.1, shard_size=8)
    with pytest.raises(MoekdError) as error:
        Manifest.open(tmp_path, changed, {}, overwrite=False)
    message = str(error.value)
    assert "routing.lam is 0.05 in the cache but 0.1 now" in message
    assert "shard_size is 4 in the cache but 8 now" in message
    assert "teacher." not in message and "encoding." not in message and "overwrite=true" in message
    assert Manifest.load(tmp_path).committed() == {0, 1}  # refusing touches nothing


def test_manifest_overwrite_removes_the_old_cache(tmp_path):
    build_cache(tmp_path)
    fresh = Manifest.open(tmp_path, identity(routing__samples=4), {}, overwrite=True)
    assert fresh.committed() == set()
    assert Manifest.load(tmp_path).identity.routing["samples"] == 4
    assert list((tmp_path / "shards").glob("*.parquet")) == []


def test_commit_refuses_after_another_run_replaced_the_cache(tmp_path):
    old = build_cache(tmp_path, shards=1)
    Manifest.open(tmp_path, identity(shard_size=8), {}, overwrite=True)
    records = make_records(2)
    with pytest.raises(MoekdError, match="replaced by a run with different settings"):
        old.commit(write_shard(tmp_path, 1, records, **spec_of(records, 500, False)))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "teacher-cache manifest not found"),
        ("{not json", "is not valid JSON"),
        ('{"format": "something-else"}', "is not a moekd teacher-cache manifest"),
        ('{"format": "moekd-teacher-cache", "version": 99}', "format version 99"),
        ('{"format": "moekd-teacher-cache", "version": 1, "identity": {}}', "is malformed"),
    ],
)
def test_manifest_load_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(MoekdError, match=message) as error:
        Manifest.load(tmp_path)
    assert "manifest.json" in str(error.value)


def test_a_cache_is_the_same_whatever_order_its_shards_were_committed_in(tmp_path):
    for name, order in (("a", [2, 0, 1]), ("b", [0, 1, 2])):
        manifest = Manifest.open(tmp_path / name, identity(), {"host": "h"}, overwrite=False)
        for i in order:
            records = make_records(4, first_id=4 * i, seed=i)
            manifest.commit(write_shard(tmp_path / name, i, records, **spec_of(records, 500, False)))
    files = {name: {p.relative_to(tmp_path / name): p.read_bytes() for p in sorted((tmp_path / name).rglob("*"))
                    if p.is_file()} for name in "ab"}
    assert files["a"] == files["b"]
    assert sorted(str(p) for p in files["a"] if str(p).startswith("commits")) == [
        f"commits/shard-{i:05d}.json" for i in range(3)]
    assert "shards" not in json.loads(files["a"][Path("manifest.json")])  # the records list the shards


def commit_all(directory, count, start, wins):
    """Child process: write and commit shards 0..count-1 of the cache, counting the commits it won."""
    start.wait()
    manifest = Manifest.open(directory, identity(), {}, overwrite=False)
    for i in range(count):
        records = make_records(1, first_id=i, seed=i, max_T=1)
        if manifest.commit(write_shard(directory, i, records, **spec_of(records, 500, False))):
            with wins.get_lock():
                wins.value += 1


def test_two_processes_racing_on_the_same_shards_commit_each_exactly_once(tmp_path):
    Manifest.open(tmp_path, identity(), {}, overwrite=False)
    context = multiprocessing.get_context("spawn")
    start, wins = context.Event(), context.Value("i", 0)
    workers = [context.Process(target=commit_all, args=(tmp_path, 30, start, wins)) for _ in range(2)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert wins.value == 30  # every shard has exactly one winner
    assert Manifest.load(tmp_path).committed() == set(range(30))
    assert len(list((tmp_path / "shards").glob("*.parquet"))) == 30 and verify_cache(tmp_path) == []


def test_a_shard_is_claimed_once_and_its_claim_goes_when_it_is_committed(tmp_path):
    first, second = (Manifest.open(tmp_path, identity(), {}, overwrite=False) for _ in range(2))
    assert first.claim(0) and not second.claim(0) and second.claim(1)
    records = make_records(4)
    first.commit(write_shard(tmp_path, 0, records, **spec_of(records, 500, False)))
    assert [p.name for p in (tmp_path / "claims").iterdir()] == ["shard-00001.json"]


def test_the_claim_of_a_writer_killed_as_it_commits_is_dropped_by_the_next(tmp_path, monkeypatch):
    manifest = Manifest.open(tmp_path, identity(), {}, overwrite=False)
    assert manifest.claim(0)
    real_create = LocalStore.create

    def create_then_die(store, name, data):
        created = real_create(store, name, data)
        if name.startswith("commits/"):
            raise KeyboardInterrupt  # killed right after the commit point
        return created

    monkeypatch.setattr(LocalStore, "create", create_then_die)
    records = make_records(4)
    with pytest.raises(KeyboardInterrupt):
        manifest.commit(write_shard(tmp_path, 0, records, **spec_of(records, 500, False)))
    assert manifest.claim(1)  # another shard, still being computed
    resumed = Manifest.load(tmp_path)
    assert resumed.committed() == {0} and len(list((tmp_path / "claims").iterdir())) == 2
    resumed.drop_stale_claims()
    assert [p.name for p in (tmp_path / "claims").iterdir()] == ["shard-00001.json"]


def test_a_killed_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = shards / f"shard-00000-{'0' * 16}.parquet.{host}-{dead.stdout.strip()}.tmp"
    live = shards / f"shard-00001-{'0' * 16}.parquet.{host}-{os.getpid()}.tmp"
    other_host = shards / f"shard-00002-{'0' * 16}.parquet.elsewhere-{dead.stdout.strip()}.tmp"
    for path in (left, live, other_host):
        path.write_bytes(b"PAR1 half")
    LocalStore(tmp_path).remove_dead_temporaries("shards")
    assert sorted(shards.iterdir()) == sorted([live, other_host])
    with atomic_path(shards / "x") as tmp:  # every writer's temporaries carry the tag
        assert tmp.name == f"x.{host}-{os.getpid()}.tmp"
        tmp.write_bytes(b"")


def test_a_losing_writer_removes_its_own_object_and_the_winner_removes_leftovers(tmp_path):
    manifest = Manifest.open(tmp_path, identity(), {}, overwrite=False)
    records = make_records(4, seed=0)
    other = make_records(4, seed=1)  # other bytes for the same shard: e.g. another GPU's rounding
    left_by_a_killed_writer = write_shard(tmp_path, 0, make_records(4, seed=2), **spec_of(records, 500, False))
    winner = write_shard(tmp_path, 0, records, **spec_of(records, 500, False))
    loser = write_shard(tmp_path, 0, other, **spec_of(other, 500, False))
    assert manifest.commit(winner)
    assert not (tmp_path / left_by_a_killed_writer.file).exists()
    assert not Manifest.load(tmp_path).commit(loser)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [Path(winner.file).name]
    assert Manifest.load(tmp_path).shards[0] == winner and verify_cache(tmp_path) == []


# ---------------------------------------------------------------- verify


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_record(directory, **fields):
    path = directory / "commits" / "shard-00001.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def rewrite_shard(directory, records, **spec):
    """Replace shard 1 by one written with `spec`, and commit it honestly (name, size and sha match)."""
    info = write_shard(directory, 1, records, **spec)
    edit_record(directory, **{k: v for k, v in vars(info).items() if k != "index"})


def unnormalised(directory):
    records = make_records(4, first_id=4, seed=1)
    for r in records:
        r.topk_logprobs = r.topk_logprobs + 3.0  # logits, not log-probabilities
    rewrite_shard(directory, records, vocab_size=500, k=8, num_samples=2, with_aggregate=False)


CORRUPTIONS = {
    "flipped bytes": (lambda d: flip_bytes(shard_file(d, 1)), "sha256 differs"),
    "truncated": (lambda d: truncate(shard_file(d, 1)), ("size is", "unreadable Parquet file")),
    "deleted": (lambda d: shard_file(d, 1).unlink(), "file is missing"),
    "wrong rows": (lambda d: edit_record(d, rows=5), "has 4 rows but the commit record says 5"),
    "wrong tokens": (lambda d: edit_record(d, tokens=999), "but the commit record says 999 tokens"),
    "wrong schema": (lambda d: rewrite_shard(d, make_records(4, first_id=4, aggregate=True), vocab_size=500, k=8,
                                             num_samples=2, with_aggregate=True), "schema is"),
    "wrong encoding": (lambda d: rewrite_shard(d, make_records(4, first_id=4, k=4), vocab_size=500, k=4,
                                               num_samples=2, with_aggregate=False), "encoding metadata differs"),
    "unnormalised": (unnormalised, "not normalised log-probabilities"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_verify_names_the_corrupted_shard(tmp_path, kind):
    build_cache(tmp_path)
    assert verify_cache(tmp_path) == []
    corrupt, messages = CORRUPTIONS[kind]
    corrupt(tmp_path)
    problems = verify_cache(tmp_path)
    assert problems and all(re.match(r"shard 1 \(shards/shard-00001-[0-9a-f]{16}\.parquet\): ", p) for p in problems)
    for message in [messages] if isinstance(messages, str) else messages:
        assert any(message in p for p in problems), problems


def test_read_shard_reports_a_corrupt_file_as_a_user_error(tmp_path):
    build_cache(tmp_path)
    truncate(shard_file(tmp_path, 1))
    with pytest.raises(MoekdError, match="shard-00001-"):
        read_shard(shard_file(tmp_path, 1))
    with pytest.raises(MoekdError, match="shard-00001-"):
        read_shard_index(shard_file(tmp_path, 1))


def test_encodings_bench_measures_what_the_cache_stores(tmp_path):
    """bench/cache_encodings.py: at the cache's own k it writes the shard's teacher columns to the byte
    count the shard has; fewer ids hold less mass in fewer bytes; top-p holds at least p where it can;
    8-bit log-probs with the tail stored add a KL far below the float16 rounding's scale."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cache_encodings

    records = make_records(40, M=2, k=16, vocab=3000, min_T=4, max_T=12)
    write_shard(tmp_path, 0, records, **spec_of(records, 3000, False))
    metadata = pq.ParquetFile(shard_file(tmp_path, 0)).metadata
    teacher_bytes = sum(metadata.row_group(g).column(c).total_compressed_size
                        for g in range(metadata.num_row_groups) for c in range(metadata.num_columns)
                        if metadata.row_group(g).column(c).path_in_schema.startswith("topk_"))
    positions = sum(len(r.positions) for r in records)
    full, small = (cache_encodings.measure(records, "top-k", None, k, False) for k in (16, 4))
    assert abs(full["bytes"] * positions - teacher_bytes) < 0.05 * teacher_bytes  # one file vs row groups
    assert full["ids"] == 32 and small["ids"] == 8 and small["mass"] < full["mass"] and small["bytes"] < full["bytes"]
    top_p = cache_encodings.measure(records, "top-p", 0.5, None, False)
    assert top_p["mass"] >= min(0.5, full["mass"]) - 1e-6
    eight = cache_encodings.measure(records, "8-bit", None, 16, True)
    assert eight["mass"] == full["mass"] and 0 < eight["kl"] < 1e-3


# ---------------------------------------------------------------- a cache is whole, or refused and repaired

ROWS, SHARD_ROWS = 14, 4  # shards of 4, 4, 4 and 2 rows


def laid_out_identity() -> CacheIdentity:
    """An identity that says how its rows are sharded, as `moekd cache` writes it."""
    return identity(rows=ROWS, shard_size=SHARD_ROWS, num_shards=4)


def shard_records(index, seed=0):
    count = min(SHARD_ROWS, ROWS - index * SHARD_ROWS)
    return make_records(count, first_id=index * SHARD_ROWS, seed=index + 100 * seed)


def write_and_commit(manifest, directory, index, seed=0) -> bool:
    records = shard_records(index, seed)
    return manifest.commit(write_shard(directory, index, records, **spec_of(records, 500, False)))


def laid_out_cache(directory, shards=range(4)) -> Manifest:
    manifest = Manifest.open(directory, laid_out_identity(), {}, overwrite=False)
    for index in shards:
        write_and_commit(manifest, directory, index)
    return manifest


def resume(directory, verify=False) -> Manifest:
    """What `moekd cache` does on resume: open the cache, then compute and commit each shard it does not trust."""
    manifest = Manifest.open(directory, laid_out_identity(), {}, overwrite=False, verify=verify)
    for index in sorted(set(range(4)) - manifest.committed()):
        assert write_and_commit(manifest, directory, index)
    return manifest


def commit_record(directory, index):
    return directory / "commits" / f"shard-{index:05d}.json"


def test_a_cache_missing_a_record_is_incomplete_to_every_reader_and_resumed(tmp_path):
    laid_out_cache(tmp_path)
    commit_record(tmp_path, 2).unlink()
    assert verify_cache(tmp_path) == ["1 of the 4 shards the identity announces have no commit record: 2"]
    with pytest.raises(MoekdError, match=r"is incomplete: 3 of 4 shards committed; 1 missing \(2\): finish it"):
        Manifest.load(tmp_path, whole=True)
    assert Manifest.load(tmp_path).missing() == [2]  # a cache being written may be read as far as it goes
    assert verify_cache(tmp_path, whole=False) == []
    assert resume(tmp_path).committed() == {0, 1, 2, 3}
    assert verify_cache(tmp_path) == []


def test_runs_of_missing_shards_are_named_as_ranges(tmp_path):
    laid_out_cache(tmp_path, shards=[1])
    with pytest.raises(MoekdError, match=r"1 of 4 shards committed; 3 missing \(0, 2-3\)"):
        Manifest.load(tmp_path, whole=True)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(rows=3), r"says shard 1 has 3 rows, but the identity's rows and shard_size give it 4"),
    (lambda r: r.update(rows=0, tokens=0), "says shard 1 has 0 rows"),
    (lambda r: r.update(bytes=r["bytes"] + 1), r"its file shards/shard-00001-\w+\.parquet is \d+ bytes, not the"),
    (lambda r: r.update(cache="0" * 64), "does not belong to this cache"),
    (lambda r: r.update(sha256="f" * 64), r"record.file is"),
])
def test_a_record_at_odds_with_the_identity_is_refused_and_replaced_on_resume(tmp_path, edit, message):
    laid_out_cache(tmp_path)
    record = json.loads(commit_record(tmp_path, 1).read_text())
    edit(record)
    commit_record(tmp_path, 1).write_text(json.dumps(record))
    if "its file" not in message:  # a wrong size is the writer's cheap check; readers hash what they read
        with pytest.raises(MoekdError, match=message) as error:
            Manifest.load(tmp_path)
        assert "\n" not in str(error.value) and "`moekd cache` with the cache's settings" in str(error.value)
        assert any(re.search(message, p) for p in verify_cache(tmp_path))
    resumed = resume(tmp_path)
    assert resumed.committed() == {0, 1, 2, 3} and not resumed.untrusted
    assert verify_cache(tmp_path) == []
    assert json.loads(commit_record(tmp_path, 1).read_text())["rows"] == 4


def test_records_of_shards_the_identity_does_not_announce_are_refused_and_deleted_on_resume(tmp_path):
    laid_out_cache(tmp_path)
    commit_record(tmp_path, 1).rename(commit_record(tmp_path, 7))  # shard 7 of 4, and shard 1 missing
    problems = verify_cache(tmp_path)
    assert len(problems) == 2 and "is named for shard 7 but describes shard 1" in problems[0]
    assert problems[1].endswith("have no commit record: 1")
    resume(tmp_path)
    assert not commit_record(tmp_path, 7).exists() and verify_cache(tmp_path) == []


def test_a_damaged_shard_is_recomputed_on_resume(tmp_path):
    laid_out_cache(tmp_path)
    truncate(shard_file(tmp_path, 1))  # found by its size: every resume checks it
    flip_bytes(shard_file(tmp_path, 2))  # the same size: found by verify=true, which hashes every shard
    assert Manifest.open(tmp_path, laid_out_identity(), {}, overwrite=False).committed() == {0, 2, 3}
    resume(tmp_path)
    flipped = str(shard_file(tmp_path, 2).relative_to(tmp_path))
    assert {p.split(":")[0] for p in verify_cache(tmp_path)} == {f"shard 2 ({flipped})"}
    assert resume(tmp_path, verify=True).committed() == {0, 1, 2, 3}
    assert verify_cache(tmp_path) == []
    assert len(list((tmp_path / "shards").iterdir())) == 4  # the same bytes again: rewritten in place


def test_a_shard_recomputed_to_other_bytes_replaces_its_record(tmp_path):
    """Another machine's rounding gives other bytes: a new object and a new record; the damaged object is left
    behind, named by no record."""
    laid_out_cache(tmp_path)
    damaged = shard_file(tmp_path, 1)
    truncate(damaged)
    first, second = (Manifest.open(tmp_path, laid_out_identity(), {}, overwrite=False) for _ in range(2))
    assert write_and_commit(first, tmp_path, 1, seed=1)
    assert not write_and_commit(second, tmp_path, 1, seed=2)  # the first's record names a whole file: it stays
    assert verify_cache(tmp_path) == [] and damaged.exists()
    assert Manifest.load(tmp_path).shards[1].file != str(damaged.relative_to(tmp_path))


RACED = 30


def racing_identity() -> CacheIdentity:
    return identity(rows=RACED, shard_size=1, num_shards=RACED)


def repair_all(directory, seed, start):
    """Child process: open the cache and compute every shard it does not trust, to bytes of its own."""
    start.wait()
    manifest = Manifest.open(directory, racing_identity(), {}, overwrite=False)
    for index in sorted(set(range(RACED)) - manifest.committed()):
        records = make_records(1, first_id=index, seed=index + 1000 * seed, max_T=1)
        manifest.commit(write_shard(directory, index, records, **spec_of(records, 500, False)))


def test_writers_repairing_the_same_shards_at_once_leave_a_whole_cache(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    start.set()
    repair_all(tmp_path, 0, start)
    for path in (tmp_path / "shards").iterdir():
        truncate(path)
    start.clear()
    workers = [context.Process(target=repair_all, args=(tmp_path, seed, start)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert Manifest.load(tmp_path, whole=True).committed() == set(range(RACED)) and verify_cache(tmp_path) == []


def test_a_fifo_in_place_of_a_record_is_refused_without_blocking_and_replaced(tmp_path):
    laid_out_cache(tmp_path)
    commit_record(tmp_path, 0).unlink()
    os.mkfifo(commit_record(tmp_path, 0))
    with no_hang(), pytest.raises(MoekdError, match=r"shard-00000.json \(cache file\) is a FIFO, not a regular"):
        Manifest.load(tmp_path)
    with no_hang():
        assert "is a FIFO" in verify_cache(tmp_path)[0]
        resume(tmp_path)
    assert verify_cache(tmp_path) == [] and commit_record(tmp_path, 0).is_file()


@pytest.mark.parametrize("content, message", [
    (None, r"manifest.json \(cache file\) is a directory, not a regular file"),
    ("fifo", r"manifest.json \(cache file\) is a FIFO, not a regular file"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "is nested more than 64 levels deep"),
    ("[" * 65 + "]" * 65, "is nested more than 64 levels deep"),
    ('{"format": "moekd-teacher-cache", "version": 3' + "0" * 5000 + "}", "holds a number of 5001 characters"),
    ('{"format": "moekd-teacher-cache", "version": 1.' + "5" * 200 + "}", "holds a number of 202 characters"),
])
def test_a_manifest_that_is_not_what_it_claims_is_one_line(tmp_path, content, message):
    if content is None:
        (tmp_path / "manifest.json").mkdir()
    elif content == "fifo":
        os.mkfifo(tmp_path / "manifest.json")
    else:
        (tmp_path / "manifest.json").write_text(content)
    with no_hang(), pytest.raises(MoekdError, match=message) as error:
        Manifest.load(tmp_path)
    assert "\n" not in str(error.value)
    if content is not None:  # a writer told to overwrite replaces it (a directory it leaves for a person)
        assert Manifest.open(tmp_path, laid_out_identity(), {}, overwrite=True).committed() == set()
        assert Manifest.load(tmp_path).identity == laid_out_identity()


def test_a_layout_that_does_not_add_up_is_malformed(tmp_path):
    Manifest.open(tmp_path, identity(rows=ROWS, shard_size=SHARD_ROWS, num_shards=4), {}, overwrite=False)
    written = json.loads((tmp_path / "manifest.json").read_text())  # as another writer might have made it:
    written["identity"]["num_shards"] = 3  # no identity moekd makes is malformed
    (tmp_path / "manifest.json").write_text(json.dumps(written))
    with pytest.raises(MoekdError, match="identity.num_shards is 3, but 14 rows in shards of 4 make 4"):
        Manifest.load(tmp_path)
