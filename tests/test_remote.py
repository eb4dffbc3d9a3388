"""Caches on object storage, against a real S3 server (SeaweedFS on loopback, `s3server.py`): the same bytes as
on disk, resume after SIGKILL, concurrent writers, training while the cache is written, damage named and
repaired, bounded reads, bad or missing credentials named, and only transient failures retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

import fixtures
from pipeline.cache.manifest import Manifest, verify_cache
from pipeline.cache.storage import RemoteStore
from pipeline.core.errors import MoekdError
from pipeline.student.losses import LossConfig
from pipeline.student.trainer import OptimConfig
from s3server import s3_bucket, s3_server  # noqa: F401 - fixtures
from stages import train
from stages.cli import main

CACHE = ["top_k=8", "shard_size=4", "batch_size=4", "device=cpu", "routing.mode=ka", "routing.samples=2",
         "routing.lam=0.5"]
COMPARED = ("loss", "ce", "kd", "lr", "grad_norm", "tokens")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir) -> Path:
    return fixtures.prepared_records(tmp_path_factory.mktemp("remote"), tokenizer_dir, 40, seed=5)


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, moe_dir, prepared) -> Path:
    """The reference: the same cache written to local disk."""
    output = tmp_path_factory.mktemp("local") / "cache"
    run_cache(str(output), moe_dir("mixtral"), prepared)
    return output


@pytest.fixture
def bucket(s3_server, s3_bucket, monkeypatch) -> str:  # noqa: F811 - pytest fixtures by name
    """s3://<a fresh bucket>, reachable from this process and from subprocesses (`env`) as users configure it."""
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.storage_options())
    return f"s3://{s3_bucket}"


def env(server) -> dict:
    return fixtures.SUBPROCESS_ENV | {"FSSPEC_S3": json.dumps(server.storage_options())}


def run_cache(output: str, teacher: Path, data: Path, *extra: str) -> None:
    assert main(["cache", output, f"teacher={teacher}", f"data={data}", *CACHE, *extra]) == 0


def cache_command(output: str, teacher: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "stages.cli", "cache", output, f"teacher={teacher}", f"data={data}", *CACHE]


def objects(server, url: str) -> dict[str, bytes]:
    """Every object under an s3:// prefix, by path relative to it."""
    fs, root = server.filesystem(), url.removeprefix("s3://")
    return {path.removeprefix(root + "/"): fs.cat_file(path) for path in fs.find(root)}


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def train_metrics(output: Path, student: Path, cache_location: str, **settings) -> list[dict]:
    settings = dict(batch_size=4, max_steps=6, save_every=0, device="cpu", dtype="float32",
                    optim=OptimConfig(lr=3e-3, warmup_steps=2), loss=LossConfig(alpha=0.5)) | settings
    train.run(train.Config(output=str(output), student=str(student), cache=cache_location, **settings))
    return [{k: m[k] for k in COMPARED} for m in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]


