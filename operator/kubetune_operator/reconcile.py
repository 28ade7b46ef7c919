"""Decide what a FineTuneJob needs next, from the job and its attempts. Pure: no API calls.

The kopf handlers read the job, its attempt Jobs (batch/v1, one per attempt), their pods
and, for an attempt waiting in a Kueue queue, Kueue's Workload; they call
:func:`reconcile` and apply the :class:`Decision` (create a Job, suspend or delete Jobs,
patch status, emit events). Running the same inputs twice gives the same decision, so
re-delivered events, retried handlers and a restarted operator never make a second
attempt: Job names are deterministic per attempt, and an existing attempt is always
observed before a new one is created. State is derived from what exists, so an operator
killed between two writes heals on the next reconcile.

An attempt ends when its Job has the ``Complete`` or ``Failed`` condition (the Job
controller fails the whole attempt, stopping the other ranks, when any pod fails); a
failed attempt is retried as a new Job once all its pods have stopped, and the new
attempt resumes every rank from the newest complete checkpoint.

Kueue: a Job in a queue is created suspended; while Kueue holds it the job is
``Queued`` (with Kueue's own message when its Workload is readable). When Kueue preempts
an admitted Job (suspends it again and removes its pods) the job is ``Queued`` with
reason ``Preempted``: no attempt is consumed, and Kueue's next admission resumes from
the newest complete checkpoint.

Spec changes: while an attempt runs, later edits of the spec are not applied (the
running attempt and its retries keep the spec they started with, kept on the Job as an
annotation); a ``SpecChangeIgnored`` condition says so. ``suspend`` is the exception:
setting it stops the trainer (which checkpoints on SIGTERM), and a resumed job starts
its next attempt from the current spec, as a suspended Kubernetes Job does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune_trainer.errors import ExitCode

from . import conditions as c
from .accounting import account, earlier_attempts_seconds, gpu_status
from .api.policy import FineTunePolicy
from .api.types import API_VERSION, KIND, FineTuneJob
from .api.validation import InvalidManifest, Problem, parse_manifest
from .memory import ARCHITECTURE_ANNOTATION, INSUFFICIENT_GPU_MEMORY, memory_refusal
from .policy import CONCURRENCY_LIMIT, POLICY_VIOLATION, Slots, all_violations, with_defaults
from .progress import evaluation_status, tracking_status
from .workload import (
    ATTEMPT_LABEL,
    COMPLETION_INDEX,
    QUEUE_LABEL,
    SPEC_ANNOTATION,
    attempt_job,
    attempt_name,
    rank_service,
    service_name,
)

TERMINAL_STATES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event owed for one transition. ``since`` identifies the status it
    leaves (state, message, last condition change): the handlers name the Event after
    it, so an Event re-derived after a crash is the same Event, posted once."""

    type: str  # Normal or Warning
    reason: str
    message: str
    action: str = "Reconcile"  # what the operator did (the Event's ``action``)
    since: str = ""


@dataclass
class Decision:
    status: dict[str, Any]
    create_job: dict[str, Any] | None = None
    create_service: dict[str, Any] | None = None
    suspend_jobs: list[str] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)
    # A finished job's workloads, once its TTL has passed (see clean_up_after_ttl).
    delete_services: list[str] = field(default_factory=list)
    delete_network_policies: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# --------------------------------------------------------------------------- observed


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know about one trainer pod."""

    name: str
    attempt: int
    phase: str
    deleting: bool
    index: int = 0
    exit_code: int | None = None
    terminated_reason: str | None = None
    termination_message: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    unschedulable_message: str | None = None
    pod_reason: str | None = None
    pod_ip: str | None = None
    finished_at: str | None = None

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodView:
        meta = pod.get("metadata", {})
        status = pod.get("status") or {}
        container = next(iter(status.get("containerStatuses") or []), {})
        state = container.get("state") or {}
        terminated = state.get("terminated") or {}
        waiting = state.get("waiting") or {}
        scheduled = next(
            (x for x in status.get("conditions") or [] if x.get("type") == "PodScheduled"), {}
        )
        unschedulable = scheduled.get("status") == "False" and scheduled.get("reason") == (
            "Unschedulable"
        )
        return cls(
            name=meta.get("name", ""),
            attempt=int((meta.get("labels") or {}).get(ATTEMPT_LABEL, "0")),
            phase=status.get("phase") or "Pending",
            deleting=bool(meta.get("deletionTimestamp")),
            index=int((meta.get("annotations") or {}).get(COMPLETION_INDEX) or 0),
            exit_code=terminated.get("exitCode"),
            terminated_reason=terminated.get("reason"),
            termination_message=terminated.get("message"),
            waiting_reason=waiting.get("reason"),
            waiting_message=waiting.get("message"),
            unschedulable_message=scheduled.get("message") if unschedulable else None,
            pod_reason=status.get("reason"),
            pod_ip=status.get("podIP"),
            finished_at=terminated.get("finishedAt"),
        )

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def reported_error(self) -> dict[str, Any] | None:
        """The trainer's error from the termination message, when it wrote one."""
        error = _result(self.termination_message).get("error")
        return error if isinstance(error, dict) else None


