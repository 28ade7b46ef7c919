"""Distributed attempts on the harness: real torchrun ranks (gloo on CPU) across two
"nodes" (pods of one Indexed Job), a rank dying mid-run, an FSDP full fine-tune, and
Kueue admission and preemption. Loss equivalence with a single process is checked on the
trainer alone (tests/integration/test_distributed_train.py), where nothing else competes
for the CPU."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Cluster, condition
from harness import Kueue

pytestmark = pytest.mark.e2e

QUEUE = "kueue.x-k8s.io/queue-name"


def _step(job: dict) -> int:
    return ((job.get("status") or {}).get("lastCheckpoint") or {}).get("step") or 0


def _progress(job: dict) -> dict[str, Any]:
    return (job.get("status") or {}).get("progress") or {}


def test_two_nodes_of_two_ranks_train_and_resume_all_ranks_after_one_dies(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    # World size 2 nodes × 2 processes = 4; global batch 2 × 1 × 4 = 8, as the 1-process job.
    job = cluster.tiny_job(
        "ddp",
        resources={"nodes": 2, "gpus": 0},
        distributed={"processesPerNode": 2},
        # Enough steps that the kill below lands mid-training: on an idle machine the tiny
        # model trains 24 steps in about the time it takes to notice step 6 and kill, and
        # attempt 1 had published (attempt 2 then rightly reports its artifact).
        training={"maxSteps": 96, "batchSize": 2, "checkpointEverySteps": 6},
    )
    cluster.apply(job)
    running = cluster.wait("ddp", lambda j: _step(j) >= 6, "a checkpoint", timeout=240)
    # Four processes really train (never nn.DataParallel in one process).
    assert _progress(running)["worldSize"] == 4
    assert _progress(running)["globalBatchSize"] == 8
    (attempt,) = cluster.jobs("ddp")
    assert attempt.spec.completion_mode == "Indexed" and attempt.spec.completions == 2
    service = cluster.core.read_namespaced_service("ftj-ddp", "default")
    assert service.spec.cluster_ip == "None"

    # One rank's pod dies: the attempt fails as a whole, the next resumes every rank.
    cluster.kubelet.kill(cluster.pod_name("ddp", attempt=1, index=1), signal.SIGKILL)
    done = cluster.wait_state("ddp", "Succeeded", timeout=300)
    assert done["status"]["attempts"] == 2
    first = cluster.batch.read_namespaced_job("ddp-attempt-1", "default")
    assert any(c.type == "Failed" and c.status == "True" for c in first.status.conditions)
    manifest = json.loads(cluster.store.get_bytes("jobs/default/ddp/adapter/manifest.json"))
    assert manifest.get("resumed_from_step") is not None, "attempt 1 finished before the kill"
    assert manifest["resumed_from_step"] >= 6
    events = [e.message for e in cluster.events() if e.involved_object.name == "ddp"]
    assert any("attempt 2 of 3 started" in m for m in events), events

    # The adapter, written by rank 0 alone, loads with stock peft.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    cluster.store.download_prefix("jobs/default/ddp/adapter/", local)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(local))
    assert not torch.allclose(before, tuned(input_ids=ids).logits, atol=1e-4)


def test_kueue_queues_admits_and_preempts_without_using_a_retry(
    cluster: Cluster, kueue: Kueue
) -> None:
    job = cluster.tiny_job("queued", training={"maxSteps": 60})
    job["metadata"]["labels"] = {QUEUE: "team-a"}
    cluster.apply(job)

    # No quota: Queued, with Kueue's own message, and no pod.
    queued = cluster.wait(
        "queued",
        lambda j: "insufficient" in (j.get("status") or {}).get("message", ""),
        "Kueue's pending message",
        timeout=60,
    )
    assert queued["status"]["state"] == "Queued"
    assert condition(queued, "Queued")["reason"] == "PendingAdmission"
    assert cluster.pods("queued") == []
    (attempt,) = cluster.jobs("queued")
    assert attempt.metadata.labels[QUEUE] == "team-a"

    # Quota: admitted, trains, checkpoints.
    kueue.set_quota("team-a", 1)
    admitted = cluster.wait("queued", lambda j: _step(j) >= 6, "a checkpoint", timeout=180)
    assert condition(admitted, "Queued")["status"] == "False"

    # Preempted: Queued/Preempted, a Warning Event, no attempt used; resumes on admission.
    kueue.set_quota("team-a", 0)
    kueue.preempt("default", "queued-attempt-1")
    preempted = cluster.wait(
        "queued",
        lambda j: (
            (j.get("status") or {}).get("state") == "Queued"
            and condition(j, "Queued")["reason"] == "Preempted"
        ),
        "Preempted",
        timeout=60,
    )
    assert preempted["status"]["attempts"] == 1
    warnings = [e for e in cluster.events() if e.reason == "Preempted" and e.type == "Warning"]
    assert warnings, "no Preempted event"
    kueue.set_quota("team-a", 1)
    done = cluster.wait_state("queued", "Succeeded", timeout=240)
    assert done["status"]["attempts"] == 1
    assert [j.metadata.name for j in cluster.jobs("queued")] == ["queued-attempt-1"]
    manifest = json.loads(cluster.store.get_bytes("jobs/default/queued/adapter/manifest.json"))
    assert manifest["resumed_from_step"] >= 6
    # GPU time: the preempted admission's pods are gone and still count (1 GPU a pod).
    (last,) = [p for p in cluster.pods("queued") if p.status.phase == "Succeeded"]
    ended = last.status.container_statuses[0].state.terminated.finished_at
    held = int((ended - last.status.start_time).total_seconds())
    assert done["status"]["gpuSeconds"] > held
    assert done["status"]["gpuUsage"][0]["final"]
    assert manifest["gpu_time_at_publish"]["earlier_attempts_gpu_seconds"] == 0


def test_a_full_fine_tune_shards_with_fsdp_across_two_nodes(cluster: Cluster) -> None:
    job = cluster.tiny_job(
        "fsdp",
        resources={"nodes": 2, "gpus": 0},
        method={"type": "full"},  # strategy auto: FSDP for full fine-tunes
        training={"maxSteps": 4, "learningRate": "1e-3", "checkpointEverySteps": 2},
    )
    del job["spec"]["method"]["lora"]
    cluster.apply(job)
    done = cluster.wait_state("fsdp", "Succeeded", timeout=240)
    assert done["status"]["artifact"]["uri"].endswith("/jobs/default/fsdp/model")
    manifest = json.loads(cluster.store.get_bytes("jobs/default/fsdp/model/manifest.json"))
    assert manifest["distributed"] == {"world_size": 2, "strategy": "fsdp", "global_batch_size": 16}
