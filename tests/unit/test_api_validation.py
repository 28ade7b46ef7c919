"""Bad manifests get messages that name the field, what is wrong, and a hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_operator import kubeyaml
from kubetune_operator.api.validation import parse_manifest, validate_manifest
from kubetune_operator.cli import main

pytestmark = pytest.mark.unit


def _job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": "hf://org/model"},
        "dataset": {"sources": ["s3://bucket/data.jsonl"]},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job"},
        "spec": base,
    }


def _messages(document: dict[str, Any]) -> list[str]:
    return [f"{p.path}: {p.message}" for p in validate_manifest(document)]


def test_minimal_job_is_valid_and_gets_defaults() -> None:
    job = parse_manifest(_job())
    assert job.spec.method.type == "lora"
    assert job.spec.training.learningRate == "2e-4"
    assert job.spec.dataset.packing is True
    assert job.spec.resources.gpuResourceName == "nvidia.com/gpu"


def test_out_of_range_value_names_field_bound_and_value() -> None:
    problems = validate_manifest(_job(method={"type": "lora", "lora": {"r": 0}}))
    assert [str(p).splitlines()[0] for p in problems] == ["spec.method.lora.r: must be ≥ 1 (got 0)"]
    assert problems[0].hint == "Rank of the adapter matrices."


def test_wrong_type() -> None:
    assert _messages(_job(training={"batchSize": "four"})) == [
        "spec.training.batchSize: must be an integer (got 'four')"
    ]


def test_missing_required_field() -> None:
    document = _job()
    del document["spec"]["dataset"]
    assert _messages(document) == ["spec.dataset: required field is missing"]


def test_unknown_field_suggests_the_closest_name() -> None:
    problems = validate_manifest(_job(training={"learningrate": "1e-4"}))
    assert [(p.path, p.message) for p in problems] == [
        ("spec.training.learningrate", "unknown field")
    ]
    assert problems[0].hint == "did you mean 'learningRate'?"


def test_broken_cross_field_rule_names_the_field_to_change() -> None:
    assert _messages(_job(training={"epochs": 2, "maxSteps": 100})) == [
        "spec.training.maxSteps: set epochs or maxSteps, not both"
    ]


def test_enum_lists_the_choices() -> None:
    (message,) = _messages(_job(method={"type": "lora2"}))
    assert message.startswith("spec.method.type: must be one of 'lora', 'qlora', 'dora'")
    assert "(got 'lora2')" in message


def test_list_items_are_addressed_by_index() -> None:
    resources = {"tolerations": [{"key": "a", "operator": "Equals"}]}
    (message,) = _messages(_job(resources=resources))
    assert message.startswith("spec.resources.tolerations[0].operator: must be one of")


def test_several_problems_are_all_reported() -> None:
    messages = _messages(
        _job(training={"batchSize": 0, "learningRate": "fast"}, resources={"cpu": "lots"})
    )
    assert len(messages) == 3


def test_wrong_kind_and_api_version() -> None:
    document = _job()
    document["apiVersion"] = "batch/v1"
    document["kind"] = "Job"
    assert _messages(document) == [
        "apiVersion: must be kubetune.io/v1alpha1 (got 'batch/v1')",
        "kind: must be FineTuneJob (got 'Job')",
    ]


def test_bad_name() -> None:
    document = _job()
    document["metadata"]["name"] = "My_Job"
    (message,) = _messages(document)
    assert message.startswith("metadata.name: has the wrong form")


def test_cli_validate_reports_problems_and_exit_code(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.yaml"
    bad = tmp_path / "bad.yaml"
    good.write_text(kubeyaml.dump(_job()))
    bad.write_text(kubeyaml.dump(_job(method={"type": "lora", "lora": {"r": 0}})))
    assert main(["validate", "-f", str(good)]) == 0
    assert "is valid" in capsys.readouterr().out
    assert main(["validate", "-f", str(good), "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.method.lora.r: must be ≥ 1 (got 0)" in err
    assert "hint: Rank of the adapter matrices." in err


def test_cli_validate_reports_yaml_syntax_errors_with_line(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: kubetune.io/v1alpha1\nspec: [unclosed\n")
    assert main(["validate", "-f", str(broken)]) == 1
    assert "not valid YAML at line" in capsys.readouterr().err


def test_cli_crd_prints_the_crd(capsys) -> None:
    assert main(["crd"]) == 0
    assert "name: finetunejobs.kubetune.io" in capsys.readouterr().out
