"""Malformed manifests: `kubetune validate` never crashes, names the field of every
problem, and rejects exactly what the API server would reject with the generated CRD.

The cases are a table: hand-written ones for files, YAML, structure, fields renamed from
other tools, cross-field rules and sweeps, and generated ones with a wrong type (and a
plausible value) for every settable field of a FineTuneJob spec. Each runs the real CLI
in process (``main(argv)``) on a real file; a few run it as a subprocess. Where the
document loads, the CRD's verdict is computed independently — kubectl's YAML reading,
the API server's defaulting, the openAPIV3Schema (jsonschema), strict unknown-field
validation and the CEL rules (cel-python) — and must equal validate's.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_api_crd import _broken_cel_rules

from kubetune_operator import kubeyaml
from kubetune_operator.api.crd import openapi_schema, sweep_openapi_schema
from kubetune_operator.api.sweep import settable_fields
from kubetune_operator.cli import main

pytestmark = pytest.mark.unit

JOB = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: job
spec:
  model:
    source: hf://org/model
  dataset:
    sources: [s3://bucket/data.jsonl]
"""

SWEEP = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneSweep
metadata:
  name: sweep
spec:
  maxTrials: 4
  template:
    model:
      source: hf://org/model
    dataset:
      sources: [s3://bucket/data.jsonl]
    output:
      uri: s3://bucket/out
  parameters:
  - path: training.learningRate
    type: logUniform
    low: "1e-5"
    high: "1e-3"
"""


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line if line else line for line in text.splitlines(True))


def job(spec: str = "", *, metadata: str = "") -> str:
    """JOB with ``spec`` (YAML, relative to spec) added under spec."""
    text = JOB
    if metadata:
        new = "metadata:\n" + _indent(metadata.strip("\n") + "\n", 2)
        text = text.replace("metadata:\n  name: job\n", new)
    return text + _indent(spec.strip("\n") + "\n", 2) if spec else text


def sweep(spec: str = "", template: str = "") -> str:
    """SWEEP with ``spec`` added under spec and ``template`` under spec.template."""
    text = SWEEP
    if template:
        text = text.replace(
            "    output:\n", _indent(template.strip("\n") + "\n", 4) + "    output:\n"
        )
    return text + _indent(spec.strip("\n") + "\n", 2) if spec else text


def job_with(path: str, value: str) -> str:
    """JOB with the spec field ``path`` (``a.b.c``) set to ``value``, YAML as written."""
    (document,) = kubeyaml.load_all(JOB)
    node = document["spec"]
    *parents, name = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = "VALUE_AS_WRITTEN"
    return kubeyaml.dump(document).replace("VALUE_AS_WRITTEN", value)


@dataclass(frozen=True)
class Case:
    id: str
    content: str | bytes
    names: str  # what the message must name: the field path, or the file's line
    crd: bool = True  # compare with the CRD's verdict (False: beyond the CRD by design)


# --------------------------------------------------------------------------- the table

FILE_CASES = [
    Case("empty-file", "", "no YAML documents"),
    Case("only-comments", "# nothing here\n", "no YAML documents"),
    Case("only-separators", "---\n---\n", "no YAML documents"),
    Case("binary-nul", b"\x7fELF\x02\x01\x01\x00\x00\x00" * 8, "byte 0x00 at offset 7"),
    Case("binary-gzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "byte 0x00 at offset 3"),
    Case("latin1", JOB.replace("name: job", "name: caf\xe9").encode("latin-1"), "line 4"),
    Case("invalid-utf8-start", b"\xc3\x28apiVersion: v1\n", "line 1, column 1"),
    Case("utf16-without-bom", JOB.encode("utf-16-le"), "byte 0x00"),
    Case("control-character", JOB + "\x07\n", "line 10"),
    Case("too-large", "# " + "x" * (3 * 1024 * 1024), "3 MiB"),
    Case("deep-nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    Case(
        "alias-bomb",
        "a: &a [1,1,1,1,1,1,1,1,1,1]\n"
        + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
            for p, c in zip("abcdefg", "bcdefgh", strict=True)
        ),
        "aliases",
    ),
    Case("recursive-alias", "a: &a [*a]\n", "line 1"),
]

YAML_CASES = [
    Case("unclosed-flow", JOB + "  training: {epochs: 1\n", "line"),
    Case("bad-indent", JOB.replace("  dataset:", " dataset:"), "line 8"),
    Case("tab-indent", JOB.replace("    source: hf", "\tsource: hf"), "line 7"),
    Case("duplicate-key", job("training:\n  epochs: 1\n  epochs: 2"), "duplicate key 'epochs'"),
    Case("duplicate-top-key", JOB + "spec: {}\n", "duplicate key 'spec'"),
    Case("duplicate-spec-key", job("model:\n  source: hf://x/y"), "duplicate key 'model'"),
    Case("infinity", job("training:\n  maxSteps: .inf"), "line 11"),
    Case("nan", job("method:\n  lora:\n    dropout: .nan"), "line 12"),
    Case("undefined-alias", job("training: *nothing"), "line 10"),
    Case("unknown-tag", job("image: !!python/object:os.system x"), "line 10"),
    Case("complex-key", job("? [a, b]\n: c"), "line"),
    Case("unterminated-quote", job('image: "abc'), "line"),
]

STRUCTURE_CASES = [
    Case("list-document", "- a\n- b\n", "(document)", crd=False),
    Case("scalar-document", "just a string\n", "(document)", crd=False),
    Case("number-document", "42\n", "(document)", crd=False),
    Case("spec-list", JOB.split("spec:")[0] + "spec: [1, 2]\n", "spec"),
    Case("spec-string", JOB.split("spec:")[0] + "spec: train it\n", "spec"),
    Case("spec-missing", JOB.split("spec:")[0], "spec: required field is missing"),
    Case("spec-null", JOB.split("spec:")[0] + "spec:\n", "spec"),
    Case("metadata-missing", JOB.replace("metadata:\n  name: job\n", ""), "metadata"),
    Case("metadata-list", JOB.replace("metadata:\n  name: job\n", "metadata: [job]\n"), "metadata"),
    Case("name-missing", job(metadata="labels: {a: b}"), "metadata.name"),
    Case("name-uppercase", job(metadata="name: My_Job"), "metadata.name"),
    Case("name-too-long", job(metadata="name: " + "a" * 53), "metadata.name"),
    Case("name-number", job(metadata="name: 123"), "metadata.name"),
    Case("model-missing", JOB.replace("  model:\n    source: hf://org/model\n", ""), "spec.model"),
    Case("dataset-missing", JOB.split("  dataset:")[0], "spec.dataset"),
    Case("sources-empty", JOB.replace("[s3://bucket/data.jsonl]", "[]"), "spec.dataset.sources"),
    Case("sources-string", JOB.replace("[s3://bucket/data.jsonl]", "data.jsonl"), "sources"),
    Case("sources-item-empty", JOB.replace("[s3://bucket/data.jsonl]", '[""]'), "sources[0]"),
    Case("sources-item-number", JOB.replace("[s3://bucket/data.jsonl]", "[1]"), "sources[0]"),
    Case("training-list", job("training: [epochs]"), "spec.training"),
    Case("tolerations-map", job("resources:\n  tolerations: {key: a}"), "tolerations"),
    Case("toleration-bad-op", job("resources:\n  tolerations: [{operator: Equals}]"), "[0]"),
    Case("node-selector-bool", job("resources:\n  nodeSelector: {gpu: true}"), "nodeSelector"),
    Case("node-selector-list", job("resources:\n  nodeSelector: [a]"), "nodeSelector"),
    Case("cpu-float", job("resources:\n  cpu: 1.5"), "spec.resources.cpu"),
    Case("cpu-words", job("resources:\n  cpu: lots"), "spec.resources.cpu"),
    Case("memory-bool", job("resources:\n  memory: yes"), "spec.resources.memory"),
    Case("memory-unit", job("resources:\n  memory: 16GB"), "spec.resources.memory"),
    Case("output-relative", job("output:\n  uri: out/dir"), "spec.output.uri"),
    Case("output-endpoint", job("output:\n  uri: s3://b/o\n  endpoint: minio:9000"), "endpoint"),
    Case("mlflow-uri", job("tracking:\n  mlflow:\n    trackingUri: mlflow:5000"), "trackingUri"),
    Case("mlflow-missing-uri", job("tracking:\n  mlflow: {experiment: e}"), "trackingUri"),
    Case(
        "secret-ref-empty-name",
        job("model:\n  source: hf://a/b\n  tokenSecretRef: {key: k}").replace(
            "  model:\n    source: hf://org/model\n", ""
        ),
        "tokenSecretRef.name",
    ),
    Case(
        "wrong-api-version",
        JOB.replace("kubetune.io/v1alpha1", "kubetune.io/v1"),
        "apiVersion",
        crd=False,
    ),
    Case("wrong-kind", JOB.replace("kind: FineTuneJob", "kind: Job"), "kind", crd=False),
    Case("kind-missing", JOB.replace("kind: FineTuneJob\n", ""), "kind", crd=False),
    Case("api-version-number", JOB.replace("kubetune.io/v1alpha1", "1"), "apiVersion", crd=False),
    Case("learning-rate-words", job("training:\n  learningRate: fast"), "learningRate"),
    Case("learning-rate-zero", job('training:\n  learningRate: "0"'), "learningRate"),
    Case("learning-rate-negative", job('training:\n  learningRate: "-1e-4"'), "learningRate"),
    Case("dropout-one", job('method:\n  lora:\n    dropout: "1"'), "dropout"),
    Case("r-zero", job("method:\n  lora:\n    r: 0"), "spec.method.lora.r"),
    Case("r-huge", job("method:\n  lora:\n    r: 4096"), "spec.method.lora.r"),
    Case("max-steps-1e30", job("training:\n  maxSteps: 1e30"), "spec.training.maxSteps"),
    Case("max-steps-over-int64", job("training:\n  maxSteps: 9223372036854775808"), "maxSteps"),
    Case("max-steps-negative", job("training:\n  maxSteps: -5"), "spec.training.maxSteps"),
    Case("epochs-1.5", job("training:\n  epochs: 1.5"), "spec.training.epochs"),
    Case(
        "percent-51",
        job("dataset:\n  sources: [d]\n  validation: {percent: 51}").replace(
            "  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""
        ),
        "percent",
    ),
    Case("target-modules-empty", job("method:\n  lora:\n    targetModules: []"), "targetModules"),
    Case("bits-string", job('method:\n  type: qlora\n  quantization:\n    bits: "4"'), "bits"),
    Case("deadline-zero", job("activeDeadlineSeconds: 0"), "activeDeadlineSeconds"),
    Case("retry-limit-21", job("retryLimit: 21"), "spec.retryLimit"),
    Case("suspend-string", job('suspend: "false"'), "spec.suspend"),
]

UNKNOWN_CASES = [
    Case("typo", job("training:\n  learningrate: '1e-4'"), "did you mean 'learningRate'"),
    Case("snake-case", job("training:\n  max_steps: 10"), "did you mean 'maxSteps'"),
    Case("top-level-unknown", JOB + "extra: 1\n", "extra"),
    Case("spec-unknown", job("replicas: 2"), "spec.resources.nodes"),
    Case("misplaced-field", job("learningRate: '1e-4'"), "spec.training.learningRate"),
    Case("warmup-ratio", job("training:\n  warmupRatio: 0.03"), "warmupPercent: 3"),
    Case("warmup-steps", job("training:\n  warmupSteps: 100"), "spec.training.warmupPercent"),
    Case("backoff-limit", job("backoffLimit: 4"), "retryLimit: 4"),
    Case(
        "validation-split",
        job("dataset:\n  sources: [d]\n  validationSplit: 0.1").replace(
            "  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""
        ),
        "percent: 10",
    ),
    Case(
        "val-set-size",
        job("dataset:\n  sources: [d]\n  val_set_size: 0.05").replace(
            "  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""
        ),
        "percent: 5",
    ),
    Case("num-train-epochs", job("training:\n  num_train_epochs: 3"), "spec.training.epochs"),
    Case("lr", job("training:\n  lr: 2e-4"), 'learningRate: "0.0002"'),
    Case("lora-r", job("method:\n  lora_r: 8"), "spec.method.lora.r"),
    Case("lora-alpha", job("method:\n  lora_alpha: 16"), "spec.method.lora.alpha"),
    Case("micro-batch", job("training:\n  micro_batch_size: 2"), "spec.training.batchSize"),
    Case("sequence-len", job("sequence_len: 512"), "spec.dataset.maxSeqLength"),
    Case("base-model", job("base_model: meta-llama/Llama-3"), "spec.model.source"),
    Case("load-in-4bit", job("method:\n  load_in_4bit: true"), "type: qlora"),
    Case(
        "peft-num-virtual-tokens",
        job("method:\n  type: prompt\n  num_virtual_tokens: 8"),
        "spec.method.prompt.numVirtualTokens",
    ),
    Case(
        "peft-init-text",
        job("method:\n  type: prompt\n  prompt_tuning_init_text: Classify"),
        "initText: Classify",
    ),
    Case("bf16", job("training:\n  bf16: true"), "precision: bf16"),
    Case("output-dir", job("output_dir: /out"), "spec.output.uri"),
    Case("num-gpus", job("resources:\n  num_gpus: 8"), "spec.resources.gpus"),
    Case("timeout", job("timeout: 3600"), "spec.activeDeadlineSeconds"),
    Case("save-steps", job("training:\n  save_steps: 50"), "checkpointEverySteps"),
    Case("lr-scheduler", job("training:\n  lr_scheduler_type: cosine"), "spec.training.scheduler"),
    Case("eval-steps", job("training:\n  eval_steps: 50"), "spec.training.evalEverySteps"),
    Case(
        "metadata-extra-ok-but-spec-bad",
        job("training:\n  epochs: '3'", metadata="name: j\nlabels: {team: ml}"),
        "spec.training.epochs",
    ),
]

CROSS_FIELD_CASES = [
    Case("epochs-and-max-steps", job("training:\n  epochs: 1\n  maxSteps: 10"), "maxSteps"),
    Case("quantization-without-qlora", job("method:\n  quantization: {bits: 4}"), "quantization"),
    Case("lora-with-full", job("method:\n  type: full\n  lora: {r: 8}"), "spec.method.lora"),
    Case(
        "early-stopping-no-eval",
        job("training:\n  earlyStopping: {patience: 2}"),
        "spec.training.earlyStopping",
    ),
    Case(
        "percent-and-sources",
        job("dataset:\n  sources: [d]\n  validation: {percent: 5, sources: [v]}").replace(
            "  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""
        ),
        "spec.dataset.validation.percent",
    ),
    Case(
        "revision-local",
        job("model:\n  source: /models/m\n  revision: main").replace(
            "  model:\n    source: hf://org/model\n", ""
        ),
        "spec.model.revision",
    ),
    Case(
        "endpoint-local-output",
        job("output:\n  uri: /out\n  endpoint: http://s3"),
        "spec.output.uri",
    ),
    Case(
        "qlora-fsdp",
        job("method: {type: qlora}\ndistributed: {strategy: fsdp}"),
        "spec.distributed.strategy",
    ),
    Case(
        "processes-with-gpus",
        job("resources: {gpus: 2}\ndistributed: {processesPerNode: 2}"),
        "spec.distributed.processesPerNode",
    ),
    Case(
        "fsdp-with-ddp",
        job("distributed: {strategy: ddp, fsdp: {cpuOffload: true}}"),
        "spec.distributed.fsdp",
    ),
    Case("prompt-packed", job("method: {type: prompt}"), "spec.dataset.packing"),
    Case(
        "prefix-merged",
        job(
            "method: {type: prefix}\noutput: {uri: s3://b/out, mergeAdapter: true}\n"
            "dataset: {sources: [d], packing: false}"
        ).replace("  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""),
        "spec.output.mergeAdapter",
    ),
    Case(
        "prefix-checkpointing",
        job(
            "method: {type: prefix}\ntraining: {gradientCheckpointing: true}\n"
            "dataset: {sources: [d], packing: false}"
        ).replace("  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""),
        "spec.training.gradientCheckpointing",
    ),
    Case(
        "prompt-text-init-without-text",
        job("method:\n  type: prompt\n  prompt: {init: text}"),
        "spec.method.prompt.initText",
    ),
    Case(
        "prefix-settings-on-lora",
        job("method:\n  prefix: {numVirtualTokens: 8}"),
        "spec.method.prefix",
    ),
    Case(
        "username-without-password",
        job(
            "tracking:\n  mlflow:\n    trackingUri: http://m\n"
            "    usernameSecretRef: {name: s, key: u}"
        ),
        "passwordSecretRef",
    ),
    Case(
        "token-and-username",
        job(
            "tracking:\n  mlflow:\n    trackingUri: http://m\n"
            "    tokenSecretRef: {name: s, key: t}\n    usernameSecretRef: {name: s, key: u}\n"
            "    passwordSecretRef: {name: s, key: p}"
        ),
        "spec.tracking.mlflow.tokenSecretRef",
    ),
    Case(
        "two-rules-at-once",
        job("training:\n  epochs: 1\n  maxSteps: 10\n  earlyStopping: {patience: 1}"),
        "spec.training.earlyStopping",
    ),
]

SWEEP_CASES = [
    Case("sweep-max-trials-missing", SWEEP.replace("  maxTrials: 4\n", ""), "spec.maxTrials"),
    Case("sweep-max-trials-string", SWEEP.replace("maxTrials: 4", 'maxTrials: "4"'), "maxTrials"),
    Case("sweep-parallel-over-max", sweep("parallelTrials: 8"), "spec.parallelTrials"),
    Case(
        "sweep-parameters-empty",
        SWEEP.split("  parameters:")[0] + "  parameters: []\n",
        "spec.parameters",
    ),
    Case(
        "sweep-parameters-map",
        SWEEP.split("  parameters:")[0] + "  parameters: {a: b}\n",
        "spec.parameters",
    ),
    Case("sweep-low-float", SWEEP.replace('low: "1e-5"', "low: 1e-5"), "spec.parameters[0].low"),
    Case("sweep-low-bool", SWEEP.replace('low: "1e-5"', "low: yes"), "spec.parameters[0].low"),
    Case("sweep-type-bogus", SWEEP.replace("type: logUniform", "type: loguniform"), "type"),
    Case("sweep-missing-high", SWEEP.replace('    high: "1e-3"\n', ""), "parameters[0].high"),
    Case(
        "sweep-step-not-int",
        sweep().replace('high: "1e-3"', 'high: "1e-3"\n    step: 2'),
        "spec.parameters[0].step",
    ),
    Case(
        "sweep-unknown-path",
        SWEEP.replace("training.learningRate", "training.lr"),
        "spec.parameters[0].path",
        crd=False,
    ),
    Case(
        "sweep-path-pattern",
        SWEEP.replace("training.learningRate", "training..lr"),
        "spec.parameters[0].path",
    ),
    Case(
        "sweep-template-epochs-string",
        sweep(template="training:\n  epochs: '3'"),
        "spec.template.training.epochs",
    ),
    Case(
        "sweep-template-warmup-ratio",
        sweep(template="training:\n  warmupRatio: 0.1"),
        "spec.template.training.warmupPercent",
    ),
    Case(
        "sweep-template-output-missing",
        SWEEP.replace("    output:\n      uri: s3://bucket/out\n", ""),
        "spec.template.output",
    ),
    Case(
        "sweep-template-cross-field",
        sweep(template="training: {epochs: 1, maxSteps: 5}"),
        "spec.template.training.maxSteps",
    ),
    Case("sweep-name-too-long", SWEEP.replace("name: sweep", "name: " + "s" * 48), "metadata.name"),
    Case("sweep-grid-decimal", sweep("algorithm: {type: grid}"), "spec.algorithm.type"),
    Case("sweep-pruning-type", sweep("pruning: {type: hyperband}"), "spec.pruning.type"),
    Case(
        "sweep-pruning-cross",
        sweep("pruning: {type: median, reductionFactor: 3}"),
        "spec.pruning.type",
    ),
    Case("sweep-duplicate-key", SWEEP + "  maxTrials: 5\n", "duplicate key 'maxTrials'"),
    Case(
        "sweep-kind-typo",
        SWEEP.replace("kind: FineTuneSweep", "kind: FinetuneSweep"),
        "kind",
        crd=False,
    ),
]

MULTI_DOCUMENT_CASES = [
    Case("second-document-bad", JOB + "---\n" + job("training:\n  epochs: '2'"), "#2"),
    Case(
        "job-and-bad-sweep",
        JOB + "---\n" + SWEEP.replace("maxTrials: 4", "maxTrials: 0"),
        "spec.maxTrials",
    ),
    Case("document-then-garbage", JOB + "---\n- [unclosed\n", "line 12"),
]

# A wrong value of each kind for every settable field of the spec (YAML as written).
WRONG = {
    "int": ['"16"', "1.5", "true"],
    "decimal": ["2e-4", "true"],
    "enum": ["3", "bogus"],
    "bool": ['"true"', "1"],
    "string": ["123", "yes"],
}
GENERATED_CASES = [
    Case(f"{field.path}={value}", job_with(field.path, value), f"spec.{field.path}")
    for field in settable_fields()
    for value in WRONG[field.kind]
]

CASES = (
    FILE_CASES
    + YAML_CASES
    + STRUCTURE_CASES
    + UNKNOWN_CASES
    + CROSS_FIELD_CASES
    + SWEEP_CASES
    + MULTI_DOCUMENT_CASES
    + GENERATED_CASES
)

# Manifests both accept: the agreement test must see both verdicts.
VALID = {
    "minimal-job": JOB,
    "minimal-sweep": SWEEP,
    "whole-float-int": job("training:\n  epochs: 3.0"),
    "exponent-int": job("training:\n  maxSteps: 1e3"),
    "quoted-decimal": job('training:\n  learningRate: "2e-4"'),
    "cpu-int-and-quantity": job("resources:\n  cpu: 8\n  memory: 64Gi"),
    "yes-is-true": job("dataset:\n  sources: [d]\n  packing: yes").replace(
        "  dataset:\n    sources: [s3://bucket/data.jsonl]\n", ""
    ),
    "octal-int": job("training:\n  seed: 017"),
    "merge-key": JOB + "  training: &t {epochs: 2}\n  method: {<<: {type: lora}}\n",
    "status-is-dropped": JOB + "status:\n  state: Exploded\n",
}
# A plausible value of each kind for every field: some valid, some out of range or
# breaking a cross-field rule, so both verdicts occur.
PLAUSIBLE = {"int": "16", "decimal": '"0.5"', "enum": None, "bool": "true", "string": "x"}


def _plausible(field: Any) -> str:
    value = PLAUSIBLE[field.kind]
    return field.choices[0] if value is None else value


AGREEMENT = {
    **VALID,
    **{f"plausible:{f.path}": job_with(f.path, _plausible(f)) for f in settable_fields()},
}


# --------------------------------------------------------------------------- helpers


def _write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "manifest.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: kubectl's default (strict) field validation
    rejects them."""
    unknown: list[str] = []
    if path == ".metadata":
        return []  # the API server checks ObjectMeta itself (labels, annotations, ...)
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        for name, sub in value.items():
            if name not in schema["properties"]:
                unknown.append(f"{path}.{name}")
            else:
                unknown += _unknown_fields(sub, schema["properties"][name], f"{path}.{name}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for name, sub in value.items():
            unknown += _unknown_fields(sub, schema["additionalProperties"], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            unknown += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return unknown


@functools.cache
def _schema(kind: str) -> tuple[dict[str, Any], jsonschema.Draft4Validator]:
    schema = sweep_openapi_schema() if kind == "FineTuneSweep" else openapi_schema()
    return schema, jsonschema.Draft4Validator(schema)


def crd_rejects(document: dict[str, Any]) -> bool:
    """The API server's verdict on ``document`` (as kubectl sent it) with our CRDs."""
    schema, validator = _schema(str(document.get("kind")))
    # A create through the main resource drops status (the status subresource owns it).
    document = {k: v for k, v in document.items() if k != "status"}
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        return True  # ObjectMeta validation: a name is required (we write no generateName)
    if _unknown_fields(document, schema):
        return True
    if not validator.is_valid(document):
        return True
    try:
        return bool(_broken_cel_rules(document, schema))
    except Exception:  # a CEL evaluation error rejects the object too
        return True


# --------------------------------------------------------------------------- tests


def test_the_table_is_large_and_has_unique_ids() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100
    kinds = {f.kind for f in settable_fields()}
    assert kinds == set(WRONG), "every field kind has wrong values"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_validate_rejects_and_names_the_field(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, case.content)
    assert main(["validate", "-f", str(path)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert case.names in captured.err, captured.err
    assert str(path) in captured.err  # every message starts with the file
    for line in captured.err.splitlines():
        if line.startswith("  ") and not line.startswith("      hint:"):
            field, _, message = line.strip().partition(": ")
            assert field and message, f"a problem without its field: {line!r}"


def _objects(case: Case) -> list[dict[str, Any]] | None:
    """The objects kubectl would send for ``case``; None when it refuses the file."""
    if not isinstance(case.content, str):
        return None
    try:
        documents = list(kubeyaml.load_all(case.content))
    except Exception:
        return None
    objects = [d for d in documents if d is not None]
    return objects if objects and all(isinstance(d, dict) for d in objects) else None


# Malformed cases that reach the API server as objects. The rest kubectl refuses (YAML
# errors, .inf) or kubeyaml refuses where kubectl keeps the last of duplicate keys.
REACH_THE_SERVER = [c for c in CASES if c.crd and _objects(c) is not None]


def test_most_cases_reach_the_server() -> None:
    assert len(REACH_THE_SERVER) >= 100


@pytest.mark.parametrize("case", REACH_THE_SERVER, ids=lambda c: c.id)
def test_validate_and_the_crd_agree_on_malformed(case: Case) -> None:
    objects = _objects(case)
    assert objects is not None
    assert any(crd_rejects(o) for o in objects), "validate rejects it, so must the CRD"


@pytest.mark.parametrize("name", sorted(AGREEMENT))
def test_validate_and_the_crd_agree_on_plausible(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = AGREEMENT[name]
    (document,) = kubeyaml.load_all(text)
    validate_rejects = main(["validate", "-f", str(_write(tmp_path, text))]) != 0
    capsys.readouterr()
    assert validate_rejects == crd_rejects(document)
    if name in VALID:
        assert not validate_rejects


@pytest.mark.parametrize(
    ("argv", "content", "names"),
    [
        (["validate"], b"\x00\x01binary", "binary file"),
        (["validate"], "apiVersion: [\n", "not valid YAML at line"),
        (["train"], JOB.replace("name: job", "name: caf\xe9").encode("latin-1"), "not UTF-8"),
        (["train"], job("training:\n  learningRate: 2e-4"), "spec.training.learningRate"),
    ],
    ids=["validate-binary", "validate-yaml", "train-latin1", "train-float"],
)
def test_real_process_exits_cleanly(
    argv: list[str], content: str | bytes, names: str, tmp_path: Path
) -> None:
    path = _write(tmp_path, content)
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", *argv, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == (1 if argv == ["validate"] else 2), result.stderr
    assert "Traceback" not in result.stderr
    assert names in result.stderr


GUESSED = """\
apiVersion: kubetune.io/v1
kind: FineTuneJob
metadata: {name: guessed}
spec:
  model: {source: hf://org/model}
  dataset: {sources: [s3://bucket/data.jsonl], validationSplit: 0.1}
  method: {type: full, lora: {r: "16"}}
  training:
    epochs: "3"
    maxSteps: 10
    learningRate: 2e-4
    warmupRatio: 0.03
    earlyStopping: {patience: 2}
  backoffLimit: 3
"""
# What the hints of one round say to write.
FIXED = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: guessed}
spec:
  model: {source: hf://org/model}
  dataset: {sources: [s3://bucket/data.jsonl], validation: {percent: 10}}
  method: {type: full}
  training:
    epochs: 3
    learningRate: "0.0002"
    warmupPercent: 3
    evalEverySteps: 50
    earlyStopping: {patience: 2}
  retryLimit: 3
"""


def test_a_guessed_manifest_takes_one_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem at once: header, types, renamed fields and the cross-field rules
    that the values as written break (pydantic alone checks those only on round two)."""
    assert main(["validate", "-f", str(_write(tmp_path, GUESSED))]) == 1
    err = capsys.readouterr().err
    reported = {
        line.strip().split(": ")[0]
        for line in err.splitlines()
        if line.startswith("  ") and not line.startswith("      hint:")
    }
    assert reported == {
        "apiVersion",
        "spec.dataset.validationSplit",
        "spec.method.lora",
        "spec.method.lora.r",
        "spec.training.epochs",
        "spec.training.maxSteps",
        "spec.training.learningRate",
        "spec.training.warmupRatio",
        "spec.training.earlyStopping",
        "spec.backoffLimit",
    }
    for hint in ("percent: 10", "warmupPercent: 3", "retryLimit: 3", 'learningRate: "0.0002"'):
        assert hint in err
    assert main(["validate", "-f", str(_write(tmp_path, FIXED))]) == 0
