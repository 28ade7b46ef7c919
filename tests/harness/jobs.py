"""A Job controller for the emulator: batch/v1 Jobs become pods, pods' ends become status.

:class:`JobController` watches Jobs and their pods through the real HTTP API (optionally
only one namespace, or Jobs matching a label selector), keeps them in
:class:`~harness.informer.Informer` caches, and reconciles every Job whenever something
changes and every ``sync_interval`` seconds (for deadlines). What it emulates, following
the documented batch/v1 semantics:

* pods from ``spec.template``: labels of the template plus ``batch.kubernetes.io/job-name``,
  ``job-name``, ``batch.kubernetes.io/controller-uid``, ``controller-uid``; an
  ``ownerReference`` to the Job (``controller``, ``blockOwnerDeletion``);
* ``completionMode: Indexed``: one pod per index ``0..completions-1`` that has not
  succeeded (at most ``parallelism`` active at once), named ``<job>-<i>-<5 random>``
  (``generateName``), with the label and the annotation
  ``batch.kubernetes.io/job-completion-index: "<i>"``, ``spec.hostname: <job>-<i>`` unless
  the template sets one (its ``subdomain`` is kept), and env ``JOB_COMPLETION_INDEX`` in
  every container, as a ``fieldRef`` to that annotation (as the real controller does);
  ``NonIndexed`` (the default): ``min(parallelism, completions - succeeded)`` active pods
  named ``<job>-<5 random>`` (``completions`` defaults to 1);
* status: ``active``, ``ready``, ``succeeded``, ``failed``, ``completedIndexes``
  (``"0-1,3"``), ``startTime``, ``completionTime`` and ``conditions`` (type, status,
  reason, message, lastProbeTime, lastTransitionTime);
* failures: a pod counts as failed when its phase is ``Failed``, when it is terminating
  (``deletionTimestamp``) and did not succeed, or when it disappears while active and the
  controller did not delete it (the emulator drops a pod without finalizers at once, so a
  deleted pod is often just gone). More failed pods than ``backoffLimit`` (default 6) →
  condition ``FailureTarget``, the active pods are deleted (the kubelet SIGTERMs them), then
  ``Failed`` with reason ``BackoffLimitExceeded``. ``activeDeadlineSeconds`` counted from
  ``status.startTime`` → the same with reason ``DeadlineExceeded``. Failed pods are replaced
  while the backoff limit allows (without the real exponential delay);
* success: all indexes (or ``completions`` pods) succeeded → ``SuccessCriteriaMet``, then
  ``Complete`` with ``completionTime``;
* ``spec.suspend: true`` → the active pods are deleted (not counted as failures),
  ``Suspended`` = True (``JobSuspended``), ``startTime`` cleared; ``suspend: false`` again →
  ``Suspended`` = False (``JobResumed``), a new ``startTime``, and the missing pods are
  created anew. A finished Job (``Complete`` or ``Failed``) gets no new pods;
* deleting a Job: the emulator's garbage collector removes its pods (ownerReferences).

Not emulated: the API server's defaulting of ``spec.selector`` and of the template's
labels, the ``batch.kubernetes.io/job-tracking`` pod finalizer and
``uncountedTerminatedPods`` (counts of pods that vanished live in this controller's
memory, so a restarted controller may undercount them), pod backoff delays,
``podFailurePolicy``, ``successPolicy``, ``backoffLimitPerIndex``, ``ttlSecondsAfterFinished``,
``managedBy``, Events. Never two active pods for one index: a pod the controller creates is
put into its cache at once, before the watch reports it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import threading
import time
import traceback
from collections.abc import Iterable

from .client import Body, KubeClient, KubeError
from .controller import Controller
from .informer import Informer

JOB_CONTROLLER_USER = "system:serviceaccount:kube-system:job-controller"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME_LABEL = "job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
LEGACY_CONTROLLER_UID_LABEL = "controller-uid"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # label and annotation
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
DEFAULT_BACKOFF_LIMIT = 6
FINISHED = ("Complete", "Failed")


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> float:
    return (
        datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
        .replace(tzinfo=datetime.UTC)
        .timestamp()
    )


def parse_indexes(text: str | None) -> set[int]:
    """``"0-2,5"`` → ``{0, 1, 2, 5}`` (the format of ``status.completedIndexes``)."""
    found: set[int] = set()
    for part in (text or "").split(","):
        if part.strip():
            first, _, last = part.partition("-")
            found.update(range(int(first), int(last or first) + 1))
    return found


def format_indexes(indexes: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` → ``"0-2,5"``."""
    ranges: list[list[int]] = []
    for index in sorted(set(indexes)):
        if ranges and ranges[-1][1] == index - 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def condition(obj: Body | None, type_: str) -> Body | None:
    """The condition of ``type_`` in ``obj["status"]["conditions"]``, or None."""
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(obj: Body | None, type_: str) -> bool:
    found = condition(obj, type_)
    return found is not None and found.get("status") == "True"


