"""Caches in a dataset repository on the Hugging Face Hub (`hf://datasets/ORG/NAME`), against a local stand-in of
the Hub's HTTP API (`hubserver.py`) driven by huggingface_hub itself: the same bytes as on disk, read back and
trained on, create-if-absent atomic under racing writers, concurrent writers, a cache in a folder of a branch,
and a missing repository, a wrong token or a dead endpoint named in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import fixtures
from hubserver import READ_TOKEN, hub, hub_server  # noqa: F401 - fixtures
from pipeline.cache import remote
from pipeline.cache.manifest import Manifest
from pipeline.cache.hub import HUB_COMMIT_ATTEMPTS, HubStore
from pipeline.cache.storage import RemoteStore, open_store
from pipeline.core.errors import MoekdError
from pipeline.student.losses import LossConfig
from pipeline.student.trainer import OptimConfig
from stages import train
from stages.cli import main

CACHE = ["top_k=8", "shard_size=4", "batch_size=4", "device=cpu", "routing.mode=ka", "routing.samples=2",
         "routing.lam=0.5"]
COMPARED = ("loss", "ce", "kd", "lr", "grad_norm", "tokens")
URL = "hf://datasets/team/cache"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.prepared_records(tmp_path_factory.mktemp("hub"), tokenizer_dir, 24, seed=5)


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, moe_dir, prepared) -> Path:
    """The reference: the same cache written to local disk."""
    output = tmp_path_factory.mktemp("local") / "cache"
    run_cache(str(output), moe_dir("mixtral"), prepared)
    return output


def create_repo(repo_id: str = "team/cache") -> None:
    from huggingface_hub import HfApi

    HfApi().create_repo(repo_id, repo_type="dataset", private=True)  # HF_ENDPOINT and HF_TOKEN: the `hub` fixture's


def run_cache(output: str, teacher: Path, data: Path, *extra: str) -> None:
    assert main(["cache", output, f"teacher={teacher}", f"data={data}", *CACHE, *extra]) == 0


def cache_command(output: str, teacher: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "cache", output, f"teacher={teacher}", f"data={data}", *CACHE]


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def repo_files(server, repo_id: str = "team/cache", folder: str = "", revision: str = "main") -> dict[str, bytes]:
    """Every file under `folder` of the repository as the Hub holds it (the Hub's own .gitattributes left out)."""
    prefix = folder + "/" if folder else ""
    return {path.removeprefix(prefix): data for path, data in server.files(repo_id, revision).items()
            if path.startswith(prefix) and path != ".gitattributes"}


def train_metrics(output: Path, student: Path, cache_location: str, **settings) -> list[dict]:
    settings = dict(batch_size=4, max_steps=4, save_every=0, device="cpu", dtype="float32",
                    optim=OptimConfig(lr=3e-3, warmup_steps=2), loss=LossConfig(alpha=0.5)) | settings
    train.run(train.Config(output=str(output), student=str(student), cache=cache_location, **settings))
    return [{k: m[k] for k in COMPARED} for m in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]


def one_line_refusal(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "it/s]" not in line)  # progress bars
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_cache_on_the_hub_is_the_local_cache_byte_for_byte_and_training_reads_it(
        tmp_path, hub, local_cache, moe_dir, prepared, student_dir, capsys):  # noqa: F811
    from huggingface_hub import HfFileSystem

    create_repo()
    run_cache(URL, moe_dir("mixtral"), prepared)
    assert isinstance(open_store(URL), HubStore) and isinstance(open_store(URL), RemoteStore)
    assert repo_files(hub) == files(local_cache)  # manifest, commit records, shards, README.md; no claims left
    # ... and a plain Hub client reads the same (the tree API in pages, resolve GETs):
    fs = HfFileSystem(skip_instance_cache=True)
    assert {path.removeprefix("datasets/team/cache/"): fs.cat_file(path) for path in fs.find("datasets/team/cache")
            if not path.endswith(".gitattributes")} == files(local_cache)
    capsys.readouterr()
    assert main(["verify", URL]) == 0 and "every shard matches" in capsys.readouterr().out
    commits = len(hub.history("team/cache"))
    run_cache(URL, moe_dir("mixtral"), prepared)  # resumes: nothing left to write, nothing committed
    assert "nothing left to write" in capsys.readouterr().out and len(hub.history("team/cache")) == commits

    remote, local = Manifest.load(URL, whole=True), Manifest.load(local_cache, whole=True)
    assert remote.shards == local.shards
    for index in remote.shards:
        assert remote.shard_bytes(index) == local.shard_bytes(index)
        assert [r.seq_id for r in remote.read_shard(index)] == [r.seq_id for r in local.read_shard(index)]
        seq_ids, counts = remote.read_shard_index(index)  # from a seekable file of ranged GETs
        assert (list(seq_ids), list(counts)) == tuple(map(list, local.read_shard_index(index)))
    assert train_metrics(tmp_path / "remote", student_dir, URL, cache_top_k=4) == \
        train_metrics(tmp_path / "local", student_dir, str(local_cache), cache_top_k=4)


def test_a_cache_in_a_folder_of_a_branch(hub, local_cache, moe_dir, prepared, capsys):  # noqa: F811
    from huggingface_hub import HfApi

    create_repo()
    HfApi().create_branch("team/cache", branch="dev", repo_type="dataset")
    url = "hf://datasets/team/cache@dev/runs/first"
    run_cache(url, moe_dir("mixtral"), prepared)
    assert repo_files(hub, folder="runs/first", revision="dev") == files(local_cache)
    assert repo_files(hub) == {}  # main is untouched
    capsys.readouterr()
    assert main(["verify", url]) == 0 and "every shard matches" in capsys.readouterr().out
    head = hub.history("team/cache", "dev")[0].oid
    pinned = f"hf://datasets/team/cache@{head}/runs/first"  # a commit id: read as it was then, never written
    assert Manifest.load(pinned, whole=True).shards == Manifest.load(local_cache).shards
    with pytest.raises(MoekdError, match=f"names commit {head}: a cache there can be read, not written"):
        open_store(pinned).put("README.md", b"")


def test_a_store_sees_what_another_committed_at_once_and_reads_no_more_than_it_may(hub):  # noqa: F811
    create_repo()
    a, b = HubStore(URL), HubStore(URL)  # two stores, as two processes have
    assert a.list("shards") == [] and not a.exists("shards/x.parquet")
    b.put("shards/x.parquet", bytes(range(200)))
    b.put("commits/shard-00000.json", b"")
    assert a.list("shards") == ["shards/x.parquet"] and a.sizes("commits") == {"commits/shard-00000.json": 0}
    assert a.read("shards/x.parquet", 200) == bytes(range(200)) and a.read("commits/shard-00000.json", 10) == b""
    with pytest.raises(MoekdError, match="x.parquet \\(cache file\\) is more than the 20 bytes it may have"):
        a.read("shards/x.parquet", 20)
    assert hub.ranges[-1] == "bytes=0-20"  # 21 bytes asked for, not 200
    with a.open("shards/x.parquet") as f:
        f.seek(-10, 2)
        assert f.read() == bytes(range(190, 200)) and f.tell() == 200
    b.delete("shards/x.parquet")
    assert a.list("shards") == []
    with pytest.raises(FileNotFoundError):
        a.read("shards/x.parquet", 200)


def test_create_is_atomic_for_two_stores_racing_for_one_name(hub, monkeypatch):  # noqa: F811
    create_repo()
    a, b = HubStore(URL), HubStore(URL)

    # Both read the same head and find the name absent; the Hub holds their commits until both have come, then
    # applies one and refuses the other (412), whose creator finds the name there on its re-check.
    name, results = "claims/shard-00000.json", {}
    hub.hold_commits(2)
    racers = [threading.Thread(target=lambda s=s, tag=tag: results.update({tag: s.create(name, tag.encode())}))
              for s, tag in ((a, "a"), (b, "b"))]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(results.values()) == [False, True] and hub.refused == 1
    winner = next(tag for tag, won in results.items() if won)
    assert hub.files("team/cache")[name] == winner.encode()
    assert [c.title for c in hub.history("team/cache")].count(f"moekd: create {name}") == 1
    commits = len(hub.history("team/cache"))
    assert not a.create(name, b"other") and len(hub.history("team/cache")) == commits  # there: nothing committed

    # The other writer commits the name between this one's reading the head and committing: with the same bytes
    # huggingface_hub commits nothing (the Hub already holds them), with other bytes the Hub refuses the commit.
    for same, name in ((True, "commits/shard-00001.json"), (False, "commits/shard-00002.json")):
        head, interleaved = a._head, []

        def head_then_b_creates(name=name, head=head, interleaved=interleaved):
            found = head()
            if not interleaved:
                interleaved.append(b.create(name, b"b"))
            return found

        refused = hub.refused
        with monkeypatch.context() as patch:
            patch.setattr(a, "_head", head_then_b_creates)
            assert a.create(name, b"b" if same else b"a") is False and interleaved == [True]
        assert hub.files("team/cache")[name] == b"b" and hub.refused == refused + (not same)


def test_commits_the_hub_refuses_because_another_landed_first_are_tried_again(hub, monkeypatch):  # noqa: F811
    monkeypatch.setattr(HubStore, "_backoff", staticmethod(lambda attempt: None))
    create_repo()
    store = HubStore(URL)
    hub.refuse_commits(2)
    store.put("shards/a.parquet", b"a")
    hub.refuse_commits(2)
    assert store.create("commits/shard-00000.json", b"{}")
    hub.refuse_commits(2)
    store.delete("shards/a.parquet")
    assert hub.refused == 6 and set(repo_files(hub)) == {"commits/shard-00000.json"}
    hub.refuse_commits(HUB_COMMIT_ATTEMPTS)
    with pytest.raises(MoekdError, match=f"each of {HUB_COMMIT_ATTEMPTS} commits to branch main of team/cache was "
                                         "refused because another writer's commit landed first"):
        store.put("shards/b.parquet", b"b")
    store.delete("shards/never-there.parquet")  # nothing to delete: nothing committed, no error


def test_two_writers_on_one_hub_cache_commit_each_shard_once(hub, local_cache, moe_dir, prepared):  # noqa: F811
    create_repo()
    command, env = cache_command(URL, moe_dir("mixtral"), prepared), fixtures.SUBPROCESS_ENV | hub.env()
    # Both writers' first commits (the manifest's) are held until both have come, so they race from there on,
    # each commit taking as long as a few shards take to compute.
    hub.hold_commits(2, timeout=120)
    hub.commit_delay = 0.02
    writers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in outputs]
    written = [int(out.split("wrote ")[1].split(" shards")[0]) if "wrote " in out else 0 for out, _ in outputs]
    assert sum(written) == 6 and hub.refused >= 1  # the manifest's creators raced; one lost and resumed
    assert repo_files(hub) == files(local_cache)


