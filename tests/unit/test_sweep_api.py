"""The FineTuneSweep API: its CRD agrees with the models, CEL and Python reject the same
specs, and parameters are checked against the FineTuneJob API with field-named messages."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_api_crd import _broken_cel_rules

from kubetune_operator import kubeyaml
from kubetune_operator.api.crd import sweep_crd, sweep_openapi_schema
from kubetune_operator.api.sweep import (
    MAX_NAME_LENGTH,
    apply_parameters,
    parse_sweep,
    settable_fields,
    spec_field,
)
from kubetune_operator.api.validation import InvalidManifest
from kubetune_operator.cli import main
from kubetune_operator.docs import field_reference_markdown

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SWEEP_EXAMPLES = sorted((ROOT / "examples" / "sweeps").glob("*.yaml"))
SPEC = sweep_openapi_schema()["properties"]["spec"]

TEMPLATE = {
    "model": {"source": "hf://org/model"},
    "dataset": {"sources": ["s3://b/d.jsonl"]},
    "training": {"evalEverySteps": 10},
    "output": {"uri": "s3://b/sweeps"},
}
LR = {"path": "training.learningRate", "type": "logUniform", "low": "1e-5", "high": "1e-3"}


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"template": copy.deepcopy(TEMPLATE), "parameters": [LR], "maxTrials": 4}
    spec.update(overrides)
    return spec


def _sweep(spec: dict[str, Any], name: str = "sweep") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": spec,
    }


def _problems(spec: dict[str, Any], name: str = "sweep") -> list[str]:
    try:
        parse_sweep(_sweep(spec, name))
    except InvalidManifest as invalid:
        return [str(p) for p in invalid.problems]
    return []


@pytest.mark.parametrize("example", SWEEP_EXAMPLES, ids=lambda p: p.name)
def test_sweep_examples_validate_against_models_and_crd_schema(example: Path) -> None:
    (document,) = kubeyaml.load_all(example.read_text())  # as kubectl reads it
    parse_sweep(document)
    jsonschema.validate(document, sweep_openapi_schema())
    assert _broken_cel_rules(document["spec"], SPEC) == []


def test_sweep_crd_names_columns_and_status_subresource() -> None:
    crd = sweep_crd()
    assert crd["metadata"]["name"] == "finetunesweeps.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["fts"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["State"] == ".status.state"
    assert columns["Done"] == ".status.counts.done"
    assert columns["Running"] == ".status.counts.running"
    assert columns["Best"] == ".status.bestTrial.value"
    assert "Age" in columns


def test_sweep_reference_is_generated_output() -> None:
    assert (ROOT / "docs" / "sweep-reference.md").read_text() == field_reference_markdown(
        "FineTuneSweep"
    ), "docs/sweep-reference.md is stale: `kubetune docs --kind FineTuneSweep > ...`"


# --------------------------------------------------------------------------- CEL vs models

CROSS_FIELD_CASES = [
    (
        {"template": {k: v for k, v in TEMPLATE.items() if k != "output"}},
        "template.output is required: each trial writes under <template.output.uri>/<trial name>/",
    ),
    ({"parallelTrials": 5}, "parallelTrials must be ≤ maxTrials"),
    (
        {
            "template": {**TEMPLATE, "training": {"evalEverySteps": 0}},
            "pruning": {"type": "median"},
        },
        "pruning on evalLoss or perplexity needs template.training.evalEverySteps > 0 "
        "(intermediate evaluations to compare)",
    ),
    (
        {"algorithm": {"type": "grid"}},
        "algorithm grid needs finite spaces: every parameter must be of type int or "
        "categorical (list the decimals you want as categorical values)",
    ),
    (
        {"parameters": [{"path": "method.lora.r", "type": "int", "low": 4}]},
        "logUniform, uniform and int spaces need low and high",
    ),
    (
        {"parameters": [{"path": "method.lora.r", "type": "categorical"}]},
        "categorical spaces need values",
    ),
    (
        {"parameters": [{**LR, "values": ["1e-4"]}]},
        "values applies only to type categorical",
    ),
    (
        {"parameters": [{"path": "method.lora.r", "type": "categorical", "values": [8], "low": 1}]},
        "low and high do not apply to type categorical",
    ),
    ({"parameters": [{**LR, "step": 2}]}, "step applies only to type int"),
    (
        {"pruning": {"type": "successiveHalving", "warmupSteps": 10}},
        "startupTrials and warmupSteps apply only to type median",
    ),
    (
        {"pruning": {"type": "median", "reductionFactor": 3}},
        "minResource and reductionFactor apply only to type successiveHalving",
    ),
]


@pytest.mark.parametrize(("patch", "message"), CROSS_FIELD_CASES)
def test_sweep_cel_rules_and_models_reject_the_same_specs(
    patch: dict[str, Any], message: str
) -> None:
    spec = _spec(**patch)
    assert message in _broken_cel_rules(spec, SPEC)
    assert any(message in p for p in _problems(spec)), _problems(spec)


def test_a_valid_sweep_passes_both_forms() -> None:
    spec = _spec(
        parameters=[LR, {"path": "method.lora.r", "type": "int", "low": 4, "high": 32, "step": 4}],
        pruning={"type": "successiveHalving", "minResource": 10},
        parallelTrials=2,
    )
    assert _broken_cel_rules(spec, SPEC) == []
    assert _problems(spec) == []


# --------------------------------------------------------------------------- parameter checks


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        (
            {**LR, "path": "training.learnigRate"},
            "spec.parameters[0].path: 'training.learnigRate' is not a field of a FineTuneJob "
            "spec (training has no field 'learnigRate')\n"
            "    hint: did you mean 'training.learningRate'?",
        ),
        (
            {**LR, "path": "method.lora"},
            "spec.parameters[0].path: 'method.lora' is an object; name one of its fields",
        ),
        (
            {**LR, "path": "dataset.sources"},
            "spec.parameters[0].path: 'dataset.sources' is a list or map",
        ),
        (
            {"path": "output.uri", "type": "categorical", "values": ["s3://x/y"]},
            "spec.parameters[0].path: 'output.uri' is set by the sweep for each trial",
        ),
        (
            {"path": "method.lora.r", "type": "uniform", "low": "1", "high": "64"},
            "spec.parameters[0].type: method.lora.r is an integer field: use type int or "
            "categorical (got uniform)",
        ),
        (
            {"path": "training.learningRate", "type": "int", "low": 1, "high": 2},
            "spec.parameters[0].type: training.learningRate is a decimal field",
        ),
        (
            {"path": "training.scheduler", "type": "uniform", "low": "0", "high": "1"},
            "spec.parameters[0].type: training.scheduler is an enum field (linear, cosine, "
            "constant, constant_with_warmup): use type categorical",
        ),
        (
            {**LR, "high": "1.5"},
            "spec.parameters[0].high: training.learningRate must be > 0.0 and < 1.0 (got 1.5)",
        ),
        ({**LR, "low": "0"}, "spec.parameters[0].low: must be > 0 for logUniform"),
        ({**LR, "low": "1e-2"}, "spec.parameters[0].high: must be > low (1e-2)"),
        ({**LR, "low": 1}, "spec.parameters[0].low: must be a decimal string"),
        ({**LR, "low": 1e-5}, 'write decimal numbers as strings such as "1e-05"'),
        (
            {"path": "method.lora.r", "type": "int", "low": 0, "high": 8},
            "spec.parameters[0].low: method.lora.r must be ≥ 1 (got 0)",
        ),
        (
            {"path": "method.lora.r", "type": "int", "low": "4", "high": 8},
            "spec.parameters[0].low: must be an integer (got '4')",
        ),
        (
            {"path": "method.lora.r", "type": "int", "low": 4, "high": 9, "step": 2},
            "spec.parameters[0].high: high - low must be a multiple of step (2)",
        ),
        (
            {"path": "training.scheduler", "type": "categorical", "values": ["cosine", "bogus"]},
            "spec.parameters[0].values[1]: training.scheduler must be one of 'linear', "
            "'cosine', 'constant' or 'constant_with_warmup' (got 'bogus')",
        ),
        (
            {"path": "method.lora.r", "type": "categorical", "values": [8, "16"]},
            "spec.parameters[0].values[1]: method.lora.r takes integers (got '16')",
        ),
        (
            {"path": "training.packing", "type": "categorical", "values": ["true", "no"]},
            "spec.parameters[0].path: 'training.packing' is not a field",
        ),
        (
            {"path": "dataset.packing", "type": "categorical", "values": ["true", "no"]},
            'spec.parameters[0].values[1]: dataset.packing is a boolean: write "true" or '
            "\"false\" (got 'no')",
        ),
        (
            {"path": "method.type", "type": "categorical", "values": ["lora", "full"]},
            "spec.parameters[0].values[1]: with method.type = 'full' the trial spec is "
            "invalid: method.lora: lora settings do not apply to type full",
        ),
    ],
)
def test_bad_parameters_are_rejected_naming_the_field(
    parameter: dict[str, Any], expected: str
) -> None:
    spec = _spec(parameters=[parameter])
    if parameter["path"] == "method.type":
        spec["template"]["method"] = {"lora": {"r": 8}}
    problems = _problems(spec)
    assert any(expected in p for p in problems), problems


def test_duplicate_paths_and_long_names_are_rejected() -> None:
    problems = _problems(_spec(parameters=[LR, LR]))
    assert any(
        "spec.parameters[1].path: training.learningRate is already set by spec.parameters[0]" in p
        for p in problems
    ), problems
    problems = _problems(_spec(), name="s" * (MAX_NAME_LENGTH + 1))
    assert any(p.startswith("metadata.name") for p in problems), problems
    assert _problems(_spec(), name="s" * MAX_NAME_LENGTH) == []


def test_settable_fields_cover_the_spec_but_not_output_or_suspend() -> None:
    fields = {f.path: f.kind for f in settable_fields()}
    assert fields["training.learningRate"] == "decimal"
    assert fields["method.lora.r"] == "int"
    assert fields["training.scheduler"] == "enum"
    assert fields["dataset.packing"] == "bool"
    assert fields["training.epochs"] == "int"
    assert not any(p.startswith(("output", "suspend")) for p in fields)
    assert spec_field("method.lora.dropout").kind == "decimal"


def test_apply_parameters_creates_missing_objects_and_keeps_the_rest() -> None:
    template = {"method": {"type": "lora"}, "training": {"maxSteps": 5}}
    applied = apply_parameters(template, {"method.lora.r": 16, "training.learningRate": "1e-4"})
    assert applied == {
        "method": {"type": "lora", "lora": {"r": 16}},
        "training": {"maxSteps": 5, "learningRate": "1e-4"},
    }
    assert template == {"method": {"type": "lora"}, "training": {"maxSteps": 5}}


def test_kubetune_validate_checks_sweeps_by_kind(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(kubeyaml.dump(_sweep(_spec())))
    bad = tmp_path / "bad.yaml"
    bad.write_text(kubeyaml.dump(_sweep(_spec(parameters=[{**LR, "path": "training.lr"}]))))
    assert main(["validate", "-f", str(good)]) == 0
    assert "FineTuneSweep 'sweep' is valid" in capsys.readouterr().out
    assert main(["validate", "-f", str(bad)]) == 1
    assert "spec.parameters[0].path: 'training.lr' is not a field" in capsys.readouterr().err