def is_finished(job: Body | None) -> bool:
    """Whether a Job has the ``Complete`` or ``Failed`` condition."""
    return any(is_true(job, type_) for type_ in FINISHED)


def set_condition(
    conditions: list[Body],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    probe: bool = True,
) -> list[Body]:
    """The conditions with ``type_`` set; ``lastTransitionTime`` changes with the status.

    ``probe``: with ``lastProbeTime`` (Job conditions have it, ``metav1.Condition`` not).
    """
    now = _now()
    old = next((c for c in conditions if c.get("type") == type_), None)
    if old is not None and (old.get("status"), old.get("reason"), old.get("message")) == (
        status,
        reason,
        message,
    ):
        return conditions
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        **({"lastProbeTime": now} if probe else {}),
        "lastTransitionTime": (
            old["lastTransitionTime"]
            if old is not None and old.get("status") == status and "lastTransitionTime" in old
            else now
        ),
    }
    if old is None:
        return [*conditions, new]
    return [new if c is old else c for c in conditions]


def controller_uid(obj: Body) -> str | None:
    """The uid of the object's controlling owner, if it is a Job."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == "Job":
            return str(ref.get("uid"))
    return None


def completion_index(pod: Body) -> int | None:
    value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
    return int(value) if value is not None and str(value).isdigit() else None


def _phase(pod: Body) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _is_active(pod: Body) -> bool:
    return _phase(pod) not in ("Succeeded", "Failed") and not pod["metadata"].get(
        "deletionTimestamp"
    )


def _is_ready(pod: Body) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return bool(statuses) and all(s.get("ready") for s in statuses)


@dataclasses.dataclass
class _Memory:
    """What the controller remembers about one Job's pods beyond what the API shows."""

    deleted_by_us: set[str] = dataclasses.field(default_factory=set)  # pod uids
    vanished_failed: set[str] = dataclasses.field(default_factory=set)  # pod uids
    vanished_succeeded: dict[str, int | None] = dataclasses.field(default_factory=dict)


