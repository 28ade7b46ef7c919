"""A FineTuneSweep on the harness: real Optuna (TPE) over real trials of the tiny model,
two at a time, an operator restart mid-sweep, and the best trial's adapter loaded with
stock peft."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Cluster

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunesweeps"


def _sweep(cluster: Cluster, name: str, **spec: Any) -> dict[str, Any]:
    template = cluster.tiny_job("unused", training={"maxSteps": 12, "evalEverySteps": 6})["spec"]
    template["output"]["uri"] = f"s3://{cluster.bucket}/sweeps/{name}"
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSweep",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": template,
            "parameters": [
                {
                    "path": "training.learningRate",
                    "type": "logUniform",
                    "low": "1e-4",
                    "high": "1e-2",
                },
                {"path": "method.lora.r", "type": "categorical", "values": [4, 8]},
            ],
            "objective": {"metric": "evalLoss", "direction": "minimize"},
            "algorithm": {"type": "tpe", "seed": 3},
            **spec,
        },
    }


def _get(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(
        cluster.custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)
    )


def _wait(cluster: Cluster, name: str, predicate: Any, what: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    sweep: dict[str, Any] = {}
    while time.monotonic() < deadline:
        sweep = _get(cluster, name)
        if predicate(sweep.get("status") or {}):
            return sweep
        time.sleep(0.3)
    raise AssertionError(f"sweep {name} never reached {what}; last: {sweep.get('status')}")


def _trials(cluster: Cluster, sweep: str) -> list[dict[str, Any]]:
    answer = cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, "default", "finetunejobs", label_selector=f"kubetune.io/sweep={sweep}"
    )
    return list(answer["items"])


def test_six_trial_tpe_sweep_two_at_a_time_survives_a_restart(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, _sweep(cluster, "lr", maxTrials=6, parallelTrials=2)
    )
    # Two trials run at once, never more.
    _wait(cluster, "lr", lambda s: (s.get("counts") or {}).get("total") == 2, "2 trials", 60)
    assert len(_trials(cluster, "lr")) == 2

    # The operator dies mid-sweep and comes back: no trial is made twice.
    _wait(cluster, "lr", lambda s: (s.get("counts") or {}).get("done", 0) >= 2, "2 done", 240)
    cluster.stop_operator()
    cluster.start_operator()
    done = _wait(cluster, "lr", lambda s: s.get("state") == "Succeeded", "Succeeded", 420)
    status = done["status"]
    trials = _trials(cluster, "lr")
    names = sorted(t["metadata"]["name"] for t in trials)
    assert names == [f"lr-{n}" for n in range(6)], names
    assert status["counts"]["total"] == 6 and status["counts"]["succeeded"] == 6
    for trial in trials:  # owned by the sweep: deleting it deletes them
        assert trial["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]

    # The best trial is the one with the lowest eval loss, with its adapter.
    values = {t["metadata"]["name"]: t["status"]["metrics"]["evalLoss"] for t in trials}
    best = status["bestTrial"]
    assert best["name"] == min(values, key=lambda name: values[name])
    assert best["value"] == pytest.approx(values[best["name"]])
    prefix = f"sweeps/lr/{best['name']}/adapter/"
    assert best["artifactUri"] == f"s3://{cluster.bucket}/{prefix}".rstrip("/")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "best"
    cluster.store.download_prefix(prefix, local)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, str(local))
    assert not torch.allclose(before, tuned(input_ids=ids).logits, atol=1e-4)


def test_pruning_stops_a_clearly_worse_trial(cluster: Cluster) -> None:
    # One at a time, every learning rate once; a learning rate of 1e-9 learns nothing, so
    # at its first evaluation it is worse than the median of the finished trials.
    sweep = _sweep(
        cluster,
        "prune",
        parameters=[
            {"path": "training.learningRate", "type": "categorical", "values": ["3e-3", "1e-9"]}
        ],
        algorithm={"type": "grid", "seed": 2},  # seed 2 happens to try 3e-3 first
        pruning={"type": "median", "startupTrials": 1},
        maxTrials=2,
    )
    sweep["spec"]["template"]["training"].update(maxSteps=60, evalEverySteps=5)
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, sweep)
    done = _wait(cluster, "prune", lambda s: s.get("state") == "Succeeded", "Succeeded", 300)
    by_lr = {t["spec"]["training"]["learningRate"]: t for t in _trials(cluster, "prune")}
    assert set(by_lr) == {"3e-3", "1e-9"}
    good, bad = by_lr["3e-3"], by_lr["1e-9"]
    assert good["metadata"]["name"] == "prune-0", "the grid ran the bad rate first (seed?)"
    assert bad["spec"]["suspend"] is True  # stopped, not deleted
    assert bad["metadata"]["annotations"]["kubetune.io/sweep-pruned"].startswith("pruned at")
    assert (bad["status"].get("progress") or {}).get("step", 0) < 60
    counts = done["status"]["counts"]
    assert counts["pruned"] == 1 and counts["succeeded"] == 1 and counts["failed"] == 0
    assert done["status"]["bestTrial"]["name"] == "prune-0"
