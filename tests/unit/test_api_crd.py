"""The CRD is generated from the API models, is structural, and agrees with them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune_operator import kubeyaml
from kubetune_operator.api.crd import crd, crd_yaml, openapi_schema, sweep_openapi_schema
from kubetune_operator.api.validation import parse_manifest, validate_manifest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "finetunejobs.kubetune.io.yaml"
SWEEP_CRD_FILE = ROOT / "crds" / "finetunesweeps.kubetune.io.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _nodes(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


def test_crd_file_is_generated_output() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `kubetune crd > crds/...`"
    assert SWEEP_CRD_FILE.read_text() == crd_yaml("FineTuneSweep"), (
        "crds/ is stale: run `kubetune crd --kind FineTuneSweep > crds/finetunesweeps...`"
    )


@pytest.mark.parametrize("path", [CRD_FILE, SWEEP_CRD_FILE], ids=lambda p: p.name)
def test_crd_passes_kubernetes_validate_strict(path: Path) -> None:
    kubernetes_validate.validate(yaml.safe_load(path.read_text()), "1.37.0", strict=True)


@pytest.mark.parametrize("schema", [openapi_schema, sweep_openapi_schema], ids=lambda f: f.__name__)
def test_schema_is_structural_and_documented(schema) -> None:
    for path, node in _nodes(schema()):
        assert "$ref" not in node and "allOf" not in node and "oneOf" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "anyOf" not in node, path
            assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if path.count(".") >= 2 and not path.endswith(("[]", "{}")):  # fields of spec, status
            assert node.get("description"), f"{path} has no description"


def test_crd_defaults_match_the_models() -> None:
    spec = openapi_schema()["properties"]["spec"]
    minimal = {"model": {"source": "m"}, "dataset": {"sources": ["d.jsonl"]}}
    parsed = parse_manifest(_job(minimal)).spec.model_dump(mode="json")
    training = spec["properties"]["training"]["properties"]
    for name, node in training.items():
        if "default" in node:
            assert parsed["training"][name] == node["default"], name
    assert spec["properties"]["method"]["default"] == {}
    assert parsed["method"]["type"] == spec["properties"]["method"]["properties"]["type"]["default"]


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job"},
        "spec": spec,
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_models_and_crd_schema(example: Path) -> None:
    (document,) = kubeyaml.load_all(example.read_text())  # as kubectl reads it
    assert validate_manifest(document) == []
    jsonschema.validate(document, openapi_schema())
    assert _broken_cel_rules(document["spec"], openapi_schema()["properties"]["spec"]) == []


# --------------------------------------------------------------------------- CEL rules


def _with_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Apply the schema's defaults as the API server does before it checks CEL rules."""
    if isinstance(value, dict):
        value = dict(value)
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = sub["default"]
            if name in value:
                value[name] = _with_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        value = [_with_defaults(item, schema["items"]) for item in value]
    return value


def _broken_cel_rules(value: Any, schema: dict[str, Any]) -> list[str]:
    """Evaluate the CRD's CEL rules like the API server would; return broken messages."""
    return _broken_after_defaulting(_with_defaults(value, schema), schema)


