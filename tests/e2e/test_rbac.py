"""The chart's RBAC grants exactly the API calls the operator makes: used-but-missing and
granted-but-unused are both failures. The calls come from the emulator's audit log while
the real operator handles an invalid job, a job that succeeds, a two-node job (its
rendezvous Service), a sweep of one trial, a suspended job, a job waiting in a Kueue
queue, a job deleted while it runs and a two-node job cleaned up after its TTL (its
Jobs, Service and per-attempt NetworkPolicy deleted), under a FineTunePolicy that it reads
and counts against, configured as the chart's defaults configure it (a NetworkPolicy per
attempt, a TTL after finishing); a stand-in trainer image keeps this fast."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from chart_helpers import chart_rbac_rules
from conftest import Cluster
from harness import OPERATOR_USER, EmulatorServer, JobController, Kubelet, Kueue

from kubetune_operator.handlers import FINALIZER
from kubetune_operator.workload import NetworkPolicyConfig

pytestmark = pytest.mark.e2e

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))


def _expand(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (verb, group, resource)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def test_operator_uses_exactly_what_the_chart_grants(
    kube: EmulatorServer, job_controller: JobController, kueue: Kueue, tmp_path: Path, seaweedfs
) -> None:
    images = {
        "fake:ok": [sys.executable, FAKE_TRAINER],
        "fake:sleep": [sys.executable, FAKE_TRAINER, "sleep"],
    }
    # dns_timeout: a stand-in rank 0 may finish before rank 1 looks up its address (a
    # finished pod has none); the stand-ins need none, and need not wait for it.
    node = Kubelet(kube.url, tmp_path / "kubelet", max_grace_period=2, images=images, dns_timeout=1)
    with node as kubelet:
        cluster = Cluster(kube, kubelet, seaweedfs, seaweedfs.create_bucket(), tmp_path)
        cluster.create_storage_secret("default")
        # A FineTunePolicy that refuses nothing here: the operator reads it (list, watch)
        # and counts the namespace's jobs for its maxConcurrentJobs (lists).
        cluster.custom.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            "default",
            "finetunepolicies",
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTunePolicy",
                "metadata": {"name": "roomy"},
                "spec": {"maxConcurrentJobs": 100, "maxNodes": 2},
            },
        )
        labels = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/instance": "kt"}
        cluster.start_operator(
            network_policy=NetworkPolicyConfig("kubetune-system", labels),
            ttl_seconds_after_finished=86400,  # the chart's default
        )
        try:
            cleaned = cluster.tiny_job("cleaned", image="fake:ok", resources={"nodes": 2})
            cleaned["spec"]["ttlSecondsAfterFinished"] = 0
            cluster.apply(cleaned)
            cluster.wait(
                "cleaned",
                lambda j: any(
                    c["type"] == "WorkloadsDeleted"
                    for c in (j.get("status") or {}).get("conditions") or []
                ),
                "its workloads deleted after its TTL",
                timeout=30,
            )
            cluster.apply(cluster.tiny_job("invalid", method={"type": "lora", "lora": {"r": 0}}))
            cluster.wait_state("invalid", "Invalid", timeout=30)
            cluster.apply(cluster.tiny_job("ok", image="fake:ok"))
            cluster.wait_state("ok", "Succeeded", timeout=30)
            two = cluster.tiny_job("two", image="fake:sleep", resources={"nodes": 2})
            cluster.apply(two)
            cluster.wait_state("two", "Running", timeout=30)
            assert cluster.core.read_namespaced_service("ftj-two", "default").spec.cluster_ip
            queued = cluster.tiny_job("queued", image="fake:ok")
            queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "none"}
            cluster.apply(queued)
            cluster.wait(
                "queued",
                lambda j: "quota" in (j.get("status") or {}).get("message", ""),
                "Kueue's message",
                timeout=30,
            )
            template = cluster.tiny_job("unused", image="fake:ok")["spec"]
            cluster.custom.create_namespaced_custom_object(
                "kubetune.io",
                "v1alpha1",
                "default",
                "finetunesweeps",
                {
                    "apiVersion": "kubetune.io/v1alpha1",
                    "kind": "FineTuneSweep",
                    "metadata": {"name": "sweep"},
                    "spec": {
                        "template": template,
                        "parameters": [
                            {"path": "method.lora.r", "type": "categorical", "values": [4]}
                        ],
                        "objective": {"metric": "trainLoss"},
                        "maxTrials": 1,
                    },
                },
            )
            cluster.wait_state("sweep-0", "Succeeded", timeout=30)  # the sweep's one trial
            cluster.apply(cluster.tiny_job("paused", image="fake:sleep"))
            cluster.wait_state("paused", "Running", timeout=30)
            cluster.patch_spec("paused", {"suspend": True})
            cluster.wait_state("paused", "Suspended", timeout=30)
            running = cluster.tiny_job("running", image="fake:sleep")
            running["metadata"]["finalizers"] = [FINALIZER]  # as earlier versions put on
            cluster.apply(running)
            cluster.wait_state("running", "Running", timeout=30)
            # kopf takes it off (a patch of the job): deleting never waits for the operator
            cluster.wait("running", lambda j: not j["metadata"].get("finalizers"), "no finalizer")
            cluster.delete("running")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and cluster.get("running") is not None:
                time.sleep(0.1)
            assert cluster.get("running") is None
        finally:
            cluster.stop_operator()

    audit = kube.emulator.audit
    used = audit.permissions(OPERATOR_USER)
    assert used, "the audit log recorded no operator calls"
    for values in ({}, {"rbac": {"mode": "namespaced"}, "watchNamespaces": ["default"]}):
        rules = chart_rbac_rules(values)
        missing = {
            (e.verb, e.group, e.rbac_resource) for e in audit.uncovered(rules, OPERATOR_USER)
        }
        assert not missing, f"used but not granted ({values}): {sorted(missing)}"
        unused = _expand(rules) - used
        assert not unused, f"granted but never used ({values}): {sorted(unused)}"
