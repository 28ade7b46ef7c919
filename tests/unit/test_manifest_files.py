"""Manifest files as kubectl reads them (kubeyaml), and local paths in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_operator import kubeyaml
from kubetune_operator.api.crd import CRDS
from kubetune_operator.cli import main
from kubetune_operator.manifests import read_documents, resolve_local_paths

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2e-4", 0.0002),  # PyYAML (YAML 1.1): the string "2e-4"
        ("1e30", 1e30),
        ("3.0", 3),  # a whole float is an integer after kubectl's JSON
        ("1e3", 1000),
        ("9223372036854775807", 2**63 - 1),
        ("9223372036854775808", 2.0**63),  # beyond int64: a float, as the API server reads it
        ("017", 15),  # go-yaml v2: octal
        ("0x1F", 31),
        ("1_000", 1000),
        ("08", 8),  # not octal: go-yaml's float pattern
        (".5", 0.5),
        ("yes", True),
        ("n", False),
        ("Off", False),
        ("2026-01-01", "2026-01-01"),  # no timestamps: a string
        ("=", "="),  # PyYAML cannot even load this one
        ("12:30", "12:30"),  # no sexagesimal numbers
        ('"16"', "16"),
        ("~", None),
    ],
)
def test_scalars_are_read_as_kubectl_reads_them(text: str, value: Any) -> None:
    (document,) = kubeyaml.load_all(f"v: {text}\n")
    assert document == {"v": value}
    assert type(document["v"]) is type(value)


@pytest.mark.parametrize(
    "value",
    ["2e-4", "yes", "y", "N", "017", "0x1F", "1_000", ".5", "1.", "null", "~", "true", "=", "3"],
)
def test_dump_quotes_strings_kubectl_would_read_as_something_else(value: str) -> None:
    text = kubeyaml.dump({"v": value})
    assert list(kubeyaml.load_all(text)) == [{"v": value}], text


def test_keys_are_strings_as_in_json() -> None:
    (document,) = kubeyaml.load_all("1: a\ny: b\nnull: c\n")
    assert document == {"1": "a", "true": "b", "null": "c"}


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_kubectl_reads_the_crd_files_as_generated(kind: str) -> None:
    """The generated CRD YAML means to kubectl what the models say (a default of "2e-4"
    written unquoted would reach the API server as a number, and it would refuse the CRD)."""
    crd = CRDS[kind]()
    for folder in ("crds", "helm/kubetune/crds"):
        path = ROOT / folder / f"{crd['metadata']['name']}.yaml"
        (document,) = kubeyaml.load_all(path.read_text())
        assert document == crd, path


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "rel"},
        "spec": spec,
    }


def test_relative_paths_start_at_the_manifest_directory(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    spec = {
        "model": {"source": "models/tiny"},
        "dataset": {"sources": ["data/train.jsonl", "s3://b/k"], "validation": {"sources": ["v"]}},
    }
    resolved, problems = resolve_local_paths(spec, tmp_path)
    assert resolved["model"]["source"] == str(tmp_path / "models" / "tiny")
    assert resolved["dataset"]["sources"] == [str(tmp_path / "data" / "train.jsonl"), "s3://b/k"]
    assert [p.path for p in problems] == ["spec.dataset.validation.sources[0]"]
    assert f"v not found in {tmp_path}" in problems[0].message
    assert spec["model"]["source"] == "models/tiny"  # the input is not changed


def test_train_names_the_directory_it_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    manifest = project / "job.yaml"
    manifest.write_text(
        kubeyaml.dump(
            _job({"model": {"source": "hf://org/m"}, "dataset": {"sources": ["train.jsonl"]}})
        )
    )
    monkeypatch.chdir(tmp_path)  # elsewhere: train.jsonl is not looked for here
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert main(["train", "-f", "project/job.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"spec.dataset.sources[0]: train.jsonl not found in {project}" in err
    assert "Traceback" not in err


def test_train_hands_the_trainer_paths_from_the_manifest_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubetune_trainer.main

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n")
    (project / "model").mkdir()
    spec = {"model": {"source": "./model"}, "dataset": {"sources": ["data/train.jsonl"]}}
    (project / "job.yaml").write_text(kubeyaml.dump(_job(spec)))
    seen: dict[str, Any] = {}

    def launch_local(config: Any, nproc: int) -> int:
        seen["config"] = config
        return 0

    monkeypatch.setattr(kubetune_trainer.main, "launch_local", launch_local)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-f", "project/job.yaml"]) == 0
    config = seen["config"]
    assert config.model.source == str(project / "model")
    assert config.dataset.sources == [str(project / "data" / "train.jsonl")]


def test_stdin_manifests_resolve_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    monkeypatch.chdir(tmp_path)
    data = kubeyaml.dump(_job({"model": {"source": "m"}, "dataset": {"sources": ["d"]}}))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    (document,) = read_documents("-")
    assert document.directory == tmp_path


def test_validate_notes_what_a_cluster_also_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job without an s3:// output is valid (kubetune train runs it) and validate says
    what the operator will also ask for on a cluster."""
    path = tmp_path / "job.yaml"
    spec = {"model": {"source": "hf://o/m"}, "dataset": {"sources": ["s3://b/d.jsonl"]}}
    path.write_text(kubeyaml.dump(_job({**spec, "output": {"uri": "/out"}})))
    assert main(["validate", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out
    assert "note: spec.output.uri: must be an s3:// URI on a cluster (got '/out')" in out


def test_sweep_names_the_directory_it_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    template = {
        "model": {"source": "hf://org/m"},
        "dataset": {"sources": ["train.jsonl"]},
        "output": {"uri": "/out"},
    }
    parameter = {"path": "method.lora.r", "type": "categorical", "values": [4, 8]}
    sweep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "rel"},
        "spec": {"template": template, "parameters": [parameter], "maxTrials": 2},
    }
    (project / "sweep.yaml").write_text(kubeyaml.dump(sweep))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "-f", "project/sweep.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"spec.template.dataset.sources[0]: train.jsonl not found in {project}" in err


@pytest.mark.parametrize(
    ("command", "example", "other"),
    [
        ("train", "examples/sweeps/tiny-local.yaml", "kubetune sweep"),
        ("sweep", "examples/tiny-local.yaml", "kubetune train"),
    ],
)
def test_the_wrong_command_names_the_right_one(
    command: str, example: str, other: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "-f", str(ROOT / example)]) == 2
    assert f"run it with {other} -f" in capsys.readouterr().err