@dataclass(frozen=True)
class AttemptView:
    """One attempt: its Job, the Job's pods and (in a Kueue queue) its Workload."""

    name: str
    attempt: int
    nodes: int
    suspended: bool
    deleting: bool
    spec_json: str | None
    queue: str | None
    created: str | None
    complete: bool
    failed_reason: str | None
    failed_message: str
    pods: tuple[PodView, ...] = ()
    pending_admission: str | None = None  # Kueue's message while it holds the Job
    evicted: str | None = None  # Kueue's eviction reason and message

    @classmethod
    def of(
        cls, job: dict[str, Any], pods: Iterable[PodView], workloads: Iterable[dict[str, Any]]
    ) -> AttemptView:
        meta = job.get("metadata", {})
        spec = job.get("spec") or {}
        labels = meta.get("labels") or {}
        attempt = int(labels.get(ATTEMPT_LABEL, "0"))
        conditions = {x.get("type"): x for x in (job.get("status") or {}).get("conditions") or []}
        failed = conditions.get("Failed") or {}
        is_failed = failed.get("status") == "True"
        pending, evicted = _kueue_view(meta.get("name", ""), workloads)
        return cls(
            name=meta.get("name", ""),
            attempt=attempt,
            nodes=int(spec.get("completions") or 1),
            suspended=bool(spec.get("suspend")),
            deleting=bool(meta.get("deletionTimestamp")),
            spec_json=(meta.get("annotations") or {}).get(SPEC_ANNOTATION),
            queue=labels.get(QUEUE_LABEL),
            created=_rfc3339(meta.get("creationTimestamp")),
            complete=(conditions.get("Complete") or {}).get("status") == "True",
            failed_reason=(failed.get("reason") or "Failed") if is_failed else None,
            failed_message=failed.get("message") or "",
            pods=tuple(sorted((p for p in pods if p.attempt == attempt), key=lambda p: p.index)),
            pending_admission=pending,
            evicted=evicted,
        )

    @property
    def finished(self) -> bool:
        return self.complete or self.failed_reason is not None

    @property
    def live_pods(self) -> list[PodView]:
        """Pods still running or about to (not finished, not being deleted)."""
        return [p for p in self.pods if not p.finished and not p.deleting]

    @property
    def stopped(self) -> bool:
        """No trainer process of this attempt can still be running."""
        return not any(p.phase in ("Running", "Pending") for p in self.pods)

    @property
    def rank0(self) -> PodView | None:
        """Rank 0's pod (index 0), which alone writes the result."""
        return next((p for p in reversed(self.pods) if p.index == 0), None)


def _kueue_view(
    job_name: str, workloads: Iterable[dict[str, Any]]
) -> tuple[str | None, str | None]:
    """Kueue's pending message and eviction (if any) for the Job named ``job_name``."""
    for workload in workloads:
        owners = (workload.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("kind") == "Job" and o.get("name") == job_name for o in owners):
            continue
        conditions = {
            x.get("type"): x for x in (workload.get("status") or {}).get("conditions") or []
        }
        reserved = conditions.get("QuotaReserved") or {}
        evicted = conditions.get("Evicted") or {}
        pending = reserved.get("message") if reserved.get("status") == "False" else None
        eviction = (
            f"{evicted.get('reason') or 'Evicted'}: {evicted.get('message') or ''}".rstrip(": ")
            if evicted.get("status") == "True"
            else None
        )
        return pending or None, eviction
    return None, None


def attempts_of(
    jobs: Iterable[dict[str, Any]],
    pods: Iterable[dict[str, Any]],
    workloads: Iterable[dict[str, Any]] = (),
) -> list[AttemptView]:
    """The attempts, oldest first."""
    pod_views = [PodView.of(p) for p in pods]
    workloads = list(workloads)
    views = [AttemptView.of(j, pod_views, workloads) for j in jobs]
    return sorted(views, key=lambda a: a.attempt)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    retryable: bool


def classify_failure(pod: PodView) -> Failure:
    """Why an attempt failed, and whether another attempt may succeed."""
    if pod.pod_reason == "DeadlineExceeded":
        return Failure("DeadlineExceeded", "the job ran longer than activeDeadlineSeconds", False)
    if pod.terminated_reason == "OOMKilled":
        return Failure(
            "OOMKilled",
            "the trainer ran out of memory; raise spec.resources.memory or lower "
            "spec.training.batchSize or spec.dataset.maxSeqLength",
            False,
        )
    detail = _error_from_message(pod.termination_message)
    # Under torchrun the container's exit code is torchrun's (1); the trainer's own
    # code travels in its error report.
    reported = (pod.reported_error or {}).get("exitCode")
    exit_code = reported if isinstance(reported, int) else pod.exit_code
    try:
        code = ExitCode(exit_code) if exit_code is not None else None
    except ValueError:
        code = None
    if code is not None and code != ExitCode.OK:
        message = detail or f"the trainer exited with code {int(code)}"
        return Failure(code.reason, message, code.retryable)
    message = detail or f"the trainer container ended with exit code {pod.exit_code}"
    return Failure("TrainerCrashed", message, True)


