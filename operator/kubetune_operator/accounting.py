"""GPU-hour accounting: how many GPU-seconds a FineTuneJob's pods held. Pure: no API calls.

What is counted, per trainer pod: the GPUs its container requested (the attempt's
``spec.resources.gpus``, read from the spec the attempt runs with, kept on its Job) times
the seconds from the pod's ``status.startTime`` to its trainer container's
``state.terminated.finishedAt``:

- ``status.startTime`` is set by the kubelet when it admits the pod on its node, which is
  when the node's device plugin hands the pod its GPUs; from then no other pod can use
  them (image pull and the trainer's start-up included). A pod that was never scheduled
  (Unschedulable, or a Job that Kueue holds suspended, which has no pods at all) has no
  ``startTime`` and costs nothing.
- ``finishedAt`` is written by the kubelet when the container has exited, after which the
  GPUs are free again. A pod still running (or stopping after a deletion) is counted up
  to ``now``, in whole seconds; a finished pod without ``finishedAt`` (it ended before its
  container started) up to its latest condition change.

Both are the pod's own timestamps, so the figure does not depend on when the operator
happened to look. Sums go over all pods of all attempts (nodes × GPUs per node).

The cluster deletes pods (TTL cleanup, eviction, Kueue preemption of an attempt, the next
attempt replacing the last), so the figures are kept in ``status.gpuUsage``: one entry
per attempt, with each pod's figure while the attempt runs. A reconcile recomputes every
pod it sees and keeps, per pod, the larger of the kept and the recomputed figure; a pod
it no longer sees keeps its kept figure. Once an attempt's Job has finished and all its
pods have stopped (or its Job is gone and a later attempt exists or the job has ended),
its figure is final: its pods are dropped from status and never counted again. So the
total never goes backwards, and an operator restarted at any point neither loses nor
double-counts anything: it starts from the kept figures. (The one approximation: a
running pod counted up to ``now`` that ended slightly earlier, because its end reached
the API late, keeps the later figure; the difference is the kubelet's report delay.)
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .api.types import AttemptGpuUsage
from .workload import ATTEMPT_LABEL, SPEC_ANNOTATION

_RUNNING = ("Pending", "Running")


def parse_time(value: Any) -> datetime | None:
    """A timestamp as the API sends it (``...Z``) or the ``kubernetes`` client writes it."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def pod_held_seconds(pod: Mapping[str, Any], now: datetime) -> int:
    """Whole seconds the pod held its node's resources: ``status.startTime`` to its
    container's ``finishedAt`` (``now`` while it has not finished); 0 if never started."""
    status = pod.get("status") or {}
    start = parse_time(status.get("startTime"))
    if start is None:
        return 0
    ends = [
        parse_time(((c.get("state") or {}).get("terminated") or {}).get("finishedAt"))
        for c in status.get("containerStatuses") or []
    ]
    known = [end for end in ends if end is not None]
    if known and len(known) == len(ends):
        end = max(known)
    elif (status.get("phase") or "Pending") in _RUNNING:
        end = now
    else:  # ended before its container ran: the pod's last change
        changes = [parse_time(c.get("lastTransitionTime")) for c in status.get("conditions") or []]
        end = max((t for t in changes if t is not None), default=start)
    return max(0, int((end - start).total_seconds()))


def gpus_per_pod(job: Mapping[str, Any] | None) -> int:
    """GPUs each pod of an attempt requests: ``resources.gpus`` of the spec the attempt
    runs with (the Job's annotation); the API's default (1) when it does not say."""
    annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
    try:
        spec = json.loads(annotations.get(SPEC_ANNOTATION) or "{}")
        return int((spec.get("resources") or {}).get("gpus", 1))
    except (ValueError, TypeError, AttributeError):
        return 1


def _attempt(obj: Mapping[str, Any]) -> int:
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {}).get(ATTEMPT_LABEL, "0"))
    except ValueError:
        return 0


def _finished(job: Mapping[str, Any]) -> bool:
    return any(
        x.get("type") in ("Complete", "Failed") and x.get("status") == "True"
        for x in (job.get("status") or {}).get("conditions") or []
    )


def kept_usage(status: Mapping[str, Any]) -> dict[int, AttemptGpuUsage]:
    """``status.gpuUsage`` by attempt (entries that do not parse are left out)."""
    kept: dict[int, AttemptGpuUsage] = {}
    for entry in status.get("gpuUsage") or []:
        try:
            usage = AttemptGpuUsage.model_validate(entry)
        except ValidationError:
            continue
        kept[usage.attempt] = usage
    return kept


def account(
    status: Mapping[str, Any],
    jobs: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    now: datetime,
) -> list[AttemptGpuUsage]:
    """The new ``status.gpuUsage``, from the kept one (``status``), the attempts' Jobs and
    their pods as they are now (see the module's docstring for the rules)."""
    kept = kept_usage(status)
    by_attempt = {_attempt(job): job for job in jobs}
    pods_of: defaultdict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for pod in pods:
        pods_of[_attempt(pod)].append(pod)
    latest = max(by_attempt, default=0)
    ended = status.get("state") in ("Succeeded", "Failed")
    usage: dict[int, AttemptGpuUsage] = {}
    for attempt in sorted(set(kept) | set(by_attempt) | set(pods_of)):
        before = kept.get(attempt)
        if attempt <= 0 or (before is not None and before.final):
            if before is not None:
                usage[attempt] = before
            continue
        job = by_attempt.get(attempt)
        gpus = gpus_per_pod(job) if job is not None else (before.gpusPerPod if before else 1)
        counted = dict(before.pods or {}) if before is not None else {}
        live = False
        for pod in pods_of.get(attempt, []):
            name = str((pod.get("metadata") or {}).get("name") or "")
            seconds = gpus * pod_held_seconds(pod, now)
            if (pod.get("status") or {}).get("startTime"):
                counted[name] = max(counted.get(name, 0), seconds)
            live = live or ((pod.get("status") or {}).get("phase") or "Pending") in _RUNNING
        # Final once no pod of it runs: its Job ended, or is gone and a later attempt
        # exists or the whole job has ended (a Failed job deleted it; TTL cleanup).
        gone = job is None and (attempt < latest or ended)
        final = not live and ((job is not None and _finished(job)) or gone)
        if not counted and not final and before is None:
            continue  # nothing held yet (queued, unschedulable, not started)
        usage[attempt] = AttemptGpuUsage(
            attempt=attempt,
            gpusPerPod=gpus,
            gpuSeconds=sum(counted.values()),
            final=final,
            pods=None if final else counted,
        )
    return [usage[a] for a in sorted(usage)]


def gpu_status(usage: list[AttemptGpuUsage]) -> dict[str, Any]:
    """The status fields of the accounting: gpuSeconds, gpuHours and gpuUsage."""
    total = sum(u.gpuSeconds for u in usage)
    return {
        "gpuSeconds": total,
        "gpuHours": round(total / 3600, 2),
        "gpuUsage": [u.model_dump(mode="json", exclude_none=True) for u in usage],
    }


def earlier_attempts_seconds(status: Mapping[str, Any], attempt: int) -> int:
    """GPU-seconds of the attempts before ``attempt``, as ``status`` keeps them."""
    return sum(u.gpuSeconds for a, u in kept_usage(status).items() if a < attempt)
