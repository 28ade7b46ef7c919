"""Bad input through the real trainer: documented exit codes, no traceback, nothing lost.

- Storage credentials and endpoints for the data, against real SeaweedFS (and a web
  server that is not S3): each ends as a TrainerError naming what to fix, never a raw
  boto error, never a secret in the message.
- The pod's entry point as a process: a dataset with several problems exits 11 once with
  all of them; SIGTERM while the data is prepared exits 21 (Preempted, retryable).
- A validation example longer than the training rows' packing capacity, and a 10 MB
  validation row, train fine; what the data stage dropped shows in the summary.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness.network import free_port
from trainer_helpers import fetch_text, run_trainer_process, tiny_config

from kubetune_trainer.errors import (
    ConfigInvalid,
    CredentialsInvalid,
    ExitCode,
    StorageUnavailable,
    TrainerError,
)
from kubetune_trainer.main import execute
from kubetune_trainer.storage import S3Settings, fetch_to_local
from kubetune_trainer.tiny import generate_instruction_dataset

pytestmark = pytest.mark.integration

FAST_FAIL = S3Settings(max_attempts=1, connect_timeout=1, read_timeout=2, retry_seconds=0)
WRONG_SECRET = "wrong-secret-" + os.urandom(6).hex()


class _NotS3(BaseHTTPRequestHandler):
    """A web server at the endpoint: HTML 400s, as a proxy or a web UI answers."""

    def _answer(self) -> None:
        body = b"<html><body>Bad Request</body></html>"
        self.send_response(400)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def not_s3() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def s3_data(seaweedfs: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """A bucket holding data/train.jsonl, and AWS_* env as a pod gets it (nothing else)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = seaweedfs.create_bucket()
    seaweedfs.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "x"}\n')
    return {"bucket": bucket, "endpoint": seaweedfs.endpoint_url}


