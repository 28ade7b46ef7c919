"""A stand-in for Kueue: queue-labelled Jobs wait, suspended, until quota admits them.

:class:`Kueue` watches Jobs labelled ``kueue.x-k8s.io/queue-name`` and Kueue's
``Workload`` objects (``kueue.x-k8s.io/v1beta1``; serve the kind with
:func:`harness.emulator.install_kueue_crd` or ``make_emulator(kueue=True)``) through the
real HTTP API. What it emulates of Kueue's Job integration:

* one Workload per Job, named ``job-<job>-<5 hex of a hash of the Job's uid>`` in the
  Job's namespace, labelled ``kueue.x-k8s.io/job-uid``, owned by the Job (so deleting the
  Job deletes it), with ``spec.queueName``, ``spec.priorityClassName`` (from the Job's
  label ``kueue.x-k8s.io/priority-class``) and one pod set ``main`` (``count`` =
  parallelism, the pod template);
* quota: each queue name stands for a LocalQueue pointing to a ClusterQueue of the same
  name with one flavor ``default-flavor`` and a quota of ``nvidia.com/gpu``. A Workload
  needs ``count`` × the GPUs of one pod (``limits``, else ``requests``, summed over its
  containers); **a Workload that asks for no GPU still takes one unit**, so CPU-only
  test jobs queue like slots. Quotas are set at construction (``quotas``, else
  ``default_quota``, 0) and at runtime with :meth:`Kueue.set_quota`;
* admission in creation order, best-effort FIFO (a Workload that does not fit does not
  block smaller ones behind it): ``status.admission``, conditions ``QuotaReserved`` and
  ``Admitted`` True, then the Job's ``spec.suspend: false``. While it does not fit:
  ``QuotaReserved`` False (reason ``Pending``, Kueue's message, e.g. "couldn't assign
  flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor
  default-flavor, 1 more needed") and ``Admitted`` False;
* quota is freed when the Job finishes (Workload condition ``Finished``) or is deleted;
* :meth:`Kueue.preempt`: ``Evicted`` True (reason ``Preempted``, "Preempted to
  accommodate a higher priority Workload"), ``Preempted`` True, ``QuotaReserved`` and
  ``Admitted`` False, no admission, the Job's ``spec.suspend: true`` (the Job controller
  then deletes its pods). The unseen preemptor is taken to hold the quota: the Workload is
  not admitted again before the next :meth:`Kueue.set_quota` of its queue; then, once it
  fits, it is admitted again with ``Evicted`` and ``Preempted`` set False.

Not emulated: the admission webhook (a Job must be created suspended, as Kueue's users
do; one that is not is suspended when first seen), priorities and preemption decisions of
its own, cohorts and borrowing, several flavors, LocalQueue/ClusterQueue objects, requeue
backoff, ``waitForPodsReady``, and any change to the Job's pod template (real Kueue injects
the flavor's nodeSelector at admission; the local kubelet has no nodes to select).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import threading
from collections.abc import Mapping

from .client import Body, KubeError
from .controller import Controller
from .emulator import KUEUE_WORKLOADS
from .informer import Informer
from .jobs import condition, is_finished, is_true, owner_exists, set_condition

KUEUE_USER = "system:serviceaccount:kueue-system:kueue-controller-manager"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
GPU = "nvidia.com/gpu"
FLAVOR = "default-flavor"
POD_SET = "main"
PREEMPTED_MESSAGE = "Preempted to accommodate a higher priority Workload"


def workload_name(job: Body) -> str:
    """Kueue's name for a Job's Workload: ``job-<name>-<5 hex>``."""
    meta = job["metadata"]
    digest = hashlib.sha256(f"{meta['name']}/{meta['uid']}".encode()).hexdigest()
    return f"job-{meta['name']}-{digest[:5]}"


def _quantity(value: object) -> int:
    text = str(value or 0)
    return int(float(text)) if text.replace(".", "", 1).isdigit() else 0


def gpus_per_pod(template: Body) -> int:
    """The ``nvidia.com/gpu`` of one pod of a template (limits, else requests)."""
    total = 0
    for container in (template.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        amount = (resources.get("limits") or {}).get(GPU)
        if amount is None:
            amount = (resources.get("requests") or {}).get(GPU)
        total += _quantity(amount)
    return total


def demand(workload: Body) -> int:
    """What a Workload takes from its queue's quota (at least one unit)."""
    pod_sets = (workload.get("spec") or {}).get("podSets") or []
    gpus = sum(int(s.get("count", 1)) * gpus_per_pod(s.get("template") or {}) for s in pod_sets)
    return max(gpus, 1)


