"""The storage layer against a real S3 API (SeaweedFS) and local directories."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from seaweedfs import SeaweedFS

from kubetune_trainer.errors import (
    ConfigInvalid,
    CredentialsInvalid,
    ExitCode,
    StorageUnavailable,
)
from kubetune_trainer.storage import S3Settings, Store, fetch_to_local, open_store

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FAST_FAIL = S3Settings(max_attempts=2, connect_timeout=1, read_timeout=2, retry_seconds=0)


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedFS:
    """AWS_* env vars as a pod gets them from its Secret, and nothing else to find."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return seaweedfs


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> str:
    return seaweedfs.create_bucket()


@pytest.fixture(params=["s3", "file-uri", "path"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same API on S3, on a file:// URI and on a plain path."""
    if request.param == "s3":
        env: SeaweedFS = request.getfixturevalue("s3_env")
        name = env.create_bucket()
        return open_store(f"s3://{name}/run-1", endpoint_url=env.endpoint_url)
    if request.param == "file-uri":
        return open_store((tmp_path / "store").as_uri())
    return open_store(str(tmp_path / "store"))


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the same API on every kind of store ---------------------------------------------


def test_bytes_round_trip_exists_and_overwrite(store: Store) -> None:
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.exists("a/b.txt")
    assert not store.exists("a/b")
    assert not store.exists("a/missing.txt")
    store.put_bytes("a/b.txt", b"second")
    assert store.get_bytes("a/b.txt") == b"second"
    assert store.list() == ["a/b.txt"]  # no temp files or duplicates left behind


def test_file_round_trip(store: Store, tmp_path: Path) -> None:
    source = _write(tmp_path / "in" / "data.bin", os.urandom(300_000))
    store.upload_file(source, "files/data.bin")
    target = tmp_path / "out" / "deep" / "copy.bin"
    store.download_file("files/data.bin", target)
    assert target.read_bytes() == source.read_bytes()


def test_dir_round_trip(store: Store, tmp_path: Path) -> None:
    files = {"adapter.safetensors": os.urandom(2048), "sub/dir/state.json": b'{"step": 3}'}
    for name, data in files.items():
        _write(tmp_path / "ckpt" / name, data)
    keys = store.upload_dir(tmp_path / "ckpt", "checkpoints/step-3")
    expected = sorted(f"checkpoints/step-3/{name}" for name in files)
    assert sorted(keys) == expected
    assert store.list("checkpoints/") == expected
    paths = store.download_prefix("checkpoints/step-3", tmp_path / "back")
    assert sorted(paths) == sorted(tmp_path / "back" / name for name in files)
    for name, data in files.items():
        assert (tmp_path / "back" / name).read_bytes() == data


def test_list_matches_string_prefixes_relative_to_the_root(store: Store) -> None:
    for key in ("x/1", "x/2", "xy/3", "z"):
        store.put_bytes(key, key.encode())
    assert store.list("x/") == ["x/1", "x/2"]
    assert store.list("x") == ["x/1", "x/2", "xy/3"]
    assert store.list() == ["x/1", "x/2", "xy/3", "z"]
    assert store.list("nothing/") == []


def test_delete_prefix(store: Store) -> None:
    for key in ("x/1", "x/deep/2", "xy/3", "z"):
        store.put_bytes(key, b"data")
    store.delete_prefix("x/")
    assert store.list() == ["xy/3", "z"]
    assert not store.exists("x/1")
    store.delete_prefix("z")
    assert store.list() == ["xy/3"]
    store.delete_prefix("absent/")  # nothing to delete is fine


def test_uri_for_addresses_the_same_objects(store: Store) -> None:
    store.put_bytes("sub/dir/k.txt", b"value")
    sub = open_store(store.uri_for("sub"), endpoint_url=getattr(store, "endpoint_url", None))
    assert sub.list() == ["dir/k.txt"]
    assert sub.get_bytes("dir/k.txt") == b"value"
    assert open_store(store.uri_for("sub/dir/k.txt")).uri_for("") == store.uri_for("sub/dir/k.txt")


def test_missing_keys_raise_file_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        store.get_bytes("missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        store.download_file("missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b"])
def test_keys_cannot_escape_the_root(store: Store, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        store.put_bytes(key, b"x")


def test_a_sibling_prefix_is_a_separate_store(s3_env: SeaweedFS, bucket: str) -> None:
    one = open_store(f"s3://{bucket}/run-1", endpoint_url=s3_env.endpoint_url)
    other = open_store(f"s3://{bucket}/run-10", endpoint_url=s3_env.endpoint_url)
    one.put_bytes("k", b"1")
    assert other.list() == []
    assert not other.exists("k")
    assert s3_env.client().get_object(Bucket=bucket, Key="run-1/k")["Body"].read() == b"1"
    assert one.uri_for("k") == f"s3://{bucket}/run-1/k"


# -- S3 specifics --------------------------------------------------------------------


def test_large_files_go_multipart(s3_env: SeaweedFS, bucket: str, tmp_path: Path) -> None:
    settings = S3Settings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = open_store(f"s3://{bucket}/big", endpoint_url=s3_env.endpoint_url, settings=settings)
    source = _write(tmp_path / "big.bin", os.urandom(12 * MiB))
    store.upload_file(source, "weights.bin")
    head = s3_env.client().head_object(Bucket=bucket, Key="big/weights.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts
    assert head["ContentLength"] == 12 * MiB
    store.download_file("weights.bin", tmp_path / "back.bin")
    assert _sha256(tmp_path / "back.bin") == _sha256(source)


def test_fetch_an_s3_object(s3_env: SeaweedFS, bucket: str, tmp_path: Path) -> None:
    rows = b'{"text": "a"}\n{"text": "b"}\n'
    s3_env.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=rows)
    local = fetch_to_local(
        f"s3://{bucket}/data/train.jsonl", tmp_path / "cache", endpoint_url=s3_env.endpoint_url
    )
    assert local == tmp_path / "cache" / bucket / "data" / "train.jsonl"
    assert local.read_bytes() == rows


@pytest.mark.parametrize("suffix", ["", "/"])
def test_fetch_an_s3_prefix(s3_env: SeaweedFS, bucket: str, tmp_path: Path, suffix: str) -> None:
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="models/tiny/w/model.safetensors", Body=b"weights")
    client.put_object(Bucket=bucket, Key="models/tiny-2/config.json", Body=b"other")
    local = fetch_to_local(
        f"s3://{bucket}/models/tiny{suffix}", tmp_path / "cache", endpoint_url=s3_env.endpoint_url
    )
    assert local == tmp_path / "cache" / bucket / "models" / "tiny"
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == ["config.json", "w/model.safetensors"]
    assert (local / "w" / "model.safetensors").read_bytes() == b"weights"


def test_fetch_a_missing_s3_source(s3_env: SeaweedFS, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match=f"s3://{bucket}/nothing/here does not exist"):
        fetch_to_local(f"s3://{bucket}/nothing/here", tmp_path, endpoint_url=s3_env.endpoint_url)


def test_fetch_local_sources_as_they_are(tmp_path: Path) -> None:
    data = _write(tmp_path / "my data" / "train.jsonl", b"{}\n")
    assert fetch_to_local(str(data), tmp_path / "cache") == data
    assert fetch_to_local(data.as_uri(), tmp_path / "cache") == data
    assert fetch_to_local(data.parent.as_uri(), tmp_path / "cache") == data.parent
    with pytest.raises(ConfigInvalid, match="does not exist") as raised:
        fetch_to_local(str(tmp_path / "absent.jsonl"), tmp_path / "cache")
    assert raised.value.hint
    with pytest.raises(ConfigInvalid, match="unsupported storage URI"):
        fetch_to_local("gs://bucket/data", tmp_path / "cache")


# -- failures ------------------------------------------------------------------------


OPERATIONS = ["put_bytes", "get_bytes", "exists", "list", "upload_file", "download_file"]


def _call(store: Store, operation: str, tmp_path: Path) -> None:
    """Run one store operation on key "k" (the object exists where that matters)."""
    if operation == "put_bytes":
        store.put_bytes("k", b"data")
    elif operation == "get_bytes":
        store.get_bytes("k")
    elif operation == "exists":
        store.exists("k")
    elif operation == "list":
        store.list()
    elif operation == "upload_file":
        store.upload_file(_write(tmp_path / "upload.bin", b"data"), "k")
    else:
        store.download_file("k", tmp_path / "download.bin")


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_wrong_credentials(
    s3_env: SeaweedFS,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    wrong: str,
    operation: str,
) -> None:
    s3_env.client().put_object(Bucket=bucket, Key="run/k", Body=b"data")
    bad_secret = "wrong-secret-" + os.urandom(8).hex()
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    store = open_store(f"s3://{bucket}/run", endpoint_url=s3_env.endpoint_url)
    with pytest.raises(CredentialsInvalid) as raised:
        _call(store, operation, tmp_path)
    error = raised.value
    assert error.exit_code == ExitCode.CREDENTIALS_INVALID
    assert bucket in error.message
    assert error.hint is not None and "AWS_SECRET_ACCESS_KEY" in error.hint
    for secret in (bad_secret, s3_env.secret_key, "AKIANOSUCHKEY0000000"):
        assert secret not in str(error)
    assert s3_env.client().get_object(Bucket=bucket, Key="run/k")["Body"].read() == b"data"


def test_no_credentials_at_all(
    s3_env: SeaweedFS, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{bucket}/run", endpoint_url=s3_env.endpoint_url)
    with pytest.raises(CredentialsInvalid, match="no S3 credentials") as raised:
        store.put_bytes("k", b"data")
    assert raised.value.hint is not None and "AWS_ACCESS_KEY_ID" in raised.value.hint


@pytest.mark.parametrize("operation", [*OPERATIONS, "delete_prefix"])
def test_missing_bucket(s3_env: SeaweedFS, tmp_path: Path, operation: str) -> None:
    store = open_store("s3://no-such-bucket-kt/run", endpoint_url=s3_env.endpoint_url)
    with pytest.raises(ConfigInvalid) as raised:
        if operation == "delete_prefix":
            store.delete_prefix("x/")
        else:
            _call(store, operation, tmp_path)
    assert raised.value.exit_code == ExitCode.CONFIG_INVALID
    assert "'no-such-bucket-kt'" in raised.value.message
    assert raised.value.hint
    buckets = [entry["Name"] for entry in s3_env.client().list_buckets()["Buckets"]]
    assert "no-such-bucket-kt" not in buckets  # nothing auto-created it


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("operation", OPERATIONS)
def test_unreachable_endpoint_fails_fast_and_retryable(
    s3_env: SeaweedFS, tmp_path: Path, operation: str
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = open_store("s3://bucket/run", endpoint_url=endpoint, settings=FAST_FAIL)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as raised:
        _call(store, operation, tmp_path)
    assert time.monotonic() - started < 5
    assert raised.value.exit_code.retryable
    assert endpoint in raised.value.message


class _Overloaded(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with 503 SlowDown, counting them."""

    requests = 0
    body = (
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    )

    def _answer(self) -> None:
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def overloaded() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Overloaded)
    _Overloaded.requests = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_throttling_is_retried_then_unavailable(s3_env: SeaweedFS, overloaded: str) -> None:
    settings = S3Settings(max_attempts=3, connect_timeout=1, read_timeout=2, retry_seconds=0)
    store = open_store("s3://bucket/run", endpoint_url=overloaded, settings=settings)
    with pytest.raises(StorageUnavailable, match="SlowDown") as raised:
        store.put_bytes("k", b"data")
    assert raised.value.exit_code == ExitCode.STORAGE_UNAVAILABLE
    assert overloaded in raised.value.message
    assert _Overloaded.requests == 3  # botocore's standard retries, then the error


def test_transient_failures_are_retried_until_the_patience_is_spent(
    s3_env: SeaweedFS, overloaded: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = S3Settings(max_attempts=2, connect_timeout=1, read_timeout=2, retry_seconds=3)
    store = open_store("s3://bucket/run", endpoint_url=overloaded, settings=settings)
    started = time.monotonic()
    with (
        caplog.at_level("WARNING", logger="kubetune_trainer.storage"),
        pytest.raises(StorageUnavailable, match=r"gave up after \d+ tries over \d+ s") as raised,
    ):
        store.put_bytes("k", b"data")
    assert time.monotonic() - started >= 3
    error = raised.value
    assert error.exit_code == ExitCode.STORAGE_UNAVAILABLE
    assert "SlowDown" in error.message and "s3://bucket/run/k" in error.message
    assert error.hint is not None and "spec.output.retryTimeoutSeconds (3 s)" in error.hint
    tries = int(error.message.split("gave up after ")[1].split()[0])
    assert tries >= 3 and _Overloaded.requests == 2 * tries  # botocore's 2 in each of ours
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == tries - 1  # one warning per retry
    assert all(r.levelname == "WARNING" for r in retries)
    assert s3_env.secret_key not in caplog.text and s3_env.access_key not in caplog.text


class _CutOff(BaseHTTPRequestHandler):
    """An S3 endpoint whose first GET breaks off mid-body; later ones are whole."""

    gets = 0
    body = b"0123456789" * 1000

    def do_GET(self) -> None:
        type(self).gets += 1
        whole = type(self).gets > 1
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body if whole else self.body[:1000])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_body_cut_off_mid_read_is_read_again(s3_env: SeaweedFS) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CutOff)
    _CutOff.gets = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        settings = S3Settings(max_attempts=1, connect_timeout=1, read_timeout=2, retry_seconds=5)
        store = open_store("s3://bucket/run", endpoint_url=endpoint, settings=settings)
        assert store.get_bytes("k") == _CutOff.body
        assert _CutOff.gets == 2
    finally:
        server.shutdown()
        server.server_close()


def test_permanent_failures_are_not_retried(
    s3_env: SeaweedFS, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = S3Settings(retry_seconds=60)
    started = time.monotonic()
    missing = open_store("s3://no-such-bucket-kt/run", endpoint_url=s3_env.endpoint_url)
    with pytest.raises(ConfigInvalid):
        missing.put_bytes("k", b"data")
    with pytest.raises(FileNotFoundError):
        open_store(f"s3://{bucket}/run", endpoint_url=s3_env.endpoint_url).get_bytes("absent")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    denied = open_store(f"s3://{bucket}/run", endpoint_url=s3_env.endpoint_url, settings=settings)
    with pytest.raises(CredentialsInvalid):
        denied.put_bytes("k", b"data")
    assert time.monotonic() - started < 10  # far below the 60 s of patience: no retries
