"""Events: one per transition, named after it, posted before the status records it, with
real reporting fields (not kopf's "Action?"/"dev")."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune_operator.events import (
    NOTE_LIMIT,
    REPORTING_CONTROLLER,
    event_manifest,
    event_name,
    reporting_instance,
)
from kubetune_operator.handlers import OperatorConfig, Reconciler
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconcile import Event

pytestmark = pytest.mark.unit

BODY = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job", "namespace": "ns", "uid": "u-1", "generation": 1},
    "spec": {
        "model": {"source": "hf://org/model"},
        "dataset": {"sources": ["s3://data/train.jsonl"]},
        "output": {"uri": "s3://out/job"},
    },
}


def test_the_same_transition_has_the_same_name_and_another_one_does_not() -> None:
    event = Event("Normal", "AttemptCreated", "attempt 1 created", "CreateAttempt", "None||")
    assert event_name("job", "u-1", event) == event_name("job", "u-1", event)
    assert event_name("job", "u-1", event).startswith("job.")
    others = [
        Event("Normal", "AttemptCreated", "attempt 1 created", "CreateAttempt", "Pending|t|x"),
        Event("Normal", "AttemptCreated", "attempt 2 created", "CreateAttempt", "None||"),
    ]
    names = {event_name("job", "u-1", e) for e in others} | {event_name("job", "u-2", event)}
    assert event_name("job", "u-1", event) not in names and len(names) == 3


def test_manifest_has_real_reporting_fields_and_a_bounded_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAME", "kubetune-operator-5d9f-abcde")
    event = Event("Warning", "TrainerCrashed", "x" * 3000, "RetryAttempt", "Running||")
    now = datetime(2026, 12, 2, 1, 2, 3, 456789, tzinfo=UTC)
    manifest = event_manifest(BODY, event, instance=reporting_instance(), now=now)
    assert manifest["action"] == "RetryAttempt"
    assert manifest["reportingComponent"] == REPORTING_CONTROLLER
    assert manifest["reportingInstance"] == "kubetune-operator-5d9f-abcde"
    assert manifest["involvedObject"] == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "job",
        "namespace": "ns",
        "uid": "u-1",
    }
    assert manifest["eventTime"] == "2026-12-02T01:02:03.456789Z"
    assert len(manifest["message"].encode()) <= NOTE_LIMIT
    monkeypatch.delenv("POD_NAME")
    assert reporting_instance()  # the host's name


class RecordingApi:
    """Records the order of the calls; Events already posted answer "exists"."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.posted: set[str] = set()

    def list_jobs(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return []

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return []

    def list_policies(self, namespace: str) -> list[dict[str, Any]]:
        return []  # a namespace without FineTunePolicies

    def create_service(self, namespace: str, manifest: dict[str, Any]) -> bool:
        return True

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.calls.append("create_job")
        return True

    def post_event(self, namespace: str, manifest: dict[str, Any]) -> bool:
        name = manifest["metadata"]["name"]
        self.calls.append(f"post_event {manifest['reason']}")
        fresh = name not in self.posted
        self.posted.add(name)
        return fresh

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append("patch_job_status")


def test_events_are_posted_before_the_status_and_a_repost_is_one_event() -> None:
    api = RecordingApi()
    reconciler = Reconciler(api, OperatorConfig(), OperatorMetrics())  # type: ignore[arg-type]
    reconciler._reconcile_locked(dict(BODY), logging.getLogger("test"))
    assert api.calls == ["create_job", "post_event AttemptCreated", "patch_job_status"]
    # Killed before the status patch landed: the same body reconciles to the same Event.
    reconciler._reconcile_locked(dict(BODY), logging.getLogger("test"))
    assert len(api.posted) == 1