class Kueue(Controller):
    """A Kueue stand-in for Jobs (see the module docstring)."""

    name = "kueue"

    def __init__(
        self,
        url: str,
        *,
        user: str = KUEUE_USER,
        namespace: str | None = None,
        quotas: Mapping[str, int] | None = None,
        default_quota: int = 0,
        sync_interval: float = 0.5,
        resync_interval: float = 5.0,
    ) -> None:
        super().__init__(url, user=user, sync_interval=sync_interval)
        self.default_quota = default_quota
        self._quotas = dict(quotas or {})
        prefix = f"/namespaces/{namespace}" if namespace else ""
        group, version, plural = KUEUE_WORKLOADS.split("/")
        self.jobs = Informer(
            self.client,
            f"/apis/batch/v1{prefix}/jobs",
            label_selector=QUEUE_LABEL,
            on_change=self.wake,
            resync_interval=resync_interval,
        )
        self.workloads = Informer(
            self.client,
            f"/apis/{group}/{version}{prefix}/{plural}",
            on_change=self.wake,
            resync_interval=resync_interval,
        )
        self._order: dict[str, int] = {}  # Job uid → the order Kueue first saw it in
        self._counter = itertools.count()
        self._held: set[str] = set()  # uids of preempted Workloads, until set_quota
        self._lock = threading.RLock()  # one pass (or preemption) at a time

    def informers(self) -> tuple[Informer, ...]:
        return (self.workloads, self.jobs)

    # -- for tests --------------------------------------------------------------------

    def set_quota(self, queue: str, gpus: int) -> None:
        """Set a queue's quota (in ``nvidia.com/gpu``); preempted Workloads may come back."""
        with self._lock:
            self._quotas[queue] = gpus
            self._held -= {
                (w["metadata"]["uid"])
                for w in self.workloads.items()
                if (w.get("spec") or {}).get("queueName") == queue
            }
        self.wake()

    def quota(self, queue: str) -> int:
        return self._quotas.get(queue, self.default_quota)

    def usage(self, queue: str) -> int:
        """The quota the admitted, unfinished Workloads of ``queue`` take."""
        return sum(
            demand(w)
            for w in self.workloads.items()
            if (w.get("spec") or {}).get("queueName") == queue
            and is_true(w, "Admitted")
            and not is_true(w, "Finished")
        )

    def workload(self, namespace: str, job_name: str) -> Body | None:
        """The Workload of a Job, as this stand-in last saw or wrote it."""
        job = self.jobs.get(namespace, job_name)
        return None if job is None else self.workloads.get(namespace, workload_name(job))

    def preempt(self, namespace: str, job_name: str) -> None:
        """Evict a Job's Workload as a higher-priority one would (see the module docstring)."""
        with self._lock:
            job = self.jobs.get(namespace, job_name)
            if job is None:
                raise KeyError(f"Kueue sees no queued Job {namespace}/{job_name}")
            workload = self.workloads.get(namespace, workload_name(job))
            if workload is None:
                raise KeyError(f"Job {namespace}/{job_name} has no Workload yet")
            self._held.add(workload["metadata"]["uid"])
            conditions = list((workload.get("status") or {}).get("conditions") or [])
            for type_, status, reason in (
                ("Evicted", "True", "Preempted"),
                ("Preempted", "True", "InClusterQueue"),
                ("QuotaReserved", "False", "Preempted"),
            ):
                conditions = set_condition(
                    conditions, type_, status, reason, PREEMPTED_MESSAGE, probe=False
                )
            conditions = set_condition(
                conditions,
                "Admitted",
                "False",
                "NoReservation",
                "The workload has no reservation",
                probe=False,
            )
            self._write_status(workload, {"conditions": conditions, "admission": None})
            self._suspend(job, True)

    # -- reconciling ------------------------------------------------------------------

    def reconcile_all(self) -> None:
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        jobs = [j for j in self.jobs.items() if not j["metadata"].get("deletionTimestamp")]
        for job in jobs:
            self._order.setdefault(job["metadata"]["uid"], next(self._counter))
        jobs.sort(
            key=lambda j: (j["metadata"]["creationTimestamp"], self._order[j["metadata"]["uid"]])
        )
        used: dict[str, int] = {}
        pending: list[tuple[Body, Body]] = []
        for job in jobs:
            workload = self.workloads.get(job["metadata"]["namespace"], workload_name(job))
            if workload is None:
                workload = self._create_workload(job)
                if workload is None:
                    continue
                if not (job.get("spec") or {}).get("suspend"):
                    self._suspend(job, True)  # no webhook did it on create
            queue = str(workload["spec"]["queueName"])
            if is_true(workload, "Finished"):
                continue
            if is_finished(job):
                self._finish(job, workload)
            elif is_true(workload, "Admitted"):
                used[queue] = used.get(queue, 0) + demand(workload)
            else:
                pending.append((job, workload))
        for job, workload in pending:
            queue = str(workload["spec"]["queueName"])
            need, free = demand(workload), self.quota(queue) - used.get(queue, 0)
            if workload["metadata"]["uid"] not in self._held and need <= free:
                used[queue] = used.get(queue, 0) + need
                self._admit(job, workload, queue, need)
            else:
                held = workload["metadata"]["uid"] in self._held
                self._pending(workload, need, 0 if held else max(free, 0), self.quota(queue))

    # -- writes -----------------------------------------------------------------------

    def _create_workload(self, job: Body) -> Body | None:
        """Create the Job's Workload; None if the Job turns out to be gone."""
        meta, spec = job["metadata"], job.get("spec") or {}
        labels = meta.get("labels") or {}
        workload_spec: Body = {
            "queueName": labels[QUEUE_LABEL],
            "podSets": [
                {
                    "name": POD_SET,
                    "count": int(spec.get("parallelism", 1)),
                    "template": copy.deepcopy(spec.get("template") or {}),
                }
            ],
        }
        if PRIORITY_LABEL in labels:
            workload_spec["priorityClassName"] = labels[PRIORITY_LABEL]
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        body = {
            "apiVersion": "kueue.x-k8s.io/v1beta1",
            "kind": "Workload",
            "metadata": {
                "name": workload_name(job),
                "namespace": meta["namespace"],
                "labels": {JOB_UID_LABEL: meta["uid"]},
                "ownerReferences": [owner],
            },
            "spec": workload_spec,
        }
        created = self.client.create(self._workload_path(meta["namespace"]), body)
        self.workloads.remember(created)
        if not owner_exists(self.client, job):  # deleted meanwhile: nothing will collect it
            path = f"{self._workload_path(meta['namespace'])}/{created['metadata']['name']}"
            try:
                self.client.delete(path)
            except KubeError as exc:
                if exc.status != 404:
                    raise
            self.workloads.forget(created)
            return None
        return created

    def _admit(self, job: Body, workload: Body, queue: str, need: int) -> None:
        conditions = list((workload.get("status") or {}).get("conditions") or [])
        changes = [
            ("QuotaReserved", "True", "QuotaReserved", f"Quota reserved in ClusterQueue {queue}"),
            ("Admitted", "True", "Admitted", "The workload is admitted"),
        ]
        for type_ in ("Evicted", "Preempted"):
            if condition(workload, type_) is not None:
                changes.append((type_, "False", "Admitted", f"Previously: {PREEMPTED_MESSAGE}"))
        for type_, status, reason, message in changes:
            conditions = set_condition(conditions, type_, status, reason, message, probe=False)
        count = int(workload["spec"]["podSets"][0].get("count", 1))
        admission = {
            "clusterQueue": queue,
            "podSetAssignments": [
                {
                    "name": POD_SET,
                    "flavors": {GPU: FLAVOR},
                    "resourceUsage": {GPU: str(need)},
                    "count": count,
                }
            ],
        }
        self._write_status(workload, {"conditions": conditions, "admission": admission})
        self._suspend(job, False)

    def _pending(self, workload: Body, need: int, free: int, quota: int) -> None:
        if need > quota:
            detail = (
                f"insufficient quota for {GPU} in flavor {FLAVOR}, "
                f"request > maximum capacity ({need} > {quota})"
            )
        else:
            detail = (
                f"insufficient unused quota for {GPU} in flavor {FLAVOR}, {need - free} more needed"
            )
        message = f"couldn't assign flavors to pod set {POD_SET}: {detail}"
        conditions = list((workload.get("status") or {}).get("conditions") or [])
        conditions = set_condition(
            conditions, "QuotaReserved", "False", "Pending", message, probe=False
        )
        conditions = set_condition(
            conditions,
            "Admitted",
            "False",
            "NoReservation",
            "The workload has no reservation",
            probe=False,
        )
        self._write_status(workload, {"conditions": conditions})

    def _finish(self, job: Body, workload: Body) -> None:
        if is_true(job, "Complete"):
            reason, message = "Succeeded", "Job finished successfully"
        else:
            failed = condition(job, "Failed") or {}
            reason, message = "Failed", str(failed.get("message") or "Job failed")
        conditions = list((workload.get("status") or {}).get("conditions") or [])
        conditions = set_condition(conditions, "Finished", "True", reason, message, probe=False)
        self._write_status(workload, {"conditions": conditions})

    def _write_status(self, workload: Body, status: Body) -> None:
        old = workload.get("status") or {}
        if all(old.get(k) == v for k, v in status.items()):
            return
        meta = workload["metadata"]
        path = f"{self._workload_path(meta['namespace'])}/{meta['name']}/status"
        try:
            written = self.client.patch(path, {"metadata": {"uid": meta["uid"]}, "status": status})
        except KubeError as exc:
            if exc.status in (404, 409):
                return
            raise
        self.workloads.remember(written)

    def _workload_path(self, namespace: str) -> str:
        group, version, plural = KUEUE_WORKLOADS.split("/")
        return f"/apis/{group}/{version}/namespaces/{namespace}/{plural}"

    def _suspend(self, job: Body, suspend: bool) -> None:
        meta = job["metadata"]
        if bool((job.get("spec") or {}).get("suspend")) == suspend:
            return
        path = f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}"
        try:
            written = self.client.patch(
                path, {"metadata": {"uid": meta["uid"]}, "spec": {"suspend": suspend}}
            )
        except KubeError as exc:
            if exc.status in (404, 409):
                return
            raise
        self.jobs.remember(written)