# name, env changes, URI (with {bucket}), endpoint ({endpoint}, {closed} or {not_s3}),
# expected error type, substrings of the message and hint.
CREDENTIAL_CASES: list[tuple[str, dict[str, str | None], str, str, type, list[str]]] = [
    (
        "no-credentials",
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
        "s3://{bucket}/data/train.jsonl",
        "{endpoint}",
        CredentialsInvalid,
        ["no S3 credentials", "AWS_ACCESS_KEY_ID"],
    ),
    (
        "only-the-access-key",
        {"AWS_SECRET_ACCESS_KEY": None},
        "s3://{bucket}/data/train.jsonl",
        "{endpoint}",
        CredentialsInvalid,
        ["AWS_SECRET_ACCESS_KEY"],
    ),
    (
        "wrong-secret",
        {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET},
        "s3://{bucket}/data/train.jsonl",
        "{endpoint}",
        CredentialsInvalid,
        ["denied", "{bucket}", "AWS_SECRET_ACCESS_KEY"],
    ),
    (
        "unknown-access-key",
        {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"},
        "s3://{bucket}/data/",
        "{endpoint}",
        CredentialsInvalid,
        ["denied", "AWS_ACCESS_KEY_ID"],
    ),
    (
        "nothing-listens-at-the-endpoint",
        {},
        "s3://{bucket}/data/train.jsonl",
        "{closed}",
        StorageUnavailable,
        ["{closed}"],
    ),
    (
        "endpoint-is-a-web-server",
        {},
        "s3://{bucket}/data/",
        "{not_s3}",
        ConfigInvalid,
        ["{not_s3}", "HTTP 400", "spec.output.endpoint"],
    ),
    (
        "missing-bucket",
        {},
        "s3://no-such-bucket-kt/data/train.jsonl",
        "{endpoint}",
        ConfigInvalid,
        ["'no-such-bucket-kt' does not exist"],
    ),
    (
        "missing-object",
        {},
        "s3://{bucket}/data/nope.jsonl",
        "{endpoint}",
        ConfigInvalid,
        ["s3://{bucket}/data/nope.jsonl does not exist"],
    ),
    (
        "empty-prefix",
        {},
        "s3://{bucket}/nothing-here/",
        "{endpoint}",
        ConfigInvalid,
        ["s3://{bucket}/nothing-here/ does not exist"],
    ),
    ("no-bucket-in-the-uri", {}, "s3:///train.jsonl", "{endpoint}", ConfigInvalid, ["no bucket"]),
]


@pytest.mark.parametrize(
    ("env", "uri", "endpoint", "kind", "expected"),
    [case[1:] for case in CREDENTIAL_CASES],
    ids=[case[0] for case in CREDENTIAL_CASES],
)
def test_bad_storage_for_the_data_is_a_clear_error(
    s3_data: dict[str, str],
    not_s3: str,
    seaweedfs: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    env: dict[str, str | None],
    uri: str,
    endpoint: str,
    kind: type,
    expected: list[str],
) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    names = {**s3_data, "closed": f"http://127.0.0.1:{free_port()}", "not_s3": not_s3}
    with pytest.raises(TrainerError) as caught:  # a raw boto error would be a crash
        fetch_to_local(
            uri.format(**names),
            tmp_path / "cache",
            endpoint_url=endpoint.format(**names),
            settings=FAST_FAIL,
        )
    error = caught.value
    assert type(error) is kind, str(error)
    assert error.hint
    for part in expected:
        assert part.format(**names) in str(error), str(error)
    for secret in (WRONG_SECRET, seaweedfs.secret_key):
        assert secret not in str(error)


# --------------------------------------------------------------------------- the process


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output, output[-3000:]


def test_every_dataset_problem_in_one_run_exit_11_without_traceback(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8))
    (data / "a.jsonl").write_text(good + "{broken\n")
    (data / "b.jsonl").write_text(good + json.dumps({"instruction": "no answer"}) + "\n")
    (data / "c.jsonl").write_bytes(good.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    termination = tmp_path / "termination-log"
    config = tiny_config(tiny_model, data, str(tmp_path / "out"))
    process = run_trainer_process(
        config, env={"KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)}
    )
    output, _ = process.communicate(timeout=180)
    assert process.returncode == ExitCode.DATASET_INVALID, output[-3000:]
    _no_traceback(output)
    error = json.loads(termination.read_text())["error"]
    assert error["reason"] == "DatasetInvalid" and error["retryable"] is False
    message = error["message"]
    assert message.startswith("3 problems in the dataset")
    for part in (
        "line 9 of a.jsonl is not valid JSON",
        "field 'output' missing or empty (lines 9;",
        "line 9 of c.jsonl is not UTF-8 text",
    ):
        assert part in message


def test_sigterm_while_preparing_data_is_preempted_and_retryable(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = generate_instruction_dataset(tmp_path / "big.jsonl", n=25_000, seed=3)
    port = free_port()
    termination = tmp_path / "termination-log"
    config = tiny_config(tiny_model, data, str(tmp_path / "out"), reporting={"progress_port": port})
    process = run_trainer_process(
        config, env={"POD_IP": "127.0.0.1", "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)}
    )
    stages: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            progress = json.loads(fetch_text(f"http://127.0.0.1:{port}/progress") or "{}")
            stages = progress.get("time_to_first_step", {})
            if "data_preparation" in stages:  # read: now rendering chat templates
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert "data_preparation" in stages and "tokenization" not in stages, stages
    assert process.returncode == ExitCode.PREEMPTED, output[-3000:]
    _no_traceback(output)
    error = json.loads(termination.read_text())["error"]
    assert error["reason"] == "Preempted" and error["retryable"] is True
    assert "while preparing the model and data" in error["message"]


def test_long_and_huge_validation_rows_train_and_drops_are_warned(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(16)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows + rows[:4]))
    validation = tmp_path / "validation.jsonl"
    long_row = {"instruction": "Repeat: " + " ".join(["word"] * 60), "output": "word " * 30}
    huge_row = {"instruction": "Summarize.", "output": "lorem ipsum " * 900_000}  # ~10 MB
    validation.write_text("".join(json.dumps(row) + "\n" for row in (long_row, huge_row, rows[0])))
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(termination))
    config = tiny_config(
        tiny_model,
        train,
        str(tmp_path / "out"),
        dataset={"validation_sources": [str(validation)]},
        training={"max_steps": 2, "batch_size": 2},
    )
    assert execute(config) == ExitCode.OK, capsys.readouterr().err[-3000:]
    result = json.loads(termination.read_text())
    assert result["stats"]["validation_examples"] == 2 and "eval_loss" in result["metrics"]
    summary = capsys.readouterr().out
    for warning in (
        "4 of 20 training rows repeat an earlier row exactly and were dropped",
        "1 of 3 validation examples also appear in the training data",
        "2 of 2 validation examples are longer than maxSeqLength 128 tokens and were truncated",
    ):
        assert f"warning      {warning}" in summary, summary
