"""Decide what a FineTuneJob needs next, from the job and its pods. Pure: no API calls.

The kopf handlers read the job and its pods, call :func:`reconcile`, and apply the
:class:`Decision` (create a pod, delete pods, patch status, emit events). Running the
same inputs twice gives the same decision, so re-delivered events, retried handlers and
a restarted operator never make a second pod: pod names are deterministic per attempt,
and an existing attempt is always observed before a new one is created.

Spec changes: while a trainer runs, later edits of the spec are not applied (the
running attempt and its retries keep the spec they started with, kept on the pod as an
annotation); a ``SpecChangeIgnored`` condition says so. ``suspend`` is the exception:
setting it stops the trainer (which checkpoints on SIGTERM), and a resumed job starts
its next attempt from the current spec, as a suspended Kubernetes Job does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubetune_trainer.errors import ExitCode

from . import conditions as c
from .api.types import API_VERSION, KIND, FineTuneJob
from .api.validation import InvalidManifest, Problem, parse_manifest
from .workload import ATTEMPT_LABEL, trainer_pod

SPEC_ANNOTATION = "kubetune.io/spec"
TERMINAL_STATES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: dict[str, Any]
    create_pod: dict[str, Any] | None = None
    delete_pods: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# --------------------------------------------------------------------------- pods


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know about one trainer pod."""

    name: str
    attempt: int
    phase: str
    deleting: bool
    spec_json: str | None
    exit_code: int | None = None
    terminated_reason: str | None = None
    termination_message: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    unschedulable_message: str | None = None
    pod_reason: str | None = None
    pod_ip: str | None = None

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
            spec_json=(meta.get("annotations") or {}).get(SPEC_ANNOTATION),
            exit_code=terminated.get("exitCode"),
            terminated_reason=terminated.get("reason"),
            termination_message=terminated.get("message"),
            waiting_reason=waiting.get("reason"),
            waiting_message=waiting.get("message"),
            unschedulable_message=scheduled.get("message") if unschedulable else None,
            pod_reason=status.get("reason"),
            pod_ip=status.get("podIP"),
        )

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


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
    try:
        code = ExitCode(pod.exit_code) if pod.exit_code is not None else None
    except ValueError:
        code = None
    if code is not None and code != ExitCode.OK:
        message = detail or f"the trainer exited with code {int(code)}"
        return Failure(code.reason, message, code.retryable)
    message = detail or f"the trainer container ended with exit code {pod.exit_code}"
    return Failure("TrainerCrashed", message, True)


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


def spec_json(job: FineTuneJob) -> str:
    """The spec an attempt runs with (suspend is not part of it), as stable JSON."""
    return json.dumps(job.spec.model_dump(mode="json", exclude={"suspend"}), sort_keys=True)


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

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        self.conditions = c.set_condition(
            self.conditions,
            type_,
            status,
            reason,
            message,
            generation=self.generation,
            now=self.now,
        )

    def state(self, state: str, reason: str, message: str, *, warning: bool = False) -> None:
        # An event per transition; a warning also when its message changes in place.
        moved = self.old.get("state") != state
        if moved or (warning and self.old.get("message") != message):
            self.decision.events.append(Event("Warning" if warning else "Normal", reason, message))
        self.status["state"] = state
        self.status["message"] = message

    def finish(self) -> Decision:
        self.status["conditions"] = self.conditions
        return self.decision


def reconcile(
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    *,
    image: str,
    now: datetime | None = None,
) -> Decision:
    """The next step for the FineTuneJob ``body`` whose trainer pods are ``pods``."""
    b = _Builder(body, now or datetime.now(UTC))
    views = sorted((PodView.of(p) for p in pods), key=lambda v: v.attempt)
    latest = views[-1] if views else None
    attempts = max([v.attempt for v in views] + [int(b.old.get("attempts") or 0)])
    raw_spec = body.get("spec") or {}

    if b.old.get("state") in TERMINAL_STATES:
        b.decision.delete_pods = [v.name for v in views if not v.finished and not v.deleting]
        return b.finish()

    try:
        current: FineTuneJob | None = _job_from(body, raw_spec)
        problems = cluster_problems(current)
    except InvalidManifest as invalid:
        current, problems = None, invalid.problems
    message = "; ".join(str(p).replace("\n    hint:", " — hint:") for p in problems)

    running = latest is not None and not latest.finished and not latest.deleting
    if running and latest is not None:
        _note_spec_change(b, latest, current, message)

    deadline = (current.spec.activeDeadlineSeconds if current else None) or None
    elapsed = _elapsed(b.old.get("startTime"), b.now)
    if deadline and elapsed is not None and elapsed >= deadline:
        return _fail(b, views, "DeadlineExceeded", "the job ran longer than activeDeadlineSeconds")

    if raw_spec.get("suspend"):
        return _suspend(b, latest)

    if latest is not None and latest.deleting:
        return b.finish()  # wait until the old attempt is gone
    resuming = b.old.get("state") == "Suspended"
    if latest is None or resuming:
        if attempts and not resuming:
            vanished = Failure("PodDeleted", "the trainer pod was deleted while it ran", True)
            return _retry_or_fail(b, current, attempts, vanished, latest, image)
        if current is None or problems:
            b.condition(c.ACCEPTED, False, "InvalidSpec", message)
            b.state("Invalid", "InvalidSpec", message, warning=True)
            return b.finish()
        return _start_attempt(b, attempts + 1, image, spec_json(current))

    if latest.phase == "Succeeded":
        return _succeed(b, latest)
    if latest.phase == "Failed":
        return _retry_or_fail(b, current, attempts, classify_failure(latest), latest, image)
    if latest.phase == "Running":
        b.condition(c.RUNNING, True, "Training", f"attempt {latest.attempt} is training")
        b.state("Running", "Training", f"attempt {latest.attempt} is training")
        return b.finish()
    reason, detail = _pending_reason(latest)
    b.condition(c.RUNNING, False, reason, detail)
    b.state("Pending", reason, detail, warning=reason in _WARNING_REASONS)
    return b.finish()