def attempt_failure(attempt: AttemptView) -> Failure:
    """Why a failed attempt failed: the pod that failed first explains it best."""
    if attempt.failed_reason == "DeadlineExceeded":
        return Failure("DeadlineExceeded", "the job ran longer than activeDeadlineSeconds", False)

    def first(pod: PodView) -> tuple[bool, bool, str, int]:
        error = pod.reported_error or {}
        # Ranks stopped because another failed report a SIGTERM (Preempted): look past them.
        stopped = error.get("exitCode") == ExitCode.PREEMPTED
        return (not error, stopped, pod.finished_at or "~", pod.index)

    failed = sorted((p for p in attempt.pods if p.phase == "Failed"), key=first)
    if failed:
        return classify_failure(failed[0])
    detail = f" ({attempt.failed_message})" if attempt.failed_message else ""
    return Failure("PodDeleted", f"a trainer pod was deleted while it ran{detail}", True)


def _error_from_message(message: str | None) -> str | None:
    if not message:
        return None
    try:
        error = json.loads(message).get("error") or {}
    except (ValueError, AttributeError):
        return message.strip()[-500:] or None  # FallbackToLogsOnError: the log's tail
    text = error.get("message") or ""
    hint = error.get("hint")
    return f"{text} (hint: {hint})" if hint else text or None


def _result(message: str | None) -> dict[str, Any]:
    try:
        result = json.loads(message or "")
    except ValueError:
        return {}
    return result if isinstance(result, dict) else {}


# --------------------------------------------------------------------------- decisions


# Not part of what an attempt runs with: read from the current spec whenever they apply.
_NOT_RUN_WITH = {"suspend", "ttlSecondsAfterFinished"}


def spec_json(job: FineTuneJob) -> str:
    """The spec an attempt runs with (suspend and the TTL after finishing are not part of
    it: changing them is no spec change a running attempt ignores), as stable JSON."""
    return json.dumps(job.spec.model_dump(mode="json", exclude=_NOT_RUN_WITH), sort_keys=True)


def _job_from(body: dict[str, Any], spec: Any) -> FineTuneJob:
    """Parse ``spec`` as the spec of the job named in ``body``'s metadata."""
    meta = body.get("metadata", {})
    return parse_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": spec,
        }
    )


def cluster_problems(job: FineTuneJob) -> list[Problem]:
    """What a valid manifest still needs to run on a cluster (not for local runs)."""
    output = job.spec.output
    if output is None:
        return [Problem("spec.output", "required on a cluster", "set spec.output.uri to s3://...")]
    if not output.uri.startswith("s3://"):
        return [
            Problem(
                "spec.output.uri",
                f"must be an s3:// URI on a cluster (got {output.uri!r})",
                "a pod's local disk is gone when it exits; use object storage",
            )
        ]
    return []


def transition_origin(status: Mapping[str, Any]) -> str:
    """What identifies the status a transition leaves: its state, its message and the
    latest change of any condition. It is read from the stored status, so the same
    transition derived again after a crash has the same origin."""
    times = [str(x.get("lastTransitionTime") or "") for x in status.get("conditions") or []]
    return f"{status.get('state')}|{max(times, default='')}|{status.get('message') or ''}"


