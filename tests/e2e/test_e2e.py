"""From `kubectl apply` of a FineTuneJob to an adapter in S3, with nothing mocked but the
API server and the kubelet."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import Cluster, condition
from harness import KUBELET_USER, OPERATOR_USER
from prometheus import find_prometheus, run_prometheus

from kubetune_operator.handlers import FINALIZER

pytestmark = pytest.mark.e2e


def _step(job: dict) -> int:
    return ((job.get("status") or {}).get("lastCheckpoint") or {}).get("step") or 0


def test_tiny_job_succeeds_with_adapter_status_events_and_metrics(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    cluster.apply(cluster.tiny_job("tiny"))
    running = cluster.wait(
        "tiny",
        lambda j: (j.get("status") or {}).get("progress", {}).get("step", 0) > 0,
        "progress reported",
    )
    assert running["status"]["progress"]["totalSteps"] == 24
    # The session's dataset repeats 8 of its 400 rows: the trainer's warning reaches status.
    assert any("repeat an earlier row" in w for w in running["status"]["dataWarnings"])
    done = cluster.wait_state("tiny", "Succeeded")
    status = done["status"]

    # Status: artifact, metrics, conditions, times, observedGeneration.
    artifact = status["artifact"]
    assert artifact["uri"] == f"s3://{cluster.bucket}/jobs/default/tiny/adapter"
    assert artifact["digest"].startswith("sha256:") and artifact["sizeBytes"] > 0
    assert status["metrics"]["trainLoss"] > 0 and "evalLoss" in status["metrics"]
    assert status["progress"]["percent"] == 100
    assert condition(done, "Succeeded")["status"] == "True"
    assert condition(done, "Accepted")["status"] == "True"
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert status["attempts"] == 1 and status["startTime"] and status["completionTime"]
    assert done["spec"] == cluster.tiny_job("tiny")["spec"]  # the operator never writes spec

    # The adapter in S3 loads with stock peft and changes the model's outputs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    cluster.store.download_prefix("jobs/default/tiny/adapter/", local)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(local))
    assert not torch.allclose(before, tuned(input_ids=ids).logits, atol=1e-4)

    # One Event per transition.
    reasons = [e.reason for e in cluster.events() if e.involved_object.name == "tiny"]
    assert "AttemptCreated" in reasons and "Completed" in reasons

    # Prometheus scrapes the operator and answers for the job's metrics.
    binary = find_prometheus()
    if binary is None:
        pytest.fail("prometheus is missing and Debian's package could not be fetched")
    with run_prometheus(binary, [f"127.0.0.1:{cluster.metrics_port}"]) as prometheus:
        result = prometheus.wait_for('kubetune_job_train_loss{namespace="default",name="tiny"}')
        assert float(result[0]["value"][1]) == pytest.approx(status["metrics"]["trainLoss"])
        succeeded = prometheus.wait_for('kubetune_jobs{state="Succeeded"}')
        assert float(succeeded[0]["value"][1]) == 1.0


def test_invalid_spec_gets_invalid_spec_condition_and_no_pod(cluster: Cluster) -> None:
    job = cluster.tiny_job("bad", method={"type": "lora", "lora": {"r": 0}})
    cluster.apply(job)
    invalid = cluster.wait_state("bad", "Invalid", timeout=30)
    accepted = condition(invalid, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "spec.method.lora.r: must be ≥ 1 (got 0)" in accepted["message"]
    assert cluster.pods("bad") == [] and cluster.jobs("bad") == []
    warnings = [e for e in cluster.events() if e.reason == "InvalidSpec"]
    assert warnings and warnings[0].type == "Warning"


def test_killed_trainer_is_retried_and_resumes_from_checkpoint(cluster: Cluster) -> None:
    # Enough steps that the kill lands mid-training on an idle machine, too.
    cluster.apply(cluster.tiny_job("retry", training={"maxSteps": 96}))
    cluster.wait("retry", lambda j: _step(j) >= 6, "a checkpoint")
    cluster.kubelet.kill(cluster.pod_name("retry"), signal.SIGKILL)
    done = cluster.wait_state("retry", "Succeeded", timeout=240)
    assert done["status"]["attempts"] == 2
    manifest = json.loads(cluster.store.get_bytes("jobs/default/retry/adapter/manifest.json"))
    assert manifest["resumed_from_step"] >= 6
    retry_events = [e for e in cluster.events() if e.involved_object.name == "retry"]
    assert any("attempt 2 of 3 started" in e.message for e in retry_events)


def test_deleting_a_running_job_stops_it_and_keeps_artifacts(cluster: Cluster) -> None:
    job = cluster.tiny_job("doomed", training={"maxSteps": 400})
    job["metadata"]["finalizers"] = [FINALIZER]  # as earlier versions put on every job
    cluster.apply(job)
    cluster.wait("doomed", lambda j: _step(j) >= 6, "a checkpoint")
    # The old finalizer is taken off: deleting a job never waits for the operator...
    cluster.wait("doomed", lambda j: not j["metadata"].get("finalizers"), "no finalizer")
    cluster.stop_operator()  # ...so it goes also while no operator runs
    cluster.delete("doomed")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (cluster.get("doomed") or cluster.pods("doomed")):
        time.sleep(0.1)
    assert cluster.get("doomed") is None
    # The garbage collector's work: the attempt Job carries the job's ownerReference.
    assert cluster.pods("doomed") == [], "trainer pod not stopped"
    assert cluster.jobs("doomed") == [], "attempt Job not deleted"
    kept = cluster.store.list("jobs/default/doomed/checkpoints/")
    assert any(key.endswith("/COMPLETE") for key in kept), kept


def test_restarted_operator_makes_no_duplicate_attempt(cluster: Cluster) -> None:
    cluster.apply(cluster.tiny_job("steady", training={"maxSteps": 30}))
    cluster.wait_state("steady", "Running")
    cluster.stop_operator()
    cluster.start_operator()
    done = cluster.wait_state("steady", "Succeeded")
    assert done["status"]["attempts"] == 1
    assert [j.metadata.name for j in cluster.jobs("steady")] == ["steady-attempt-1"]
    assert len(cluster.pods("steady")) == 1


def test_jobs_in_two_namespaces_stay_apart(cluster: Cluster) -> None:
    for namespace in ("team-a", "team-b"):
        cluster.create_namespace(namespace)
        cluster.create_storage_secret(namespace)
        cluster.apply(cluster.tiny_job("job", namespace, training={"maxSteps": 8}))
    for namespace in ("team-a", "team-b"):
        done = cluster.wait_state("job", "Succeeded", namespace)
        assert done["status"]["artifact"]["uri"].endswith(f"/jobs/{namespace}/job/adapter")
        (attempt,) = cluster.jobs("job", namespace)
        assert attempt.metadata.owner_references[0].uid == done["metadata"]["uid"]
        (pod,) = cluster.pods("job", namespace)
        assert pod.metadata.namespace == namespace
        assert pod.metadata.owner_references[0].uid == attempt.metadata.uid

    audit = cluster.kube.emulator.audit
    operator_calls = audit.entries(OPERATOR_USER)
    assert operator_calls, "the audit log recorded nothing for the operator"
    assert not [e for e in operator_calls if e.resource == "secrets"], "operator read Secrets"
    secret_reads = {e.namespace for e in audit.entries(KUBELET_USER) if e.resource == "secrets"}
    assert {"team-a", "team-b"} <= secret_reads  # each pod got its own namespace's Secret
    for entry in operator_calls:
        if entry.namespace in ("team-a", "team-b") and entry.name:
            assert entry.name.startswith("job"), entry


def test_suspend_stops_the_trainer_and_resume_continues_from_checkpoint(
    cluster: Cluster,
) -> None:
    cluster.apply(cluster.tiny_job("pausing", training={"maxSteps": 80}))
    cluster.wait("pausing", lambda j: _step(j) >= 6, "a checkpoint")
    cluster.patch_spec("pausing", {"suspend": True})
    suspended = cluster.wait_state("pausing", "Suspended", timeout=30)
    assert condition(suspended, "Suspended")["status"] == "True"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and cluster.pods("pausing"):
        time.sleep(0.1)
    assert cluster.pods("pausing") == [], "the trainer pod was not stopped"
    (paused,) = cluster.jobs("pausing")
    assert paused.spec.suspend is True  # the attempt Job is suspended, not deleted

    cluster.patch_spec("pausing", {"suspend": False})
    done = cluster.wait_state("pausing", "Succeeded", timeout=240)
    assert done["status"]["attempts"] == 2
    assert condition(done, "Suspended")["status"] == "False"
    manifest = json.loads(cluster.store.get_bytes("jobs/default/pausing/adapter/manifest.json"))
    assert manifest["resumed_from_step"] >= 6
