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
    from kubetune_trainer.train import pack_capacity

    assert pack_capacity([100, 120, 80], batch_size=4, max_seq_length=2048) == 400
    assert pack_capacity([100, 900], batch_size=1, max_seq_length=2048) == 900  # longest fits
    assert pack_capacity([100] * 10, batch_size=64, max_seq_length=2048) == 2048