class _Builder:
    """Accumulates the new status and the actions of one reconcile."""

    def __init__(self, body: dict[str, Any], now: datetime) -> None:
        meta = body.get("metadata", {})
        self.now = now
        self.identity = {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")}}
        self.uid = str(meta.get("uid") or "")
        self.generation = meta.get("generation")
        self.old = dict(body.get("status") or {})
        self.status = dict(self.old)
        self.status["observedGeneration"] = self.generation
        self.conditions: list[dict[str, Any]] = list(self.old.get("conditions") or [])
        self.decision = Decision(status=self.status)
        self.since = transition_origin(self.old)
        self.current: FineTuneJob | None = None  # the spec, once parsed
        # The namespace's FineTunePolicies, and its concurrency as this job sees it.
        self.policies: tuple[FineTunePolicy, ...] = ()
        self.slots: Slots | None = None
        self.ttl_default: int | None = None  # seconds after finishing; None: never
        self.gpu_products: dict[str, str] = {}

    def condition(self, type_: str, status: bool | str, reason: str, message: str = "") -> None:
        self.conditions = c.set_condition(
            self.conditions,
            type_,
            status,
            reason,
            message,
            generation=self.generation,
            now=self.now,
        )

    def state(
        self,
        state: str,
        reason: str,
        message: str,
        *,
        warning: bool = False,
        action: str = "ObserveAttempt",
    ) -> None:
        # An event per transition; a warning also when its message changes in place.
        moved = self.old.get("state") != state
        if moved or (warning and self.old.get("message") != message):
            kind = "Warning" if warning else "Normal"
            self.decision.events.append(Event(kind, reason, message, action, self.since))
        self.status["state"] = state
        self.status["message"] = message

    def finish(self) -> Decision:
        self._summary_conditions()
        self.status["conditions"] = self.conditions
        return self.decision

    def _summary_conditions(self) -> None:
        """Ready, Stalled and Reconciling, as kstatus (Flux, kpt) reads them, from the state
        (reason: the state; message: the status message)."""
        state = self.status.get("state")
        if state is None:
            return
        message = self.status.get("message") or ""
        self.condition(c.READY, state == "Succeeded", state, message)
        self.condition(c.STALLED, state in ("Failed", "Invalid"), state, message)
        in_flight = state in ("Pending", "Queued", "Running", "Retrying")
        self.condition(c.RECONCILING, in_flight, state, message)


def reconcile(
    body: dict[str, Any],
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    workloads: list[dict[str, Any]] | None = None,
    *,
    image: str,
    now: datetime | None = None,
    policies: Sequence[FineTunePolicy] = (),
    slots: Slots | None = None,
    ttl_seconds_after_finished: int | None = None,
    gpu_products: Mapping[str, str] | None = None,
) -> Decision:
    """The next step for the FineTuneJob ``body``, given its attempt ``jobs``, their
    ``pods`` and Kueue's ``workloads`` for them (if read), its namespace's FineTunePolicies
    and (under maxConcurrentJobs) the namespace's :class:`~kubetune_operator.policy.Slots`
    as this job sees them. The policies are checked before an attempt starts (the first,
    and after a resume), never against a running job."""
    b = _Builder(body, now or datetime.now(UTC))
    b.policies, b.slots = tuple(policies), slots
    b.ttl_default = ttl_seconds_after_finished  # the operator's; spec.ttlSecondsAfterFinished wins
    b.gpu_products = dict(gpu_products or {})  # GPU product label → memory (chart gpuProducts)
    views = attempts_of(jobs, pods, workloads or ())
    usage = account(b.old, jobs, pods, b.now)  # in every state: stopping pods still count
    if usage or b.old.get("gpuSeconds") is not None:
        b.status.update(gpu_status(usage))
    decision = _reconcile(b, views, body, image)
    _owed_retry_event(b, views, decision)
    return decision


def _owed_retry_event(b: _Builder, views: list[AttemptView], decision: Decision) -> None:
    """A retry the status never recorded (the operator died between creating the next
    attempt's Job and writing Retrying, and that attempt has run since) still gets its
    Warning Event, the same one it would have had."""
    recorded = int(b.old.get("attempts") or 0)
    if not views or views[-1].attempt <= recorded or decision.create_job is not None:
        return
    retried = _retried(b, views, b.current)
    if retried is None:
        return
    event = Event("Warning", retried[0], retried[1], "RetryAttempt", b.since)
    if event not in decision.events:
        decision.events.insert(0, event)


def _reconcile(b: _Builder, views: list[AttemptView], body: dict[str, Any], image: str) -> Decision:
    latest = views[-1] if views else None
    attempts = max([v.attempt for v in views] + [int(b.old.get("attempts") or 0)])
    spec_field = body.get("spec")
    # Not an object only when the API server's schema was bypassed: parsing says so
    # (Accepted=False/InvalidSpec, naming spec); nothing else may read it as one.
    raw_spec = spec_field if isinstance(spec_field, dict) else {}
    # Kueue labels: the job's own, else its namespace policy's default queue and priority.
    labels = with_defaults((body.get("metadata") or {}).get("labels") or {}, b.policies)

    if b.old.get("state") in TERMINAL_STATES:
        if b.old.get("state") == "Failed":  # a stop lost in a crash is repeated
            b.decision.delete_jobs = _unfinished(views)
        clean_up_after_ttl(b, views, body.get("spec"))
        return b.finish()  # a Succeeded job's attempts all ended: nothing to stop
    if views and not b.status.get("startTime") and views[0].created:
        # The status write after the first Job's creation was lost: the Job remembers.
        b.status["startTime"] = views[0].created
    if attempts:
        b.status["attempts"] = attempts
    if views and c.get_condition(b.conditions, c.ACCEPTED) is None:
        # Lost with the same status write: an attempt is only created for a valid spec.
        b.condition(c.ACCEPTED, True, "Valid", "the spec is valid")

    try:
        current: FineTuneJob | None = _job_from(body, {} if spec_field is None else spec_field)
        problems = cluster_problems(current)
    except InvalidManifest as invalid:
        current, problems = None, invalid.problems
    b.current = current
    message = "; ".join(str(p).replace("\n    hint:", " — hint:") for p in problems)

    if latest is not None and not latest.finished and not latest.deleting:
        _note_spec_change(b, latest, current, message)

    deadline = (current.spec.activeDeadlineSeconds if current else None) or None
    elapsed = _elapsed(b.status.get("startTime"), b.now)
    if deadline and elapsed is not None and elapsed >= deadline:
        return _fail(b, views, "DeadlineExceeded", "the job ran longer than activeDeadlineSeconds")

    if latest is not None and latest.complete:
        return _succeed(b, latest)
    if raw_spec.get("suspend"):
        return _suspend(b, latest)
    if latest is not None and latest.deleting:
        return b.finish()  # wait until the old attempt is gone
    # Resume after a suspend; also when a suspend was undone before its status was
    # written (a suspended Job outside Kueue's queues has no one else to resume it).
    resuming = b.old.get("state") == "Suspended" or (
        latest is not None and latest.suspended and not latest.queue and not latest.finished
    )
    if latest is None or resuming:
        if attempts and not resuming:
            vanished = Failure("AttemptDeleted", "the attempt's Job was deleted while it ran", True)
            return _retry_or_fail(b, current, attempts, vanished, None, image, labels)
        if current is None or problems:
            b.condition(c.ACCEPTED, False, "InvalidSpec", message)
            b.state("Invalid", "InvalidSpec", message, warning=True, action="ValidateSpec")
            return b.finish()
        refused = all_violations(current.spec, b.policies)
        if refused:
            text = "; ".join(v.message for v in refused)
            b.condition(c.ACCEPTED, False, POLICY_VIOLATION, text)
            b.state("Invalid", POLICY_VIOLATION, text, warning=True, action="ValidateSpec")
            return b.finish()
        too_big = _memory_refusal(current, body, b.gpu_products)
        if too_big is not None:
            b.condition(c.ACCEPTED, False, too_big[0], too_big[1])
            b.state("Invalid", too_big[0], too_big[1], warning=True, action="ValidateSpec")
            return b.finish()
        if b.slots is not None and not b.slots.free:
            return _waits_for_slot(b, b.slots)
        if (c.get_condition(b.conditions, c.QUEUED) or {}).get("reason") == CONCURRENCY_LIMIT:
            b.condition(c.QUEUED, False, "Admitted", "a slot is free: the job starts")
        if latest is not None and not latest.finished:
            b.decision.delete_jobs = [latest.name]  # the suspended attempt; resume anew
        started = spec_json(current)
        return _start_attempt(b, attempts + 1, image, started, labels, run_job=current)

    if latest.failed_reason is not None:
        if not latest.stopped:
            detail = f"attempt {latest.attempt} failed; waiting for its other ranks to stop"
            b.condition(c.RUNNING, False, "AttemptFailed", detail)
            return b.finish()
        failure = attempt_failure(latest)
        return _retry_or_fail(b, current, attempts, failure, latest, image, labels)
    if latest.suspended:
        return _queued(b, latest)
    if any(p.phase == "Failed" for p in latest.pods):
        return b.finish()  # the Job controller is about to fail the attempt as a whole
    if c.get_condition(b.conditions, c.QUEUED) is not None:
        b.condition(c.QUEUED, False, "Admitted", f"attempt {latest.attempt} was admitted")
    live = latest.live_pods
    if len(live) == latest.nodes and all(p.phase == "Running" for p in live):
        ranks = f" on {latest.nodes} nodes" if latest.nodes > 1 else ""
        b.condition(c.RUNNING, True, "Training", f"attempt {latest.attempt} is training{ranks}")
        b.state("Running", "Training", f"attempt {latest.attempt} is training{ranks}")
        return b.finish()
    reason, detail = _pending_reason(latest)
    retried = _retried(b, views, current)
    if retried is not None and reason not in _WARNING_REASONS:
        # Until the next attempt trains, the job is Retrying for the failure's reason
        # (a reason the user must act on, such as Unschedulable, wins).
        return _retrying(b, *retried)
    b.condition(c.RUNNING, False, reason, detail)
    b.state("Pending", reason, detail, warning=reason in _WARNING_REASONS)
    return b.finish()


def _memory_refusal(
    job: FineTuneJob, body: dict[str, Any], gpu_products: Mapping[str, str]
) -> tuple[str, str] | None:
    """(reason, message) when the job's estimated GPU memory exceeds
    spec.resources.gpuMemory (memory.py), or its architecture annotation is malformed."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    try:
        message = memory_refusal(job, annotations, gpu_products)
    except (ValueError, TypeError) as error:
        return "InvalidSpec", f"metadata.annotations[{ARCHITECTURE_ANNOTATION}]: {error}"
    return None if message is None else (INSUFFICIENT_GPU_MEMORY, message)


def _retried(
    b: _Builder, views: list[AttemptView], current: FineTuneJob | None
) -> tuple[str, str] | None:
    """The failure's reason and the Retrying message when the latest attempt retries a
    failed one: derived from the failed attempt's Job while it exists (so a status write
    lost in a crash is re-derived alike), else kept from the status (its Job was deleted)."""
    latest = views[-1]
    previous = views[-2] if len(views) > 1 else None
    if previous is not None and previous.attempt == latest.attempt - 1:
        if previous.failed_reason is None:
            return None
        failure = attempt_failure(previous)
        return failure.reason, _retry_message(b, current, previous.attempt, failure)
    if b.old.get("state") == "Retrying":
        running = c.get_condition(b.conditions, c.RUNNING) or {}
        return str(running.get("reason") or "Retrying"), str(b.old.get("message") or "")
    return None


def _retry_message(b: _Builder, current: FineTuneJob | None, failed: int, failure: Failure) -> str:
    limit = current.spec.retryLimit if current is not None else 0
    checkpoint = (b.old.get("lastCheckpoint") or {}).get("step")
    resume = f", resuming from checkpoint step {checkpoint}" if checkpoint else ""
    return (
        f"attempt {failed} failed ({failure.reason}: {failure.message}); "
        f"attempt {failed + 1} of {limit + 1} started{resume}"
    )


def _retrying(b: _Builder, reason: str, message: str) -> Decision:
    b.condition(c.RUNNING, False, "Retrying", message)
    b.state("Retrying", reason, message, warning=True, action="RetryAttempt")
    return b.finish()


def _unfinished(views: list[AttemptView]) -> list[str]:
    return [v.name for v in views if not v.finished and not v.deleting]


def _queued(b: _Builder, attempt: AttemptView) -> Decision:
    """Kueue holds the attempt: never admitted yet, or preempted after admission."""
    queued = c.get_condition(b.conditions, c.QUEUED) or {}
    preempted = attempt.evicted is not None or (
        b.old.get("state") in ("Pending", "Running")
        or (b.old.get("state") == "Queued" and queued.get("reason") == "Preempted")
    )
    where = f"in Kueue queue {attempt.queue!r}" if attempt.queue else "(its Job is suspended)"
    if preempted and attempt.evicted is None and queued.get("reason") == "Preempted":
        message = queued.get("message") or ""  # already said; Kueue's Workload may be gone
        reason = "Preempted"
    elif preempted:
        why = attempt.evicted or "the attempt's Job was suspended and its pods removed"
        checkpoint = (b.old.get("lastCheckpoint") or {}).get("step")
        resume = (
            f" from checkpoint step {checkpoint}" if checkpoint else " from the newest checkpoint"
        )
        message = (
            f"attempt {attempt.attempt} was preempted ({why}); it waits {where} and resumes"
            f"{resume} when admitted again (no retry is used)"
        )
        reason = "Preempted"
    else:
        pending = f": {attempt.pending_admission}" if attempt.pending_admission else ""
        message = f"attempt {attempt.attempt} waits for admission {where}{pending}"
        reason = "PendingAdmission"
    b.condition(c.QUEUED, True, reason, message)
    b.condition(c.RUNNING, False, reason, message)
    b.state("Queued", reason, message, warning=preempted)
    return b.finish()


def _waits_for_slot(b: _Builder, slots: Slots) -> Decision:
    """maxConcurrentJobs is reached: wait (no attempt yet) until a slot frees."""
    message = slots.message()
    b.condition(c.ACCEPTED, True, "Valid", "the spec is valid")
    if b.old.get("state") == "Suspended":
        b.condition(c.SUSPENDED, False, "Resumed", "resumed; it waits for a slot")
    b.condition(c.QUEUED, True, CONCURRENCY_LIMIT, message)
    b.condition(c.RUNNING, False, CONCURRENCY_LIMIT, message)
    b.state("Queued", CONCURRENCY_LIMIT, message, action="WaitForSlot")
    return b.finish()


def _note_spec_change(
    b: _Builder, latest: AttemptView, current: FineTuneJob | None, problems: str
) -> None:
    started = latest.spec_json
    changed = current is None or (started is not None and spec_json(current) != started)
    if changed:
        detail = f" (and the new spec is invalid: {problems})" if current is None else ""
        b.condition(
            c.SPEC_CHANGED,
            True,
            "SpecChangedWhileRunning",
            "the spec changed after the job started; the running job keeps its original "
            f"spec{detail}. Suspend and resume the job, or re-create it, to apply changes.",
        )
    elif c.get_condition(b.conditions, c.SPEC_CHANGED) is not None:
        b.condition(c.SPEC_CHANGED, False, "SpecUnchanged", "the spec matches the running job")


def _elapsed(start: str | None, now: datetime) -> float | None:
    started = _parse_time(start)
    return None if started is None else (now - started).total_seconds()


def _parse_time(value: Any) -> datetime | None:
    """A timestamp as the API sends it (``...Z``) or as the ``kubernetes`` client's
    objects serialise it (``...+00:00``); None when absent or unreadable."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _rfc3339(value: Any) -> str | None:
    """A timestamp in the status's own form (``2026-11-23T12:00:00Z``)."""
    parsed = _parse_time(value) if value else None
    return c.now_rfc3339(parsed.astimezone(UTC)) if parsed is not None else None


