"""A throwaway SeaweedFS (``weed mini``) on loopback: a real S3 API for integration tests.

``run_seaweedfs(weed)`` starts one in a temp dir, with free ports and one identity whose
access and secret keys are random, waits until S3 answers signed requests, and kills it
on exit (SIGKILL: the data is thrown away anyway). Buckets are not auto-created on
upload (``-s3.autoCreateBucket=false``), so a missing bucket fails as it does on S3.
``run_weed_process(weed)`` gives a :class:`WeedProcess` instead, which a fault test can
stop (SIGKILL) and start again on the same ports, data and identity. The server's own
Prometheus metrics (``-metricsPort``) say how many requests of each type it answered per
bucket: :meth:`SeaweedFS.request_counts` (e.g. to count object GETs).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # weed's default gRPC port = HTTP port + 10000
# Servers whose HTTP and gRPC ports we set; the admin server's gRPC port is left at
# its default (admin port + 10000) because weed's plugin worker always dials that one.
SERVERS = ("s3", "master", "volume", "filer")


@dataclass(frozen=True)
class SeaweedFS:
    """A running SeaweedFS: where its S3 API is and the one identity it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    directory: Path
    metrics_url: str | None = None  # the server's Prometheus /metrics

    def request_counts(self, bucket: str) -> dict[str, int]:
        """S3 requests the server answered for ``bucket``, by type ("GET" counts object
        GETs and HEADs, "PUT", "LIST", ...), from ``SeaweedFS_s3_request_total``."""
        import urllib.request

        if self.metrics_url is None:
            raise RuntimeError("this SeaweedFS was started without a metrics port")
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{bucket}"' in line:
                labels, value = line.rsplit(" ", 1)
                kind = labels.split('type="', 1)[1].split('"', 1)[0]
                counts[kind] = counts.get(kind, 0) + int(float(value))
        return counts

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client signed with this server's identity."""
        import boto3  # here, so that importing this module (conftest does) needs no boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name unless given) and return its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


def find_weed() -> Path | None:
    """The ``weed`` binary: next to this Python (the venv's bin) first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


class WeedProcess:
    """One ``weed mini`` with fixed ports, data directory and identity, so that a test can
    stop it (an outage: connections are refused) and start it again where it was."""

    def __init__(self, weed: Path, directory: Path) -> None:
        (directory / "data").mkdir(parents=True)
        self.weed = weed
        self.ports = _free_ports()
        self.server = SeaweedFS(
            endpoint_url=f"http://{HOST}:{self.ports['s3']}",
            access_key=secrets.token_hex(10).upper(),
            secret_key=secrets.token_urlsafe(30),
            directory=directory,
            metrics_url=f"http://{HOST}:{self.ports['metrics']}/metrics",
        )
        self._config = directory / "s3.json"
        self._config.write_text(json.dumps(_identities(self.server)), encoding="utf-8")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> bool:
        """Start weed and wait until S3 answers signed requests; False if weed exits first."""
        directory = self.server.directory
        _remove_sockets(self.ports, directory)  # a killed weed leaves its sockets behind
        with (directory / "weed.log").open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.weed), "mini", *_flags(directory, self._config, self.ports)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(directory)},  # weed's own log files go there
            )
        return _wait_ready(self.server, self._process, timeout)

    def stop(self) -> None:
        """SIGKILL weed and wait for it (a clean stop takes ~14 s); the data stays."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@contextmanager
def run_seaweedfs(weed: Path, *, timeout: float = 30.0, attempts: int = 3) -> Iterator[SeaweedFS]:
    """Run ``weed mini`` until the block exits; retried with new ports if it dies early."""
    with run_weed_process(weed, timeout=timeout, attempts=attempts) as process:
        yield process.server


@contextmanager
def run_weed_process(
    weed: Path, *, timeout: float = 30.0, attempts: int = 3
) -> Iterator[WeedProcess]:
    """Like :func:`run_seaweedfs`, but the test may stop and start the server."""
    with tempfile.TemporaryDirectory(prefix="kubetune-weed-") as temp:
        for attempt in range(1, attempts + 1):
            process = WeedProcess(weed, Path(temp) / f"run-{attempt}")
            try:
                if process.start(timeout):
                    yield process
                    return
            finally:
                process.stop()
                _remove_sockets(process.ports, process.server.directory)
        log = (process.server.directory / "weed.log").read_text(errors="replace")
        raise RuntimeError(f"weed mini did not start in {attempts} attempts:\n{log[-3000:]}")


def _identities(server: SeaweedFS) -> dict[str, Any]:
    """The s3.json config: one identity with all actions."""
    credentials = {"accessKey": server.access_key, "secretKey": server.secret_key}
    actions = ["Admin", "Read", "List", "Tagging", "Write"]
    return {"identities": [{"name": "test", "credentials": [credentials], "actions": actions}]}


def _flags(directory: Path, config: Path, ports: dict[str, int]) -> list[str]:
    """``weed mini`` flags: loopback only, our ports, no extras, no outbound telemetry."""
    flags = [
        f"-dir={directory / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-admin.port={ports['admin']}",
        f"-metricsPort={ports['metrics']}",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
    ]
    for name in SERVERS:
        flags += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
    return flags


def _free_ports() -> dict[str, int]:
    """Distinct free loopback ports for every server, "admin" and "admin.grpc" included."""
    names = [name for server in SERVERS for name in (server, server + ".grpc")] + ["metrics"]
    with ExitStack() as stack:
        ports = {name: _bind(stack, 0) for name in names}
        while True:  # admin's gRPC port is fixed at admin + 10000: it must be free too
            admin = _bind(stack, 0)
            if admin + GRPC_OFFSET <= 65535 and _try_bind(stack, admin + GRPC_OFFSET):
                return {**ports, "admin": admin, "admin.grpc": admin + GRPC_OFFSET}


def _bind(stack: ExitStack, port: int) -> int:
    """Bind a loopback socket (held until ``stack`` closes) and return its port."""
    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    sock.bind((HOST, port))
    return int(sock.getsockname()[1])


def _try_bind(stack: ExitStack, port: int) -> bool:
    try:
        _bind(stack, port)
    except OSError:
        return False
    return True


def _wait_ready(server: SeaweedFS, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until S3 answers a signed request; False if weed exits first."""
    client = server.client(retries={"max_attempts": 1}, connect_timeout=0.5, read_timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            client.list_buckets()
            return True
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"SeaweedFS S3 not ready after {timeout} s; see {server.directory}")


def _remove_sockets(ports: dict[str, int], directory: Path) -> None:
    """Remove the unix sockets weed puts in /tmp (named by port) whatever TMPDIR says,
    and the ones it was told to put in ``directory``."""
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)
    for path in directory.glob("*.sock"):
        path.unlink(missing_ok=True)
