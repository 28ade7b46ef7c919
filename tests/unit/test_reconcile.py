"""The operator's decisions, from a job, its attempt Jobs and their pods to the next action.
No API server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator.reconcile import reconcile
from kubetune_operator.workload import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX,
    JOB_LABEL,
    QUEUE_LABEL,
    SPEC_ANNOTATION,
)
from kubetune_trainer.errors import ExitCode

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
IMAGE = "trainer:test"


def _job(
    status: dict[str, Any] | None = None,
    generation: int = 1,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict:
    base: dict[str, Any] = {
        "model": {"source": "hf://org/model"},
        "dataset": {"sources": ["s3://data/train.jsonl"]},
        "output": {"uri": "s3://out/job", "credentialsSecretRef": {"name": "s3"}},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "job",
            "namespace": "ns",
            "uid": "u-1",
            "generation": generation,
            "labels": labels or {},
        },
        "spec": base,
        "status": status or {},
    }


def _attempt(
    attempt: int,
    *,
    nodes: int = 1,
    spec_json: str | None = None,
    suspend: bool = False,
    condition: str | None = None,
    reason: str = "",
    queue: str | None = None,
) -> dict:
    """An attempt Job as the Job controller reports it (condition: Complete or Failed)."""
    labels = {JOB_LABEL: "job", ATTEMPT_LABEL: str(attempt)}
    if queue:
        labels[QUEUE_LABEL] = queue
    conditions = [{"type": condition, "status": "True", "reason": reason}] if condition else []
    return {
        "metadata": {
            "name": f"job-attempt-{attempt}",
            "uid": f"job-uid-{attempt}",
            "labels": labels,
            "annotations": {SPEC_ANNOTATION: spec_json} if spec_json else {},
        },
        "spec": {"completions": nodes, "parallelism": nodes, "suspend": suspend},
        "status": {"conditions": conditions},
    }


def _pod(attempt: int, phase: str, index: int = 0, **status: Any) -> dict:
    return {
        "metadata": {
            "name": f"job-attempt-{attempt}-{index}-abcde",
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: str(attempt)},
            "annotations": {COMPLETION_INDEX: str(index)},
        },
        "status": {"phase": phase, **status},
    }


def _terminated(
    code: int, message: dict | str | None = None, reason: str = "Error", at: str = ""
) -> dict:
    text = json.dumps(message) if isinstance(message, dict) else message
    terminated = {"exitCode": code, "reason": reason, "message": text, "finishedAt": at}
    return {"containerStatuses": [{"state": {"terminated": terminated}}]}


def _error(code: ExitCode, message: str = "boom") -> dict:
    return {"error": {"reason": code.reason, "message": message, "exitCode": int(code)}}


def _condition(decision, type_: str) -> dict:
    return next(c for c in decision.status["conditions"] if c["type"] == type_)


def _started_spec() -> str:
    return reconcile(_job(), [], [], image=IMAGE, now=NOW).create_job["metadata"]["annotations"][
        SPEC_ANNOTATION
    ]


RUNNING = {"state": "Running", "attempts": 1}


def test_new_valid_job_creates_first_attempt_job() -> None:
    decision = reconcile(_job(), [], [], image=IMAGE, now=NOW)
    job = decision.create_job
    assert job is not None and job["metadata"]["name"] == "job-attempt-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["suspend"] is False
    assert decision.create_service is None  # one node: no rendezvous Service
    assert decision.status["state"] == "Pending"
    assert decision.status["attempts"] == 1
    assert decision.status["startTime"] == "2026-11-23T12:00:00Z"
    assert decision.status["observedGeneration"] == 1
    assert _condition(decision, "Accepted")["status"] == "True"
    assert [e.reason for e in decision.events] == ["AttemptCreated"]


def test_multi_node_job_gets_one_pod_per_node_and_a_rank0_service() -> None:
    decision = reconcile(_job(resources={"nodes": 3, "gpus": 8}), [], [], image=IMAGE, now=NOW)
    assert decision.create_job["spec"]["completions"] == 3
    assert decision.create_job["spec"]["parallelism"] == 3
    service = decision.create_service
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_invalid_spec_gets_condition_naming_the_field_and_no_job() -> None:
    decision = reconcile(
        _job(method={"type": "lora", "lora": {"r": 0}}), [], [], image=IMAGE, now=NOW
    )
    assert decision.create_job is None
    assert decision.status["state"] == "Invalid"
    accepted = _condition(decision, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "spec.method.lora.r: must be ≥ 1 (got 0)" in accepted["message"]
    assert decision.events[0].type == "Warning"


def test_qlora_under_fsdp_is_invalid_naming_the_field() -> None:
    decision = reconcile(
        _job(method={"type": "qlora"}, distributed={"strategy": "fsdp"}),
        [],
        [],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None
    assert "spec.distributed.strategy" in decision.status["message"]


def test_cluster_jobs_need_s3_output() -> None:
    decision = reconcile(_job(output={"uri": "/tmp/out"}), [], [], image=IMAGE, now=NOW)
    assert decision.create_job is None
    assert "spec.output.uri: must be an s3:// URI" in decision.status["message"]


def test_existing_attempt_is_observed_not_recreated() -> None:
    first = reconcile(_job(), [], [], image=IMAGE, now=NOW)
    again = reconcile(_job(first.status), [_attempt(1)], [], image=IMAGE, now=NOW)
    assert again.create_job is None
    assert again.events == []  # nothing new to say
    assert again.status["message"] == "attempt 1 created, waiting to start"
    # What the attempt's creation wrote is what its Job's and its pod's events compute:
    # neither writes the status again.
    assert again.status == first.status
    pods = [_pod(1, "Pending")]
    pending = reconcile(_job(first.status), [_attempt(1)], pods, image=IMAGE, now=NOW)
    assert pending.status == first.status and pending.events == []
    assert [e.message for e in first.events] == ["attempt 1 created, waiting to start"]


def test_running_pod_sets_running_state() -> None:
    decision = reconcile(
        _job({"state": "Pending", "attempts": 1}),
        [_attempt(1)],
        [_pod(1, "Running")],
        image=IMAGE,
        now=NOW,
    )
    assert decision.status["state"] == "Running"
    assert _condition(decision, "Running")["status"] == "True"


def test_a_multi_node_attempt_runs_when_every_rank_runs() -> None:
    job = _job({"state": "Pending", "attempts": 1}, resources={"nodes": 2})
    one = reconcile(
        job, [_attempt(1, nodes=2)], [_pod(1, "Running", 0), _pod(1, "Pending", 1)], image=IMAGE
    )
    assert one.status["state"] == "Pending"
    both = reconcile(
        job, [_attempt(1, nodes=2)], [_pod(1, "Running", 0), _pod(1, "Running", 1)], image=IMAGE
    )
    assert both.status["state"] == "Running"
    assert "on 2 nodes" in both.status["message"]


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
        [_attempt(1)],
        [_pod(1, "Pending", **pod_status)],
        image=IMAGE,
        now=NOW,
    )
    assert _condition(decision, "Running")["reason"] == reason
    assert decision.events and decision.events[0].type == "Warning"


def test_success_records_rank0s_artifact_and_metrics() -> None:
    result = {
        "artifact": {"uri": "s3://out/job/adapter", "digest": "sha256:ab", "sizeBytes": 10},
        "metrics": {"train_loss": 1.5, "eval_loss": 1.7, "perplexity": 5.4},
    }
    decision = reconcile(
        _job(RUNNING, resources={"nodes": 2}),
        [_attempt(1, nodes=2, condition="Complete")],
        [
            _pod(1, "Succeeded", 1, **_terminated(0, None, "Completed")),
            _pod(1, "Succeeded", 0, **_terminated(0, result, "Completed")),
        ],
        image=IMAGE,
        now=NOW,
    )
    assert decision.status["state"] == "Succeeded"
    assert decision.status["artifact"]["uri"] == "s3://out/job/adapter"
    assert decision.status["metrics"] == {"trainLoss": 1.5, "evalLoss": 1.7, "perplexity": 5.4}
    assert _condition(decision, "Succeeded")["status"] == "True"
    assert decision.status["completionTime"] == "2026-11-23T12:00:00Z"
    assert "tracking" not in decision.status  # the trainer reported no tracking


def test_success_records_where_the_run_is_tracked() -> None:
    result = {
        "artifact": {"uri": "s3://out/job/adapter", "digest": "sha256:ab", "sizeBytes": 10},
        "metrics": {"train_loss": 1.5},
        "tracking": {
            "mlflow": "ok",
            "runId": "r1",
            "runUrl": "http://mlflow/#/experiments/2/runs/r1",
            "tensorboard": "on",
            "tensorboardUri": "s3://out/job/adapter/tensorboard",
        },
    }
    decision = reconcile(
        _job(RUNNING),
        [_attempt(1, condition="Complete")],
        [_pod(1, "Succeeded", **_terminated(0, result, "Completed"))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.status["state"] == "Succeeded"
    assert decision.status["tracking"] == {
        "mlflowRunId": "r1",
        "mlflowRunUrl": "http://mlflow/#/experiments/2/runs/r1",
        "tensorboardUri": "s3://out/job/adapter/tensorboard",
    }


def test_a_failed_pod_is_not_acted_on_before_the_job_controller_fails_the_attempt() -> None:
    decision = reconcile(
        _job(RUNNING),
        [_attempt(1)],
        [_pod(1, "Failed", **_terminated(1, _error(ExitCode.DATASET_INVALID)))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None and decision.status["state"] == "Running"


def test_non_retryable_exit_fails_at_once_with_the_trainers_reason() -> None:
    error = {
        "error": {
            "reason": "DatasetInvalid",
            "message": "2 of 6 rows miss 'output'",
            "hint": "fix the rows",
        }
    }
    decision = reconcile(
        _job(RUNNING),
        [_attempt(1, condition="Failed", reason="BackoffLimitExceeded")],
        [_pod(1, "Failed", **_terminated(ExitCode.DATASET_INVALID, error))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None
    failed = _condition(decision, "Failed")
    assert failed["reason"] == "DatasetInvalid"
    assert "2 of 6 rows miss 'output' (hint: fix the rows)" in failed["message"]


def test_the_trainers_exit_code_wins_over_torchruns() -> None:
    """torchrun exits 1 for any failed rank; the trainer's code is in its report."""
    decision = reconcile(
        _job(RUNNING, resources={"nodes": 2}),
        [_attempt(1, nodes=2, condition="Failed", reason="BackoffLimitExceeded")],
        [
            # rank 0 was stopped by the Job controller after rank 1 failed: look past it
            _pod(1, "Failed", 0, **_terminated(1, _error(ExitCode.PREEMPTED), at="12:00:05")),
            _pod(1, "Failed", 1, **_terminated(1, _error(ExitCode.DATASET_INVALID), at="12:00:09")),
        ],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None
    assert _condition(decision, "Failed")["reason"] == "DatasetInvalid"


def test_retryable_failure_waits_for_every_rank_to_stop_then_retries_with_started_spec() -> None:
    started = _started_spec()
    job = _job({**RUNNING, "lastCheckpoint": {"step": 40}}, resources={"nodes": 2})
    attempt = _attempt(1, nodes=2, spec_json=started, condition="Failed", reason="X")
    failed = _pod(1, "Failed", 1, **_terminated(1, _error(ExitCode.STORAGE_UNAVAILABLE)))
    waiting = reconcile(job, [attempt], [failed, _pod(1, "Running", 0)], image=IMAGE, now=NOW)
    assert waiting.create_job is None
    assert _condition(waiting, "Running")["reason"] == "AttemptFailed"

    decision = reconcile(job, [attempt], [failed], image=IMAGE, now=NOW)
    assert decision.create_job["metadata"]["name"] == "job-attempt-2"
    assert decision.create_job["metadata"]["annotations"][SPEC_ANNOTATION] == started
    assert decision.status["state"] == "Retrying"
    assert decision.status["attempts"] == 2
    assert "resuming from checkpoint step 40" in decision.status["message"]


def test_retries_stop_at_retry_limit() -> None:
    job = _job({"state": "Running", "attempts": 3}, retryLimit=2)
    jobs = [_attempt(i, condition="Failed", reason="BackoffLimitExceeded") for i in (1, 2, 3)]
    pods = [_pod(i, "Failed", **_terminated(137, None)) for i in (1, 2, 3)]
    decision = reconcile(job, jobs, pods, image=IMAGE, now=NOW)
    assert decision.create_job is None
    assert _condition(decision, "Failed")["reason"] == "BackoffLimitExceeded"


def test_oom_killed_is_not_retried() -> None:
    decision = reconcile(
        _job(RUNNING),
        [_attempt(1, condition="Failed", reason="BackoffLimitExceeded")],
        [_pod(1, "Failed", **_terminated(137, None, "OOMKilled"))],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None
    assert _condition(decision, "Failed")["reason"] == "OOMKilled"
    assert "spec.resources.memory" in decision.status["message"]


def test_deadline_exceeded_fails_and_stops_the_attempt() -> None:
    start = (NOW - timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    job = _job({**RUNNING, "startTime": start}, activeDeadlineSeconds=60)
    decision = reconcile(job, [_attempt(1)], [_pod(1, "Running")], image=IMAGE, now=NOW)
    assert decision.delete_jobs == ["job-attempt-1"]
    assert _condition(decision, "Failed")["reason"] == "DeadlineExceeded"


def test_the_job_controllers_deadline_is_not_retried() -> None:
    decision = reconcile(
        _job(RUNNING, activeDeadlineSeconds=600),
        [_attempt(1, condition="Failed", reason="DeadlineExceeded")],
        [],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None
    assert _condition(decision, "Failed")["reason"] == "DeadlineExceeded"


def test_the_remaining_deadline_goes_on_the_next_attempt_job() -> None:
    start = (NOW - timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    job = _job({**RUNNING, "startTime": start}, activeDeadlineSeconds=600)
    decision = reconcile(job, [_attempt(1, condition="Failed")], [], image=IMAGE, now=NOW)
    assert decision.create_job["spec"]["activeDeadlineSeconds"] == 500


def test_a_deleted_attempt_job_is_retried() -> None:
    decision = reconcile(_job(RUNNING), [], [], image=IMAGE, now=NOW)
    assert decision.create_job["metadata"]["name"] == "job-attempt-2"
    assert decision.status["state"] == "Retrying"
    assert "AttemptDeleted" in decision.status["message"]


def test_suspend_suspends_the_attempt_job_and_resume_starts_a_new_attempt() -> None:
    running = _job(RUNNING, suspend=True)
    decision = reconcile(running, [_attempt(1)], [_pod(1, "Running")], image=IMAGE, now=NOW)
    assert decision.suspend_jobs == ["job-attempt-1"] and decision.delete_jobs == []
    assert decision.status["state"] == "Suspended"
    assert "stopping attempt 1" in decision.status["message"]

    stopped = reconcile(
        _job(decision.status, suspend=True), [_attempt(1, suspend=True)], [], image=IMAGE, now=NOW
    )
    assert stopped.suspend_jobs == []
    assert "set spec.suspend to false" in stopped.status["message"]

    resumed = reconcile(
        _job(stopped.status, suspend=False), [_attempt(1, suspend=True)], [], image=IMAGE, now=NOW
    )
    assert resumed.create_job["metadata"]["name"] == "job-attempt-2"
    assert resumed.delete_jobs == ["job-attempt-1"]
    assert _condition(resumed, "Suspended")["status"] == "False"


def test_suspend_deletes_a_queued_attempt_job_kueue_owns_its_suspension() -> None:
    job = _job(RUNNING, labels={QUEUE_LABEL: "team-a"}, suspend=True)
    decision = reconcile(job, [_attempt(1, queue="team-a")], [], image=IMAGE, now=NOW)
    assert decision.delete_jobs == ["job-attempt-1"] and decision.suspend_jobs == []


def test_a_queued_job_is_created_suspended_with_kueue_labels() -> None:
    labels = {QUEUE_LABEL: "team-a", "kueue.x-k8s.io/priority-class": "high", "team": "x"}
    decision = reconcile(_job(labels=labels), [], [], image=IMAGE, now=NOW)
    job = decision.create_job
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert "team" not in job["metadata"]["labels"]
    assert decision.status["state"] == "Queued"
    assert _condition(decision, "Queued")["reason"] == "PendingAdmission"


def _workload(conditions: list[dict]) -> dict:
    return {
        "metadata": {"ownerReferences": [{"kind": "Job", "name": "job-attempt-1"}]},
        "status": {"conditions": conditions},
    }


def test_queued_shows_kueues_own_message_and_admission_clears_it() -> None:
    labels = {QUEUE_LABEL: "team-a"}
    created = reconcile(_job(labels=labels), [], [], image=IMAGE, now=NOW)
    pending = _workload(
        [{"type": "QuotaReserved", "status": "False", "message": "insufficient quota for gpu"}]
    )
    job = _job(created.status, labels=labels)
    queued = reconcile(
        job, [_attempt(1, suspend=True, queue="team-a")], [], [pending], image=IMAGE, now=NOW
    )
    assert queued.status["state"] == "Queued"
    assert "insufficient quota for gpu" in _condition(queued, "Queued")["message"]
    assert queued.create_job is None and queued.events == []

    admitted = reconcile(
        _job(queued.status, labels=labels),
        [_attempt(1, queue="team-a")],
        [_pod(1, "Running")],
        image=IMAGE,
        now=NOW,
    )
    assert admitted.status["state"] == "Running"
    assert _condition(admitted, "Queued")["status"] == "False"


def test_preemption_is_reported_and_consumes_no_attempt() -> None:
    labels = {QUEUE_LABEL: "team-a"}
    evicted = _workload(
        [{"type": "Evicted", "status": "True", "reason": "Preempted", "message": "higher prio"}]
    )
    decision = reconcile(
        _job({**RUNNING, "lastCheckpoint": {"step": 6}}, labels=labels),
        [_attempt(1, suspend=True, queue="team-a")],
        [],
        [evicted],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None and decision.delete_jobs == []
    assert decision.status["state"] == "Queued"
    assert decision.status["attempts"] == 1
    assert _condition(decision, "Queued")["reason"] == "Preempted"
    assert "from checkpoint step 6" in decision.status["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "Preempted")]
    # Without Kueue's Workload (no RBAC, or not installed) it is still recognised.
    again = reconcile(
        _job(decision.status, labels=labels),
        [_attempt(1, suspend=True, queue="team-a")],
        [],
        image=IMAGE,
        now=NOW,
    )
    assert _condition(again, "Queued")["reason"] == "Preempted" and again.events == []


def test_spec_change_while_running_is_reported_not_applied() -> None:
    started = _started_spec()
    changed = _job(RUNNING, generation=2, training={"learningRate": "1e-3"})
    decision = reconcile(
        changed, [_attempt(1, spec_json=started)], [_pod(1, "Running")], image=IMAGE, now=NOW
    )
    assert decision.create_job is None and decision.delete_jobs == []
    condition = _condition(decision, "SpecChangeIgnored")
    assert condition["status"] == "True" and condition["observedGeneration"] == 2
    assert decision.status["observedGeneration"] == 2


def test_terminal_jobs_stay_terminal() -> None:
    decision = reconcile(
        _job({"state": "Succeeded", "attempts": 1}),
        [_attempt(1, condition="Complete")],
        [_pod(1, "Succeeded")],
        image=IMAGE,
        now=NOW,
    )
    assert decision.create_job is None and decision.events == []
    assert decision.delete_jobs == []


def test_a_succeeded_job_never_stops_an_attempt_it_sees_as_running() -> None:
    """A stale view (the attempt that completed still seen running) must not delete it;
    a Failed job still stops an attempt left running (a stop lost in a crash)."""
    running = [_attempt(1)], [_pod(1, "Running")]
    done = reconcile(_job({"state": "Succeeded", "attempts": 1}), *running, image=IMAGE)
    assert done.delete_jobs == [] and done.events == []
    failed = reconcile(_job({"state": "Failed", "attempts": 1}), *running, image=IMAGE)
    assert failed.delete_jobs == ["job-attempt-1"]


def test_condition_transition_time_kept_when_status_unchanged() -> None:
    first = reconcile(
        _job({"state": "Pending", "attempts": 1}),
        [_attempt(1)],
        [_pod(1, "Running")],
        image=IMAGE,
        now=NOW,
    )
    later = reconcile(
        _job(first.status),
        [_attempt(1)],
        [_pod(1, "Running")],
        image=IMAGE,
        now=NOW + timedelta(minutes=5),
    )
    assert _condition(later, "Running")["lastTransitionTime"] == "2026-11-23T12:00:00Z"
    assert later.status == first.status  # a stable status: nothing to write


def test_start_time_lost_with_a_status_write_is_recovered_from_the_first_job() -> None:
    attempt = _attempt(1)
    attempt["metadata"]["creationTimestamp"] = "2026-11-23T11:00:00Z"
    decision = reconcile(_job(), [attempt], [_pod(1, "Running")], image=IMAGE, now=NOW)
    assert decision.create_job is None
    assert decision.status["attempts"] == 1
    assert decision.status["startTime"] == "2026-11-23T11:00:00Z"
    assert _condition(decision, "Accepted")["status"] == "True"  # lost with the same write


def test_a_suspend_undone_before_its_status_was_written_resumes() -> None:
    """The operator suspended the Job, died before writing Suspended, and the user set
    suspend back to false: the suspended Job has no one else to resume it."""
    decision = reconcile(_job(RUNNING), [_attempt(1, suspend=True)], [], image=IMAGE, now=NOW)
    assert decision.delete_jobs == ["job-attempt-1"]
    assert decision.create_job["metadata"]["name"] == "job-attempt-2"


def test_suspending_a_job_still_waiting_in_the_queue_deletes_its_job() -> None:
    job = _job({"state": "Queued", "attempts": 1}, labels={QUEUE_LABEL: "q"}, suspend=True)
    decision = reconcile(job, [_attempt(1, suspend=True, queue="q")], [], image=IMAGE, now=NOW)
    assert decision.delete_jobs == ["job-attempt-1"]
    assert decision.status["state"] == "Suspended"


@pytest.mark.parametrize(
    ("status", "jobs", "pods", "spec", "expected"),
    [
        ({}, [], [], {}, ("Pending", False, False, True)),
        (RUNNING, [_attempt(1)], [_pod(1, "Running")], {}, ("Running", False, False, True)),
        (RUNNING, [_attempt(1, condition="Complete")], [], {}, ("Succeeded", True, False, False)),
        (
            RUNNING,
            [_attempt(1, condition="Failed")],
            [_pod(1, "Failed", **_terminated(1, _error(ExitCode.DATASET_INVALID)))],
            {},
            ("Failed", False, True, False),
        ),
        ({}, [], [], {"method": {"lora": {"r": 0}}}, ("Invalid", False, True, False)),
        (
            RUNNING,
            [_attempt(1, suspend=True)],
            [],
            {"suspend": True},
            ("Suspended", False, False, False),
        ),
    ],
)
def test_kstatus_conditions_follow_the_state(
    status: dict, jobs: list, pods: list, spec: dict, expected: tuple
) -> None:
    """Ready/Stalled/Reconciling, so Flux and kstatus need no custom code."""
    decision = reconcile(_job(status, **spec), jobs, pods, image=IMAGE, now=NOW)
    state, ready, stalled, reconciling = expected
    assert decision.status["state"] == state
    assert _condition(decision, "Ready")["status"] == str(ready)
    assert _condition(decision, "Stalled")["status"] == str(stalled)
    assert _condition(decision, "Reconciling")["status"] == str(reconciling)
    assert _condition(decision, "Ready")["observedGeneration"] == 1


# -- issue 15: a kill at any line heals; Retrying holds; bad input never crashes ------------


def _failed_first_attempt(**spec: Any) -> tuple[dict, dict]:
    """Attempt 1 (of a job with ``spec``) failed with a retryable error; its pod stopped."""
    started = reconcile(_job(**spec), [], [], image=IMAGE, now=NOW).create_job["metadata"][
        "annotations"
    ][SPEC_ANNOTATION]
    attempt = _attempt(1, spec_json=started, condition="Failed", reason="BackoffLimitExceeded")
    pod = _pod(1, "Failed", **_terminated(20, _error(ExitCode.STORAGE_UNAVAILABLE, "no S3")))
    return attempt, pod


def test_retrying_state_and_the_failures_reason_hold_until_the_next_attempt_trains() -> None:
    failed, failed_pod = _failed_first_attempt()
    retry = reconcile(_job(RUNNING), [failed], [failed_pod], image=IMAGE, now=NOW)
    assert retry.create_job["metadata"]["name"] == "job-attempt-2"
    assert retry.status["state"] == "Retrying"
    assert "StorageUnavailable: no S3" in retry.status["message"]
    assert _condition(retry, "Running")["reason"] == "Retrying"  # was lost after finish()
    assert _condition(retry, "Reconciling")["reason"] == "Retrying"
    assert [(e.type, e.reason, e.action) for e in retry.events] == [
        ("Warning", "StorageUnavailable", "RetryAttempt")
    ]

    second = _attempt(2, spec_json=_started_spec())
    for pods in ([], [_pod(2, "Pending")]):  # the new Job, then its pod, before it runs
        later = reconcile(_job(retry.status), [failed, second], [failed_pod, *pods], image=IMAGE)
        assert later.status["state"] == "Retrying", pods
        assert later.status["message"] == retry.status["message"]
        assert later.events == []

    running = reconcile(
        _job(retry.status), [failed, second], [failed_pod, _pod(2, "Running")], image=IMAGE
    )
    assert running.status["state"] == "Running"


def test_an_unschedulable_retry_says_so_instead_of_retrying() -> None:
    failed, failed_pod = _failed_first_attempt()
    retry = reconcile(_job(RUNNING), [failed], [failed_pod], image=IMAGE, now=NOW)
    unschedulable = _pod(
        2,
        "Pending",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "x"}
        ],
    )
    later = reconcile(
        _job(retry.status), [failed, _attempt(2)], [failed_pod, unschedulable], image=IMAGE
    )
    assert later.status["state"] == "Pending"
    assert [e.reason for e in later.events] == ["Unschedulable"]


def test_a_retry_whose_status_write_was_lost_is_derived_with_the_same_event() -> None:
    """Killed after creating attempt 2's Job, before writing Retrying (or after posting
    its Event): the next reconcile derives the same state and the same Event (same
    transition origin), and creates nothing."""
    failed, failed_pod = _failed_first_attempt()
    retry = reconcile(_job(RUNNING), [failed], [failed_pod], image=IMAGE, now=NOW)
    healed = reconcile(
        _job(RUNNING),
        [failed, _attempt(2)],
        [failed_pod, _pod(2, "Pending")],
        image=IMAGE,
        now=NOW + timedelta(seconds=3),
    )
    assert healed.create_job is None
    assert healed.status["state"] == "Retrying" and healed.status["attempts"] == 2
    assert healed.status["message"] == retry.status["message"]
    assert healed.events == retry.events


@pytest.mark.parametrize("created", ["2026-11-23T11:00:00Z", "2026-11-23T11:00:00+00:00"])
def test_the_first_jobs_creation_time_is_read_in_either_form(created: str) -> None:
    """From kopf's index it is ``...Z``; from a live LIST through the kubernetes client,
    ``...+00:00``: either gives the status's own form (found by the kill trials: the
    second form made every later reconcile of the job raise)."""
    attempt = _attempt(1)
    attempt["metadata"]["creationTimestamp"] = created
    decision = reconcile(_job(), [attempt], [_pod(1, "Running")], image=IMAGE, now=NOW)
    assert decision.status["startTime"] == "2026-11-23T11:00:00Z"
    again = reconcile(_job(decision.status), [attempt], [_pod(1, "Running")], image=IMAGE)
    assert again.status["startTime"] == "2026-11-23T11:00:00Z"


def test_a_status_lost_before_any_write_still_gets_the_remaining_deadline() -> None:
    """Killed between creating attempt 1 and the first status write, and attempt 1 then
    failed: the retry keeps the first Job's start and gets only what is left of the
    deadline."""
    failed, failed_pod = _failed_first_attempt(activeDeadlineSeconds=600)
    failed["metadata"]["creationTimestamp"] = "2026-11-23T11:58:20Z"  # 100 s before NOW
    decision = reconcile(
        _job(activeDeadlineSeconds=600), [failed], [failed_pod], image=IMAGE, now=NOW
    )
    assert decision.status["startTime"] == "2026-11-23T11:58:20Z"
    assert decision.status["attempts"] == 2
    assert decision.create_job["spec"]["activeDeadlineSeconds"] == 500


@pytest.mark.parametrize("spec", ["a string", ["a", "list"], 42])
def test_a_spec_that_is_not_an_object_is_an_invalid_spec(spec: Any) -> None:
    """Only possible when the API server's schema is bypassed; never an AttributeError."""
    body = _job()
    body["spec"] = spec
    decision = reconcile(body, [], [], image=IMAGE, now=NOW)
    assert decision.create_job is None
    assert decision.status["state"] == "Invalid"
    accepted = _condition(decision, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert accepted["message"].startswith("spec:"), accepted["message"]
    assert [(e.reason, e.action) for e in decision.events] == [("InvalidSpec", "ValidateSpec")]


def test_the_same_transition_repeated_later_is_a_new_event() -> None:
    """Preempted twice in one attempt: each "training again" is its own Event (its origin
    differs), while the same transition derived twice is one."""
    labels = {QUEUE_LABEL: "q"}
    status = dict(RUNNING)
    origins = []
    for minute in range(4):
        queued = minute % 2 == 0
        pods = [] if queued else [_pod(1, "Running")]
        decision = reconcile(
            _job(status, labels=labels),
            [_attempt(1, suspend=queued, queue="q")],
            pods,
            image=IMAGE,
            now=NOW + timedelta(minutes=minute),
        )
        assert len(decision.events) == 1, decision.status
        origins.append(decision.events[0].since)
        status = decision.status
    assert len(set(origins)) == 4


def test_a_retry_the_status_never_recorded_still_gets_its_event() -> None:
    """Killed right after creating attempt 2's Job; attempt 2 already trains when the
    operator is back: the job is Running, and the retry's Warning Event (the one it would
    have had) is still posted."""
    failed, failed_pod = _failed_first_attempt()
    retry = reconcile(_job(RUNNING), [failed], [failed_pod], image=IMAGE, now=NOW)
    healed = reconcile(
        _job(RUNNING),
        [failed, _attempt(2)],
        [failed_pod, _pod(2, "Running")],
        image=IMAGE,
        now=NOW,
    )
    assert healed.status["state"] == "Running" and healed.status["attempts"] == 2
    assert healed.events == retry.events  # same reason, message and origin: one Event
    recorded = reconcile(
        _job({**RUNNING, "attempts": 2}),
        [failed, _attempt(2)],
        [failed_pod, _pod(2, "Running")],
        image=IMAGE,
    )
    assert recorded.events == []  # once the status has the retry, nothing is owed


# -- TTL cleanup of a finished job's workloads -----------------------------------------------

FINISHED_AT = NOW - timedelta(hours=1)


def _succeeded(**extra: Any) -> dict[str, Any]:
    """A job whose success is recorded (an hour before NOW), as the operator wrote it."""
    done = reconcile(
        _job({"state": "Running", "attempts": 1, "startTime": "2026-11-23T10:00:00Z"}),
        [_attempt(1, condition="Complete")],
        [_pod(1, "Succeeded", **_terminated(0, {"artifact": ARTIFACT}))],
        image=IMAGE,
        now=FINISHED_AT,
    )
    assert done.status["state"] == "Succeeded"
    return {**done.status, **extra}


ARTIFACT = {"uri": "s3://out/job/adapter", "digest": "sha256:ab", "sizeBytes": 3}
SUCCEEDED_WORKLOADS = [_attempt(1, condition="Complete")], [_pod(1, "Succeeded")]


@pytest.mark.parametrize(
    ("default", "spec_ttl", "cleaned"),
    [
        (None, None, False),  # no default, nothing in the spec: kept for ever
        (7200, None, False),  # the operator's default has not passed yet
        (3600, None, True),  # ... and now it has (an hour exactly)
        (None, 0, True),  # 0: as soon as the finish is recorded
        (60, 86400, False),  # the spec wins over the operator's default
        (86400, 60, True),
    ],
)
def test_a_finished_jobs_workloads_are_deleted_after_its_ttl(
    default: int | None, spec_ttl: int | None, cleaned: bool
) -> None:
    spec = {} if spec_ttl is None else {"ttlSecondsAfterFinished": spec_ttl}
    decision = reconcile(
        _job(_succeeded(), **spec),
        *SUCCEEDED_WORKLOADS,
        image=IMAGE,
        now=NOW,
        ttl_seconds_after_finished=default,
    )
    assert decision.create_job is None and decision.status["state"] == "Succeeded"
    if not cleaned:
        assert decision.delete_jobs == [] and decision.delete_network_policies == []
        assert decision.events == []
        assert all(x["type"] != "WorkloadsDeleted" for x in decision.status["conditions"])
        return
    assert decision.delete_jobs == ["job-attempt-1"]
    assert decision.delete_network_policies == ["job-attempt-1"]
    assert decision.delete_services == []  # one node: it never had a Service
    deleted = _condition(decision, "WorkloadsDeleted")
    assert deleted["status"] == "True" and deleted["reason"] == "TTLExpired"
    assert [(e.type, e.reason, e.action) for e in decision.events] == [
        ("Normal", "WorkloadsDeleted", "DeleteWorkloads")
    ]
    assert decision.events[0].message == deleted["message"]


def test_a_job_is_not_cleaned_up_before_its_finish_is_recorded() -> None:
    """The reconcile that sees the attempt complete records the result first; even with
    ttlSecondsAfterFinished 0 the Jobs are deleted only by a later reconcile."""
    running = {"state": "Running", "attempts": 1, "startTime": "2026-11-23T10:00:00Z"}
    decision = reconcile(
        _job(running, ttlSecondsAfterFinished=0),
        *SUCCEEDED_WORKLOADS,
        image=IMAGE,
        now=NOW,
        ttl_seconds_after_finished=0,
    )
    assert decision.status["state"] == "Succeeded" and decision.delete_jobs == []


def test_every_attempts_jobs_network_policies_and_the_service_go() -> None:
    failed, failed_pod = _failed_first_attempt()
    status = {
        "state": "Failed",
        "attempts": 2,
        "completionTime": "2026-11-23T11:00:00Z",
        "conditions": [],
    }
    decision = reconcile(
        _job(status),
        [failed, _attempt(2, nodes=2, condition="Failed")],
        [failed_pod, _pod(2, "Failed"), _pod(2, "Failed", index=1)],
        image=IMAGE,
        now=NOW,
        ttl_seconds_after_finished=3600,
    )
    assert decision.delete_jobs == ["job-attempt-1", "job-attempt-2"]
    assert decision.delete_network_policies == ["job-attempt-1", "job-attempt-2"]
    assert decision.delete_services == ["ftj-job"]
    assert decision.status["state"] == "Failed" and decision.create_job is None


def test_the_last_failed_attempts_pod_is_kept_until_the_ttl() -> None:
    failed, failed_pod = _failed_first_attempt()
    status = {"state": "Failed", "attempts": 1, "completionTime": "2026-11-23T11:30:00Z"}
    decision = reconcile(
        _job(status), [failed], [failed_pod], image=IMAGE, now=NOW, ttl_seconds_after_finished=3600
    )
    assert decision.delete_jobs == [] and decision.events == []


@pytest.mark.parametrize("cleaned_up", [True, False])
@pytest.mark.parametrize("state", ["Succeeded", "Failed"])
def test_a_finished_job_whose_jobs_are_gone_stays_finished(cleaned_up: bool, state: str) -> None:
    """Once its Jobs and pods are deleted, a finished job stays as it was: no new attempt,
    status, startTime, attempts and artifact kept. Also when the operator died after the
    deletes and before recording them (cleaned_up False): the deletes are repeated (they
    find nothing), nothing else happens."""
    status, workloads = _succeeded(), SUCCEEDED_WORKLOADS
    if state == "Failed":  # retryLimit 0: the first failure fails the job
        failed, failed_pod = _failed_first_attempt(retryLimit=0)
        workloads = [failed], [failed_pod]
        running = {"state": "Running", "attempts": 1, "startTime": "2026-11-23T10:00:00Z"}
        status = reconcile(_job(running, retryLimit=0), *workloads, image=IMAGE, now=NOW).status
        assert status["state"] == "Failed"
        status["artifact"] = ARTIFACT  # (none in truth: kept all the same)
    if cleaned_up:
        first = reconcile(
            _job(status), *workloads, image=IMAGE, now=NOW, ttl_seconds_after_finished=0
        )
        assert first.delete_jobs == ["job-attempt-1"]
        status = first.status
    for default in (0, None):
        later = reconcile(
            _job(status),
            [],
            [],
            image=IMAGE,
            now=NOW + timedelta(days=3),
            ttl_seconds_after_finished=default,
        )
        assert later.create_job is None and later.create_service is None
        assert later.delete_jobs == [] and later.suspend_jobs == []
        for key in ("state", "message", "startTime", "completionTime", "attempts", "artifact"):
            assert later.status.get(key) == status.get(key), key
        assert later.status["artifact"] == ARTIFACT and later.status["attempts"] == 1
        if cleaned_up or default is None:
            assert later.events == [] and later.delete_network_policies == []
            assert later.status["conditions"] == status["conditions"]
        else:
            assert later.delete_network_policies == ["job-attempt-1"]
            assert [e.reason for e in later.events] == ["WorkloadsDeleted"]


def test_a_cleanup_event_derived_again_after_a_crash_is_the_same_event() -> None:
    status = _succeeded()
    first = reconcile(
        _job(status), *SUCCEEDED_WORKLOADS, image=IMAGE, now=NOW, ttl_seconds_after_finished=0
    )
    again = reconcile(_job(status), [], [], image=IMAGE, now=NOW, ttl_seconds_after_finished=0)
    assert first.events == again.events  # same transition origin: one Event of that name


def test_a_retrying_job_keeps_its_attempts_and_start_time_when_an_earlier_job_is_gone() -> None:
    """Attempt 1's Job was deleted (by hand, or by any cleanup) while attempt 2 trains."""
    started = "2026-11-23T10:00:00Z"
    status = {"state": "Retrying", "attempts": 2, "startTime": started, "message": "retry"}
    decision = reconcile(_job(status), [_attempt(2)], [_pod(2, "Running")], image=IMAGE, now=NOW)
    assert decision.create_job is None and decision.delete_jobs == []
    assert decision.status["attempts"] == 2 and decision.status["startTime"] == started
    assert decision.status["state"] == "Running"
    pending = reconcile(_job(status), [_attempt(2)], [], image=IMAGE, now=NOW)
    assert pending.create_job is None and pending.status["attempts"] == 2
    assert pending.status["startTime"] == started


def test_changing_the_ttl_of_a_running_job_is_no_ignored_spec_change() -> None:
    """The TTL applies when the job has finished, read from the spec as it is then."""
    started = _started_spec()
    assert "ttlSecondsAfterFinished" not in json.loads(started)
    changed = _job(RUNNING, generation=2, ttlSecondsAfterFinished=60)
    decision = reconcile(
        changed, [_attempt(1, spec_json=started)], [_pod(1, "Running")], image=IMAGE, now=NOW
    )
    assert all(c["type"] != "SpecChangeIgnored" for c in decision.status["conditions"])
    assert decision.status["state"] == "Running"
