"""GPU-hour accounting with controlled timestamps: what each attempt's pods held (GPUs ×
seconds from the pod's status.startTime to its container's finishedAt), kept in status
so that deleted pods still count, and counted once into the per-namespace counter, also
across an operator restart. No API server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest

from kubetune_operator.accounting import account, gpu_status, pod_held_seconds
from kubetune_operator.api.crd import crd
from kubetune_operator.api.types import FineTuneJobStatus
from kubetune_operator.handlers import OperatorConfig, Reconciler
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconcile import reconcile
from kubetune_operator.workload import ATTEMPT_LABEL, COMPLETION_INDEX, JOB_LABEL, SPEC_ANNOTATION
from kubetune_trainer.artifact import gpu_time_at_publish
from kubetune_trainer.config import GPU_ACCOUNTING_ENV

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
IMAGE = "trainer:test"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_body(status: dict[str, Any] | None = None, gpus: int = 2, nodes: int = 1) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "team-a", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"sources": ["s3://data/train.jsonl"]},
            "output": {"uri": "s3://out/job"},
            "resources": {"gpus": gpus, "nodes": nodes},
            "retryLimit": 3,
        },
        "status": status or {},
    }


def attempt_job(attempt: int, gpus: int = 2, nodes: int = 1, condition: str | None = None) -> dict:
    spec = job_body(gpus=gpus, nodes=nodes)["spec"]  # the spec it runs with
    conditions = [{"type": condition, "status": "True"}] if condition else []
    return {
        "metadata": {
            "name": f"job-attempt-{attempt}",
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: str(attempt)},
            "annotations": {SPEC_ANNOTATION: json.dumps(spec)},
        },
        "spec": {"completions": nodes, "parallelism": nodes, "suspend": False},
        "status": {"conditions": conditions},
    }


def pod(
    attempt: int,
    index: int = 0,
    *,
    started: float | None = 0,
    finished: float | None = None,
    phase: str | None = None,
    suffix: str = "a",
    exit_code: int = 0,
) -> dict:
    """A trainer pod whose kubelet set startTime (``started`` seconds after T0, None: never
    scheduled) and, once its container ended, finishedAt."""
    status: dict[str, Any] = {"phase": phase or ("Running" if finished is None else "Succeeded")}
    if started is None:
        status["phase"] = "Pending"
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "x"}
        ]
    else:
        status["startTime"] = stamp(started)
        state: dict[str, Any] = {"running": {"startedAt": stamp(started + 5)}}
        if finished is not None:
            state = {
                "terminated": {
                    "exitCode": exit_code,
                    "startedAt": stamp(started + 5),
                    "finishedAt": stamp(finished),
                }
            }
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    return {
        "metadata": {
            "name": f"job-attempt-{attempt}-{index}-{suffix}",
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: str(attempt)},
            "annotations": {COMPLETION_INDEX: str(index)},
        },
        "status": status,
    }


def total(usage: list) -> int:
    return sum(u.gpuSeconds for u in usage)


# --------------------------------------------------------------------------- one pod


def test_a_pod_is_counted_from_its_start_time_to_its_finish() -> None:
    running = pod(1, started=10)
    assert pod_held_seconds(running, at(70)) == 60  # running: up to now
    assert pod_held_seconds(running, at(70.9)) == 60  # whole seconds
    ended = pod(1, started=10, finished=250)
    assert pod_held_seconds(ended, at(9999)) == 240  # the pod's own timestamps, not now
    assert pod_held_seconds(pod(1, started=None), at(9999)) == 0  # never scheduled


def test_gpus_times_seconds_and_finished_attempts_are_final() -> None:
    jobs = [attempt_job(1, gpus=2)]
    usage = account({}, jobs, [pod(1, started=10)], at(110))
    assert total(usage) == 2 * 100
    assert not usage[0].final and usage[0].pods == {"job-attempt-1-0-a": 200}

    jobs = [attempt_job(1, gpus=2, condition="Complete")]
    status = gpu_status(usage)
    usage = account(status, jobs, [pod(1, started=10, finished=130)], at(400))
    assert total(usage) == 2 * 120
    assert usage[0].final and usage[0].pods is None
    # A final attempt is never recounted, whatever its pods say later.
    again = account(gpu_status(usage), jobs, [pod(1, started=0, finished=999)], at(2000))
    assert total(again) == 240


# --------------------------------------------------------------------------- attempts


def test_multi_node_attempts_add_up_per_pod() -> None:
    """Two nodes with 4 GPUs each; the pods started 3 s apart and end 1 s apart."""
    jobs = [attempt_job(1, gpus=4, nodes=2, condition="Complete")]
    pods = [pod(1, 0, started=0, finished=600), pod(1, 1, started=3, finished=601)]
    usage = account({}, jobs, pods, at(700))
    assert total(usage) == 4 * 600 + 4 * 598
    assert usage[0].gpusPerPod == 4 and usage[0].final


def test_several_attempts_the_failed_ones_included() -> None:
    jobs = [
        attempt_job(1, condition="Failed"),
        attempt_job(2, condition="Failed"),
        attempt_job(3),
    ]
    pods = [
        pod(1, started=0, finished=100, phase="Failed", exit_code=20),
        pod(2, started=120, finished=170, phase="Failed", exit_code=1),
        pod(3, started=200),
    ]
    usage = account({}, jobs, pods, at(260))
    assert [u.attempt for u in usage] == [1, 2, 3]
    assert [u.gpuSeconds for u in usage] == [200, 100, 120]
    assert [u.final for u in usage] == [True, True, False]


def test_a_preempted_attempt_keeps_its_first_pods_time() -> None:
    """Kueue preempts attempt 1 (its pods are removed, its Job suspended), then admits it
    again: new pods of the same attempt. Both runs count, once."""
    job = attempt_job(1, gpus=1)
    first = pod(1, started=0, suffix="first")
    status = gpu_status(account({}, [job], [first], at(50)))
    # The kubelet reported the end as the pod was deleted, then the pod was gone.
    ended = pod(1, started=0, finished=60, phase="Failed", suffix="first")
    status = gpu_status(account(status, [job], [ended], at(61)))
    status = gpu_status(account(status, [{**job, "spec": {"suspend": True}}], [], at(300)))
    assert status["gpuSeconds"] == 60
    second = pod(1, started=400, suffix="second")
    status = gpu_status(account(status, [job], [second], at(430)))
    assert status["gpuSeconds"] == 60 + 30
    done = pod(1, started=400, finished=500, suffix="second")
    complete = attempt_job(1, gpus=1, condition="Complete")
    status = gpu_status(account(status, [complete], [done], at(501)))
    assert status["gpuSeconds"] == 60 + 100 and status["gpuUsage"][0]["final"]


def test_a_pod_never_scheduled_costs_nothing() -> None:
    jobs = [attempt_job(1, gpus=8)]
    assert account({}, jobs, [pod(1, started=None)], at(3600)) == []
    # A Kueue-suspended Job has no pods at all: nothing either.
    assert account({}, [{**jobs[0], "spec": {"suspend": True}}], [], at(3600)) == []


def test_cpu_jobs_hold_no_gpus() -> None:
    usage = account({}, [attempt_job(1, gpus=0)], [pod(1, started=0)], at(500))
    assert total(usage) == 0


# --------------------------------------------------------------------------- pods deleted


def test_deleted_pods_and_jobs_keep_their_figures_and_nothing_counts_twice() -> None:
    """The cluster deletes finished pods (TTL, eviction) and, on a retry, nothing of the
    old attempt may be lost; an operator restarted later starts from status alone."""
    jobs = [attempt_job(1, condition="Failed"), attempt_job(2)]
    pods = [pod(1, started=0, finished=100, phase="Failed"), pod(2, started=110)]
    status = gpu_status(account({}, jobs, pods, at(150)))
    assert status["gpuSeconds"] == 200 + 80
    # Attempt 1's Job and pod are deleted; attempt 2's pod too, while it ran (eviction).
    status = gpu_status(account(status, [attempt_job(2)], [], at(500)))
    assert status["gpuSeconds"] == 280  # nothing lost, nothing invented
    # An operator restarted at any point derives the same from the same inputs.
    for _ in range(3):
        status = gpu_status(account(json.loads(json.dumps(status)), [attempt_job(2)], [], at(900)))
        assert status["gpuSeconds"] == 280


def test_the_total_never_goes_backwards() -> None:
    """Counted up to now while the API still said Running; the pod's own finishedAt,
    reported late, is a second earlier: the figure already counted stays."""
    jobs = [attempt_job(1, gpus=1)]
    status = gpu_status(account({}, jobs, [pod(1, started=0)], at(101)))
    late = pod(1, started=0, finished=100)
    assert gpu_status(account(status, jobs, [late], at(102)))["gpuSeconds"] == 101


# --------------------------------------------------------------------------- reconcile


def test_reconcile_writes_typed_status_in_every_state() -> None:
    jobs = [attempt_job(1, gpus=2)]
    decision = reconcile(job_body(), jobs, [pod(1, started=0)], image=IMAGE, now=at(1800))
    status = FineTuneJobStatus.model_validate(decision.status)
    assert status.gpuSeconds == 3600 and status.gpuHours == 1.0
    assert status.gpuUsage is not None and status.gpuUsage[0].attempt == 1

    # A Failed job's ranks still stopping are still counted.
    failed = job_body({**decision.status, "state": "Failed"})
    stopping = pod(1, started=0, finished=2700, phase="Failed")
    later = reconcile(
        failed, [attempt_job(1, condition="Failed")], [stopping], image=IMAGE, now=at(3000)
    )
    assert later.status["gpuSeconds"] == 2 * 2700


def test_a_job_that_never_ran_has_no_gpu_fields() -> None:
    decision = reconcile(job_body(), [], [], image=IMAGE, now=at(0))
    assert "gpuSeconds" not in decision.status


def test_the_next_attempt_is_told_the_earlier_attempts_gpu_seconds() -> None:
    jobs = [attempt_job(1, gpus=2, condition="Failed")]
    failed = pod(1, started=0, finished=300, phase="Failed", exit_code=20)
    error = {"error": {"reason": "StorageUnavailable", "message": "x", "exitCode": 20}}
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(error)
    decision = reconcile(job_body({"attempts": 1}), jobs, [failed], image=IMAGE, now=at(301))
    assert decision.create_job is not None
    env = decision.create_job["spec"]["template"]["spec"]["containers"][0]["env"]
    told = json.loads(next(e["value"] for e in env if e["name"] == GPU_ACCOUNTING_ENV))
    assert told == {"earlierAttemptsGpuSeconds": 600, "gpusPerPod": 2, "pods": 1}


def test_the_manifest_figure_adds_this_attempts_time() -> None:
    env = {
        GPU_ACCOUNTING_ENV: json.dumps(
            {"earlierAttemptsGpuSeconds": 600, "gpusPerPod": 4, "pods": 2}
        )
    }
    figure = gpu_time_at_publish(env, started=1000.0, now=1100.5)
    assert figure is not None
    assert figure["earlier_attempts_gpu_seconds"] == 600
    assert figure["this_attempt_gpu_seconds_so_far"] == 4 * 2 * 100
    assert figure["gpu_seconds"] == 600 + 800
    assert gpu_time_at_publish({}, 0.0, 1.0) is None  # a local run: the operator said nothing


# --------------------------------------------------------------------------- the counter


class StoredApi:
    """Just enough of the API for Reconciler: one FineTuneJob, its Jobs and pods."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.jobs: list[dict[str, Any]] = []
        self.pods: list[dict[str, Any]] = []

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.body))

    def list_jobs(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return self.jobs

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return self.pods

    def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.body["status"] = {**(self.body.get("status") or {}), **patch}

    def __getattr__(self, name: str) -> Any:  # create_job, post_event, ...: accepted
        return lambda *args, **kw: [] if name.startswith("list_") else True


def counted(metrics: OperatorMetrics, namespace: str = "team-a") -> float:
    value = metrics.registry.get_sample_value(
        "kubetune_gpu_seconds_total", {"namespace": namespace}
    )
    return value or 0.0


def test_the_counter_counts_status_growth_once_across_a_restart(monkeypatch) -> None:
    api = StoredApi(job_body(gpus=1))
    api.jobs = [attempt_job(1, gpus=1)]
    api.pods = [pod(1, started=0)]
    clock = {"now": at(100)}
    monkeypatch.setattr(  # the operator's clock, controlled
        "kubetune_operator.handlers.reconcile",
        lambda *args, **kw: reconcile(*args, **kw, now=clock["now"]),
    )
    first = OperatorMetrics()
    operator = Reconciler(api, OperatorConfig(), first)  # type: ignore[arg-type]
    operator.reconcile("team-a", "job", None)
    assert api.body["status"]["gpuSeconds"] == 100 and counted(first) == 100
    clock["now"] = at(160)
    operator.reconcile("team-a", "job", None)
    assert counted(first) == 160
    operator.reconcile("team-a", "job", None)  # nothing new: nothing counted
    assert counted(first) == 160

    # Restart: a new process with a fresh counter; the pod ended and was deleted meanwhile
    # (its last 40 s were reported before it went).
    api.pods = [pod(1, started=0, finished=200)]
    restarted = OperatorMetrics()
    operator = Reconciler(api, OperatorConfig(), restarted)  # type: ignore[arg-type]
    clock["now"] = at(300)
    operator.reconcile("team-a", "job", None)
    api.pods = []
    operator.reconcile("team-a", "job", None)
    assert api.body["status"]["gpuSeconds"] == 200
    assert counted(restarted) == 40  # only what this process saw added
    assert counted(first) + counted(restarted) == api.body["status"]["gpuSeconds"]
    exposition = generate_latest(restarted.registry).decode()
    assert 'kubetune_gpu_seconds_total{namespace="team-a"} 40.0' in exposition
    assert "name=" not in exposition.split("kubetune_gpu_seconds_total")[1].split("\n")[0]


def test_kubectl_get_wide_shows_gpu_hours() -> None:
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    column = next(c for c in columns if c["name"] == "GPU-Hours")
    assert column["jsonPath"] == ".status.gpuHours"
    assert column["priority"] == 1  # -o wide only
    names = [c["name"] for c in columns]
    assert names[-1] == "Age"  # kubectl's convention: Age last
    assert names.index("GPU-Hours") > names.index("Ranks")  # with the other -o wide columns


def test_an_ended_job_whose_workloads_were_deleted_keeps_final_figures() -> None:
    """A Failed job deleted its running attempt (its ranks were stopped), then TTL cleanup
    deleted what was left: the figures stay, and become final."""
    jobs = [attempt_job(1, nodes=2)]
    pods = [pod(1, 0, started=0), pod(1, 1, started=0)]
    status = gpu_status(account({}, jobs, pods, at(100)))
    stopped = [pod(1, 0, started=0, finished=110, phase="Failed"), pod(1, 1, started=0)]
    status = gpu_status(account({**status, "state": "Failed"}, [], stopped, at(111)))
    assert status["gpuSeconds"] == 2 * 110 + 2 * 111
    assert not status["gpuUsage"][0]["final"]  # rank 1 still stopping
    status = gpu_status(account({**status, "state": "Failed"}, [], [], at(5000)))
    assert status["gpuSeconds"] == 2 * 110 + 2 * 111
    assert status["gpuUsage"][0]["final"] and "pods" not in status["gpuUsage"][0]
