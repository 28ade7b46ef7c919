"""The trainer's progress state: percent, ETA (also after a resume), termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.progress import (
    TERMINATION_MESSAGE_LIMIT,
    ProgressState,
    write_termination_message,
)

pytestmark = pytest.mark.unit


def test_eta_counts_only_the_steps_of_this_run() -> None:
    state = ProgressState(step=60, total_steps=100, started_at=1000.0, started_step=50)
    # 10 steps in 20 s → 2 s a step → 40 steps left → 80 s
    assert state.eta_seconds(now=1020.0) == 80
    assert state.percent == 60
    assert ProgressState(step=50, total_steps=100, started_step=50).eta_seconds() is None


def test_termination_message_stays_under_the_kubelet_limit(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    result = {
        "artifact": {"uri": "s3://b/a", "digest": "sha256:x", "sizeBytes": 1},
        "stats": {f"key{i}": "x" * 100 for i in range(100)},
    }
    write_termination_message(path, result)
    written = path.read_text()
    assert len(written.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert json.loads(written)["artifact"]["uri"] == "s3://b/a"  # details dropped, not the result


def test_pack_capacity_keeps_about_batch_size_examples_per_sequence() -> None:
    from kubetune_trainer.train import pack_capacity, rows_for_batch

    assert pack_capacity([100, 120, 80], batch_size=4, max_seq_length=2048) == 400
    assert rows_for_batch([100, 120, 80], batch_size=4, max_seq_length=2048) == 1
    assert pack_capacity([100, 900], batch_size=1, max_seq_length=2048) == 900  # longest fits
    # maxSeqLength too short for batchSize examples in one row: 6400 tokens in 4 rows
    assert pack_capacity([100] * 10, batch_size=64, max_seq_length=2048) == 1600
    assert rows_for_batch([100] * 10, batch_size=64, max_seq_length=2048) == 4
    # the tests' tiny runs: about 35 tokens an example, batch 8, maxSeqLength 128
    assert rows_for_batch([35] * 10, batch_size=8, max_seq_length=128) == 3
    assert pack_capacity([35] * 10, batch_size=8, max_seq_length=128) == 94


def test_progress_shows_world_size_strategy_and_global_batch() -> None:
    data = ProgressState(world_size=4, strategy="ddp", global_batch_size=64).as_json()
    assert (data["world_size"], data["strategy"], data["global_batch_size"]) == (4, "ddp", 64)
    assert ProgressState().as_json()["world_size"] == 1


def test_first_error_of_the_pod_is_kept(tmp_path: Path) -> None:
    from kubetune_trainer.main import exit_code_of, record_result

    path = tmp_path / "termination-log"
    path.touch()  # the kubelet creates the file empty
    first = {"error": {"reason": "StorageUnavailable", "message": "m", "exitCode": 20}}
    assert record_result(path, first)
    echo = {"error": {"reason": "InternalError", "message": "peer died", "exitCode": 22}}
    assert not record_result(path, echo)
    assert json.loads(path.read_text())["error"]["exitCode"] == 20
    # torchrun says 1; the message says what happened
    assert exit_code_of(1, path) == 20
    assert exit_code_of(0, path) == 0
    assert exit_code_of(1, tmp_path / "missing") == 1


def test_recent_evaluations_are_kept_for_the_poller() -> None:
    from kubetune_trainer.progress import EVALUATIONS_KEPT

    state = ProgressState()
    for step in range(0, 10 * (EVALUATIONS_KEPT + 5), 10):
        state.record_evaluation(step, 1.0 / (step + 1))
    assert len(state.evaluations) == EVALUATIONS_KEPT
    assert (
        min(state.evaluations) == 50
        and state.eval_loss == state.evaluations[max(state.evaluations)]
    )
    assert json.loads(json.dumps(state.as_json()))["evaluations"]["50"] == state.evaluations[50]


def test_a_poller_that_gives_up_leaves_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    import socket
    import struct

    from kubetune_trainer.progress import ProgressServer

    with ProgressServer(ProgressState(), 0, host="127.0.0.1") as server:
        for _ in range(10):  # each resets the connection before the answer (a timeout)
            with socket.create_connection(server.address) as client:
                client.sendall(b"GET /progress HTTP/1.1\r\nHost: trainer\r\n\r\n")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with socket.create_connection(server.address) as client:  # still serving
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: trainer\r\n\r\n")
            assert client.recv(1024).startswith(b"HTTP/1.0 200")
    assert "Traceback" not in capfd.readouterr().err