def _note_spec_change(
    b: _Builder, latest: PodView, current: FineTuneJob | None, problems: str
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
    if not start:
        return None
    started = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (now - started).total_seconds()


_WARNING_REASONS = ("Unschedulable", "ImagePullBackOff", "CreateContainerConfigError")


def _pending_reason(pod: PodView) -> tuple[str, str]:
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
    return "Pending", f"attempt {pod.attempt} is waiting to start"


def _start_attempt(b: _Builder, attempt: int, image: str, started_spec: str) -> Decision:
    """Create the pod for ``attempt``, which runs with ``started_spec``."""
    run_job = _job_from(b.identity, json.loads(started_spec))
    deadline = run_job.spec.activeDeadlineSeconds
    elapsed = _elapsed(b.old.get("startTime"), b.now) or 0.0
    pod = trainer_pod(
        run_job,
        uid=b.uid,
        attempt=attempt,
        image=image,
        deadline_seconds=int(deadline - elapsed) if deadline else None,
    )
    pod["metadata"].setdefault("annotations", {})[SPEC_ANNOTATION] = started_spec
    b.decision.create_pod = pod
    b.status["attempts"] = attempt
    b.status.setdefault("startTime", c.now_rfc3339(b.now))
    b.condition(c.ACCEPTED, True, "Valid", "the spec is valid")
    if b.old.get("state") == "Suspended":
        b.condition(c.SUSPENDED, False, "Resumed", f"resumed with attempt {attempt}")
    b.condition(c.RUNNING, False, "Pending", f"attempt {attempt} created")
    b.state("Pending", "AttemptCreated", f"attempt {attempt} created")
    return b.finish()


def _retry_or_fail(
    b: _Builder,
    current: FineTuneJob | None,
    attempts: int,
    failure: Failure,
    latest: PodView | None,
    image: str,
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
    decision = _start_attempt(b, attempts + 1, image, spec_text)
    checkpoint = (b.old.get("lastCheckpoint") or {}).get("step")
    resume = f", resuming from checkpoint step {checkpoint}" if checkpoint else ""
    message = (
        f"attempt {attempts} failed ({failure.reason}: {failure.message}); "
        f"attempt {attempts + 1} of {limit + 1} started{resume}"
    )
    b.decision.events.clear()
    b.condition(c.RUNNING, False, "Retrying", message)
    b.state("Retrying", failure.reason, message, warning=True)
    return decision


def _fail(b: _Builder, views: list[PodView], reason: str, message: str) -> Decision:
    b.decision.delete_pods = [v.name for v in views if not v.finished and not v.deleting]
    b.status["completionTime"] = c.now_rfc3339(b.now)
    b.condition(c.RUNNING, False, reason, message)
    b.condition(c.FAILED, True, reason, message)
    b.state("Failed", reason, message, warning=True)
    return b.finish()


def _succeed(b: _Builder, pod: PodView) -> Decision:
    result = _result(pod.termination_message)
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
    progress = dict(b.old.get("progress") or {})
    if progress.get("totalSteps"):
        progress.update(step=progress["totalSteps"], percent=100, etaSeconds=0)
        b.status["progress"] = progress
    b.status["completionTime"] = c.now_rfc3339(b.now)
    uri = (artifact or {}).get("uri", "the output store")
    b.condition(c.RUNNING, False, "Completed", f"attempt {pod.attempt} completed")
    b.condition(c.SUCCEEDED, True, "Completed", f"the adapter is at {uri}")
    b.state("Succeeded", "Completed", f"the adapter is at {uri}")
    return b.finish()


def _suspend(b: _Builder, latest: PodView | None) -> Decision:
    if latest is not None and not latest.finished and not latest.deleting:
        b.decision.delete_pods = [latest.name]
        message = f"stopping attempt {latest.attempt} (it checkpoints first)"
    else:
        message = "suspended; set spec.suspend to false to resume from the last checkpoint"
    b.condition(c.SUSPENDED, True, "Suspended", message)
    b.condition(c.RUNNING, False, "Suspended", message)
    b.state("Suspended", "Suspended", message)
    return b.finish()
