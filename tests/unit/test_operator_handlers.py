"""The handlers' own decisions: which job events reconcile, and when the kopf indexes are
trusted instead of a live LIST (an index that has not caught up with a created attempt
must never make the operator start a second one); which model cache attempt pods mount."""

from __future__ import annotations

import copy
import logging
from typing import Any

from kubetune_operator.handlers import (
    OperatorConfig,
    Reconciler,
    _slim,
    _spec_changed,
    _worth_handling,
)
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.workload import ATTEMPT_LABEL, JOB_LABEL, NetworkPolicyConfig


def _attempt_job(attempt: int, *conditions: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"j-attempt-{attempt}",
            "namespace": "ns",
            "labels": {JOB_LABEL: "j", ATTEMPT_LABEL: str(attempt)},
        },
        "spec": {"completions": 1, "suspend": False, "template": {"spec": {"x": "big"}}},
        "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
    }


class FakeApi:
    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs, self.lists = jobs, 0

    def list_jobs(self, namespace: str, name: str) -> list[dict[str, Any]]:
        self.lists += 1
        return self.jobs

    def list_pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return []


def _reconciler(api: FakeApi, jobs_in_index: list[dict[str, Any]]) -> Reconciler:
    reconciler = Reconciler(api, OperatorConfig(), OperatorMetrics())  # type: ignore[arg-type]
    reconciler.jobs_index = {("ns", "j"): jobs_in_index}
    reconciler.pods_index = {}
    return reconciler


def test_only_spec_changes_reconcile_a_modified_job() -> None:
    assert not _spec_changed({"metadata": {"generation": 2}, "status": {"observedGeneration": 2}})
    assert _spec_changed({"metadata": {"generation": 3}, "status": {"observedGeneration": 2}})
    assert _spec_changed({"metadata": {"generation": 1}})  # never reconciled


def test_kopf_calls_the_job_handler_for_creation_spec_changes_and_deletion_only() -> None:
    ours = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2}}
    edited = {"metadata": {"generation": 3}, "status": {"observedGeneration": 2}}
    assert not _worth_handling({"type": "MODIFIED"}, ours)  # our own status write
    assert _worth_handling({"type": "MODIFIED"}, edited)
    for kind in (None, "ADDED", "DELETED"):  # None: the first listing
        assert _worth_handling({"type": kind}, ours)


def test_index_behind_the_status_falls_back_to_a_live_list() -> None:
    live = [_attempt_job(1)]
    api = FakeApi(live)
    reconciler = _reconciler(api, [])  # the index has not seen attempt 1 yet
    jobs, _, indexed = reconciler._workloads("ns", "j", {"status": {"attempts": 1}})
    assert jobs == live and api.lists == 1 and not indexed


def test_index_that_caught_up_is_used_without_a_request() -> None:
    api = FakeApi([])
    indexed = [_attempt_job(1)]
    jobs, _, _ = _reconciler(api, indexed)._workloads("ns", "j", {"status": {"attempts": 1}})
    assert jobs == indexed and api.lists == 0


def test_a_finished_attempt_is_read_live() -> None:
    api = FakeApi([_attempt_job(1, "Failed")])
    _reconciler(api, [_attempt_job(1, "Failed")])._workloads("ns", "j", {"status": {"attempts": 1}})
    assert api.lists == 1


def test_an_ended_job_is_decided_from_the_index_and_acts_only_on_a_live_read() -> None:
    """Every resync reconciles every job, also those that ended long ago: they are decided
    from the indexes, and only a decision that would write anything is made again from a
    live read (the index may still show an attempt running that in fact completed)."""
    ended = {**JOB_BODY, "status": {"attempts": 1, "state": "Failed"}}
    api = ServerApi(ended)
    api.jobs = [_attempt_job(1, "Complete")]
    reconciler = _reconciler(api, [_attempt_job(1)])  # stale: attempt 1 still runs
    jobs, _, indexed = reconciler._workloads("ns", "j", ended)
    assert indexed and api.lists == 0 and jobs == [_attempt_job(1)]
    reconciler.reconcile("ns", "j", logging.getLogger("test"), body=copy.deepcopy(ended))
    # From the index alone it would stop attempt 1 (a Failed job's unfinished attempts);
    # the live read shows it completed: nothing is deleted.
    assert api.lists == 1 and api.deleted == []
    settled = copy.deepcopy(api.body)
    reconciler.jobs_index = {("ns", "j"): [_attempt_job(1, "Complete")]}  # caught up
    reconciler.reconcile("ns", "j", logging.getLogger("test"), body=settled)
    assert api.lists == 1  # nothing to write: no live read


