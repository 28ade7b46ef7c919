"""Evaluation on the tiny model: it detects learning, and the gate acts on it.

A full fine-tune of the tiny model on the quickstart tasks (a colour from a fixed table,
the number after n, the first or last word of a list) takes exact match on held-out
prompts from 0 to well above it; a run that cannot learn (the smallest learning rate, a
few steps) stays at 0 and fails the same gate, and its artifact is still published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import tiny_config

from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import execute
from kubetune_trainer.tiny import generate_quickstart_dataset

pytestmark = pytest.mark.integration

GATE = {"metric": "exactMatch", "threshold": 0.25, "min_improvement": 0.2}


def _config(model: Path, data: Path, out: Path, **training: float) -> object:
    return tiny_config(
        model,
        data,
        str(out),
        method={"type": "full"},
        dataset={"validation_ratio": 0.1, "max_seq_length": 64},
        training={"batch_size": 16, "scheduler": "constant", **training},
        evaluation={
            "metrics": ["exactMatch", "tokenF1", "rougeL", "bleu"],
            "max_samples": 16,
            "max_new_tokens": 8,
            "gate": GATE,
        },
    )


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_quickstart_dataset(tmp_path_factory.mktemp("qs") / "train.jsonl", n=200)


def _read(artifact: Path) -> tuple[dict, list[dict], dict]:
    report = json.loads((artifact / "eval.json").read_text())
    samples = [json.loads(line) for line in (artifact / "samples.jsonl").read_text().splitlines()]
    manifest = json.loads((artifact / "manifest.json").read_text())
    return report, samples, manifest


def test_full_fine_tuning_moves_exact_match_and_passes_the_gate(
    tiny_model: Path, quickstart: Path, tmp_path: Path
) -> None:
    config = _config(tiny_model, quickstart, tmp_path, max_steps=100, learning_rate=2e-3)
    assert execute(config) == ExitCode.OK
    report, samples, manifest = _read(tmp_path / "model")
    exact = report["metrics"]["exactMatch"]
    # The random base model answers nothing right; the tuned one a good share.
    assert exact["base"] == 0.0
    assert exact["tuned"] >= 0.25, report["metrics"]
    loss = report["metrics"]["evalLoss"]
    assert loss["tuned"] < loss["base"] - 1.0
    assert report["gate"]["passed"] is True, report["gate"]
    assert report["samples"] == 16 and len(samples) == 16
    assert report["decoding"] == {"strategy": "greedy", "maxNewTokens": 8, "maxSamples": 16}
    # samples.jsonl agrees with the score: its per-sample verdicts average to it.
    assert sum(s["tunedExactMatch"] for s in samples) / 16 == pytest.approx(exact["tuned"])
    assert all({"prompt", "reference", "base", "tuned"} <= set(s) for s in samples)
    # The manifest lists both files (with their digests) and carries the summary.
    assert {"eval.json", "samples.jsonl"} <= set(manifest["files"])
    assert manifest["evaluation"]["gate"]["passed"] is True


def test_an_untrainable_run_fails_the_gate_and_keeps_its_artifact(
    tiny_model: Path, quickstart: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    general = tmp_path / "general.jsonl"
    general.write_text(
        "".join(
            json.dumps({"text": line}) + "\n"
            for line in ("The quick brown fox jumps over the lazy dog.", "In summer the light.")
        )
    )
    config = _config(tiny_model, quickstart, tmp_path / "out", max_steps=3, learning_rate=1e-9)
    config = config.model_copy(
        update={
            "evaluation": config.evaluation.model_copy(
                update={
                    "retention_sources": [str(general)],
                    "gate": config.evaluation.gate.model_copy(
                        update={"max_retention_loss_increase": 0.5}
                    ),
                }
            )
        }
    )
    assert execute(config) == ExitCode.OK  # a failed gate is not a failed job
    summary = capsys.readouterr().out
    assert "  evaluation   exactMatch 0->0 (+0) on 16 samples" in summary
    assert "  gate         gate failed: FAILED: exactMatch 0 >= 0.25" in summary
    report, _, manifest = _read(tmp_path / "out" / "model")
    assert report["metrics"]["exactMatch"]["tuned"] == 0.0
    assert report["gate"]["passed"] is False
    assert "FAILED: exactMatch 0 >= 0.25" in report["gate"]["message"]
    # The retention check held (nothing was learnt, nothing forgotten) and says so.
    retention = report["metrics"]["retentionLoss"]
    assert abs(retention["delta"]) < 0.01
    assert "ok: retentionLoss" in report["gate"]["message"]
    assert report["examples"]["retention"] == 2
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert manifest["evaluation"]["gate"]["passed"] is False


def test_evaluation_leaves_training_unchanged(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Evaluation only reads the model and the data: without a test split it takes no
    training example and changes no weight, so the adapter comes out byte for byte the
    same (LoRA dropout on: the steps' random draws must line up too). The Trainer reseeds
    and sets train mode itself, so random draws or eval mode before it cannot leak in."""
    weights = {}
    for name, evaluation in (
        ("plain", None),
        ("evaluated", {"metrics": ["exactMatch"], "max_samples": 4, "max_new_tokens": 4}),
    ):
        sections: dict = {
            "method": {"dropout": 0.1},
            "training": {"max_steps": 4},
            "dataset": {"validation_ratio": 0.05},
        }
        if evaluation is not None:
            sections["evaluation"] = evaluation
        config = tiny_config(tiny_model, tiny_dataset, str(tmp_path / name), **sections)
        assert execute(config) == ExitCode.OK
        manifest = json.loads((tmp_path / name / "adapter" / "manifest.json").read_text())
        weights[name] = manifest["files"]["adapter_model.safetensors"]["sha256"]
        assert ("eval.json" in manifest["files"]) is (evaluation is not None)
    assert weights["plain"] == weights["evaluated"]
