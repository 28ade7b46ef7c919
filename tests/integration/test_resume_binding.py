"""A run resumes only its own checkpoints, publishes exactly once, and never overwrites
another run's artifact without being asked to (real training on the tiny model).

One finished run (the module's fixture, stopped by a SIGTERM during its last step) is
copied into each test's output, which then re-runs it with the same or other settings.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
from trainer_helpers import tiny_config

from kubetune_trainer.artifact import sha256_file
from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import TERMINATION_MESSAGE_ENV, execute
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.train import RunResult, run

pytestmark = pytest.mark.integration

STEPS = 8
UID = "uid-1"  # the FineTuneJob that wrote the fixture's checkpoints


def _config(model: Path, data: Path, out_dir: Path, uid: str | None = UID, **sections):
    training = {"max_steps": STEPS, "checkpoint_every_steps": 4, **sections.pop("training", {})}
    config = tiny_config(model, data, str(out_dir), training=training, **sections)
    return config.model_copy(update={"job_uid": uid})


class _StopAfter(threading.Event):
    """A stop flag that reads as set from ``step`` on: a SIGTERM during that step."""

    def __init__(self, state: ProgressState, step: int) -> None:
        super().__init__()
        self.state, self.step = state, step

    def is_set(self) -> bool:
        return self.state.step >= self.step


@pytest.fixture(scope="module")
def finished(
    tiny_model: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RunResult]:
    """The output of a run that got SIGTERM during its last step (it must publish)."""
    root = tmp_path_factory.mktemp("finished")
    state = ProgressState()
    result = run(
        _config(tiny_model, tiny_dataset, root / "out"),
        work_dir=root / "work",
        state=state,
        stop=_StopAfter(state, STEPS),
    )
    return root / "out", result


def _files(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): sha256_file(p) for p in directory.rglob("*") if p.is_file()
    }


def _copy(finished: tuple[Path, RunResult], tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[0], tmp_path / "out"))


def _markers(output: Path) -> dict[int, dict]:
    return {
        int(p.parent.name.split("-")[1]): json.loads(p.read_text())
        for p in output.glob("checkpoints/step-*/COMPLETE")
    }


def _checkpoint_uri(output: Path, step: int) -> str:
    return (output / "checkpoints" / f"step-{step:08d}").as_uri()


def _other_data(tiny_dataset: Path, tmp_path: Path) -> Path:
    lines = tiny_dataset.read_text().splitlines()
    path = tmp_path / "newer.jsonl"
    path.write_text("\n".join(lines[: len(lines) * 3 // 4]) + "\n")
    return path


def test_sigterm_during_the_last_step_publishes(finished: tuple[Path, RunResult]) -> None:
    output, result = finished
    manifest = json.loads((output / "adapter" / "manifest.json").read_text())
    assert result.metrics["steps"] == manifest["metrics"]["steps"] == STEPS
    assert result.artifact.uri == (output / "adapter").as_uri()
    assert sorted(_markers(output)) == [4, STEPS]
    assert manifest["run"]["fingerprint"].startswith("sha256:")
    assert all(m["run"] == manifest["run"] for m in _markers(output).values())


def test_a_checkpoint_at_the_last_step_is_published_without_another_step(
    finished: tuple[Path, RunResult],
    tiny_model: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = _copy(finished, tmp_path)
    before = json.loads((output / "adapter" / "manifest.json").read_text())
    shutil.rmtree(output / "adapter")  # killed after the last checkpoint, before publishing
    # A re-created job (another uid) with the same settings: the same run.
    config = _config(tiny_model, tiny_dataset, output, uid="uid-2")
    assert execute(config) == ExitCode.OK
    manifest = json.loads((output / "adapter" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == STEPS
    assert manifest["metrics"]["steps"] == STEPS
    assert sorted(_markers(output)) == [4, STEPS]  # no step-00000009
    assert manifest["metrics"]["train_loss"] == before["metrics"]["train_loss"]
    assert manifest["metrics"]["eval_loss"] == pytest.approx(before["metrics"]["eval_loss"])
    weights = "adapter_model.safetensors"
    assert manifest["files"][weights]["sha256"] == before["files"][weights]["sha256"]

    # Run again: the artifact is this run's result already; nothing is trained or written.
    published = _files(output)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_MESSAGE_ENV, str(termination))
    capsys.readouterr()
    assert execute(config) == ExitCode.OK
    assert _files(output) == published
    message = json.loads(termination.read_text())
    assert (
        message["artifact"]["digest"]
        == f"sha256:{sha256_file(output / 'adapter' / 'manifest.json')}"
    )
    assert message["metrics"]["steps"] == STEPS
    assert "nothing was trained again" in capsys.readouterr().out


def test_an_artifact_of_other_settings_is_refused_then_replaced_on_request(
    finished: tuple[Path, RunResult],
    tiny_model: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kubetune_operator.cli import main as cli

    output = _copy(finished, tmp_path)
    before = _files(output)
    newer = _other_data(tiny_dataset, tmp_path)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_MESSAGE_ENV, str(termination))

    # Refused before the model is even fetched (this model directory does not exist).
    missing_model = tmp_path / "no-model"
    config = _config(missing_model, newer, output, uid="uid-2", training={"learning_rate": 1e-3})
    assert execute(config) == ExitCode.CONFIG_INVALID
    error = json.loads(termination.read_text())["error"]
    assert error["reason"] == "ConfigInvalid" and error["retryable"] is False
    assert "spec.output.uri" in error["message"] and "spec.output.overwrite" in error["hint"]
    for setting in ("data", "training.learningRate", "model.source"):
        assert setting in error["message"]
    assert _files(output) == before  # not a byte changed

    # The same through kubetune train: refused, then --overwrite (spec.output.overwrite:
    # true) trains from scratch and removes the other settings' checkpoints.
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "newer"},
        "spec": {  # tiny_config's settings, but other data and learning rate
            "model": {"source": str(tiny_model)},
            "dataset": {"sources": [str(newer)], "format": "alpaca", "maxSeqLength": 128},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": "0.0"}},
            "training": {
                "maxSteps": STEPS,
                "batchSize": 8,
                "gradientAccumulationSteps": 1,
                "learningRate": "1e-3",
                "scheduler": "constant",
                "warmupPercent": 0,
                "checkpointEverySteps": 4,
            },
            "output": {"uri": str(output)},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(manifest))  # JSON is YAML
    termination.unlink()
    monkeypatch.delenv(TERMINATION_MESSAGE_ENV)
    capsys.readouterr()
    assert cli(["train", "-f", str(path)]) == ExitCode.CONFIG_INVALID
    assert "spec.output.overwrite: true" in capsys.readouterr().err
    assert _files(output) == before
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
        assert cli(["train", "-f", str(path), "--overwrite"]) == ExitCode.OK
    said = caplog.text
    assert "it will be replaced, as spec.output.overwrite is true" in said
    assert (
        f"checkpoint step-{STEPS} at {_checkpoint_uri(output, STEPS)} "
        "belongs to a run with other settings (data, training.learningRate); starting fresh"
    ) in said
    written = json.loads((output / "adapter" / "manifest.json").read_text())
    assert written["resumed_from_step"] is None and written["metrics"]["steps"] == STEPS
    assert written["training"]["learning_rate"] == 1e-3
    old = json.loads(finished[0].joinpath("adapter", "manifest.json").read_text())
    assert written["run"]["fingerprint"] != old["run"]["fingerprint"]
    weights = "adapter_model.safetensors"
    assert written["files"][weights]["sha256"] != old["files"][weights]["sha256"]
    assert all(m["run"] == written["run"] for m in _markers(output).values())
    assert sorted(_markers(output)) == [4, STEPS]
    assert set(_files(output / "adapter")) == set(written["files"]) | {"manifest.json"}


def test_an_edited_job_resumes_its_own_checkpoint_and_says_what_changed(
    finished: tuple[Path, RunResult],
    tiny_model: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    output = _copy(finished, tmp_path)
    shutil.rmtree(output / "adapter")
    # The same FineTuneJob (uid), its spec edited while suspended: its checkpoints are its own.
    config = _config(tiny_model, tiny_dataset, output, training={"learning_rate": 1e-3})
    with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
        assert execute(config) == ExitCode.OK
    assert (
        f"resuming checkpoint step-{STEPS} at {_checkpoint_uri(output, STEPS)}, "
        "written by this FineTuneJob before its spec was edited (training.learningRate)"
    ) in caplog.text
    manifest = json.loads((output / "adapter" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == STEPS and manifest["metrics"]["steps"] == STEPS
    assert manifest["resumed_with_other_settings"] == ["training.learningRate"]


def test_on_s3_a_published_run_is_reported_and_another_refused(
    finished: tuple[Path, RunResult],
    tiny_model: Path,
    tiny_dataset: Path,
    seaweedfs,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kubetune_trainer.storage import open_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    bucket = seaweedfs.create_bucket()
    store = open_store(f"s3://{bucket}/out", endpoint_url=seaweedfs.endpoint_url)
    store.upload_dir(finished[0], "")  # the finished run's checkpoints and artifact
    keys = {key: store.get_bytes(key) for key in store.list("")}

    def config(**training: float):
        s3 = _config(tiny_model, tiny_dataset, Path("unused"), training=training)
        output = s3.output.model_copy(
            update={"uri": f"s3://{bucket}/out", "endpoint_url": seaweedfs.endpoint_url}
        )
        return s3.model_copy(update={"output": output})

    assert execute(config()) == ExitCode.OK  # the same settings: reported, not trained
    assert "nothing was trained again" in capsys.readouterr().out
    assert execute(config(learning_rate=1e-3)) == ExitCode.CONFIG_INVALID
    assert "training.learningRate" in capsys.readouterr().err
    assert {key: store.get_bytes(key) for key in store.list("")} == keys
