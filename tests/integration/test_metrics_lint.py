"""Operator and trainer metrics follow Prometheus conventions (`promtool check metrics`)."""

from __future__ import annotations

import subprocess

import pytest
from prometheus import find_promtool
from prometheus_client import generate_latest

from kubetune_operator.metrics import OperatorMetrics
from kubetune_trainer.progress import MetricsExporter, ProgressState

pytestmark = pytest.mark.integration


def _promtool_check(exposition: bytes) -> str:
    promtool = find_promtool()
    if promtool is None:
        pytest.fail("promtool is missing and Debian's prometheus package could not be fetched")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
    )
    return (result.stdout + result.stderr).decode()


def test_operator_metrics_pass_promtool() -> None:
    metrics = OperatorMetrics()
    metrics.observe_state("ns", "job", "Running")
    metrics.observe_status(
        "ns", "job", {"progress": {"step": 1, "totalSteps": 4}, "metrics": {"trainLoss": 2.0}}
    )
    metrics.observe_status(  # base vs tuned evaluation and the gate's verdict
        "ns",
        "gated",
        {
            "evaluation": {
                "metrics": [{"name": "exactMatch", "base": 0.0, "tuned": 0.5, "delta": 0.5}],
                "gate": {"metric": "exactMatch", "passed": True, "message": ""},
            }
        },
    )
    metrics.api_errors.labels("create_pod").inc()
    metrics.observe_gpu_seconds("ns", 100, 160)
    with metrics.reconcile_seconds.time():
        pass
    exposition = generate_latest(metrics.registry)
    assert b"kubetune_reconcile_duration_seconds_bucket" in exposition
    assert b'kubetune_gpu_seconds_total{namespace="ns"} 60.0' in exposition
    assert b"kubetune_job_evaluation_gate_passed" in exposition
    assert _promtool_check(exposition) == ""


def test_trainer_metrics_pass_promtool() -> None:
    state = ProgressState(step=3, total_steps=10, train_loss=1.5, tokens_per_second=900.0)
    state.evaluation = {
        "metrics": {"evalLoss": {"base": 2.0, "tuned": 1.5, "delta": -0.5}},
        "gate": {"metric": "evalLoss", "passed": False, "message": ""},
    }
    exposition = MetricsExporter(state).render()
    assert b'kubetune_trainer_evaluation{metric="evalLoss",model="tuned"} 1.5' in exposition
    assert b"kubetune_trainer_step 3.0" in exposition
    assert _promtool_check(exposition) == ""
