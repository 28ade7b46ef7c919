"""The kopf handlers: read, call the pure deciders, apply. Nothing clever lives here.

- a FineTuneJob's creation or spec change (not its status or metadata: those are our own
  writes and kopf's), every attempt-Job event and every trainer-pod event →
  :func:`reconcile` for that job, with the attempt Jobs and pods from kopf indexes;
- one thread polls every running job's rank 0 progress endpoint (through a pool of 8)
  each ``progress_interval_seconds`` and patches status.progress / status.metrics /
  status.lastCheckpoint (only what changed); a job waiting in a Kueue queue is
  reconciled then (Kueue's message changes on its Workload, which the operator does not
  watch);
- one thread reconciles every job each ``resync_interval_seconds`` from one LIST
  (deadlines, missed events);
- on delete: nothing to stop by hand. The attempt Jobs (and so their pods), the rank-0
  Service and the NetworkPolicies carry the job's ownerReference, so the garbage collector
  removes them; artifacts are never touched. No finalizer: deleting a job never waits for
  the operator (kopf removes the ``kubetune.io/finalizer`` that older versions put on);
- a decision is applied in order: workloads (create, suspend, delete), then its Events
  (posted here, named per transition: :mod:`~kubetune_operator.events`), then the status
  patch that records them, so a crash anywhere is healed by the next reconcile;
- a namespace's FineTunePolicies come from a kopf index (a watch); a job about to start
  under ``maxConcurrentJobs`` is decided with the namespace locked and its running jobs
  counted live (:mod:`~kubetune_operator.tenancy`); when a job frees a slot, or a policy
  changes, the namespace's waiting (and refused) jobs are reconciled at once;
- every FineTuneSweep event and every event of one of its trials (FineTuneJobs labelled
  ``kubetune.io/sweep``) → :func:`~kubetune_operator.sweep.reconcile_sweep` for that
  sweep, plus a resync timer; deleting a sweep deletes its trials through their owner
  references (the garbage collector), never their artifacts.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import kopf

from .api.policy import PLURAL as POLICY_PLURAL
from .api.sweep import PLURAL as SWEEP_PLURAL
from .api.types import GROUP, PLURAL, VERSION
from .conditions import now_rfc3339
from .events import event_manifest, reporting_instance
from .kube import KubeApi
from .metrics import OperatorMetrics
from .policy import POLICY_VIOLATION, model_cache_claim, waits_for_slot
from .progress import changed_fields, fetch_progress, status_from_progress
from .reconcile import TERMINAL_STATES, Decision, Event, reconcile
from .sweep import SWEEP_LABEL, SweepDecision, reconcile_sweep
from .tenancy import Tenancy, slim_policy
from .workload import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX,
    DEFAULT_IMAGE,
    JOB_LABEL,
    MANAGED_BY,
    PROGRESS_PORT,
    QUEUE_LABEL,
    TRAINER_UID,
    NetworkPolicyConfig,
    attempt_network_policy,
    with_model_cache,
    with_trainer_uid,
)

FINALIZER = "kubetune.io/finalizer"
log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class OperatorConfig:
    """What a platform team sets when running the operator."""

    image: str = DEFAULT_IMAGE
    progress_interval_seconds: float = 5.0
    resync_interval_seconds: float = 60.0
    progress_port: int = PROGRESS_PORT
    # Delete a finished job's workloads this long after it finished, unless its
    # spec.ttlSecondsAfterFinished says otherwise; None: keep them (the chart sets 86400).
    ttl_seconds_after_finished: int | None = None
    # A NetworkPolicy per attempt (the chart's networkPolicy.perJob); None: none.
    network_policy: NetworkPolicyConfig | None = None
    # The shared model cache: a ReadWriteMany PVC of this name in each job's namespace,
    # mounted in every attempt pod (the chart's modelCache.claimName; a namespace's
    # FineTunePolicy spec.modelCache.claimName overrides it); None: no cache.
    model_cache_claim: str | None = None
    # The trainer pods' UID (and group, fsGroup); None: the platform assigns one (OpenShift).
    trainer_uid: int | None = TRAINER_UID
    # GPU product (node label nvidia.com/gpu.product) → memory per GPU, such as
    # {"NVIDIA-H100-80GB-HBM3": "80Gi"} (the chart's gpuProducts): jobs selecting such
    # nodes get the memory check without spec.resources.gpuMemory (memory.py).
    gpu_products: dict[str, str] = field(default_factory=dict)


class Reconciler:
    """Serialises reconciles per job and applies their decisions through the API.

    Attempt Jobs and trainer pods come from two kopf indexes (``attempt_jobs``,
    ``attempt_pods``: slim copies, keyed by (namespace, job)), with a live LIST whenever
    the index knows fewer attempts than ``status.attempts`` (it has not caught up with a
    Job we created), the latest attempt has finished (its pods' termination messages
    must be complete) or the job has (a stale index must never make a finished job stop
    an attempt that in fact completed). One thread resyncs every job (a LIST of
    FineTuneJobs) and one polls the running trainers through a small pool, instead of two
    kopf timers per job.
    """

    def __init__(self, api: KubeApi, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.api, self.config, self.metrics = api, config, metrics
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self.namespaces: list[str] = []  # empty: cluster-wide
        self.jobs_index: Any = None
        self.pods_index: Any = None
        # per job: when it was last reconciled (monotonic), the status we last saw or
        # wrote (of jobs in _STATUS_KEPT states only), the newest body we know (JSON: as
        # read, or as our last status patch returned it); jobs we wrote a status for
        self._reconciled: dict[tuple[str, str], float] = {}
        self._status: dict[tuple[str, str], dict[str, Any]] = {}
        self._bodies: dict[tuple[str, str], bytes] = {}
        self._written: set[tuple[str, str]] = set()
        self.instance = reporting_instance()  # the Events' reportingInstance
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self.tenancy = Tenancy(api)  # the namespaces' FineTunePolicies and slots

    # -- reconciling one job ----------------------------------------------------------------

    def reconcile(
        self,
        namespace: str,
        name: str,
        logger: logging.Logger | Any,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Reconcile one job. ``body`` (from a watch event of the job) is used only while
        this operator has written no status for the job: then nothing newer can exist that
        we caused; otherwise the job is read live. Without ``body`` (an attempt Job's or a
        pod's event, a wake-up) the job is the newest body we know: what our last status
        patch returned, or what we last read (only this operator writes the status; a
        spec change brings its own event, and the resync refreshes metadata)."""
        key = (namespace, name)
        with self._locks[key], self.metrics.reconcile_seconds.time():
            kept = self._bodies.get(key) if body is None else None
            if kept is not None:
                body = json.loads(kept)
            elif body is None or key in self._written:
                body = self.api.get_job(namespace, name)
            self._reconcile_locked(body, logger, remember=kept is None)
        self._wake_freed()

    def _reconcile_locked(
        self, body: dict[str, Any] | None, logger: Any, *, remember: bool = True
    ) -> None:
        """Reconcile ``body``; ``remember``: keep it as the job's newest known state (not
        when it is that already)."""
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if remember:
            self._remember(body)
        jobs, pods, indexed = self._workloads(namespace, name, body)
        policies = self.tenancy.policies(namespace)
        with self.tenancy.slots(body, jobs, policies) as slots:  # locks the namespace if set
            decision = self._decide(body, jobs, pods, policies, slots)
            if indexed and _acts(body, decision):
                # An ended job decided from the indexes (every resync, for as long as it
                # exists) acts only on what a live read confirms: a stale index must
                # never make it delete, or rewrite its status.
                jobs, pods = self._live_workloads(namespace, name)
                decision = self._decide(body, jobs, pods, policies, slots)
            claim = model_cache_claim(policies) or self.config.model_cache_claim
            if decision.create_job is not None and claim:
                decision.create_job = with_model_cache(decision.create_job, claim)
            if decision.create_job is not None and self.config.trainer_uid != TRAINER_UID:
                decision.create_job = with_trainer_uid(decision.create_job, self.config.trainer_uid)
            self._apply(body, decision, logger)
        self.tenancy.note(namespace, body.get("status") or {}, decision.status)
        self._reconciled[(namespace, name)] = time.monotonic()

    def _decide(
        self,
        body: dict[str, Any],
        jobs: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        policies: list[Any],
        slots: Any,
    ) -> Decision:
        latest = max(jobs, key=_attempt, default=None)
        workloads: list[dict[str, Any]] = []
        if latest is not None and _waits_in_queue(latest):
            uid = latest["metadata"].get("uid", "")
            workloads = self.api.list_workloads(body["metadata"]["namespace"], uid)
        return reconcile(
            body,
            jobs,
            pods,
            workloads,
            image=self.config.image,
            policies=policies,
            slots=slots,
            ttl_seconds_after_finished=self.config.ttl_seconds_after_finished,
            gpu_products=self.config.gpu_products,
        )

    def _workloads(
        self, namespace: str, name: str, body: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
        """The job's attempt Jobs and pods, from the indexes when they can be trusted, and
        whether they came from the indexes for a job that has ended (whose decision then
        acts only after a live read: see :func:`_acts`)."""
        if self.jobs_index is not None and self.pods_index is not None:
            key = (namespace, name)
            jobs = list(self.jobs_index.get(key) or ())
            pods = list(self.pods_index.get(key) or ())
            status = body.get("status") or {}
            if status.get("state") in TERMINAL_STATES:
                return jobs, pods, True
            latest = max(jobs, key=_attempt, default=None)
            known = _attempt(latest) if latest is not None else 0
            attempts = int(status.get("attempts") or 0)
            if known >= attempts and (latest is None or not _finished(latest)):
                return jobs, pods, False
        return (*self._live_workloads(namespace, name), False)

    def _live_workloads(
        self, namespace: str, name: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return self.api.list_jobs(namespace, name), self.api.list_pods(namespace, name)

    def _apply(self, body: dict[str, Any], decision: Decision, logger: Any) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        key = (namespace, name)
        if decision.create_service is not None:
            self.api.create_service(namespace, decision.create_service)
        policy = self.config.network_policy
        if decision.create_job is not None and policy is not None:  # before its pods exist
            self.api.create_network_policy(
                namespace, attempt_network_policy(decision.create_job, policy)
            )
        if decision.create_job is not None:
            created = self.api.create_job(namespace, decision.create_job)
            job = decision.create_job["metadata"]["name"]
            logger.info(f"job {job} {'created' if created else 'already exists'}")
        for job in decision.suspend_jobs:
            self.api.suspend_job(namespace, job)
            logger.info(f"job {job} suspended")
        # TTL cleanup: the Service and NetworkPolicies before the Jobs, so that a crash in
        # between repeats only deletes of what is left (see reconcile.clean_up_after_ttl).
        for service in decision.delete_services:
            self.api.delete_service(namespace, service)
        for name_ in decision.delete_network_policies if policy is not None else ():
            self.api.delete_network_policy(namespace, name_)
        for job in decision.delete_jobs:
            self.api.delete_job(namespace, job)
            logger.info(f"job {job} deleted")
        self._post_events(body, decision.events, logger)  # before the status records them
        old = body.get("status") or {}
        patch = {k: v for k, v in decision.status.items() if old.get(k) != v}
        if patch:
            self._remember(self.api.patch_job_status(namespace, name, patch), key)
            self._written.add(key)
            # Counted once written: the next reconcile reads it back as its ``old``.
            self.metrics.observe_gpu_seconds(
                namespace, old.get("gpuSeconds"), patch.get("gpuSeconds")
            )
        state = decision.status.get("state")
        if state in _STATUS_KEPT:
            self._status[key] = {**old, **patch}
        else:
            self._status.pop(key, None)
        self.metrics.observe_state(namespace, name, state)
        self.metrics.observe_status(namespace, name, decision.status)

    def _post_events(self, body: dict[str, Any], events: list[Event], logger: Any) -> None:
        """Post the transitions' Events. Called before the status patch that records the
        transitions: a crash in between re-derives them, and the same name makes the
        repost a 409 (see :mod:`kubetune_operator.events`)."""
        namespace = body["metadata"]["namespace"]
        for event in events:
            manifest = event_manifest(body, event, instance=self.instance)
            if not self.api.post_event(namespace, manifest):
                logger.info(f"event {manifest['metadata']['name']} was already posted")

    def _remember(self, body: dict[str, Any] | None, key: tuple[str, str] | None = None) -> None:
        """Keep ``body`` as the job's newest known state (compact JSON: thousands of jobs).
        None (a status patch that returned no job): forget the job's, so that the next
        reconcile reads it live rather than from a body older than that write."""
        if body is None:
            if key is not None:
                self._bodies.pop(key, None)
            return
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        self._bodies[key] = json.dumps(body, separators=(",", ":")).encode()

    def forget(self, namespace: str, name: str) -> None:
        """The job is gone: drop what we kept of it, and give its concurrency slot away
        (its workloads go with it: they carry its ownerReference)."""
        key = (namespace, name)
        for table in (self._reconciled, self._status, self._bodies, self._locks):
            table.pop(key, None)
        self._written.discard(key)
        self.metrics.forget(namespace, name)
        self.wake(namespace)

    # -- sweeps -----------------------------------------------------------------------------
    def reconcile_sweep(self, namespace: str, name: str, logger: logging.Logger | Any) -> None:
        with self._locks[(namespace, f"sweep/{name}")]:
            body = self.api.get_sweep(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            trials = self.api.list_trials(namespace, name, SWEEP_LABEL)
            policies = self.tenancy.policies(namespace)
            self._apply_sweep(body, reconcile_sweep(body, trials, policies=policies), logger)

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
        self._post_events(body, decision.events, logger)  # before the status records them
        old = body.get("status") or {}
        patch = {k: v for k, v in decision.status.items() if old.get(k) != v}
        if patch:
            self.api.patch_sweep_status(namespace, name, patch)
        self.metrics.observe_sweep(namespace, name, decision.status)

    def wake(self, namespace: str, *, refused: bool = False) -> None:
        """Reconcile the namespace's jobs that wait for a concurrency slot (and, with
        ``refused``, those its policy refused): a slot freed, or a policy changed. In the
        pool when it runs (never under a job's lock), else here."""
        for (ns, name), status in list(self._status.items()):
            refused_here = refused and status.get("state") == "Invalid"
            refused_here = refused_here and _reason(status, "Accepted") == POLICY_VIOLATION
            if ns != namespace or not (waits_for_slot(status) or refused_here):
                continue
            pool = self._pool
            if pool is not None:
                pool.submit(self._logged, self.reconcile, ns, name, log)
            else:
                self._logged(self.reconcile, ns, name, log)

    def _wake_freed(self) -> None:
        for namespace in self.tenancy.take_freed():
            self.wake(namespace)

    def poll_progress(self, namespace: str, name: str) -> None:
        """Poll rank 0's progress endpoint; patch what changed in the status."""
        key = (namespace, name)
        if self.pods_index is not None:
            pods = list(self.pods_index.get(key) or ())
        else:
            pods = self.api.list_pods(namespace, name)
        ranks0 = sorted((p for p in pods if _is_running_rank0(p)), key=_attempt)
        ip = (ranks0[-1].get("status") or {}).get("podIP") if ranks0 else None
        report = fetch_progress(ip, port=self.config.progress_port) if ip else None
        if not report:
            return
        with self._locks[key]:
            status = self._status.get(key)
            if status is None or status.get("state") != "Running":
                return  # reconciled meanwhile into another state (or deleted)
            patch = changed_fields(status, status_from_progress(report, now_rfc3339()))
            if patch:
                self._remember(self.api.patch_job_status(namespace, name, patch), key)
                self._written.add(key)
                self._status[key] = {**status, **patch}
                self.metrics.observe_status(namespace, name, {**status, **patch})

    # -- the two loops: resync of all jobs, progress of the running ones ----------------------

    def remember_indexes(self, jobs_index: Any, pods_index: Any) -> None:
        """Keep the indexes: kopf hands them to resource handlers only."""
        self.jobs_index, self.pods_index = jobs_index, pods_index

    @staticmethod
    def _logged(call: Callable[..., None], *args: Any) -> None:
        """Run one job's work from a loop: an error is logged, the loop goes on."""
        try:
            call(*args)
        except Exception:
            log.exception(f"{getattr(call, '__name__', call)}{args[:2]} failed")

    def start_loops(self) -> None:
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kubetune-progress")
        for target, name in ((self._resync_loop, "resync"), (self._progress_loop, "progress")):
            thread = threading.Thread(target=target, name=f"kubetune-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_loops(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _resync_loop(self) -> None:
        while not self._stop.wait(self.config.resync_interval_seconds):
            try:
                self.resync_all()
            except Exception:
                log.exception("resync failed")

    def resync_all(self) -> None:
        """Reconcile every job from one LIST; a job reconciled since the LIST began is
        skipped (what it was reconciled with is at least as new)."""
        started = time.monotonic()
        for body in self.api.list_all_jobs(self.namespaces):
            if self._stop.is_set():
                return
            body.setdefault("apiVersion", f"{GROUP}/{VERSION}")
            body.setdefault("kind", "FineTuneJob")
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            self._logged(self._resync_one, key, body, started)
        self._wake_freed()

    def _resync_one(self, key: tuple[str, str], body: dict[str, Any], started: float) -> None:
        with self._locks[key], self.metrics.reconcile_seconds.time():
            if self._reconciled.get(key, 0.0) > started:
                return
            self._reconcile_locked(body, log)

    def _progress_loop(self) -> None:
        while not self._stop.wait(self.config.progress_interval_seconds):
            try:
                self.progress_round()
            except Exception:
                log.exception("progress round failed")

    def progress_round(self) -> None:
        """Poll every running trainer (a pool of 8); reconcile every queued job (Kueue's
        message changes on its Workload, which the operator does not watch)."""
        pool = self._pool
        if pool is None:
            return
        futures = []
        # _status holds only Running, Queued and Invalid jobs: not the thousands that wait
        for (namespace, name), status in list(self._status.items()):
            state = status.get("state")
            if state == "Running":
                futures.append(pool.submit(self._logged, self.poll_progress, namespace, name))
            elif state == "Queued" and not waits_for_slot(status):  # those: woken, resynced
                futures.append(pool.submit(self._logged, self.reconcile, namespace, name, log))
        wait(futures)


# The states whose status the operator keeps in memory: Running (the progress poller
# diffs against it), Queued and Invalid (wake() looks for jobs waiting for a slot, or
# refused by a policy that may have changed). Others need none: thousands may be Pending.
_STATUS_KEPT = ("Running", "Queued", "Invalid")


def _acts(body: dict[str, Any], decision: Decision) -> bool:
    """Whether ``decision`` would write anything: create, suspend or delete a workload,
    post an Event, or change the status."""
    old = body.get("status") or {}
    return bool(
        decision.create_job
        or decision.create_service
        or decision.suspend_jobs
        or decision.delete_jobs
        or decision.delete_services
        or decision.delete_network_policies
        or decision.events
        or any(old.get(k) != v for k, v in decision.status.items())
    )


def _reason(status: dict[str, Any], type_: str) -> str | None:
    found = next((x for x in status.get("conditions") or [] if x.get("type") == type_), None)
    return found.get("reason") if found else None


def _attempt(obj: dict[str, Any]) -> int:
    return int((obj["metadata"].get("labels") or {}).get(ATTEMPT_LABEL, "0"))


def _finished(job: dict[str, Any]) -> bool:
    return any(
        x.get("type") in ("Complete", "Failed") and x.get("status") == "True"
        for x in (job.get("status") or {}).get("conditions") or []
    )


def _slim(body: Any, spec_keys: tuple[str, ...]) -> dict[str, Any]:
    """What reconcile() reads of an attempt Job or a pod (not the pod template: the
    indexes hold one per job, and memory grows with the number of jobs)."""
    meta = body["metadata"]
    return copy.deepcopy(
        {
            "metadata": {k: meta.get(k) for k in _META_KEYS if meta.get(k) is not None},
            "spec": {k: body.get("spec", {}).get(k) for k in spec_keys},
            "status": dict(body.get("status") or {}),
        }
    )


_META_KEYS = ("name", "namespace", "uid", "labels", "annotations", "creationTimestamp")
_META_KEYS += ("deletionTimestamp",)


def _waits_in_queue(job: dict[str, Any]) -> bool:
    """An attempt Job that Kueue holds (suspended, in a queue, not finished)."""
    labels = job["metadata"].get("labels") or {}
    suspended = bool((job.get("spec") or {}).get("suspend"))
    return QUEUE_LABEL in labels and suspended and not _finished(job)


def _is_running_rank0(pod: dict[str, Any]) -> bool:
    """Rank 0 serves the progress endpoint (the pod with completion index 0)."""
    index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, "0")
    return index == "0" and (pod.get("status") or {}).get("phase") == "Running"


def _spec_changed(body: Any) -> bool:
    """A FineTuneJob change worth a reconcile: its spec (generation) is newer than the
    status says was reconciled. Status-only and metadata-only changes (our own status
    writes, a sweep's annotations) are not; the resync covers the rest."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return meta.get("generation") != status.get("observedGeneration")


def _worth_handling(event: dict[str, Any], body: Any, **_: Any) -> bool:
    """kopf's filter for FineTuneJob events, so that our own status writes (most events)
    cost kopf no handler call: creation, the first listing, a spec change, deletion."""
    return event.get("type") != "MODIFIED" or _spec_changed(body)


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    """All handlers, in a registry of their own (so tests can run several operators)."""
    registry = kopf.OperatorRegistry()
    job = {"group": GROUP, "version": VERSION, "plural": PLURAL, "registry": registry}
    workloads = {"labels": dict(MANAGED_BY), "registry": registry}

    # ids: kopf passes each index to the handlers as a kwarg named by its handler's id
    # The index functions are async (they do no I/O): kopf calls them in its event loop,
    # where a sync function would cost a thread hand-off per event.
    @kopf.index("batch", "v1", "jobs", id="attempt_jobs", **workloads)
    async def attempt_jobs(namespace: str, labels: Any, body: Any, **_: Any) -> Any:
        job_name = labels.get(JOB_LABEL)
        return {(namespace, job_name): _slim(body, ("completions", "suspend"))} if job_name else {}

    @kopf.index("", "v1", "pods", id="attempt_pods", **workloads)
    async def attempt_pods(namespace: str, labels: Any, body: Any, **_: Any) -> Any:
        job_name = labels.get(JOB_LABEL)
        return {(namespace, job_name): _slim(body, ())} if job_name else {}

    policy = {"group": GROUP, "version": VERSION, "plural": POLICY_PLURAL, "registry": registry}

    @kopf.index(**policy, id="tenant_policies")
    async def tenant_policies(namespace: str, body: Any, **_: Any) -> Any:
        return {namespace: slim_policy(copy.deepcopy(dict(body)))}

    @kopf.on.event(**policy)
    def policy_changed(namespace: str, **kw: Any) -> None:
        """A changed limit may let waiting or refused jobs start now."""
        reconciler.tenancy.index = kw["tenant_policies"]
        reconciler.wake(namespace, refused=True)

    @kopf.on.startup(registry=registry)
    def start_loops(**_: Any) -> None:
        reconciler.start_loops()

    @kopf.on.cleanup(registry=registry)
    def stop_loops(**_: Any) -> None:
        reconciler.stop_loops()

    @kopf.on.event(**job, when=_worth_handling)
    def job_changed(
        event: dict[str, Any], body: Any, namespace: str, name: str, logger: Any, **kw: Any
    ) -> None:
        reconciler.remember_indexes(kw["attempt_jobs"], kw["attempt_pods"])
        reconciler.tenancy.index = kw["tenant_policies"]
        if event.get("type") == "DELETED":
            reconciler.forget(namespace, name)
        else:
            reconciler.reconcile(namespace, name, logger, body=copy.deepcopy(dict(body)))

    @kopf.on.event("batch", "v1", "jobs", **workloads)
    @kopf.on.event("", "v1", "pods", **workloads)
    def workload_changed(labels: dict[str, str], namespace: str, logger: Any, **kw: Any) -> None:
        reconciler.remember_indexes(kw["attempt_jobs"], kw["attempt_pods"])
        reconciler.tenancy.index = kw["tenant_policies"]
        job_name = labels.get(JOB_LABEL)
        if job_name:
            reconciler.reconcile(namespace, job_name, logger)

    config = reconciler.config
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


class NoDiffBase(kopf.DiffBaseStorage):
    """No last-handled state: the operator has no handlers that detect changes (on.create,
    on.update, on.field...), only event handlers, indexes and a timer, so kopf needs none.
    The default storage deep-copies every event's body to build one (every Job and pod
    event included), and reads its annotation back."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def configure(settings: kopf.OperatorSettings) -> None:
    """Explicit kopf settings (used by `kubetune operator` and by the tests)."""
    # FineTuneJobs get no finalizer (no on.delete handler); kopf removes this one, which
    # older versions put on, from jobs that still carry it. Sweeps keep it (their timer).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.diffbase_storage = NoDiffBase()
    # The operator posts its Events itself (kubetune_operator.events: named per
    # transition, before the status records it); kopf posts none.
    settings.posting.enabled = False
    settings.posting.loggers = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 16
