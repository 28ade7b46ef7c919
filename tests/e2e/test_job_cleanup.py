"""Per-job isolation and cleanup on the harness (a stand-in trainer image keeps it fast).

Each attempt gets a NetworkPolicy of its own next to its Job. A finished job keeps its
workloads until its TTL has passed (the failed attempt's pod, with its termination
message, stays readable until then); then its Jobs, pods, Service and NetworkPolicies go,
and the job stays finished with its status, Events and artifact: no new attempt, across
operator restarts too, and when the operator is SIGKILLed in the middle of a cleanup."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, condition
from harness import (
    OPERATOR_USER,
    AuditEntry,
    EmulatorServer,
    JobController,
    Kubelet,
    OperatorProcess,
)
from kubernetes.client import NetworkingV1Api
from kubernetes.client.exceptions import ApiException

from kubetune_operator.api.types import GROUP, PLURAL, VERSION
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

            # Reconciled again (every job, as the periodic resync does): nothing happens.
            cleaned = {name: cluster.get(name)["status"] for name in ("done", "failed")}
            events = {name: _reasons(cluster, name) for name in ("done", "failed")}
            assert cluster.operator_thread is not None
            cluster.operator_thread.operator.reconciler.resync_all()
            for name in ("done", "failed"):
                assert cluster.jobs(name) == [] and cluster.pods(name) == []
                assert cluster.get(name)["status"] == cleaned[name]
                assert sorted(_reasons(cluster, name)) == sorted(events[name])
        finally:
            cluster.stop_operator()


# Where the operator dies in a cleanup: at the Jobs' delete (the Service's and the
# policy's deletes landed before; the Jobs are gone, nothing records it): the riskiest
# point, where a finished job without Jobs must not look like one with no attempt yet. A
# kill before it leaves Jobs that the next reconcile deletes with the rest
# (tests/unit/test_operator_handlers.py); one after it re-posts the same Event
# (tests/unit/test_reconcile.py), which the API server keeps once.
KILL_POINTS = (("delete", "jobs"),)


def _killer(pid: int, verb: str, resource: str) -> Callable[[AuditEntry], None]:
    """An audit listener that SIGKILLs the operator at its ``verb resource`` request (the
    request is still served: its write lands, its answer is lost)."""

    def kill(entry: AuditEntry) -> None:
        if entry.user == OPERATOR_USER and (entry.verb, entry.rbac_resource) == (verb, resource):
            os.kill(pid, signal.SIGKILL)

    return kill


def _manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "image": "fake:ok",
            "model": {"source": "s3://bucket/models/tiny"},
            "dataset": {"sources": ["s3://bucket/data/train.jsonl"]},
            "output": {"uri": f"s3://bucket/jobs/{name}"},
            "resources": {"nodes": 2},  # a rank-0 Service too
            "ttlSecondsAfterFinished": 3600,
        },
    }


def test_an_operator_killed_in_the_middle_of_a_cleanup_heals(
    kube: EmulatorServer, job_controller: JobController, tmp_path: Path, seaweedfs
) -> None:
    """SIGKILLed at each step of a cleanup, the restarted operator finishes it: the
    workloads are gone, WorkloadsDeleted is recorded with one Event, no new attempt."""
    policy = {"operatorNamespace": "kubetune-system", "operatorPodLabels": OPERATOR_LABELS}
    args = ["--image", "fake:ok", "--resync-interval", "1", "--progress-interval", "1"]
    args += ["--ttl-seconds-after-finished", "3600", "--job-network-policy", json.dumps(policy)]
    kubeconfig = kube.write_kubeconfig(tmp_path / "operator-kubeconfig", OPERATOR_USER)
    operator = OperatorProcess(kubeconfig, tmp_path / "operator-logs", args=args, preload=True)
    images = {"fake:ok": [sys.executable, FAKE_TRAINER]}
    node = Kubelet(kube.url, tmp_path / "kubelet", max_grace_period=1, images=images, dns_timeout=1)
    cluster = Cluster(kube, node, seaweedfs, seaweedfs.create_bucket(), tmp_path)
    networking = NetworkingV1Api(cluster.core.api_client)
    names = [f"kill-{n}" for n in range(len(KILL_POINTS))]
    with node, operator:
        operator.start()
        for name in names:
            cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, _manifest(name)
            )
        for name in names:
            cluster.wait_state(name, "Succeeded", timeout=30)
        for name, (verb, resource) in zip(names, KILL_POINTS, strict=True):
            assert operator.pid is not None
            kill = _killer(operator.pid, verb, resource)
            stop_listening = kube.emulator.audit.listen(kill)
            try:
                cluster.patch_spec(name, {"ttlSecondsAfterFinished": 0})
                _eventually(lambda: not operator.alive, f"a kill at {verb} {resource}", 15)
            finally:
                stop_listening()
            operator.kill()  # reaped
            assert not any(
                c["type"] == "WorkloadsDeleted" for c in cluster.get(name)["status"]["conditions"]
            ), f"killed at {verb} {resource}, yet the cleanup was recorded"
            operator.start()
            job = cluster.wait(
                name,
                lambda j: any(
                    c["type"] == "WorkloadsDeleted"
                    for c in (j.get("status") or {}).get("conditions") or []
                ),
                f"WorkloadsDeleted after a kill at {verb} {resource}",
                timeout=30,
            )
            assert job["status"]["state"] == "Succeeded" and job["status"]["attempts"] == 1
            _eventually(lambda n=name: not cluster.jobs(n) and not cluster.pods(n), "deleted")
            assert not _exists(
                lambda n=name: cluster.core.read_namespaced_service(f"ftj-{n}", "default")
            )
            assert not _exists(
                lambda n=name: networking.read_namespaced_network_policy(
                    f"{n}-attempt-1", "default"
                )
            )
            assert _reasons(cluster, name).count("WorkloadsDeleted") == 1
        for name in names:  # the others, cleaned up before, stay as they were
            assert cluster.jobs(name) == [] and cluster.get(name)["status"]["attempts"] == 1
        operator.kill()  # no clean stop needed