class JobController(Controller):
    """Plays kube-controller-manager's Job controller (see the module docstring)."""

    name = "job-controller"

    def __init__(
        self,
        url: str,
        *,
        user: str = JOB_CONTROLLER_USER,
        namespace: str | None = None,
        label_selector: str | None = None,
        sync_interval: float = 0.5,
        resync_interval: float = 5.0,
    ) -> None:
        super().__init__(url, user=user, sync_interval=sync_interval)
        self.namespace = namespace
        prefix = f"/namespaces/{namespace}" if namespace else ""
        self.jobs = Informer(
            self.client,
            f"/apis/batch/v1{prefix}/jobs",
            label_selector=label_selector,
            on_change=self._on_job,
            resync_interval=resync_interval,
        )
        self.pods = Informer(
            self.client,
            f"/api/v1{prefix}/pods",
            label_selector=CONTROLLER_UID_LABEL,
            on_change=self._on_pod,
            resync_interval=resync_interval,
        )
        self._memory: dict[str, _Memory] = {}  # by Job uid
        self._lock = threading.Lock()

    def informers(self) -> tuple[Informer, ...]:
        return (self.pods, self.jobs)

    # -- for tests --------------------------------------------------------------------

    def pods_of(self, namespace: str, job_name: str) -> list[Body]:
        """The live pods of a Job as this controller sees them, by index then name."""
        job = self.jobs.get(namespace, job_name)
        if job is None:
            return []
        uid = job["metadata"]["uid"]
        pods = [p for p in self.pods.items() if controller_uid(p) == uid]
        return sorted(pods, key=lambda p: (completion_index(p) or 0, p["metadata"]["name"]))

    # -- events -----------------------------------------------------------------------

    def _on_job(self, type_: str, job: Body) -> None:
        if type_ == "DELETED":
            with self._lock:
                self._memory.pop(job["metadata"]["uid"], None)
        self.wake()

    def _on_pod(self, type_: str, pod: Body) -> None:
        self.wake()
        owner = controller_uid(pod)
        if type_ != "DELETED" or owner is None:
            return
        uid = pod["metadata"]["uid"]
        with self._lock:
            memory = self._memory.setdefault(owner, _Memory())
            if uid in memory.deleted_by_us:
                return
            if _phase(pod) == "Succeeded":
                memory.vanished_succeeded[uid] = completion_index(pod)
            else:  # failed, or deleted while active: a failure either way
                memory.vanished_failed.add(uid)

    # -- reconciling ------------------------------------------------------------------

    def reconcile_all(self) -> None:
        for job in self.jobs.items():
            if self.stopping:
                return
            try:
                self._sync(job)
            except Exception:
                if not self.stopping:
                    traceback.print_exc()

    def _sync(self, job: Body) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        if meta.get("deletionTimestamp"):
            return
        uid = meta["uid"]
        with self._lock:
            memory = copy.deepcopy(self._memory.setdefault(uid, _Memory()))
        pods = [p for p in self.pods.items() if controller_uid(p) == uid]
        active = [p for p in pods if _is_active(p)]
        status: Body = copy.deepcopy(job.get("status") or {})
        conditions: list[Body] = list(status.get("conditions") or [])

        if is_finished(job):
            self._delete_pods(uid, active)
            self._write_status(job, status, active=[])
            return

        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec.get("parallelism", 1))
        succeeded_uids = {
            p["metadata"]["uid"]: completion_index(p) for p in pods if _phase(p) == "Succeeded"
        } | memory.vanished_succeeded
        failed_uids = {
            p["metadata"]["uid"]
            for p in pods
            if not _is_active(p)
            and _phase(p) != "Succeeded"
            and p["metadata"]["uid"] not in memory.deleted_by_us
        } | memory.vanished_failed
        completed = parse_indexes(status.get("completedIndexes")) | {
            i for i in succeeded_uids.values() if i is not None and i < completions
        }
        succeeded = (
            len(completed) if indexed else max(status.get("succeeded") or 0, len(succeeded_uids))
        )
        failed = max(status.get("failed") or 0, len(failed_uids))
        status.update(succeeded=succeeded, failed=failed)
        if indexed:
            status["completedIndexes"] = format_indexes(completed)

        # Failure: the backoff limit, the deadline, or a failure already decided.
        failure = condition(job, "FailureTarget")
        reason = message = None
        if failure is not None and failure.get("status") == "True":
            reason, message = failure.get("reason"), failure.get("message")
        elif failed > int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)):
            reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        elif (
            not spec.get("suspend")
            and status.get("startTime")
            and spec.get("activeDeadlineSeconds") is not None
            and time.time() - _parse_time(status["startTime"])
            >= float(spec["activeDeadlineSeconds"])
        ):
            reason, message = "DeadlineExceeded", "Job was active longer than specified deadline"
        if reason is not None:
            conditions = set_condition(conditions, "FailureTarget", "True", reason, message or "")
            job = self._write_status(job, {**status, "conditions": conditions}, active=active)
            self._delete_pods(uid, active)
            conditions = set_condition(conditions, "Failed", "True", reason, message or "")
            self._write_status(job, {**status, "conditions": conditions}, active=[])
            return

        # Success: every index (or enough pods) succeeded.
        if succeeded >= completions:
            reason, message = "CompletionsReached", "Reached expected number of succeeded pods"
            conditions = set_condition(conditions, "SuccessCriteriaMet", "True", reason, message)
            job = self._write_status(job, {**status, "conditions": conditions}, active=active)
            self._delete_pods(uid, active)
            conditions = set_condition(conditions, "Complete", "True", reason, message)
            status.update(conditions=conditions, completionTime=_now())
            self._write_status(job, status, active=[])
            return

        if spec.get("suspend"):
            self._delete_pods(uid, active)
            if not is_true(job, "Suspended"):
                conditions = set_condition(
                    conditions, "Suspended", "True", "JobSuspended", "Job suspended"
                )
            status.update(conditions=conditions, startTime=None)
            self._write_status(job, status, active=[])
            return

        if is_true(job, "Suspended"):
            conditions = set_condition(
                conditions, "Suspended", "False", "JobResumed", "Job resumed"
            )
            status["startTime"] = None
        if not status.get("startTime"):
            status["startTime"] = _now()
        status["conditions"] = conditions
        if indexed:
            busy = {completion_index(p) for p in active}
            for index in range(completions):
                if len(active) >= parallelism:
                    break
                if index not in completed and index not in busy:
                    active.append(self._create_pod(job, index))
        else:
            for _ in range(min(parallelism, completions - succeeded) - len(active)):
                active.append(self._create_pod(job, None))
        self._write_status(job, status, active=active)

    # -- writes -----------------------------------------------------------------------

    def _create_pod(self, job: Body, index: int | None) -> Body:
        pod = pod_for(job, index)
        created = self.client.create(f"/api/v1/namespaces/{job['metadata']['namespace']}/pods", pod)
        self.pods.remember(created)
        if not owner_exists(self.client, job):  # deleted meanwhile: nothing will collect it
            self._delete_pods(job["metadata"]["uid"], [created])
        return created

    def _delete_pods(self, job_uid: str, pods: list[Body]) -> None:
        for pod in pods:
            meta = pod["metadata"]
            with self._lock:
                self._memory.setdefault(job_uid, _Memory()).deleted_by_us.add(meta["uid"])
            try:
                self.client.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
            except KubeError as exc:
                if exc.status != 404:
                    raise
            self.pods.forget(pod)

    def _write_status(self, job: Body, status: Body, *, active: list[Body]) -> Body:
        """Merge-patch the Job's status if it changed; the Job as it now is."""
        status = {
            **status,
            "active": len(active),
            "ready": sum(1 for p in active if _is_ready(p)),
        }
        old = job.get("status") or {}
        if all(old.get(k) == v for k, v in status.items() if v is not None) and not any(
            k in old for k, v in status.items() if v is None
        ):
            return job
        meta = job["metadata"]
        path = f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}/status"
        try:
            written = self.client.patch(path, {"metadata": {"uid": meta["uid"]}, "status": status})
        except KubeError as exc:
            if exc.status in (404, 409):  # gone, or replaced by a namesake
                return job
            raise
        self.jobs.remember(written)
        return written


