"""Generate the CustomResourceDefinitions (FineTuneJob, FineTuneSweep, FineTunePolicy) from
the API models.

The pydantic JSON schema is rewritten into a *structural* OpenAPI v3 schema, the form
the API server demands: references inlined, ``anyOf [X, null]`` collapsed to X, titles
and ``additionalProperties: false`` dropped (unknown fields are pruned by the server
and rejected by ``kubetune validate``), and the Kubernetes extensions kept.
"""

from __future__ import annotations

import copy
from typing import Any

from .. import kubeyaml
from . import policy as policy_api
from . import sweep as sweep_api
from .types import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

Schema = dict[str, Any]

_DROPPED_KEYS = {"title", "examples", "const"}


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline ``$ref`` and collapse nullable unions, keeping the referring site's keys."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        target = defs[ref.rsplit("/", 1)[-1]]
        node = {
            **target,
            **{k: v for k, v in node.items() if k != "description"},
            "description": node.get("description", target.get("description")),
        }
    any_of = node.get("anyOf")
    if any_of is not None:
        branches = [b for b in any_of if b.get("type") != "null"]
        if len(branches) == 1:
            del node["anyOf"]
            merged = _resolve(branches[0], defs)
            node = {**merged, **node}
        else:
            node["anyOf"] = [_resolve(b, defs) for b in branches]
    if node.get("default", "absent") is None:
        del node["default"]
    return node


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _resolve(node, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _structural(value, defs)
            # `false` (extra=forbid) and `true` (free-form dict) are not structural.
        elif key == "anyOf":
            # Only int-or-string unions reach here; structural form lists bare types.
            out[key] = [{"type": branch["type"]} for branch in value]
        else:
            # A copy: a model used at several places (SecretKeyRef) must not share its
            # lists, or the YAML dump writes anchors and aliases (&id001, *id001).
            out[key] = copy.deepcopy(value)
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if "required" in out and not out["required"]:
        del out["required"]
    return out


def _model_schema(model: Any) -> Schema:
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return _structural(schema, defs)


def _metadata_schema(resource_model: Any) -> Schema:
    """metadata with the model's name constraints: a structural schema may restrict
    metadata.name (and only it and generateName; metadata itself takes nothing else), so the
    API server refuses the names the operator would. (Not a CEL rule: CEL's cost estimate
    takes metadata.name as unbounded without kubernetes/kubernetes#139573.)"""
    meta = resource_model.model_fields["metadata"].annotation.model_json_schema()
    name = meta["properties"]["name"]
    return {
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "maxLength": name["maxLength"],
                "pattern": name["pattern"],
                "description": name["description"],
            }
        },
    }


def _resource_schema(
    kind: str, doc: str | None, resource_model: Any, spec_model: Any, status_model: Any
) -> Schema:
    spec = _model_schema(spec_model)
    status = _model_schema(status_model)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return {
        "type": "object",
        "description": doc,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_VERSION}"},
            "kind": {"type": "string", "description": kind},
            "metadata": _metadata_schema(resource_model),
            "spec": spec,
            "status": status,
        },
    }


def openapi_schema() -> Schema:
    """The openAPIV3Schema of a FineTuneJob."""
    return _resource_schema(
        KIND, FineTuneJob.__doc__, FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
    )


def sweep_openapi_schema() -> Schema:
    """The openAPIV3Schema of a FineTuneSweep."""
    return _resource_schema(
        sweep_api.KIND,
        sweep_api.FineTuneSweep.__doc__,
        sweep_api.FineTuneSweep,
        sweep_api.FineTuneSweepSpec,
        sweep_api.FineTuneSweepStatus,
    )


def policy_openapi_schema() -> Schema:
    """The openAPIV3Schema of a FineTunePolicy (no status: only the platform team writes it)."""
    return {
        "type": "object",
        "description": policy_api.FineTunePolicy.__doc__,
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_VERSION}"},
            "kind": {"type": "string", "description": policy_api.KIND},
            "metadata": _metadata_schema(policy_api.FineTunePolicy),
            "spec": {**_model_schema(policy_api.FineTunePolicySpec), "default": {}},
        },
    }