def test_a_missing_repository_a_wrong_token_or_a_dead_endpoint_is_one_line(
        hub, moe_dir, prepared, monkeypatch, capsys):  # noqa: F811
    create_repo()
    assert "teacher-cache manifest not found" in one_line_refusal(capsys, "verify", URL)
    err = one_line_refusal(capsys, "verify", "hf://datasets/team/nothing")
    assert "dataset repository team/nothing not found" in err and "hf repos create team/nothing" in err
    assert "has no branch 'nope'" in one_line_refusal(capsys, "verify", "hf://datasets/team/cache@nope/x")
    assert "in dataset repositories" in one_line_refusal(capsys, "verify", "hf://team/model-repo")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)  # may read, not write
    err = one_line_refusal(capsys, "cache", URL, f"teacher={moe_dir('mixtral')}", f"data={prepared}", *CACHE)
    assert "access denied" in err and "HF_TOKEN" in err and "write" in err
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert "access denied (Invalid credentials in Authorization header (HTTP 401))" in \
        one_line_refusal(capsys, "verify", URL)
    monkeypatch.delenv("HF_TOKEN")  # anonymous: the Hub does not say whether a private repository exists
    assert "not found at" in one_line_refusal(capsys, "verify", URL)
    monkeypatch.setattr(remote.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    err = one_line_refusal(capsys, "verify", URL)
    assert "ConnectError" in err and "check the endpoint (HF_ENDPOINT)" in err and "after 4 attempts" in err
