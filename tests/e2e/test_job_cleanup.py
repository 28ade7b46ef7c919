"""Per-job isolation and cleanup on the harness (a stand-in trainer image keeps it fast).

Each attempt gets a NetworkPolicy of its own next to its Job. A finished job keeps its
workloads until its TTL has passed (the failed attempt's pod, with its termination
message, stays readable until then); then its Jobs, pods, Service and NetworkPolicies go,
and the job stays finished with its status, Events and artifact: no new attempt, across
operator restarts too."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, condition
from harness import EmulatorServer, JobController, Kubelet
from kubernetes.client import NetworkingV1Api
from kubernetes.client.exceptions import ApiException

from kubetune_operator.workload import NetworkPolicyConfig

pytestmark = pytest.mark.e2e

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))
OPERATOR_LABELS = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/instance": "kt"}
ISOLATED = {
    "network_policy": NetworkPolicyConfig("kubetune-system", OPERATOR_LABELS),
    "ttl_seconds_after_finished": 3600,  # the default; the jobs' specs override it later
}
KEPT = ("state", "message", "startTime", "completionTime", "attempts", "artifact", "gpuSeconds")


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def _exists(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def _reasons(cluster: Cluster, name: str) -> list[str]:
    return [e.reason for e in cluster.events() if e.involved_object.name == name]


def test_a_finished_jobs_workloads_go_after_its_ttl_and_the_job_stays_finished(
    kube: EmulatorServer, job_controller: JobController, tmp_path: Path, seaweedfs
) -> None:
    images = {
        "fake:ok": [sys.executable, FAKE_TRAINER],
        "fake:fail-once": [sys.executable, FAKE_TRAINER, "fail-once"],
    }
    # dns_timeout: the stand-in's rank 0 may finish before rank 1 looks up its address (a
    # finished pod has none); rank 1 needs none, and need not wait for it.
    node = Kubelet(kube.url, tmp_path / "kubelet", max_grace_period=2, images=images, dns_timeout=1)
    with node as kubelet:
        cluster = Cluster(kube, kubelet, seaweedfs, seaweedfs.create_bucket(), tmp_path)
        networking = NetworkingV1Api(cluster.core.api_client)
        cluster.create_storage_secret("default")
        cluster.start_operator(**ISOLATED)
        try:
            cluster.apply(cluster.tiny_job("done", image="fake:ok", resources={"nodes": 2}))
            cluster.apply(cluster.tiny_job("failed", image="fake:fail-once", retryLimit=0))
            cluster.wait_state("done", "Succeeded", timeout=30)
            failed = cluster.wait_state("failed", "Failed", timeout=30)
            assert "StorageUnavailable" in failed["status"]["message"]

            # Isolation: each attempt has its NetworkPolicy, selecting exactly its pods.
            for name, nodes in (("done", 2), ("failed", 1)):
                policy = networking.read_namespaced_network_policy(f"{name}-attempt-1", "default")
                selector = policy.spec.pod_selector.match_labels
                pods = cluster.pods(name)
                assert len(pods) == nodes
                for pod in pods:
                    assert selector.items() <= pod.metadata.labels.items()
                assert selector["kubetune.io/job"] == name
                assert selector["kubetune.io/attempt"] == "1"
                assert policy.metadata.owner_references[0].kind == "FineTuneJob"
                peers = policy.spec.ingress[1]._from[0].pod_selector.match_labels
                assert peers == selector  # only the attempt's own pods, on any port
            # Before the TTL: the failed attempt's pod and its termination message stay.
            [pod] = cluster.pods("failed")
            terminated = pod.status.container_statuses[0].state.terminated
            assert pod.status.phase == "Failed" and "StorageUnavailable" in terminated.message
            assert cluster.core.read_namespaced_service("ftj-done", "default")
            assert not any(c["type"] == "WorkloadsDeleted" for c in failed["status"]["conditions"])

            # The operator is down when the TTL is shortened; the restarted one cleans up.
            cluster.stop_operator()
            for name in ("done", "failed"):
                cluster.patch_spec(name, {"ttlSecondsAfterFinished": 0})
            before = {name: cluster.get(name)["status"] for name in ("done", "failed")}
            cluster.start_operator(**ISOLATED)
            for name in ("done", "failed"):
                job = cluster.wait(
                    name,
                    lambda j: any(
                        c["type"] == "WorkloadsDeleted" and c["status"] == "True"
                        for c in (j.get("status") or {}).get("conditions") or []
                    ),
                    "WorkloadsDeleted",
                    timeout=30,
                )
                assert condition(job, "WorkloadsDeleted")["reason"] == "TTLExpired"
                for key in KEPT:
                    assert job["status"].get(key) == before[name].get(key), (name, key)
            for name in ("done", "failed"):
                _eventually(lambda n=name: not cluster.jobs(n), f"{name}'s Jobs deleted")
                _eventually(lambda n=name: not cluster.pods(n), f"{name}'s pods deleted")
                _eventually(
                    lambda n=name: (
                        not _exists(
                            lambda: networking.read_namespaced_network_policy(
                                f"{n}-attempt-1", "default"
                            )
                        )
                    ),
                    f"{name}'s NetworkPolicy deleted",
                )
            assert not _exists(lambda: cluster.core.read_namespaced_service("ftj-done", "default"))
            done = cluster.get("done")["status"]
            assert done["artifact"]["uri"] == "s3://bucket/fake/adapter"
            assert done["attempts"] == 1 and done["state"] == "Succeeded"
            for name in ("done", "failed"):
                reasons = _reasons(cluster, name)
                assert reasons.count("WorkloadsDeleted") == 1, reasons
                assert len(reasons) > 1  # the earlier Events are kept

            # Restarted again, the operator reconciles the cleaned-up jobs: nothing happens.
            cleaned = {name: cluster.get(name)["status"] for name in ("done", "failed")}
            events = {name: _reasons(cluster, name) for name in ("done", "failed")}
            cluster.stop_operator()
            operator = cluster.start_operator(**ISOLATED)
            operator.operator.reconciler.resync_all()
            for name in ("done", "failed"):
                assert cluster.jobs(name) == [] and cluster.pods(name) == []
                assert cluster.get(name)["status"] == cleaned[name]
                assert sorted(_reasons(cluster, name)) == sorted(events[name])
        finally:
            cluster.stop_operator()