_WARNING_REASONS = ("Unschedulable", "ImagePullBackOff", "CreateContainerConfigError")


def _pending_reason(attempt: AttemptView) -> tuple[str, str]:
    """Why the attempt is not training yet: the first pod with a reason explains it."""
    for pod in attempt.live_pods:
        reason = _pod_pending_reason(pod)
        if reason is not None:
            return reason
    return "Pending", waiting_to_start(attempt.attempt)


def waiting_to_start(attempt: int) -> str:
    """A new attempt's message, with or without its pods yet: the status written with the
    attempt's Job is the one its Job's and pods' events compute, so they write nothing."""
    return f"attempt {attempt} created, waiting to start"


def _pod_pending_reason(pod: PodView) -> tuple[str, str] | None:
    if pod.unschedulable_message:
        return "Unschedulable", f"no node fits the trainer pod: {pod.unschedulable_message}"
    if pod.waiting_reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
        return "ImagePullBackOff", (
            f"cannot pull the trainer image: {pod.waiting_message or pod.waiting_reason}; "
            "check spec.image and image pull secrets"
        )
    if pod.waiting_reason == "CreateContainerConfigError":
        return pod.waiting_reason, (
            f"{pod.waiting_message or 'the pod cannot be configured'}; create the Secret "
            "named by spec.output.credentialsSecretRef or spec.model.tokenSecretRef in the "
            "job's namespace"
        )
    if pod.waiting_reason:
        return pod.waiting_reason, pod.waiting_message or pod.waiting_reason
    return None


