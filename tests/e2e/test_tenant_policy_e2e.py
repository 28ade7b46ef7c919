"""A namespace's FineTunePolicy, enforced by the real operator on the harness (the
emulated API server runs no admission policies: this is the path clusters without them
take). A stand-in trainer keeps it fast: a violating job is refused with no workload, a
job within the policy runs, under maxConcurrentJobs 1 later jobs wait Queued and start
one at a time, in creation order, as the running one finishes, and a relaxed policy lets
the refused job start."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import Cluster, condition
from harness import EmulatorServer, JobController, Kubelet

pytestmark = pytest.mark.e2e

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))


def _policy(**spec: object) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTunePolicy",
        "metadata": {"name": "team-a", "namespace": "default"},
        "spec": spec,
    }


def test_policy_refuses_limits_and_queues(
    kube: EmulatorServer, job_controller: JobController, tmp_path: Path, seaweedfs
) -> None:
    gate, gate2 = tmp_path / "first-may-finish", tmp_path / "second-may-finish"
    images = {
        "fake:ok": [sys.executable, FAKE_TRAINER],
        "fake:until": [sys.executable, FAKE_TRAINER, "until", str(gate)],
        "fake:until2": [sys.executable, FAKE_TRAINER, "until", str(gate2)],
    }
    with Kubelet(kube.url, tmp_path / "kubelet", max_grace_period=2, images=images) as kubelet:
        cluster = Cluster(kube, kubelet, seaweedfs, seaweedfs.create_bucket(), tmp_path)
        cluster.create_storage_secret("default")
        cluster.custom.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            "default",
            "finetunepolicies",
            _policy(maxNodes=1, allowedMethods=["lora", "qlora"], maxConcurrentJobs=1),
        )
        cluster.start_operator()
        try:
            # Refused: two nodes and method full; the message names both rules.
            big = cluster.tiny_job("too-big", image="fake:ok", resources={"nodes": 2})
            big["spec"]["method"] = {"type": "full"}
            cluster.apply(big)
            refused = cluster.wait_state("too-big", "Invalid", timeout=30)
            accepted = condition(refused, "Accepted")
            assert (accepted["status"], accepted["reason"]) == ("False", "PolicyViolation")
            assert accepted["message"] == (
                "spec.method.type: 'full' is not allowed by FineTunePolicy team-a: it is not "
                "in spec.allowedMethods; spec.resources.nodes: 2 is over the limit of "
                "FineTunePolicy team-a: spec.maxNodes is 1"
            )
            assert cluster.jobs("too-big") == [] and cluster.pods("too-big") == []
            warnings = [
                e
                for e in cluster.events()
                if e.reason == "PolicyViolation" and e.involved_object.name == "too-big"
            ]
            assert [e.type for e in warnings] == ["Warning"]

            # Within the policy: it runs (until the test lets it finish).
            cluster.apply(cluster.tiny_job("first", image="fake:until"))
            cluster.wait_state("first", "Running", timeout=30)
            # Over maxConcurrentJobs: they wait, with no attempt, naming the policy. Named
            # against their creation order (a second apart), which decides who goes first.
            cluster.apply(cluster.tiny_job("zz-second", image="fake:until2"))
            waiting = cluster.wait_state("zz-second", "Queued", timeout=30)
            queued = condition(waiting, "Queued")
            assert (queued["status"], queued["reason"]) == ("True", "ConcurrencyLimit")
            assert "FineTunePolicy team-a lets at most 1 jobs" in queued["message"]
            created = waiting["metadata"]["creationTimestamp"]
            while time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) <= created:
                time.sleep(0.05)
            cluster.apply(cluster.tiny_job("aa-third", image="fake:ok"))
            cluster.wait_state("aa-third", "Queued", timeout=30)
            assert cluster.jobs("zz-second") == [] and cluster.jobs("aa-third") == []
            assert cluster.get("first")["status"]["state"] == "Running"

            gate.touch()  # the first job finishes; the older waiting job takes its slot
            cluster.wait_state("first", "Succeeded", timeout=30)
            cluster.wait_state("zz-second", "Running", timeout=30)
            third = cluster.get("aa-third")
            assert third["status"]["state"] == "Queued" and cluster.jobs("aa-third") == []
            gate2.touch()
            cluster.wait_state("zz-second", "Succeeded", timeout=30)
            done = cluster.wait_state("aa-third", "Succeeded", timeout=30)
            assert condition(done, "Accepted")["reason"] == "Valid"
            assert done["status"]["attempts"] == 1

            # The platform team relaxes the policy: the refused job is checked again, runs.
            cluster.custom.patch_namespaced_custom_object(
                "kubetune.io",
                "v1alpha1",
                "default",
                "finetunepolicies",
                "team-a",
                {"spec": {"maxNodes": 2, "allowedMethods": ["lora", "qlora", "full"]}},
            )
            started = cluster.wait(
                "too-big",
                lambda j: (j.get("status") or {}).get("attempts") == 1,
                "its first attempt",
                timeout=30,
            )
            assert condition(started, "Accepted")["status"] == "True"
            assert [j.metadata.name for j in cluster.jobs("too-big")] == ["too-big-attempt-1"]
        finally:
            cluster.stop_operator()