def crd() -> Schema:
    """The CustomResourceDefinition, as a dict."""
    columns: list[dict[str, Any]] = [
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {
            "name": "Progress",
            "type": "integer",
            "jsonPath": ".status.progress.percent",
            "description": "Percent of the optimizer steps done",
        },
        {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss"},
        {"name": "Eval", "type": "number", "jsonPath": ".status.metrics.evalLoss", "priority": 1},
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1},
        {
            "name": "Ranks",
            "type": "integer",
            "jsonPath": ".status.progress.worldSize",
            "description": "Trainer processes (nodes × processes per node)",
            "priority": 1,
        },
        {
            "name": "GPU-Hours",
            "type": "number",
            "jsonPath": ".status.gpuHours",
            "description": "GPU-hours held by the job's pods, all attempts (status.gpuSeconds)",
            "priority": 1,
        },
        {
            "name": "Evaluation",
            "type": "string",
            "jsonPath": ".status.evaluation.headline",
            "description": "The gate's metric (or the first task metric), base->tuned (delta)",
            "priority": 1,
        },
        {
            "name": "Gate",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="EvaluationPassed")].reason',
            "description": "GatePassed or GateFailed (spec.evaluation.gate)",
            "priority": 1,
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd_of(KIND, PLURAL, SINGULAR, SHORT_NAMES, columns, openapi_schema())


def sweep_crd() -> Schema:
    """The FineTuneSweep CustomResourceDefinition, as a dict."""
    columns: list[dict[str, Any]] = [
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {
            "name": "Done",
            "type": "integer",
            "jsonPath": ".status.counts.done",
            "description": "Finished trials: succeeded + failed + pruned",
        },
        {"name": "Running", "type": "integer", "jsonPath": ".status.counts.running"},
        {
            "name": "Best",
            "type": "number",
            "jsonPath": ".status.bestTrial.value",
            "description": "The best objective value so far",
        },
        {"name": "Trial", "type": "string", "jsonPath": ".status.bestTrial.name", "priority": 1},
        {"name": "Max", "type": "integer", "jsonPath": ".spec.maxTrials", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd_of(
        sweep_api.KIND,
        sweep_api.PLURAL,
        sweep_api.SINGULAR,
        sweep_api.SHORT_NAMES,
        columns,
        sweep_openapi_schema(),
    )


def policy_crd() -> Schema:
    """The FineTunePolicy CustomResourceDefinition, as a dict."""
    columns: list[dict[str, Any]] = [
        {"name": "Max GPUs", "type": "integer", "jsonPath": ".spec.maxGpusPerJob"},
        {"name": "Max Nodes", "type": "integer", "jsonPath": ".spec.maxNodes"},
        {"name": "Max Jobs", "type": "integer", "jsonPath": ".spec.maxConcurrentJobs"},
        {"name": "Queue", "type": "string", "jsonPath": ".spec.defaultQueueName", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    definition = _crd_of(
        policy_api.KIND,
        policy_api.PLURAL,
        policy_api.SINGULAR,
        policy_api.SHORT_NAMES,
        columns,
        policy_openapi_schema(),
    )
    del definition["spec"]["versions"][0]["subresources"]  # no status
    return definition


def _crd_of(
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    columns: list[dict[str, Any]],
    schema: Schema,
) -> Schema:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


# The CRDs by kind, and the file each is written to in crds/ (and helm/kubetune/crds/).
CRDS = {KIND: crd, sweep_api.KIND: sweep_crd, policy_api.KIND: policy_crd}


def crd_filename(kind: str = KIND) -> str:
    return f"{CRDS[kind]()['metadata']['name']}.yaml"


def crd_yaml(kind: str = KIND) -> str:
    """The CRD of ``kind`` as the YAML written to crds/ (stable: same models, same bytes)."""
    command = "kubetune crd" if kind == KIND else f"kubetune crd --kind {kind}"
    header = f"# Generated by `{command}` from the API models. Do not edit by hand.\n"
    # kubectl's YAML rules: a string default such as "2e-4" is quoted, or kubectl would
    # send a number and the API server would reject the CRD.
    return header + kubeyaml.dump(copy.deepcopy(CRDS[kind]()), sort_keys=False, width=100)