def test_index_entries_leave_out_the_pod_template() -> None:
    slim = _slim(_attempt_job(1), ("completions", "suspend"))
    assert slim["spec"] == {"completions": 1, "suspend": False}
    assert slim["metadata"]["labels"][ATTEMPT_LABEL] == "1"


class CreatingApi(FakeApi):
    """Keeps the attempt Jobs the reconciler creates; the namespace has ``policies``."""

    def __init__(self, policies: list[dict[str, Any]]) -> None:
        super().__init__([])
        self.policies, self.created = policies, []

    def list_policies(self, namespace: str) -> list[dict[str, Any]]:
        return self.policies

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.created.append(manifest)
        return True

    def post_event(self, namespace: str, manifest: dict[str, Any]) -> bool:
        return True

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        pass


JOB_BODY = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "j", "namespace": "ns", "uid": "u-1", "generation": 1},
    "spec": {
        "model": {"source": "s3://models/llama"},
        "dataset": {"sources": ["s3://data/train.jsonl"]},
        "output": {"uri": "s3://out/j"},
    },
}


def _policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTunePolicy",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": spec,
    }


def _created(config: OperatorConfig, policies: list[dict[str, Any]]) -> dict[str, Any]:
    """The first attempt's Job, as the reconciler creates it."""
    api = CreatingApi(policies)
    reconciler = Reconciler(api, config, OperatorMetrics())  # type: ignore[arg-type]
    reconciler._reconcile_locked(dict(JOB_BODY), logging.getLogger("test"))
    (job,) = api.created
    return job


def _claims(operator_claim: str | None, policies: list[dict[str, Any]]) -> list[str]:
    """The PVCs the first attempt's pods mount as the model cache."""
    job = _created(OperatorConfig(model_cache_claim=operator_claim), policies)
    volumes = job["spec"]["template"]["spec"]["volumes"]
    return [
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    ]


def test_attempt_pods_mount_the_model_cache_the_operator_or_the_policy_names() -> None:
    assert _claims(None, []) == []  # no cache configured: nothing mounted
    assert _claims("models", []) == ["models"]
    assert _claims("models", [_policy("limits", maxNodes=2)]) == ["models"]
    override = [_policy("b", modelCache={"claimName": "team-b"}), _policy("a", maxNodes=2)]
    assert _claims("models", override) == ["team-b"]
    assert _claims(None, override) == ["team-b"]