def _start_attempt(
    b: _Builder,
    attempt: int,
    image: str,
    started_spec: str,
    labels: Mapping[str, str],
    retry: tuple[str, str] | None = None,
    run_job: FineTuneJob | None = None,
) -> Decision:
    """Create the Job of ``attempt``, which runs with ``started_spec`` (``run_job``: that
    spec parsed, when the caller has it); ``retry`` (the failure's reason and message)
    when it retries a failed attempt."""
    if run_job is None:
        run_job = _job_from(b.identity, json.loads(started_spec))
    deadline = run_job.spec.activeDeadlineSeconds
    elapsed = _elapsed(b.status.get("startTime"), b.now) or 0.0
    job = attempt_job(
        run_job,
        uid=b.uid,
        attempt=attempt,
        image=image,
        labels=labels,
        deadline_seconds=int(deadline - elapsed) if deadline else None,
        started_spec=started_spec,
        gpu_seconds_before=earlier_attempts_seconds(b.status, attempt),
    )
    b.decision.create_job = job
    b.decision.create_service = rank_service(run_job, uid=b.uid)
    b.status["attempts"] = attempt
    b.status.setdefault("startTime", c.now_rfc3339(b.now))
    b.condition(c.ACCEPTED, True, "Valid", "the spec is valid")
    if b.old.get("state") == "Suspended":
        b.condition(c.SUSPENDED, False, "Resumed", f"resumed with attempt {attempt}")
    if job["spec"]["suspend"]:
        queue = job["metadata"]["labels"][QUEUE_LABEL]
        created = retry[1] if retry else f"attempt {attempt} created"
        message = f"{created}; waits for admission in Kueue queue {queue!r}"
        b.condition(c.QUEUED, True, "PendingAdmission", message)
        b.condition(c.RUNNING, False, "PendingAdmission", message)
        reason, action = (
            (retry[0], "RetryAttempt") if retry else ("AttemptCreated", "CreateAttempt")
        )
        b.state("Queued", reason, message, warning=retry is not None, action=action)
        return b.finish()
    if retry is not None:
        return _retrying(b, *retry)
    b.condition(c.RUNNING, False, "Pending", waiting_to_start(attempt))
    b.state("Pending", "AttemptCreated", waiting_to_start(attempt), action="CreateAttempt")
    return b.finish()


