"""Conditions per the Kubernetes API conventions: one per type, transition time kept
when the status does not change."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# Condition types.
ACCEPTED = "Accepted"  # the spec is valid (False: InvalidSpec)
RUNNING = "Running"  # a trainer pod is scheduled or running
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
QUEUED = "Queued"  # Kueue holds the attempt (reason PendingAdmission or Preempted)
# The conditions kstatus (Flux, kpt, cli-utils) reads, derived from the state.
READY = "Ready"  # True once the job succeeded
STALLED = "Stalled"  # True when the job cannot progress: failed, or an invalid spec
RECONCILING = "Reconciling"  # True while work is in flight (pending, queued, training)
SPEC_CHANGED = "SpecChangeIgnored"  # the spec changed after the job started
# A finished job's attempt Jobs, pods, Service and NetworkPolicies were deleted (its TTL).
WORKLOADS_DELETED = "WorkloadsDeleted"
# spec.evaluation.gate's verdict on the tuned model (reason GatePassed, GateFailed, or
# NotEvaluated when the trainer reported none); status.promotedArtifact follows it.
EVALUATION_PASSED = "EvaluationPassed"


def now_rfc3339(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """A new list with ``type_`` set; lastTransitionTime changes only when status does."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == value
        else now_rfc3339(now)
    )
    condition: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return [c for c in conditions if c.get("type") != type_] + [condition]


def get_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
