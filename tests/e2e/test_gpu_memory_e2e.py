"""A job that cannot fit its GPUs is refused before any pod starts; the architecture comes
from `kubetune plan`'s reading of the model's config.json in S3 (the --annotate path)."""

from __future__ import annotations

import json

import pytest
from conftest import Cluster, condition

from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.memory import ARCHITECTURE_ANNOTATION
from kubetune_operator.plan import run_plan
from kubetune_operator.translate import trainer_config

pytestmark = pytest.mark.e2e


def test_a_job_too_big_for_its_gpus_is_refused_before_any_pod(cluster: Cluster) -> None:
    # 1 MiB per GPU holds not even the CUDA context the estimate counts
    job = cluster.tiny_job("too-big", resources={"gpus": 1, "gpuMemory": "1Mi"})
    code, report, _ = run_plan(
        parse_manifest(job), trainer_config(parse_manifest(job)), gpu_memory=None, with_data=True
    )
    assert code == 1 and report["verdict"]["result"] == "does not fit"
    assert report["architecture"]["hiddenSize"] == 128  # read from s3://.../config.json
    # the data report, from the S3 dataset with the S3 model's tokenizer
    assert report["data"]["problems"] == []
    assert report["data"]["stats"]["train_examples"] > 300
    assert report["data"]["stats"]["max_tokens"] > 0
    annotation = json.dumps(report["architecture"], sort_keys=True, separators=(",", ":"))
    job["metadata"]["annotations"] = {ARCHITECTURE_ANNOTATION: annotation}
    cluster.apply(job)
    refused = cluster.wait_state("too-big", "Invalid", timeout=30)
    accepted = condition(refused, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InsufficientGpuMemory")
    assert "1.0 MiB available" in accepted["message"] and "try" in accepted["message"]
    assert cluster.pods("too-big") == [] and cluster.jobs("too-big") == []
    warnings = [e for e in cluster.events() if e.reason == "InsufficientGpuMemory"]
    assert warnings and warnings[0].type == "Warning"

    # Declared on a larger GPU, the same job is accepted and its first attempt starts.
    cluster.patch_spec("too-big", {"resources": {"gpus": 1, "gpuMemory": "80Gi"}})
    cluster.wait("too-big", lambda j: cluster.jobs("too-big") != [], "an attempt Job")
    accepted = condition(cluster.get("too-big") or {}, "Accepted")
    assert accepted["status"] == "True"