def _retry_or_fail(
    b: _Builder,
    current: FineTuneJob | None,
    attempts: int,
    failure: Failure,
    latest: AttemptView | None,
    image: str,
    labels: Mapping[str, str],
) -> Decision:
    limit = current.spec.retryLimit if current is not None else 0
    if not failure.retryable:
        return _fail(b, [], failure.reason, failure.message)
    if attempts > limit:
        return _fail(
            b,
            [],
            "BackoffLimitExceeded",
            f"{attempts} attempts failed (retryLimit {limit}); last: {failure.reason}: "
            f"{failure.message}",
        )
    # Retries keep the spec the job started with.
    started = latest.spec_json if latest is not None else None
    spec_text = started or (spec_json(current) if current is not None else None)
    if spec_text is None:
        return _fail(b, [], "InvalidSpec", "cannot retry: the spec is no longer valid")
    retry = (failure.reason, _retry_message(b, current, attempts, failure))
    return _start_attempt(b, attempts + 1, image, spec_text, labels, retry)


def _fail(b: _Builder, views: list[AttemptView], reason: str, message: str) -> Decision:
    b.decision.delete_jobs = _unfinished(views)
    b.status["completionTime"] = c.now_rfc3339(b.now)
    b.condition(c.RUNNING, False, reason, message)
    b.condition(c.FAILED, True, reason, message)
    b.state("Failed", reason, message, warning=True, action="FailJob")
    return b.finish()


def _succeed(b: _Builder, attempt: AttemptView) -> Decision:
    rank0 = attempt.rank0
    result = _result(rank0.termination_message if rank0 is not None else None)
    artifact = result.get("artifact")
    if artifact:
        b.status["artifact"] = artifact
    metrics = result.get("metrics") or {}
    merged = dict(b.old.get("metrics") or {})
    for source, target in (
        ("train_loss", "trainLoss"),
        ("eval_loss", "evalLoss"),
        ("perplexity", "perplexity"),
        ("tokens_per_second", "tokensPerSecond"),
    ):
        if source in metrics:
            merged[target] = metrics[source]
    if merged:
        b.status["metrics"] = merged
    tracking = tracking_status(result.get("tracking"))
    if tracking:
        b.status["tracking"] = tracking
    progress = dict(b.old.get("progress") or {})
    if progress.get("totalSteps"):
        progress.update(step=progress["totalSteps"], percent=100, etaSeconds=0)
        b.status["progress"] = progress
    b.status["completionTime"] = c.now_rfc3339(b.now)
    uri = (artifact or {}).get("uri", "the output store")
    promoted = _evaluated(b, attempt, result.get("evaluation"))
    if artifact and promoted:
        b.status["promotedArtifact"] = artifact
    else:
        b.status.pop("promotedArtifact", None)
    message = f"the adapter is at {uri}"
    if not promoted:
        message += "; not promoted: the evaluation gate did not pass"
    b.condition(c.RUNNING, False, "Completed", f"attempt {attempt.attempt} completed")
    b.condition(c.SUCCEEDED, True, "Completed", f"the adapter is at {uri}")
    b.state("Succeeded", "Completed", message, action="CompleteJob")
    return b.finish()


