"""`kubetune sweep` runs a FineTuneSweep locally: real trials of the tiny model, one after
another, through the operator's own sweep logic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kubetune_operator import kubeyaml

pytestmark = pytest.mark.integration


def test_kubetune_sweep_runs_trials_and_names_the_best(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    from kubetune_operator.cli import main

    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "cli-sweep"},
        "spec": {
            "template": {
                "model": {"source": str(tiny_model)},
                "dataset": {
                    "sources": [str(tiny_dataset)],
                    "maxSeqLength": 128,
                    "validation": {"percent": 10},
                },
                "training": {"maxSteps": 3, "batchSize": 8, "gradientAccumulationSteps": 1},
                "output": {"uri": "/nonexistent/overridden-by-o"},
                "resources": {"gpus": 0},
            },
            "parameters": [
                {
                    "path": "training.learningRate",
                    "type": "logUniform",
                    "low": "1e-4",
                    "high": "1e-2",
                },
                {"path": "method.lora.r", "type": "categorical", "values": [4, 8]},
            ],
            "algorithm": {"type": "random", "seed": 1},
            "maxTrials": 3,
            "parallelTrials": 2,
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(kubeyaml.dump(manifest))
    out = tmp_path / "out"
    assert main(["sweep", "-f", str(path), "-o", str(out)]) == 0
    printed = capsys.readouterr().out

    losses = {}
    for n in range(3):
        trial = f"cli-sweep-{n}"
        artifact = out / trial / "adapter" / "manifest.json"
        assert artifact.is_file(), trial
        losses[trial] = json.loads(artifact.read_text())["metrics"]["eval_loss"]
        assert f"trial {trial} (training.learningRate=" in printed
    assert not (out / "cli-sweep-3").exists()  # maxTrials
    best = min(losses, key=lambda t: losses[t])
    assert re.search(rf"^\* {best} ", printed, re.M), printed
    assert f"best trial   {best}: evalLoss {losses[best]:.4f}" in printed
    assert f"adapter      file://{out / best / 'adapter'}" in printed
