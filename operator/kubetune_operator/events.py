"""Kubernetes Events for transitions, named so that posting one twice makes one Event.

The handlers post a transition's Event *before* the status patch that records it. An
operator killed between the two re-derives the same transition from the unchanged
status on its next reconcile (see :func:`~kubetune_operator.reconcile.transition_origin`)
and posts an Event of the same name: the API server answers 409 AlreadyExists, so the
Event exists exactly once, and no recorded state is without its Event.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import UTC, datetime
from typing import Any

from .reconcile import Event

REPORTING_CONTROLLER = "kubetune.io/operator"  # the Event's reportingComponent
SOURCE_COMPONENT = "kubetune-operator"  # the Event's source.component (kubectl's FROM)
NOTE_LIMIT = 1024  # the API server refuses longer messages (bytes)
INSTANCE_LIMIT = 128


def reporting_instance() -> str:
    """This operator's pod (``POD_NAME`` from the downward API in the chart), else the
    host's name."""
    return (os.environ.get("POD_NAME") or socket.gethostname() or "kubetune-operator")[
        :INSTANCE_LIMIT
    ]


def event_name(involved_name: str, uid: str, event: Event) -> str:
    """The same for the same transition of the same object (by uid): a deterministic
    ``<object>.<16 hex>``, like the names Kubernetes' own recorder gives."""
    identity = "\0".join((uid, event.since, event.type, event.reason, event.message))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{involved_name[: 253 - 17]}.{digest}"


def _truncate(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def event_manifest(
    involved: dict[str, Any], event: Event, *, instance: str, now: datetime | None = None
) -> dict[str, Any]:
    """A core/v1 Event about ``involved`` (a FineTuneJob or FineTuneSweep body)."""
    meta = involved.get("metadata") or {}
    moment = now or datetime.now(UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": event_name(meta.get("name") or "", str(meta.get("uid") or ""), event),
            "namespace": meta.get("namespace"),
        },
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": event.type,
        "reason": event.reason,
        "message": _truncate(event.message, NOTE_LIMIT),
        "action": event.action,
        "reportingComponent": REPORTING_CONTROLLER,
        "reportingInstance": instance,
        "source": {"component": SOURCE_COMPONENT},
        "eventTime": moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