def _gate_of(spec_text: str | None) -> Any:
    """spec.evaluation.gate of the spec an attempt ran with (None: no gate)."""
    try:
        spec = json.loads(spec_text or "{}")
    except ValueError:
        return None
    evaluation = spec.get("evaluation") if isinstance(spec, dict) else None
    return evaluation.get("gate") if isinstance(evaluation, dict) else None


def _evaluated(b: _Builder, attempt: AttemptView, report: Any) -> bool:
    """status.evaluation and the EvaluationPassed condition from the trainer's report;
    whether the artifact is promoted: the gate passed, or the job has no gate."""
    evaluation = evaluation_status(report)
    if evaluation:
        b.status["evaluation"] = evaluation
    gate = (evaluation or {}).get("gate")
    if gate is not None:
        passed = bool(gate["passed"])
        reason = "GatePassed" if passed else "GateFailed"
        b.condition(c.EVALUATION_PASSED, passed, reason, gate.get("message", ""))
        return passed
    if _gate_of(attempt.spec_json) is not None:
        b.condition(
            c.EVALUATION_PASSED,
            "Unknown",
            "NotEvaluated",
            "the trainer reported no evaluation (an older trainer image?); not promoted",
        )
        return False
    return True


def _suspend(b: _Builder, latest: AttemptView | None) -> Decision:
    """Stop the running attempt: suspend its Job (the Job controller stops the pods and the
    trainer checkpoints on SIGTERM). A Job in a Kueue queue is deleted instead: Kueue owns
    its suspension, and deleting it frees the quota at once."""
    active = latest is not None and not latest.finished and not latest.deleting
    if latest is not None and active:
        if latest.queue:  # even while Kueue holds it: it would admit it later
            b.decision.delete_jobs = [latest.name]
        elif not latest.suspended:
            b.decision.suspend_jobs = [latest.name]
    if latest is not None and not latest.stopped:
        message = f"stopping attempt {latest.attempt} (it checkpoints first)"
    else:
        message = "suspended; set spec.suspend to false to resume from the last checkpoint"
    b.condition(c.SUSPENDED, True, "Suspended", message)
    b.condition(c.RUNNING, False, "Suspended", message)
    b.state("Suspended", "Suspended", message, action="SuspendAttempt")
    return b.finish()


# --------------------------------------------------------------------------- cleanup


def ttl_seconds(spec: Any, default: int | None) -> int | None:
    """How long after finishing a job's workloads stay: ``spec.ttlSecondsAfterFinished``
    (read from the spec as it is now, so it can be changed after the job finished), else
    the operator's default; None: for ever."""
    ttl = spec.get("ttlSecondsAfterFinished") if isinstance(spec, dict) else None
    if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0:
        return ttl
    return default


def finished_at(status: Mapping[str, Any]) -> datetime | None:
    """When the job finished: ``completionTime``, else its Succeeded/Failed condition's
    last transition."""
    finished = _parse_time(status.get("completionTime")) if status.get("completionTime") else None
    if finished is not None:
        return finished
    for type_ in (c.SUCCEEDED, c.FAILED):
        found = c.get_condition(list(status.get("conditions") or []), type_) or {}
        if found.get("status") == "True" and found.get("lastTransitionTime"):
            return _parse_time(found["lastTransitionTime"])
    return None


def clean_up_after_ttl(b: _Builder, views: list[AttemptView], spec: Any) -> None:
    """A finished job whose TTL has passed: delete its attempts' Jobs (the pods go with
    them), its rank-0 Service and its attempts' NetworkPolicies, once.

    Only a job whose *recorded* status is Succeeded or Failed is cleaned up, so its
    result is already in the status, and nothing is derived from its Jobs any more: a
    terminal job stays as it is without them (no new attempt, status, startTime, attempts
    and artifact kept). The ``WorkloadsDeleted`` condition records the cleanup (a crash
    before it is written repeats the deletes, which then find nothing) and says where the
    pods went; its Event is named by the transition like every other.
    """
    if c.get_condition(b.conditions, c.WORKLOADS_DELETED) is not None:
        return
    ttl = ttl_seconds(spec, b.ttl_default)
    finished = finished_at(b.old)
    if ttl is None or finished is None or (b.now - finished).total_seconds() < ttl:
        return
    name = str(b.identity["metadata"].get("name") or "")
    attempts = max([v.attempt for v in views] + [int(b.old.get("attempts") or 0)])
    b.decision.delete_jobs = [v.name for v in views if not v.deleting]
    if any(v.nodes > 1 for v in views) or not views:  # not views: a crash after the Jobs
        b.decision.delete_services = [service_name(name)]
    b.decision.delete_network_policies = [attempt_name(name, n) for n in range(1, attempts + 1)]
    message = (
        f"the job finished {ttl} s ago (ttlSecondsAfterFinished): its attempts' Jobs, pods, "
        "Service and NetworkPolicies were deleted; its status, Events and artifact are kept"
    )
    b.condition(c.WORKLOADS_DELETED, True, "TTLExpired", message)
    b.decision.events.append(
        Event("Normal", "WorkloadsDeleted", message, "DeleteWorkloads", b.since)
    )