def test_a_cache_on_s3_is_the_local_cache_byte_for_byte_and_every_stage_reads_it(
        tmp_path, s3_server, bucket, local_cache, moe_dir, prepared, student_dir, capsys):  # noqa: F811
    url = f"{bucket}/team/cache"
    run_cache(url, moe_dir("mixtral"), prepared)
    assert objects(s3_server, url) == files(local_cache)  # manifest, commit records, shards; no claims left
    capsys.readouterr()
    assert main(["verify", url]) == 0 and "every shard matches" in capsys.readouterr().out
    assert main(["inspect", url]) == 0 and f"cache      {url}" in capsys.readouterr().out
    run_cache(url, moe_dir("mixtral"), prepared)  # resumes: nothing left to write
    assert "nothing left to write" in capsys.readouterr().out
    assert main(["cache", url, f"teacher={moe_dir('mixtral')}", f"data={prepared}", *CACHE, "routing.lam=0.25"]) == 2
    assert "routing.lam is 0.5 in the cache but 0.25 now" in capsys.readouterr().err
    remote = train_metrics(tmp_path / "remote", student_dir, url, cache_top_k=4)
    assert remote == train_metrics(tmp_path / "local", student_dir, str(local_cache), cache_top_k=4)
    assert main(["eval", "--output", str(tmp_path / "eval"), f"models={{s: {student_dir}}}", f"data=[{prepared}]",
                 "--cache", url, "--no-generate", "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["cache"]["path"] == url


def test_sigkill_then_resume_on_s3_is_byte_identical(s3_server, bucket, local_cache, moe_dir, prepared):  # noqa: F811
    url, fs = f"{bucket}/cache", s3_server.filesystem()
    command = cache_command(url, moe_dir("mixtral"), prepared)
    victim = subprocess.Popen(command, env=env(s3_server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(fs.ls(f"{url[5:]}/commits", refresh=True) if fs.exists(f"{url[5:]}/commits") else []) < 3:
        assert victim.poll() is None and time.monotonic() < deadline, "the writer ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    committed = len(Manifest.load(url).committed())
    assert 3 <= committed < 10, "the kill must land mid-run for this test to mean anything"
    resumed = subprocess.run(command, env=env(s3_server), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{committed} already committed" in resumed.stdout
    assert objects(s3_server, url) == files(local_cache)


def test_two_writers_on_one_s3_cache_commit_each_shard_once(s3_server, bucket, local_cache, moe_dir,  # noqa: F811
                                                          prepared):
    url = f"{bucket}/cache"
    command = cache_command(url, moe_dir("mixtral"), prepared)
    writers = [subprocess.Popen(command, env=env(s3_server), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    written = [int(out.split("wrote ")[1].split(" shards")[0]) if "wrote " in out else 0 for out in outputs]
    assert sum(written) == 10
    assert objects(s3_server, url) == files(local_cache)


def test_training_follows_an_s3_cache_while_it_is_written(tmp_path, s3_server, bucket, local_cache, moe_dir,  # noqa: F811
                                                         prepared, student_dir, capsys):
    url = f"{bucket}/cache"
    run_cache(url, moe_dir("mixtral"), prepared, "worker=1", "num_workers=2")  # odd shards first: 0 is missing
    later = threading.Thread(target=lambda: (time.sleep(2), subprocess.run(
        cache_command(url, moe_dir("mixtral"), prepared) + ["worker=0", "num_workers=2"], env=env(s3_server),
        check=True, capture_output=True)))
    later.start()  # the even shards, written while the student trains
    settings = dict(follow=True, max_steps=None, epochs=1, shuffle_shards=2)
    followed = train_metrics(tmp_path / "followed", student_dir, url, **settings)
    later.join()
    assert "follow: waiting for shard 0 of the teacher cache" in capsys.readouterr().out
    assert followed == train_metrics(tmp_path / "local", student_dir, str(local_cache), **settings)
    assert objects(s3_server, url) == files(local_cache)


def test_a_shard_damaged_in_the_bucket_is_caught(tmp_path, s3_server, bucket, moe_dir, prepared, student_dir,  # noqa: F811
                                                 capsys):
    url = f"{bucket}/cache"
    run_cache(url, moe_dir("mixtral"), prepared)
    shard = Manifest.load(url).shards[3]
    fs = s3_server.filesystem()
    data = bytearray(fs.cat_file(f"{url[5:]}/{shard.file}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{url[5:]}/{shard.file}", bytes(data))
    assert [p.split(":")[0] for p in verify_cache(url)] == [f"shard 3 ({shard.file})"]
    with pytest.raises(MoekdError, match="does not match its commit record"):
        Manifest.load(url).read_shard(3)
    with pytest.raises(MoekdError, match=f"shard {url}/{shard.file} does not match its commit record"):
        train_metrics(tmp_path / "run", student_dir, url, max_steps=None, epochs=1)  # stops when it reaches it


def test_bad_credentials_a_missing_bucket_or_a_dead_endpoint_are_one_line(s3_server, bucket, monkeypatch,  # noqa: F811
                                                                        capsys):
    def refusal(url: str, **options) -> str:
        monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.storage_options(**options))
        capsys.readouterr()
        assert main(["verify", url]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "teacher-cache manifest not found" in refusal(f"{bucket}/nothing")
    assert "access denied" in refusal(f"{bucket}/nothing", secret="wrong")
    assert "bucket does not exist" in refusal("s3://no-such-bucket-here/cache")
    dead = {"endpoint_url": "http://127.0.0.1:9"}
    assert "check the endpoint" in refusal(f"{bucket}/cache", client_kwargs=dead)


def test_an_s3_cache_missing_a_record_or_holding_damage_is_refused_then_repaired_by_moekd_cache(
        s3_server, bucket, local_cache, moe_dir, prepared, capsys):  # noqa: F811
    url, fs = f"{bucket}/cache", s3_server.filesystem()
    run_cache(url, moe_dir("mixtral"), prepared)
    root, shards = url[5:], Manifest.load(url).shards
    fs.rm_file(f"{root}/commits/shard-00002.json")  # its writer killed before it committed
    record = json.loads(fs.cat_file(f"{root}/commits/shard-00003.json")) | {"rows": 3}
    fs.pipe_file(f"{root}/commits/shard-00003.json", json.dumps(record).encode())
    fs.pipe_file(f"{root}/{shards[5].file}", fs.cat_file(f"{root}/{shards[5].file}")[:100])
    flipped = bytearray(fs.cat_file(f"{root}/{shards[7].file}"))
    flipped[len(flipped) // 2] ^= 0x01
    fs.pipe_file(f"{root}/{shards[7].file}", bytes(flipped))
    problems = verify_cache(url)
    assert "shard-00003.json says shard 3 has 3 rows, but the identity's rows and shard_size give it 4" in problems[0]
    assert problems[1] == "1 of the 10 shards the identity announces have no commit record: 2"
    assert [p.split(" (")[0] for p in problems[2:]] == ["shard 5", "shard 5", "shard 7"]  # size, Parquet; sha256
    with pytest.raises(MoekdError, match="says shard 3 has 3 rows"):
        Manifest.load(url)
    capsys.readouterr()
    run_cache(url, moe_dir("mixtral"), prepared, "verify=true")
    out = capsys.readouterr().out
    assert all(f"shard {index} is computed again" in out for index in (3, 5, 7))
    assert verify_cache(url) == [] and objects(s3_server, url) == files(local_cache)


def test_reads_from_a_bucket_are_bounded_and_an_empty_object_is_read(s3_server, bucket, moe_dir,  # noqa: F811
                                                                     prepared):
    url, fs = f"{bucket}/cache", s3_server.filesystem()
    run_cache(url, moe_dir("mixtral"), prepared)
    fs.pipe_file(f"{url[5:]}/commits/shard-00001.json", b"")  # S3 answers a ranged read of it with 416
    fs.pipe_file(f"{url[5:]}/commits/shard-00002.json", b" " * (1 << 20))
    problems = verify_cache(url)
    assert "shard-00001.json is not valid JSON" in problems[0]
    assert "shard-00002.json (cache file) is more than the 65536 bytes it may have" in problems[1]
    run_cache(url, moe_dir("mixtral"), prepared)
    assert verify_cache(url) == []


def test_missing_credentials_are_named_as_such(s3_server, bucket, monkeypatch, capsys):  # noqa: F811
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {key: value for key, value in s3_server.storage_options().items() if key not in ("key", "secret")}
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    capsys.readouterr()
    assert main(["verify", f"{bucket}/cache"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no credentials found" in err, err
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err and "endpoint" not in err


class FailingFilesystem:
    """An fsspec filesystem whose reads fail as s3fs reports an S3 error response, counting the attempts."""

    protocol = "s3"

    def __init__(self, status: int, code: str):
        self.status, self.code, self.calls = status, code, 0

    def size(self, path):
        return 1000

    def cat_file(self, path, start=None, end=None):
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        self.calls += 1
        raise translate_boto_error(ClientError({"Error": {"Code": self.code, "Message": f"the server said {self.code}"},
                                                "ResponseMetadata": {"HTTPStatusCode": self.status}}, "GetObject"))


@pytest.mark.parametrize("status, code, attempts", [(400, "InvalidArgument", 1), (416, "InvalidRange", 1),
                                                    (501, "NotImplemented", 1), (503, "SlowDown", 4),
                                                    (500, "InternalError", 4), (400, "RequestTimeout", 4)])
def test_only_transient_failures_are_retried(status, code, attempts, monkeypatch):
    monkeypatch.setattr("pipeline.cache.remote.time.sleep", lambda seconds: None)
    failing = FailingFilesystem(status, code)
    store = RemoteStore(failing, "bucket/cache", "s3://bucket/cache")
    message = f"s3://bucket/cache/manifest.json: the server said {code} \\(HTTP {status}\\)"
    with pytest.raises(MoekdError, match=message):
        store.read("manifest.json", 1000)
    assert failing.calls == attempts


def test_offline_mode_is_one_line_at_once(capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: tests never reach a hub
    started = time.monotonic()
    assert main(["verify", "hf://datasets/someone/some-cache"]) == 2
    err = capsys.readouterr().err
    assert "offline mode is enabled" in err and "attempts" not in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 3  # four attempts would sleep 3.5 s
