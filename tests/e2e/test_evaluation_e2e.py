"""A FineTuneJob whose evaluation gate fails: the job succeeds, its status shows the
failed gate with the numbers, the artifact is kept (with eval.json and samples.jsonl) and
nothing is promoted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cluster, condition

pytestmark = pytest.mark.e2e


def test_a_failed_gate_shows_on_status_and_keeps_the_artifact(
    cluster: Cluster, tmp_path: Path
) -> None:
    job = cluster.tiny_job(
        "gated",
        # Two steps at the smallest learning rate: nothing is learnt.
        training={"maxSteps": 2, "learningRate": "1e-9", "checkpointEverySteps": 0},
        evaluation={
            "metrics": ["exactMatch", "tokenF1"],
            "maxSamples": 4,
            "maxNewTokens": 4,
            "gate": {"metric": "exactMatch", "threshold": "0.5"},
        },
    )
    cluster.apply(job)
    done = cluster.wait_state("gated", "Succeeded")
    status = done["status"]

    gate = condition(done, "EvaluationPassed")
    assert (gate["status"], gate["reason"]) == ("False", "GateFailed")
    assert "FAILED: exactMatch 0 >= 0.5" in gate["message"]
    assert condition(done, "Succeeded")["status"] == "True"
    assert "promotedArtifact" not in status
    assert "not promoted" in status["message"]
    metrics = {m["name"]: m for m in status["evaluation"]["metrics"]}
    assert metrics["exactMatch"]["tuned"] == 0.0 and metrics["exactMatch"]["base"] == 0.0
    assert metrics["evalLoss"]["base"] > 0 and metrics["evalLoss"]["tuned"] > 0
    assert status["evaluation"]["samples"] == 4
    assert status["evaluation"]["gate"]["passed"] is False

    # The artifact is complete in S3, evaluation files included.
    artifact = status["artifact"]
    assert artifact["uri"] == f"s3://{cluster.bucket}/jobs/default/gated/adapter"
    local = tmp_path / "adapter"
    cluster.store.download_prefix("jobs/default/gated/adapter/", local)
    manifest = json.loads((local / "manifest.json").read_text())
    assert {"eval.json", "samples.jsonl", "adapter_model.safetensors"} <= set(manifest["files"])
    report = json.loads((local / "eval.json").read_text())
    assert report["gate"]["passed"] is False
    assert len((local / "samples.jsonl").read_text().splitlines()) == 4