def owner_exists(client: KubeClient, job: Body) -> bool:
    """Whether the Job still exists (read afresh: a cache may lag behind its deletion).

    Checked after creating an object it owns: the emulator collects garbage when an owner
    is removed, so an object created for an owner already gone would stay for ever."""
    meta = job["metadata"]
    try:
        found = client.get(f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}")
    except KubeError as exc:
        if exc.status == 404:
            return False
        raise
    return bool(found["metadata"].get("uid") == meta["uid"])


def pod_for(job: Body, index: int | None) -> Body:
    """The pod the Job controller creates for ``index`` (None for a NonIndexed Job)."""
    meta = job["metadata"]
    template = copy.deepcopy((job.get("spec") or {}).get("template") or {})
    template_meta = template.get("metadata") or {}
    labels = {
        **(template_meta.get("labels") or {}),
        CONTROLLER_UID_LABEL: meta["uid"],
        LEGACY_CONTROLLER_UID_LABEL: meta["uid"],
        JOB_NAME_LABEL: meta["name"],
        LEGACY_JOB_NAME_LABEL: meta["name"],
    }
    annotations = dict(template_meta.get("annotations") or {})
    spec: Body = template.get("spec") or {}
    generate_name = f"{meta['name']}-"
    if index is not None:
        labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = str(index)
        generate_name = f"{meta['name']}-{index}-"
        spec.setdefault("hostname", f"{meta['name']}-{index}")
        field = {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            env = container.setdefault("env", [])
            if not any(e.get("name") == COMPLETION_INDEX_ENV for e in env):
                env.append({"name": COMPLETION_INDEX_ENV, "valueFrom": {"fieldRef": field}})
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": generate_name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner],
        },
        "spec": spec,
    }
