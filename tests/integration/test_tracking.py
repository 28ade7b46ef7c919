"""Experiment tracking against a real MLflow server; TensorBoard event files in the artifact."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from mlflow_server import MlflowServer, free_port
from trainer_helpers import tiny_config

from kubetune_trainer.artifact import sha256_file
from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import TERMINATION_MESSAGE_ENV, execute
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.tracking import TENSORBOARD_DIR

pytestmark = pytest.mark.integration

STEPS = 8


def _scalars(event_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    assert tag in events.Tags()["scalars"], events.Tags()["scalars"]
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_mlflow_run_has_params_metric_history_and_artifact(
    tiny_model: Path,
    tiny_dataset: Path,
    mlflow_server: MlflowServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_MESSAGE_ENV, str(termination))
    output = tmp_path / "out"
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(output),
        training={"max_steps": STEPS, "eval_every_steps": 4},
        tracking={
            "mlflow": {
                "tracking_uri": mlflow_server.url,
                "experiment": "tracking-test",
                "run_name": "tiny-lora",
                "tags": {"team": "nlp"},
            }
        },
    )
    assert execute(config) == ExitCode.OK

    result = json.loads(termination.read_text())
    tracking = result["tracking"]
    assert tracking["mlflow"] == "ok", tracking
    artifact_uri = result["artifact"]["uri"]
    assert tracking["tensorboardUri"] == f"{artifact_uri}/{TENSORBOARD_DIR}"

    # What the server holds, read through its REST API.
    [run] = mlflow_server.search_runs("tracking-test")
    info, data = run["info"], run["data"]
    assert info["run_id"] == tracking["runId"]
    assert tracking["runUrl"].endswith(f"/runs/{info['run_id']}")
    assert info["run_name"] == "tiny-lora" and info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["method.type"] == "lora" and params["method.r"] == "8"
    assert params["training.max_steps"] == str(STEPS)
    assert params["training.learning_rate"] == "0.003"
    assert params["dataset.format"] == "alpaca"
    assert params["distributed.world_size"] == "1"
    assert params["model.source"] == str(tiny_model)
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["team"] == "nlp" and tags["kubetune.job"] == "test"
    assert tags["kubetune.artifactUri"] == artifact_uri
    assert tags["kubetune.artifactDigest"] == result["artifact"]["digest"]

    losses = mlflow_server.metric_history(info["run_id"], "train/loss")
    assert [m["step"] for m in losses] == list(range(1, STEPS + 1))
    for key in ("train/learning_rate", "train/tokens_per_second"):
        history = mlflow_server.metric_history(info["run_id"], key)
        assert len(history) == STEPS and all(m["value"] > 0 for m in history), key
    evals = mlflow_server.metric_history(info["run_id"], "eval/loss")
    # Periodic evaluations (and one before the first step, where the trainer does that).
    assert {4, STEPS} <= {m["step"] for m in evals} <= {0, 4, STEPS}
    latest = {m["key"]: m["value"] for m in data["metrics"]}
    assert latest["final/eval_loss"] == pytest.approx(result["metrics"]["eval_loss"])
    assert latest["final/train_loss"] == pytest.approx(result["metrics"]["train_loss"])

    # TensorBoard: the same curve, in event files inside the published adapter.
    adapter = output / "adapter"
    tensorboard = _scalars(adapter / TENSORBOARD_DIR, "train/loss")
    assert [step for step, _ in tensorboard] == list(range(1, STEPS + 1))
    assert [v for _, v in tensorboard] == pytest.approx([m["value"] for m in losses], rel=1e-5)
    eval_steps = {step for step, _ in _scalars(adapter / TENSORBOARD_DIR, "eval/loss")}
    assert eval_steps == {m["step"] for m in evals}

    # The artifact stays what it was: a manifest that matches, and stock PEFT loads it.
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert any(name.startswith(f"{TENSORBOARD_DIR}/") for name in manifest["files"])
    for name, entry in manifest["files"].items():
        assert sha256_file(adapter / name) == entry["sha256"], name
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(adapter))


def test_training_goes_on_when_the_tracker_is_down(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kubetune_trainer import train

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(tmp_path / "out"),
        training={"max_steps": 4},
        tracking={"mlflow": {"tracking_uri": dead}, "tensorboard": False},
    )
    state = ProgressState()
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
        result = train.run(config, work_dir=tmp_path / "work", state=state, stop=threading.Event())

    assert result.metrics["steps"] == 4  # trained to the end
    warnings = [r for r in caplog.records if "MLflow tracking at" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # warned once
    assert dead in warnings[0].getMessage() and "training continues" in warnings[0].getMessage()
    # The progress report (/progress serves state.as_json()) and the termination message.
    progress = state.as_json()["tracking"]
    assert progress["mlflow"].startswith(f"unavailable: cannot reach {dead}"), progress
    assert progress["tensorboard"] == "off" and "runId" not in progress
    assert result.as_termination_message()["tracking"] == progress
    assert not (tmp_path / "out" / "adapter" / TENSORBOARD_DIR).exists()


def test_a_resumed_attempt_continues_the_run_and_the_curves(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """What a checkpoint carries (event files, run id) lets the next attempt continue."""
    import time

    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.errors import Preempted
    from kubetune_trainer.tracking import Tracker

    config = TrainerConfig.model_validate(
        {
            "job_name": "resumed",
            "model": {"source": "/models/tiny"},
            "dataset": {"sources": ["/data/train.jsonl"]},
            "output": {"uri": str(tmp_path / "out")},
            "tracking": {"mlflow": {"tracking_uri": mlflow_server.url, "experiment": "resume"}},
        }
    )
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    first = Tracker(config, ProgressState(), tmp_path / "attempt-1", enabled=True)
    with pytest.raises(Preempted), first:
        first.start(config, {"world_size": 1}, None)
        first.log({"train/loss": 2.0}, 1)
        first.log({"train/loss": 1.5}, 2)
        deadline = time.monotonic() + 30
        while first.state.tracking.get("mlflow") != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        first.save_to_checkpoint(checkpoint)
        raise Preempted("stopped by SIGTERM at step 2")
    run_id = first.status()["runId"]
    [run] = mlflow_server.search_runs("resume")
    assert run["info"]["status"] == "KILLED"

    second = Tracker(config, ProgressState(), tmp_path / "attempt-2", enabled=True)
    with second:
        second.start(config, {"world_size": 2}, checkpoint)  # params are not logged again
        second.log({"train/loss": 1.0}, 3)
        second.finish("file:///out/adapter", "sha256:00", {"train_loss": 1.0}, 3)
    assert second.status()["runId"] == run_id and second.status()["mlflow"] == "ok"
    [run] = mlflow_server.search_runs("resume")
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["distributed.world_size"] == "1"  # from the first attempt
    history = mlflow_server.metric_history(run_id, "train/loss")
    assert [(m["step"], m["value"]) for m in history] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    curve = _scalars(tmp_path / "attempt-2" / TENSORBOARD_DIR, "train/loss")
    assert curve == [(1, 2.0), (2, 1.5), (3, 1.0)]
