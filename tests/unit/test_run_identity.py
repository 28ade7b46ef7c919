"""The run fingerprint, and the decisions it drives: which checkpoint a run resumes and
what it does about an artifact already at its output (no torch, no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.translate import trainer_config
from kubetune_operator.workload import attempt_job
from kubetune_trainer.artifact import (
    MANIFEST,
    check_existing,
    existing_artifact,
    present_files,
    publish,
    read_manifest,
    write_manifest,
)
from kubetune_trainer.checkpoints import MARKER, find_resumable, upload_checkpoint
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import ConfigInvalid
from kubetune_trainer.fingerprint import RunIdentity
from kubetune_trainer.storage import LocalStore

pytestmark = pytest.mark.unit

DATA = [{"split": "train", "sha256": "a" * 64, "name": "train.jsonl", "rows": 10}]


def _config(**sections: dict[str, Any]) -> TrainerConfig:
    base: dict[str, Any] = {
        "model": {"source": "/models/tiny"},
        "dataset": {"sources": ["/data/train.jsonl"]},
        "training": {"max_steps": 40, "learning_rate": 2e-4},
        "output": {"uri": "/out"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainerConfig.model_validate(base)


def _identity(data: list[dict[str, Any]] = DATA, **sections: dict[str, Any]) -> RunIdentity:
    return RunIdentity.of(_config(**sections), data)


# --------------------------------------------------------------------------- fingerprint


def test_the_fingerprint_changes_with_what_changes_the_result() -> None:
    base = _identity()
    assert base.fingerprint == _identity().fingerprint  # stable
    assert base.fingerprint.startswith("sha256:")
    other_data = [{**DATA[0], "sha256": "b" * 64}]
    changed = {
        "data": _identity(other_data),
        "training.learningRate": _identity(training={"learning_rate": 1e-3}),
        "training.seed": _identity(training={"seed": 7}),
        "training.maxSteps": _identity(training={"max_steps": 41}),
        "method.r": _identity(method={"r": 8}),
        "model.revision": _identity(model={"revision": "v2"}),
        "dataset.maxSeqLength": _identity(dataset={"max_seq_length": 512}),
    }
    for name, identity in changed.items():
        assert identity.fingerprint != base.fingerprint, name
        assert identity.differences(base.record()) == [name]


def test_the_fingerprint_ignores_what_does_not_change_the_result() -> None:
    base = _identity()
    same = [
        _identity(training={"checkpoint_every_steps": 5, "gradient_checkpointing": True}),
        _identity(output={"uri": "s3://elsewhere/x", "overwrite": True}),
        _identity(reporting={"progress_bar": False}),
        _identity(dataset={"sources": ["s3://bucket/moved/train.jsonl"]}),  # same content
        RunIdentity.of(_config(), DATA, job_uid="uid-2"),
    ]
    for identity in same:
        assert identity.fingerprint == base.fingerprint
        assert identity.differences(base.record()) == []


def test_a_record_without_settings_differs_by_fingerprint() -> None:
    assert _identity().differences(None) == ["fingerprint"]
    assert _identity().differences({"step": 3}) == ["fingerprint"]


def test_checkpoints_belong_to_the_same_settings_or_the_same_job_object() -> None:
    mine = RunIdentity.of(_config(), DATA, job_uid="uid-1")
    edited = RunIdentity.of(_config(training={"learning_rate": 1e-3}), DATA, job_uid="uid-1")
    recreated = RunIdentity.of(_config(training={"learning_rate": 1e-3}), DATA, job_uid="uid-2")
    local = RunIdentity.of(_config(training={"learning_rate": 1e-3}), DATA)
    assert mine.belongs_to(RunIdentity.of(_config(), DATA, job_uid="uid-9").record())
    assert edited.belongs_to(mine.record())  # the same FineTuneJob, edited while suspended
    assert not recreated.belongs_to(mine.record())
    assert not local.belongs_to(mine.record())
    assert not local.belongs_to(None)  # written before checkpoints recorded their run


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(tmp_path: Path, store: LocalStore, step: int, run: dict | None) -> None:
    local = tmp_path / f"ckpt-{step}"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"w" * step)
    upload_checkpoint(local, store, step, run)


def test_a_run_finds_its_own_newest_checkpoint_and_reports_the_others(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    mine, theirs = _identity(), _identity(training={"learning_rate": 1e-3})
    _checkpoint(tmp_path, store, 4, mine.record())
    _checkpoint(tmp_path, store, 8, theirs.record())
    found = find_resumable(store, mine.belongs_to)
    assert found.checkpoint is not None and found.checkpoint.step == 4
    assert found.run == mine.record()
    assert [(c.step, run) for c, run in found.foreign] == [(8, theirs.record())]

    # An older kubetune's marker (no run record) is not ours either.
    store.put_bytes(f"checkpoints/step-{12:08d}/{MARKER}", json.dumps({"step": 12}).encode())
    found = find_resumable(store, theirs.belongs_to)
    assert found.checkpoint is not None and found.checkpoint.step == 8
    assert [(c.step, run) for c, run in found.foreign] == [(12, None), (4, mine.record())]


# --------------------------------------------------------------------------- artifacts


def _published(tmp_path: Path, store: LocalStore, identity: RunIdentity, files: dict) -> dict:
    directory = tmp_path / f"artifact-{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    write_manifest(directory, {"run": identity.record(), "metrics": {"steps": 40.0}})
    publish(directory, store, "adapter")
    manifest = read_manifest(store, "adapter")
    assert manifest is not None
    return manifest


def _decide(store: LocalStore, identity: RunIdentity, overwrite: bool = False, merge=False):
    return check_existing(
        read_manifest(store, "adapter"),
        present_files(store, "adapter"),
        identity,
        uri=store.uri_for("adapter"),
        overwrite=overwrite,
        merge=merge,
    )


def test_no_artifact_publishes(tmp_path: Path) -> None:
    assert _decide(LocalStore(tmp_path / "out"), _identity()).action == "publish"


def test_the_same_settings_reuse_a_complete_artifact(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    mine = _identity()
    manifest = _published(tmp_path, store, mine, {"adapter_model.safetensors": b"w" * 10})
    decision = _decide(store, mine)
    assert decision.action == "reuse" and decision.manifest == manifest
    assert "without training again" in (decision.note or "")
    reused = existing_artifact(store, "adapter", manifest)
    manifest_bytes = (tmp_path / "out" / "adapter" / MANIFEST).read_bytes()
    assert reused.size_bytes == 10 + len(manifest_bytes)
    # An incomplete copy (a file gone) or a newly asked merged export: publish again.
    (tmp_path / "out" / "adapter" / "adapter_model.safetensors").unlink()
    assert _decide(store, mine).action == "publish"


def test_a_newly_asked_merged_export_publishes_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    mine = _identity()
    _published(tmp_path, store, mine, {"adapter_model.safetensors": b"w"})
    decision = _decide(store, mine, merge=True)
    assert decision.action == "publish" and "mergeAdapter" in (decision.note or "")


def test_other_settings_are_refused_naming_the_field_and_the_choice(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    _published(tmp_path, store, _identity(), {"adapter_model.safetensors": b"w"})
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    newer = _identity(training={"learning_rate": 1e-3})
    with pytest.raises(ConfigInvalid) as refused:
        _decide(store, newer)
    message = str(refused.value)
    assert "spec.output.uri" in message and "training.learningRate" in message
    assert "spec.output.overwrite: true" in message
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before
    decision = _decide(store, newer, overwrite=True)
    assert decision.action == "replace" and "training.learningRate" in (decision.note or "")


def test_an_artifact_without_a_run_record_is_not_overwritten(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    store.put_bytes(f"adapter/{MANIFEST}", json.dumps({"files": {}}).encode())
    with pytest.raises(ConfigInvalid, match="fingerprint"):
        _decide(store, _identity())


def test_publishing_over_an_artifact_leaves_none_of_its_old_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    _published(tmp_path, store, _identity(), {"a.bin": b"old", "merged/model.bin": b"old"})
    manifest = _published(tmp_path, store, _identity(method={"r": 4}), {"a.bin": b"new"})
    assert present_files(store, "adapter") == {"a.bin", MANIFEST}
    assert set(manifest["files"]) == {"a.bin"}


# --------------------------------------------------------------------------- operator side


def test_the_operator_passes_overwrite_and_the_job_uid_to_the_trainer() -> None:
    with open("examples/llama-8b-qlora.yaml") as handle:
        manifest = yaml.safe_load(handle)
    default = trainer_config(parse_manifest(manifest))
    assert default.output.overwrite is False and default.job_uid is None  # a local run
    manifest["spec"]["output"]["overwrite"] = True
    job = parse_manifest(manifest)
    config = trainer_config(job, job_uid="uid-1")
    assert config.output.overwrite is True and config.job_uid == "uid-1"
    pod = attempt_job(job, uid="uid-7", attempt=1, image="trainer:1")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    sent = TrainerConfig.from_json(env["KUBETUNE_CONFIG"])
    assert sent.job_uid == "uid-7" and sent.output.overwrite is True


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_after_training_lets_the_run_publish() -> None:
    import os
    import signal
    import threading

    from kubetune_trainer.errors import PreemptionSignal
    from kubetune_trainer.main import _install_sigterm
    from kubetune_trainer.progress import ProgressState

    previous = signal.getsignal(signal.SIGTERM)
    state, stop = ProgressState(phase="saving"), threading.Event()
    try:
        _install_sigterm(stop, state)
        os.kill(os.getpid(), signal.SIGTERM)  # raises nothing: the artifact is uploading
        state.phase = "preparing"
        with pytest.raises(PreemptionSignal):  # before training: stops at once
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.is_set()
