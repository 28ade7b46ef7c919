"""The kopf handlers: read, call the pure deciders, apply. Nothing clever lives here.

- every FineTuneJob event and every trainer-pod event → :func:`reconcile` for that job;
- a timer per running job polls the trainer's progress endpoint and patches
  status.progress / status.metrics / status.lastCheckpoint (only what changed);
- a slower timer reconciles every job (deadlines, missed events);
- on delete (behind a finalizer): stop the trainer pods; artifacts are never touched.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import kopf

from .api.types import GROUP, PLURAL, VERSION
from .conditions import now_rfc3339
from .kube import KubeApi
from .metrics import OperatorMetrics
from .progress import changed_fields, fetch_progress, status_from_progress
from .reconcile import Decision, reconcile
from .workload import DEFAULT_IMAGE, JOB_LABEL, MANAGED_BY, PROGRESS_PORT

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
            pods = self.api.list_pods(namespace, name)
            decision = reconcile(body, pods, image=self.config.image)
            self._apply(body, decision, logger)

    def _apply(self, body: dict[str, Any], decision: Decision, logger: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if decision.create_pod is not None:
            created = self.api.create_pod(namespace, decision.create_pod)
            pod = decision.create_pod["metadata"]["name"]
            logger.info(f"pod {pod} {'created' if created else 'already exists'}")
        for pod in decision.delete_pods:
            self.api.delete_pod(namespace, pod)
            logger.info(f"pod {pod} deleted")
        old = body.get("status") or {}
        patch = {k: v for k, v in decision.status.items() if old.get(k) != v}
        if patch:
            self.api.patch_job_status(namespace, name, patch)
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        self.metrics.observe_state(namespace, name, decision.status.get("state"))
        self.metrics.observe_status(namespace, name, decision.status)

    def poll_progress(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self._locks[(namespace, name)]:
            pods = self.api.list_pods(namespace, name)
            running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            ip = (running[-1].get("status") or {}).get("podIP") if running else None
            report = fetch_progress(ip, port=self.config.progress_port) if ip else None
            if not report:
                return
            patch = changed_fields(status, status_from_progress(report, now_rfc3339()))
            if patch:
                self.api.patch_job_status(namespace, name, patch)
                self.metrics.observe_status(namespace, name, {**status, **patch})

    def stop(self, namespace: str, name: str, logger: Any) -> None:
        for pod in self.api.list_pods(namespace, name):
            if not (pod["metadata"].get("deletionTimestamp")):
                self.api.delete_pod(namespace, pod["metadata"]["name"])
                logger.info(f"pod {pod['metadata']['name']} deleted with its job")
        self.metrics.forget(namespace, name)


def _is_running(status: Any, **_: Any) -> bool:
    return bool(status) and status.get("state") == "Running"


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

    @kopf.on.event("", "v1", "pods", labels=dict(MANAGED_BY), registry=registry)
    def pod_changed(labels: dict[str, str], namespace: str, logger: Any, **_: Any) -> None:
        job_name = labels.get(JOB_LABEL)
        if job_name:
            reconciler.reconcile(namespace, job_name, logger)

    @kopf.timer(**job, interval=config.progress_interval_seconds, when=_is_running)
    def poll_progress(namespace: str, name: str, status: Any, **_: Any) -> None:
        reconciler.poll_progress(namespace, name, dict(status))

    @kopf.timer(**job, interval=config.resync_interval_seconds, initial_delay=5)
    def resync(namespace: str, name: str, logger: Any, **_: Any) -> None:
        reconciler.reconcile(namespace, name, logger)

    @kopf.on.delete(**job)
    def job_deleted(namespace: str, name: str, logger: Any, **_: Any) -> None:
        reconciler.stop(namespace, name, logger)

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
