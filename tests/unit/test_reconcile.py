"""The operator's decisions, from a job and its pods to the next action. No API server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator.reconcile import SPEC_ANNOTATION, reconcile
from kubetune_operator.workload import ATTEMPT_LABEL, JOB_LABEL
from kubetune_trainer.errors import ExitCode

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
IMAGE = "trainer:test"


def _job(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict:
    base: dict[str, Any] = {
        "model": {"source": "hf://org/model"},
        "dataset": {"sources": ["s3://data/train.jsonl"]},
        "output": {"uri": "s3://out/job", "credentialsSecretRef": {"name": "s3"}},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "u-1", "generation": generation},
        "spec": base,
        "status": status or {},
    }


def _pod(attempt: int, phase: str, spec_json: str | None = None, **status: Any) -> dict:
    annotations = {SPEC_ANNOTATION: spec_json} if spec_json else {}
    return {
        "metadata": {
            "name": f"job-attempt-{attempt}",
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: str(attempt)},
            "annotations": annotations,
        },
        "status": {"phase": phase, **status},
    }


def _terminated(code: int, message: dict | str | None = None, reason: str = "Error") -> dict:
    text = json.dumps(message) if isinstance(message, dict) else message
    return {
        "containerStatuses": [
            {"state": {"terminated": {"exitCode": code, "reason": reason, "message": text}}}
        ]
    }


def _condition(decision, type_: str) -> dict:
    return next(c for c in decision.status["conditions"] if c["type"] == type_)


def test_new_valid_job_creates_first_attempt() -> None:
    decision = reconcile(_job(), [], image=IMAGE, now=NOW)
    pod = decision.create_pod
    assert pod is not None and pod["metadata"]["name"] == "job-attempt-1"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert decision.status["state"] == "Pending"
    assert decision.status["attempts"] == 1
    assert decision.status["startTime"] == "2026-11-23T12:00:00Z"
    assert decision.status["observedGeneration"] == 1
    assert _condition(decision, "Accepted")["status"] == "True"
    assert [e.reason for e in decision.events] == ["AttemptCreated"]


def test_invalid_spec_gets_condition_naming_the_field_and_no_pod() -> None:
    decision = reconcile(_job(method={"type": "lora", "lora": {"r": 0}}), [], image=IMAGE, now=NOW)
    assert decision.create_pod is None
    assert decision.status["state"] == "Invalid"
    accepted = _condition(decision, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "spec.method.lora.r: must be ≥ 1 (got 0)" in accepted["message"]
    assert decision.events[0].type == "Warning"


def test_cluster_jobs_need_s3_output() -> None:
    decision = reconcile(_job(output={"uri": "/tmp/out"}), [], image=IMAGE, now=NOW)
    assert decision.create_pod is None
    assert "spec.output.uri: must be an s3:// URI" in decision.status["message"]


def test_existing_attempt_is_observed_not_recreated() -> None:
    first = reconcile(_job(), [], image=IMAGE, now=NOW)
    job = _job(status=first.status)
    again = reconcile(job, [_pod(1, "Pending")], image=IMAGE, now=NOW)
    assert again.create_pod is None
    assert again.events == []  # nothing new to say


def test_running_pod_sets_running_state() -> None:
    decision = reconcile(
        _job({"state": "Pending", "attempts": 1}), [_pod(1, "Running")], image=IMAGE, now=NOW
    )
    assert decision.status["state"] == "Running"
    assert _condition(decision, "Running")["status"] == "True"


@pytest.mark.parametrize(
    ("pod_status", "reason"),
    [
        (
            {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes have nvidia.com/gpu",
                    }
                ]
            },
            "Unschedulable",
        ),
        (
            {
                "containerStatuses": [
                    {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
                ]
            },
            "ImagePullBackOff",
        ),
    ],
)
def test_pending_reasons_a_user_can_act_on(pod_status: dict, reason: str) -> None:
    decision = reconcile(
        _job({"state": "Pending", "attempts": 1}),
        [_pod(1, "Pending", **pod_status)],
        image=IMAGE,
        now=NOW,
    )
    assert _condition(decision, "Running")["reason"] == reason
    assert decision.events and decision.events[0].type == "Warning"


def test_success_records_artifact_and_metrics() -> None:
    result = {
        "artifact": {"uri": "s3://out/job/adapter", "digest": "sha256:ab", "sizeBytes": 10},
        "metrics": {"train_loss": 1.5, "eval_loss": 1.7, "perplexity": 5.4},
    }
    decision = reconcile(
        _job({"state": "Running", "attempts": 1}),
        [_pod(1, "Succeeded", **_terminated(0, result, "Completed"))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.status["state"] == "Succeeded"
    assert decision.status["artifact"]["uri"] == "s3://out/job/adapter"
    assert decision.status["metrics"] == {"trainLoss": 1.5, "evalLoss": 1.7, "perplexity": 5.4}
    assert _condition(decision, "Succeeded")["status"] == "True"
    assert decision.status["completionTime"] == "2026-11-23T12:00:00Z"


def test_non_retryable_exit_fails_at_once_with_the_trainers_reason() -> None:
    error = {
        "error": {
            "reason": "DatasetInvalid",
            "message": "2 of 6 rows miss 'output'",
            "hint": "fix the rows",
        }
    }
    decision = reconcile(
        _job({"state": "Running", "attempts": 1}),
        [_pod(1, "Failed", **_terminated(ExitCode.DATASET_INVALID, error))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_pod is None
    failed = _condition(decision, "Failed")
    assert failed["reason"] == "DatasetInvalid"
    assert "2 of 6 rows miss 'output' (hint: fix the rows)" in failed["message"]


def test_retryable_exit_starts_next_attempt_with_the_started_spec() -> None:
    started = json.dumps({"started": "spec"})
    job = _job({"state": "Running", "attempts": 1, "lastCheckpoint": {"step": 40}})
    original = reconcile(_job(), [], image=IMAGE, now=NOW).create_pod
    started = original["metadata"]["annotations"][SPEC_ANNOTATION]
    decision = reconcile(
        job,
        [_pod(1, "Failed", started, **_terminated(ExitCode.STORAGE_UNAVAILABLE))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_pod["metadata"]["name"] == "job-attempt-2"
    assert decision.create_pod["metadata"]["annotations"][SPEC_ANNOTATION] == started
    assert decision.status["state"] == "Retrying"
    assert "resuming from checkpoint step 40" in decision.status["message"]


def test_retries_stop_at_retry_limit() -> None:
    job = _job({"state": "Running", "attempts": 3}, retryLimit=2)
    pods = [_pod(i, "Failed", **_terminated(137, None)) for i in (1, 2, 3)]
    decision = reconcile(job, pods, image=IMAGE, now=NOW)
    assert decision.create_pod is None
    assert _condition(decision, "Failed")["reason"] == "BackoffLimitExceeded"


def test_oom_killed_is_not_retried() -> None:
    decision = reconcile(
        _job({"state": "Running", "attempts": 1}),
        [_pod(1, "Failed", **_terminated(137, None, "OOMKilled"))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_pod is None
    assert _condition(decision, "Failed")["reason"] == "OOMKilled"
    assert "spec.resources.memory" in decision.status["message"]


def test_deadline_exceeded_fails_and_stops_the_pod() -> None:
    start = (NOW - timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    job = _job({"state": "Running", "attempts": 1, "startTime": start}, activeDeadlineSeconds=60)
    decision = reconcile(job, [_pod(1, "Running")], image=IMAGE, now=NOW)
    assert decision.delete_pods == ["job-attempt-1"]
    assert _condition(decision, "Failed")["reason"] == "DeadlineExceeded"


def test_suspend_stops_the_pod_and_resume_starts_a_new_attempt() -> None:
    running = _job({"state": "Running", "attempts": 1}, suspend=True)
    decision = reconcile(running, [_pod(1, "Running")], image=IMAGE, now=NOW)
    assert decision.delete_pods == ["job-attempt-1"]
    assert decision.status["state"] == "Suspended"

    resumed = reconcile(_job(decision.status, suspend=False), [], image=IMAGE, now=NOW)
    assert resumed.create_pod["metadata"]["name"] == "job-attempt-2"
    assert _condition(resumed, "Suspended")["status"] == "False"


def test_spec_change_while_running_is_reported_not_applied() -> None:
    first = reconcile(_job(), [], image=IMAGE, now=NOW).create_pod
    started = first["metadata"]["annotations"][SPEC_ANNOTATION]
    changed = _job(
        {"state": "Running", "attempts": 1}, generation=2, training={"learningRate": "1e-3"}
    )
    decision = reconcile(changed, [_pod(1, "Running", started)], image=IMAGE, now=NOW)
    assert decision.create_pod is None and decision.delete_pods == []
    condition = _condition(decision, "SpecChangeIgnored")
    assert condition["status"] == "True" and condition["observedGeneration"] == 2
    assert decision.status["observedGeneration"] == 2


def test_terminal_jobs_stay_terminal() -> None:
    decision = reconcile(
        _job({"state": "Succeeded", "attempts": 1}), [_pod(1, "Succeeded")], image=IMAGE, now=NOW
    )
    assert decision.create_pod is None and decision.events == []


def test_condition_transition_time_kept_when_status_unchanged() -> None:
    first = reconcile(
        _job({"state": "Pending", "attempts": 1}), [_pod(1, "Running")], image=IMAGE, now=NOW
    )
    later = reconcile(
        _job(first.status), [_pod(1, "Running")], image=IMAGE, now=NOW + timedelta(minutes=5)
    )
    assert _condition(later, "Running")["lastTransitionTime"] == "2026-11-23T12:00:00Z"
    assert later.status == first.status  # a stable status: nothing to write
