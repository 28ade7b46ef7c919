"""The kopf handlers: read, call the pure deciders, apply. Nothing clever lives here.

- every FineTuneJob event, every attempt-Job event and every trainer-pod event →
  :func:`reconcile` for that job;
- a timer per running job polls rank 0's progress endpoint and patches
  status.progress / status.metrics / status.lastCheckpoint (only what changed); for a
  job waiting in a Kueue queue the same timer reconciles (Kueue's message changes on
  its Workload, which the operator does not watch);
- a slower timer reconciles every job (deadlines, missed events);
- on delete (behind a finalizer): delete the attempt Jobs, which stops the trainer pods;
  artifacts are never touched;
- every FineTuneSweep event and every event of one of its trials (FineTuneJobs labelled
  ``kubetune.io/sweep``) → :func:`~kubetune_operator.sweep.reconcile_sweep` for that
  sweep, plus a resync timer; deleting a sweep deletes its trials through their owner
  references (the garbage collector), never their artifacts.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import kopf

from .api.sweep import PLURAL as SWEEP_PLURAL
from .api.types import GROUP, PLURAL, VERSION
from .conditions import now_rfc3339
from .kube import KubeApi
from .metrics import OperatorMetrics
from .progress import changed_fields, fetch_progress, status_from_progress
from .reconcile import Decision, reconcile
from .sweep import SWEEP_LABEL, SweepDecision, reconcile_sweep
from .workload import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX,
    DEFAULT_IMAGE,
    JOB_LABEL,
    MANAGED_BY,
    PROGRESS_PORT,
    QUEUE_LABEL,
)

FINALIZER = "kubetune.io/finalizer"


@dataclass(frozen=True)
class OperatorConfig:
    """What a platform team sets when running the operator."""

    image: str = DEFAULT_IMAGE
    progress_interval_seconds: float = 5.0
    resync_interval_seconds: float = 60.0
    progress_port: int = PROGRESS_PORT


class Reconciler:
    """Serialises reconciles per job and applies their decisions through the API."""

    def __init__(self, api: KubeApi, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.api, self.config, self.metrics = api, config, metrics
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)

    def reconcile(self, namespace: str, name: str, logger: logging.Logger | Any) -> None:
        with self._locks[(namespace, name)], self.metrics.reconcile_seconds.time():
            body = self.api.get_job(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            jobs = self.api.list_jobs(namespace, name)
            pods = self.api.list_pods(namespace, name)
            latest = max(jobs, key=_attempt, default=None)
            workloads: list[dict[str, Any]] = []
            if latest is not None and _waits_in_queue(latest):
                workloads = self.api.list_workloads(namespace, latest["metadata"].get("uid", ""))
            decision = reconcile(body, jobs, pods, workloads, image=self.config.image)
            self._apply(body, decision, logger)

    def _apply(self, body: dict[str, Any], decision: Decision, logger: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if decision.create_service is not None:
            self.api.create_service(namespace, decision.create_service)
        if decision.create_job is not None:
            created = self.api.create_job(namespace, decision.create_job)
            job = decision.create_job["metadata"]["name"]
            logger.info(f"job {job} {'created' if created else 'already exists'}")
        for job in decision.suspend_jobs:
            self.api.suspend_job(namespace, job)
            logger.info(f"job {job} suspended")
        for job in decision.delete_jobs:
            self.api.delete_job(namespace, job)
            logger.info(f"job {job} deleted")
        old = body.get("status") or {}
        patch = {k: v for k, v in decision.status.items() if old.get(k) != v}
        if patch:
            self.api.patch_job_status(namespace, name, patch)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        self.metrics.observe_state(namespace, name, decision.status.get("state"))
        self.metrics.observe_status(namespace, name, decision.status)

    def reconcile_sweep(self, namespace: str, name: str, logger: logging.Logger | Any) -> None:
        with self._locks[(namespace, f"sweep/{name}")]:
            body = self.api.get_sweep(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            trials = self.api.list_trials(namespace, name, SWEEP_LABEL)
            self._apply_sweep(body, reconcile_sweep(body, trials), logger)

    def _apply_sweep(self, body: dict[str, Any], decision: SweepDecision, logger: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        for trial in decision.create_trials:
            created = self.api.create_trial(namespace, trial)
            trial_name = trial["metadata"]["name"]
            logger.info(f"trial {trial_name} {'created' if created else 'already exists'}")
        for trial_name, notes in decision.annotate_trials.items():
            self.api.patch_trial(namespace, trial_name, {"metadata": {"annotations": notes}})
        for trial_name in decision.stop_trials:
            self.api.patch_trial(namespace, trial_name, {"spec": {"suspend": True}})
            logger.info(f"trial {trial_name} pruned (suspended)")
        old = body.get("status") or {}
        patch = {k: v for k, v in decision.status.items() if old.get(k) != v}
        if patch:
            self.api.patch_sweep_status(namespace, name, patch)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        self.metrics.observe_sweep(namespace, name, decision.status)

    def poll_progress(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self._locks[(namespace, name)]:
            pods = self.api.list_pods(namespace, name)
            ranks0 = sorted((p for p in pods if _is_running_rank0(p)), key=_attempt)
            ip = (ranks0[-1].get("status") or {}).get("podIP") if ranks0 else None
            report = fetch_progress(ip, port=self.config.progress_port) if ip else None
            if not report:
                return
            patch = changed_fields(status, status_from_progress(report, now_rfc3339()))
            if patch:
                self.api.patch_job_status(namespace, name, patch)
                self.metrics.observe_status(namespace, name, {**status, **patch})

    def stop(self, namespace: str, name: str, logger: Any) -> None:
        for job in self.api.list_jobs(namespace, name):
            if not job["metadata"].get("deletionTimestamp"):
                self.api.delete_job(namespace, job["metadata"]["name"])
                logger.info(f"job {job['metadata']['name']} deleted with its FineTuneJob")
        self.metrics.forget(namespace, name)


def _attempt(obj: dict[str, Any]) -> int:
    return int((obj["metadata"].get("labels") or {}).get(ATTEMPT_LABEL, "0"))


def _waits_in_queue(job: dict[str, Any]) -> bool:
    """An attempt Job that Kueue holds (suspended, in a queue, not finished)."""
    labels = job["metadata"].get("labels") or {}
    done = any(
        x.get("type") in ("Complete", "Failed") and x.get("status") == "True"
        for x in (job.get("status") or {}).get("conditions") or []
    )
    return QUEUE_LABEL in labels and bool((job.get("spec") or {}).get("suspend")) and not done


def _is_running_rank0(pod: dict[str, Any]) -> bool:
    """Rank 0 serves the progress endpoint (the pod with completion index 0)."""
    index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0")
    return index == "0" and (pod.get("status") or {}).get("phase") == "Running"


def _is_running_or_queued(status: Any, **_: Any) -> bool:
    return bool(status) and status.get("state") in ("Running", "Queued")


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    """All handlers, in a registry of their own (so tests can run several operators)."""
    registry = kopf.OperatorRegistry()
    config = reconciler.config
    job = {"group": GROUP, "version": VERSION, "plural": PLURAL, "registry": registry}

    @kopf.on.event(**job)
    def job_changed(
        event: dict[str, Any], namespace: str, name: str, logger: Any, **_: Any
    ) -> None:
        if event.get("type") == "DELETED":
            reconciler.metrics.forget(namespace, name)
            return
        reconciler.reconcile(namespace, name, logger)

    @kopf.on.event("batch", "v1", "jobs", labels=dict(MANAGED_BY), registry=registry)
    @kopf.on.event("", "v1", "pods", labels=dict(MANAGED_BY), registry=registry)
    def workload_changed(labels: dict[str, str], namespace: str, logger: Any, **_: Any) -> None:
        job_name = labels.get(JOB_LABEL)
        if job_name:
            reconciler.reconcile(namespace, job_name, logger)

    @kopf.timer(**job, interval=config.progress_interval_seconds, when=_is_running_or_queued)
    def poll_progress(namespace: str, name: str, status: Any, logger: Any, **_: Any) -> None:
        if status.get("state") == "Queued":
            reconciler.reconcile(namespace, name, logger)
        else:
            reconciler.poll_progress(namespace, name, dict(status))

    @kopf.timer(**job, interval=config.resync_interval_seconds, initial_delay=5)
    def resync(namespace: str, name: str, logger: Any, **_: Any) -> None:
        reconciler.reconcile(namespace, name, logger)

    @kopf.on.delete(**job)
    def job_deleted(namespace: str, name: str, logger: Any, **_: Any) -> None:
        reconciler.stop(namespace, name, logger)

    sweep = {"group": GROUP, "version": VERSION, "plural": SWEEP_PLURAL, "registry": registry}

    @kopf.on.event(**sweep)
    def sweep_changed(
        event: dict[str, Any], namespace: str, name: str, logger: Any, **_: Any
    ) -> None:
        if event.get("type") == "DELETED":
            reconciler.metrics.forget_sweep(namespace, name)
            return
        reconciler.reconcile_sweep(namespace, name, logger)

    @kopf.on.event(**job, labels={SWEEP_LABEL: kopf.PRESENT})
    def trial_changed(labels: dict[str, str], namespace: str, logger: Any, **_: Any) -> None:
        reconciler.reconcile_sweep(namespace, labels[SWEEP_LABEL], logger)

    @kopf.timer(**sweep, interval=config.resync_interval_seconds, initial_delay=5)
    def resync_sweep(namespace: str, name: str, logger: Any, **_: Any) -> None:
        reconciler.reconcile_sweep(namespace, name, logger)

    return registry


def configure(settings: kopf.OperatorSettings) -> None:
    """Explicit kopf settings (used by `kubetune operator` and by the tests)."""
    settings.persistence.finalizer = FINALIZER
    settings.posting.reporting_component = "kubetune-operator"
    settings.posting.loggers = False  # only our explicit events become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 16
