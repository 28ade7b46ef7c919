"""The shared model cache through the operator: the claim the operator is given reaches
every attempt pod, and the trainer fills the cache on it (that a second job then hits it
is tests/integration/test_model_cache_s3.py's part, with the object GETs counted)."""

from __future__ import annotations

import json

import pytest
from conftest import Cluster

pytestmark = pytest.mark.e2e


def test_attempt_pods_mount_the_operators_model_cache_and_the_trainer_fills_it(
    cluster: Cluster,
) -> None:
    cluster.stop_operator()
    cluster.start_operator(model_cache_claim="llm-models")
    cluster.apply(cluster.tiny_job("cached", training={"maxSteps": 2, "checkpointEverySteps": 0}))
    cluster.wait_state("cached", "Succeeded")

    (pod,) = cluster.pods("cached")
    claims = [
        v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim
    ]
    assert claims == ["llm-models"]
    manifest = json.loads(cluster.store.get_bytes("jobs/default/cached/adapter/manifest.json"))
    report = manifest["model_cache"]
    assert report["hit"] is False and report["source"] == f"s3://{cluster.bucket}/models/tiny"
    # the harness's kubelet keeps a PVC's files under claims/<namespace>/<claim>
    assert "/claims/default/llm-models/" in report["path"] and report["bytes"] > 0