class OrderedApi(CreatingApi):
    """Records the order of the reconciler's writes."""

    def __init__(self, jobs: list[dict[str, Any]] | None = None) -> None:
        super().__init__([])
        self.jobs, self.calls = jobs or [], []

    def create_network_policy(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.calls.append(("create_network_policy", manifest["metadata"]["name"]))
        return True

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.calls.append(("create_job", manifest["metadata"]["name"]))
        return True

    def delete_service(self, namespace: str, name: str) -> None:
        self.calls.append(("delete_service", name))

    def delete_network_policy(self, namespace: str, name: str) -> None:
        self.calls.append(("delete_network_policy", name))

    def delete_job(self, namespace: str, name: str) -> None:
        self.calls.append(("delete_job", name))


ISOLATION = NetworkPolicyConfig("kubetune-system", {"app.kubernetes.io/name": "kubetune"})


def _run(api: OrderedApi, body: dict[str, Any], **config: Any) -> list[tuple[str, str]]:
    reconciler = Reconciler(api, OperatorConfig(**config), OperatorMetrics())  # type: ignore[arg-type]
    reconciler._reconcile_locked(body, logging.getLogger("test"))
    return api.calls


def test_an_attempts_network_policy_is_created_before_its_job_and_only_when_configured() -> None:
    assert _run(OrderedApi(), dict(JOB_BODY), network_policy=ISOLATION) == [
        ("create_network_policy", "j-attempt-1"),
        ("create_job", "j-attempt-1"),
    ]
    assert _run(OrderedApi(), dict(JOB_BODY)) == [("create_job", "j-attempt-1")]


def test_cleanup_deletes_the_service_and_policies_before_the_jobs() -> None:
    """A crash between the deletes leaves Jobs, which the next reconcile sees and deletes
    again together with what else may be left."""
    finished = {
        **JOB_BODY,
        "spec": {**JOB_BODY["spec"], "ttlSecondsAfterFinished": 0},
        "status": {"state": "Succeeded", "attempts": 2, "completionTime": "2026-11-23T10:00:00Z"},
    }
    jobs = [_attempt_job(1, "Failed"), _attempt_job(2, "Complete")]
    jobs[1]["spec"]["completions"] = 2  # two nodes: a rank-0 Service
    calls = _run(OrderedApi(jobs), finished, network_policy=ISOLATION)
    assert calls == [
        ("delete_service", "ftj-j"),
        ("delete_network_policy", "j-attempt-1"),
        ("delete_network_policy", "j-attempt-2"),
        ("delete_job", "j-attempt-1"),
        ("delete_job", "j-attempt-2"),
    ]
    # Without per-attempt policies there are none to delete (nor the RBAC to do it).
    assert [c for c in _run(OrderedApi(jobs), finished) if "network" in c[0]] == []


def test_the_operators_trainer_uid_reaches_the_attempt_pods() -> None:
    def security(config: OperatorConfig) -> dict[str, Any]:
        context: dict[str, Any] = _created(config, [])["spec"]["template"]["spec"][
            "securityContext"
        ]
        return context

    assert security(OperatorConfig())["runAsUser"] == 10001
    assert security(OperatorConfig(trainer_uid=2000))["fsGroup"] == 2000
    assert "runAsUser" not in security(OperatorConfig(trainer_uid=None))


class ServerApi(CreatingApi):
    """Keeps the job as the API server would (status merge-patches), counts its GETs."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__([])
        self.body, self.gets, self.patches = copy.deepcopy(body), 0, 0
        self.deleted: list[str] = []

    def delete_job(self, namespace: str, name: str) -> None:
        self.deleted.append(name)

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        self.gets += 1
        return copy.deepcopy(self.body)

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> Any:
        self.patches += 1
        self.body["status"] = {**(self.body.get("status") or {}), **status}
        return copy.deepcopy(self.body)


def test_workload_events_reconcile_from_the_status_last_written_without_a_get() -> None:
    api = ServerApi(JOB_BODY)
    reconciler = Reconciler(api, OperatorConfig(), OperatorMetrics())  # type: ignore[arg-type]
    reconciler.reconcile("ns", "j", logging.getLogger("test"), body=copy.deepcopy(JOB_BODY))
    assert (api.gets, api.patches, len(api.created)) == (0, 1, 1)
    attempt = {**api.created[0], "status": {}}
    api.jobs = [attempt]
    reconciler.jobs_index, reconciler.pods_index = {("ns", "j"): [attempt]}, {}
    # The attempt Job's event: the job as our patch returned it, not a GET, and nothing
    # to write (the status written with the attempt is what its Job's event computes).
    reconciler.reconcile("ns", "j", logging.getLogger("test"))
    assert (api.gets, api.patches, len(api.created)) == (0, 1, 1)
    # A watch event of the job itself may be older than our write: read live.
    reconciler.reconcile("ns", "j", logging.getLogger("test"), body=copy.deepcopy(JOB_BODY))
    assert (api.gets, api.patches, len(api.created)) == (1, 1, 1)
    # Deleted: nothing of it is kept.
    reconciler.forget("ns", "j")
    assert not reconciler._bodies and not reconciler._status
