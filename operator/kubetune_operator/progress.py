"""Turn the trainer's /progress JSON into a status patch. Pure; the poller does the I/O."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from .api.types import EvaluationStatus, GateResult, MetricComparison, TrackingStatus
from .workload import PROGRESS_PORT

WARNINGS_KEPT = 10  # the trainer's data warnings copied into status.dataWarnings
WARNING_CHARS = 300


def progress_url(pod_ip: str, port: int = PROGRESS_PORT) -> str:
    return f"http://{pod_ip}:{port}/progress"


def fetch_progress(pod_ip: str, *, port: int = PROGRESS_PORT, timeout: float = 2.0) -> Any:
    """GET the trainer's progress; None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(progress_url(pod_ip, port), timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _rounded(value: Any, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _text(value: Any) -> str | None:
    return str(value) if value else None


def tracking_status(tracking: Any) -> dict[str, Any] | None:
    """status.tracking from the trainer's tracking report (in its progress or termination
    message): the MLflow run, the TensorBoard files, and why the tracker was unavailable."""
    if not isinstance(tracking, dict):
        return None
    mlflow = str(tracking.get("mlflow") or "")
    status = TrackingStatus(
        mlflowRunId=_text(tracking.get("runId")),
        mlflowRunUrl=_text(tracking.get("runUrl")),
        tensorboardUri=_text(tracking.get("tensorboardUri")),
        message=f"MLflow {mlflow}; training went on without it"
        if mlflow.startswith("unavailable")
        else None,
    )
    return status.model_dump(exclude_none=True) or None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def evaluation_status(report: Any) -> dict[str, Any] | None:
    """status.evaluation from the trainer's evaluation summary (termination message):
    ``{"metrics": {name: {"base", "tuned", "delta"}}, "samples", "headline", "gate"}``;
    what does not fit the API's types is left out."""
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        return None
    metrics = [
        MetricComparison(
            name=str(name),
            base=_number(numbers.get("base")),
            tuned=_number(numbers.get("tuned")),
            delta=_number(numbers.get("delta")),
        )
        for name, numbers in report["metrics"].items()
        if isinstance(numbers, dict)
    ]
    gate = report.get("gate")
    samples = report.get("samples")
    status = EvaluationStatus(
        metrics=metrics or None,
        samples=samples if isinstance(samples, int) and samples >= 0 else None,
        headline=_text(report.get("headline")),
        gate=GateResult(
            metric=str(gate.get("metric") or ""),
            passed=gate.get("passed") is True,
            message=str(gate.get("message") or "")[:1000],
        )
        if isinstance(gate, dict)
        else None,
    )
    return status.model_dump(exclude_none=True) or None


def status_from_progress(progress: dict[str, Any], checkpoint_time: str) -> dict[str, Any]:
    """The status fields (progress, metrics, lastCheckpoint) a progress report implies.

    Values are rounded so that noise alone does not produce a new status write.
    """
    status: dict[str, Any] = {
        "progress": {
            "step": int(progress.get("step") or 0),
            "totalSteps": int(progress.get("total_steps") or 0),
            "epoch": _rounded(progress.get("epoch"), 2) or 0.0,
            "percent": int(progress.get("percent") or 0),
            "etaSeconds": progress.get("eta_seconds"),
        }
    }
    for source, target in (("world_size", "worldSize"), ("global_batch_size", "globalBatchSize")):
        if progress.get(source):
            status["progress"][target] = int(progress[source])
    metrics = {
        "trainLoss": _rounded(progress.get("train_loss")),
        "evalLoss": _rounded(progress.get("eval_loss")),
        "learningRate": _rounded(progress.get("learning_rate"), 8),
        "tokensPerSecond": _rounded(progress.get("tokens_per_second"), 0),
    }
    status["metrics"] = {k: v for k, v in metrics.items() if v is not None}
    evaluations = progress.get("evaluations") or {}
    if evaluations:
        status["evaluations"] = [
            {"step": int(step), "evalLoss": _rounded(loss)}
            for step, loss in sorted(evaluations.items(), key=lambda item: int(item[0]))
        ]
    tracking = tracking_status(progress.get("tracking"))
    if tracking:
        status["tracking"] = tracking
    warnings = progress.get("warnings")
    if isinstance(warnings, list) and warnings:
        status["dataWarnings"] = [str(w)[:WARNING_CHARS] for w in warnings[:WARNINGS_KEPT]]
    if progress.get("last_checkpoint_step") is not None:
        status["lastCheckpoint"] = {
            "step": int(progress["last_checkpoint_step"]),
            "uri": progress.get("last_checkpoint_uri") or "",
            "time": checkpoint_time,
        }
    return status


def changed_fields(old_status: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Only the fields whose value differs (so an unchanged report writes nothing).

    lastCheckpoint keeps its old time when the step has not moved.
    """
    patch: dict[str, Any] = {}
    for key, value in new.items():
        old = old_status.get(key)
        if key == "lastCheckpoint" and old and old.get("step") == value.get("step"):
            continue
        if key == "progress" and old:
            comparable = {k: v for k, v in value.items() if k != "etaSeconds"}
            if all(old.get(k) == v for k, v in comparable.items()):
                continue
        if old != value:
            patch[key] = value
    return patch
