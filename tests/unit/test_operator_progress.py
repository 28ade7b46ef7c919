"""Progress reports become small, throttled status patches; metrics follow jobs."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from kubetune_operator.api.types import FineTuneJobStatus
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.progress import changed_fields, status_from_progress, tracking_status

pytestmark = pytest.mark.unit

REPORT = {
    "step": 10,
    "total_steps": 40,
    "epoch": 0.5123,
    "percent": 25,
    "eta_seconds": 90,
    "train_loss": 2.345678,
    "eval_loss": None,
    "learning_rate": 0.0002,
    "tokens_per_second": 1234.56,
    "last_checkpoint_step": 8,
    "last_checkpoint_uri": "s3://b/job/checkpoints/step-00000008",
}


def test_status_from_progress() -> None:
    status = status_from_progress(REPORT, "2026-11-23T12:00:00Z")
    assert status["progress"] == {
        "step": 10,
        "totalSteps": 40,
        "epoch": 0.51,
        "percent": 25,
        "etaSeconds": 90,
    }
    assert status["metrics"] == {
        "trainLoss": 2.3457,
        "learningRate": 0.0002,
        "tokensPerSecond": 1235.0,
    }
    assert status["lastCheckpoint"]["step"] == 8
    history = status_from_progress({**REPORT, "evaluations": {"20": 1.9, "10": 2.25}}, "t")
    assert history["evaluations"] == [{"step": 10, "evalLoss": 2.25}, {"step": 20, "evalLoss": 1.9}]


def test_data_warnings_become_status_data_warnings_once() -> None:
    warnings = ["49 of 50 training rows repeat an earlier row exactly and were dropped"]
    status = status_from_progress({**REPORT, "warnings": warnings}, "t")
    assert status["dataWarnings"] == warnings
    FineTuneJobStatus.model_validate(status)  # the schema has the field (else pruned)
    assert "dataWarnings" not in changed_fields(status, status)
    assert "dataWarnings" not in status_from_progress({**REPORT, "warnings": []}, "t")
    many = status_from_progress({**REPORT, "warnings": ["x" * 1000] * 30}, "t")
    assert len(many["dataWarnings"]) == 10 and len(many["dataWarnings"][0]) == 300


def test_unchanged_report_writes_nothing() -> None:
    first = status_from_progress(REPORT, "2026-11-23T12:00:00Z")
    later = status_from_progress({**REPORT, "eta_seconds": 85}, "2026-11-23T12:00:05Z")
    assert changed_fields(first, later) == {}
    moved = status_from_progress({**REPORT, "step": 11, "percent": 27}, "2026-11-23T12:00:05Z")
    assert set(changed_fields(first, moved)) == {"progress"}


def test_metrics_follow_jobs_and_are_removed_on_delete() -> None:
    metrics = OperatorMetrics()
    metrics.observe_state("ns", "a", "Pending")
    metrics.observe_state("ns", "a", "Running")
    metrics.observe_status(
        "ns", "a", {"progress": {"step": 10, "totalSteps": 40}, "metrics": {"trainLoss": 1.5}}
    )
    text = generate_latest(metrics.registry).decode()
    assert 'kubetune_jobs{state="Running"} 1.0' in text
    assert 'kubetune_job_transitions_total{from_state="Pending",to_state="Running"} 1.0' in text
    assert 'kubetune_job_progress_ratio{name="a",namespace="ns"} 0.25' in text
    metrics.forget("ns", "a")
    text = generate_latest(metrics.registry).decode()
    assert 'kubetune_jobs{state="Running"} 0.0' in text
    assert 'name="a"' not in text


def test_tracking_state_becomes_status_tracking() -> None:
    ok = {
        "mlflow": "ok",
        "runId": "abc123",
        "runUrl": "http://mlflow:5000/#/experiments/1/runs/abc123",
        "tensorboard": "on",
    }
    status = status_from_progress({**REPORT, "tracking": ok}, "2026-11-23T12:00:00Z")
    assert status["tracking"] == {
        "mlflowRunId": "abc123",
        "mlflowRunUrl": "http://mlflow:5000/#/experiments/1/runs/abc123",
    }
    FineTuneJobStatus.model_validate(status)  # the typed status accepts it

    down = {"mlflow": "unavailable: cannot reach http://mlflow:5000: [Errno 111] refused"}
    status = status_from_progress({**REPORT, "tracking": down}, "2026-11-23T12:00:00Z")
    assert status["tracking"] == {
        "message": "MLflow unavailable: cannot reach http://mlflow:5000: [Errno 111] refused; "
        "training went on without it"
    }
    # Nothing tracked (or an older trainer): no status.tracking at all.
    off = {"mlflow": "off", "tensorboard": "off"}
    assert "tracking" not in status_from_progress({**REPORT, "tracking": off}, "t")
    assert "tracking" not in status_from_progress(REPORT, "t")
    assert tracking_status({"mlflow": "off", "tensorboardUri": "s3://b/j/adapter/tensorboard"}) == {
        "tensorboardUri": "s3://b/j/adapter/tensorboard"
    }