@functools.cache
def _cel_program(rule: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def _broken_after_defaulting(value: Any, schema: dict[str, Any]) -> list[str]:
    broken = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _cel_program(rule["rule"])
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            broken.append(rule["message"])
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                broken += _broken_after_defaulting(value[name], sub)
    if isinstance(value, list) and "items" in schema:
        for item in value:
            broken += _broken_after_defaulting(item, schema["items"])
    return broken


BASE = {"model": {"source": "hf://org/model"}, "dataset": {"sources": ["s3://b/d.jsonl"]}}

_REF = {"name": "mlflow-auth", "key": "value"}
CROSS_FIELD_CASES = [
    ({"training": {"epochs": 1, "maxSteps": 10}}, "set epochs or maxSteps, not both"),
    (
        {"method": {"type": "lora", "quantization": {"bits": 4}}},
        "quantization applies only to type qlora",
    ),
    ({"method": {"type": "full", "lora": {"r": 8}}}, "lora settings do not apply to type full"),
    ({"training": {"earlyStopping": {"patience": 2}}}, "earlyStopping needs evalEverySteps > 0"),
    (
        {"dataset": {"sources": ["d.jsonl"], "validation": {"percent": 5, "sources": ["v.jsonl"]}}},
        "set validation.percent or validation.sources, not both",
    ),
    (
        {"model": {"source": "/models/m", "revision": "main"}},
        "revision applies only to hf:// sources",
    ),
    (
        {"output": {"uri": "/tmp/out", "endpoint": "http://s3"}},
        "endpoint and credentialsSecretRef apply only to s3:// outputs",
    ),
    ({"training": {"learningRate": "0"}}, "must be > 0.0 and < 1.0"),
    ({"method": {"lora": {"dropout": "1.5"}}}, "must be >= 0.0 and < 1.0"),
    (
        {"method": {"type": "qlora"}, "distributed": {"strategy": "fsdp"}},
        "QLoRA cannot be sharded with FSDP (the 4-bit base is frozen and small): "
        "use distributed.strategy ddp or auto",
    ),
    (
        {"resources": {"gpus": 2}, "distributed": {"processesPerNode": 2}},
        "distributed.processesPerNode applies only to CPU jobs (resources.gpus: 0); "
        "with GPUs one process runs per GPU",
    ),
    (
        {"distributed": {"strategy": "ddp", "fsdp": {"cpuOffload": True}}},
        "fsdp settings do not apply to strategy ddp",
    ),
    (
        {"tracking": {"mlflow": {"trackingUri": "http://mlflow:5000", "usernameSecretRef": _REF}}},
        "set usernameSecretRef and passwordSecretRef together",
    ),
    (
        {
            "tracking": {
                "mlflow": {
                    "trackingUri": "http://mlflow:5000",
                    "tokenSecretRef": _REF,
                    "usernameSecretRef": _REF,
                    "passwordSecretRef": _REF,
                }
            }
        },
        "set tokenSecretRef or usernameSecretRef/passwordSecretRef, not both",
    ),
    *[
        (
            {"method": {"type": method}},  # packing defaults to true
            "dataset.packing must be false for method types prefix and prompt: the "
            "virtual tokens are prepended once per row, and packed examples would "
            "attend to each other",
        )
        for method in ("prefix", "prompt")
    ],
    (
        {
            "method": {"type": "prompt"},
            "dataset": {"sources": ["d.jsonl"], "packing": False},
            "output": {"uri": "s3://b/out", "mergeAdapter": True},
        },
        "output.mergeAdapter must be false for method types prefix and prompt: "
        "virtual tokens cannot be merged into the base model's weights",
    ),
    (
        {
            "method": {"type": "prefix"},
            "dataset": {"sources": ["d.jsonl"], "packing": False},
            "training": {"gradientCheckpointing": True},
        },
        "training.gradientCheckpointing must be false for method type prefix: "
        "checkpointed layers drop the key/value prefix",
    ),
    (
        {"method": {"type": "prompt", "lora": {"r": 8}}},
        "lora settings do not apply to types prefix and prompt",
    ),
    ({"method": {"prefix": {}}}, "prefix settings apply only to type prefix"),
    ({"method": {"type": "prefix", "prompt": {}}}, "prompt settings apply only to type prompt"),
    (
        {"method": {"type": "prefix", "prefix": {"projectionHiddenSize": 256}}},
        "projectionHiddenSize needs projection: true",
    ),
    (
        {"method": {"type": "prompt", "prompt": {"init": "text"}}},
        "init text needs initText (the words the virtual tokens start from)",
    ),
    (
        {"method": {"type": "prompt", "prompt": {"initText": "Classify"}}},
        "initText applies only to init: text",
    ),
    (
        {"method": {"type": "prompt", "quantization": {"bits": 4}}},
        "quantization applies only to type qlora",
    ),
]

_UNPACKED = {"sources": ["d.jsonl"], "packing": False}


@pytest.mark.parametrize(
    "patch",
    [
        {"resources": {"gpus": 0}, "distributed": {"processesPerNode": 4}},
        {"method": {"type": "qlora"}, "distributed": {"strategy": "ddp"}},
        {"method": {"type": "full"}, "distributed": {"strategy": "fsdp", "fsdp": {}}},
        {"resources": {"nodes": 4, "gpus": 8}},
        {"method": {"type": "prefix"}, "dataset": _UNPACKED, "distributed": {"strategy": "ddp"}},
        # FSDP shards the frozen base (seen training and saving on 2 gloo ranks, peft 0.21)
        {"method": {"type": "prompt"}, "dataset": _UNPACKED, "distributed": {"strategy": "fsdp"}},
        {
            "method": {
                "type": "prefix",
                "prefix": {"projection": True, "projectionHiddenSize": 64},
            },
            "dataset": _UNPACKED,
        },
        {
            "method": {"type": "prompt", "prompt": {"init": "text", "initText": "Answer:"}},
            "dataset": _UNPACKED,
            "training": {"gradientCheckpointing": True},
            "output": {"uri": "s3://b/out"},
        },
        {"tracking": {"mlflow": {"trackingUri": "https://m", "tokenSecretRef": _REF}}},
        {
            "tracking": {
                "tensorboard": False,
                "mlflow": {
                    "trackingUri": "http://m:5000",
                    "usernameSecretRef": _REF,
                    "passwordSecretRef": _REF,
                },
            }
        },
    ],
)
def test_valid_distributed_specs_pass_both_forms(patch: dict[str, Any]) -> None:
    spec = {**BASE, **patch}
    assert _broken_cel_rules(spec, openapi_schema()["properties"]["spec"]) == []
    assert validate_manifest(_job(spec)) == []


@pytest.mark.parametrize(("patch", "message"), CROSS_FIELD_CASES)
def test_cel_rules_and_models_reject_the_same_specs(patch: dict[str, Any], message: str) -> None:
    spec = {**BASE, **patch}
    cel_broken = _broken_cel_rules(spec, openapi_schema()["properties"]["spec"])
    model_problems = [p.message for p in validate_manifest(_job(spec))]
    assert message in cel_broken
    assert any(message in m for m in model_problems), model_problems


def test_crd_has_printer_columns_short_name_and_status_subresource() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["State"] == ".status.state"
    assert columns["Progress"] == ".status.progress.percent"
    assert columns["Loss"] == ".status.metrics.trainLoss"
    assert "Age" in columns
    assert crd()["spec"]["names"]["shortNames"] == ["ftj"]
