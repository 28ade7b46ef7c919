"""Field names other fine-tuning tools use, and the kubetune field each one is.

A manifest guessed from Hugging Face's TrainingArguments, axolotl, LLaMA-Factory or a
Kubernetes Job often names a field the way those tools do (``warmupRatio``,
``backoffLimit``, ``validationSplit``). ``kubetune validate`` reports such a field as
unknown and, from this table, names our field and the value to write there, so that
one round of validation is enough.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _percent(value: Any) -> Any:
    """A fraction (0.05) as a whole percent (5)."""
    number = _number(value)
    if number is None or not 0 <= number <= 1:
        return None
    return round(number * 100)


def _decimal_string(value: Any) -> Any:
    number = _number(value)
    return None if number is None else f'"{number:g}"'


def _integer(value: Any) -> Any:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _when_true(result: str) -> Callable[[Any], Any]:
    return lambda value: result if value is True else None


@dataclass(frozen=True)
class Rename:
    """Another tool's name for one of our fields."""

    field: str  # the FineTuneJob spec field, relative to spec (``training.warmupPercent``)
    takes: str  # what our field takes, and how to convert the other tool's value
    convert: Callable[[Any], Any] = _integer  # the value to write, or None when unknown


_TABLE: tuple[tuple[tuple[str, ...], Rename], ...] = (
    (
        ("warmupRatio", "warmup_ratio"),
        Rename("training.warmupPercent", "a whole percent of the steps (ratio × 100)", _percent),
    ),
    (
        ("warmupSteps", "warmup_steps", "numWarmupSteps"),
        Rename(
            "training.warmupPercent",
            "a whole percent of the steps (warmup steps ÷ total steps × 100)",
            lambda value: None,
        ),
    ),
    (
        ("backoffLimit", "maxRetries", "retries", "restartLimit", "maxRestarts"),
        Rename("retryLimit", "new attempts after a retryable failure (0-20)"),
    ),
    (
        (
            "validationSplit",
            "valSetSize",
            "val_set_size",
            "evalSplit",
            "testSize",
            "test_size",
            "validationRatio",
            "validationFraction",
        ),
        Rename("dataset.validation.percent", "a whole percent (fraction × 100)", _percent),
    ),
    (
        ("validationFile", "validationFiles", "evalFile", "eval_file", "validationData"),
        Rename("dataset.validation.sources", "a list of files", lambda value: None),
    ),
    (
        ("numTrainEpochs", "num_train_epochs", "numEpochs", "nEpochs"),
        Rename("training.epochs", "an integer"),
    ),
    (
        ("learning_rate", "lr"),
        Rename("training.learningRate", 'a decimal string such as "2e-4"', _decimal_string),
    ),
    (
        (
            "perDeviceTrainBatchSize",
            "per_device_train_batch_size",
            "microBatchSize",
            "micro_batch_size",
            "trainBatchSize",
        ),
        Rename("training.batchSize", "examples per device step"),
    ),
    (
        ("evalSteps", "eval_steps", "evalInterval"),
        Rename("training.evalEverySteps", "an integer"),
    ),
    (
        ("saveSteps", "save_steps", "checkpointSteps", "checkpointInterval"),
        Rename("training.checkpointEverySteps", "an integer"),
    ),
    (
        ("lrSchedulerType", "lr_scheduler_type", "lrScheduler", "lr_scheduler"),
        Rename("training.scheduler", "a schedule name such as cosine", lambda value: value),
    ),
    (("bf16",), Rename("training.precision", "bf16, fp16, fp32 or auto", _when_true("bf16"))),
    (("fp16",), Rename("training.precision", "bf16, fp16, fp32 or auto", _when_true("fp16"))),
    (
        ("earlyStoppingPatience", "early_stopping_patience"),
        Rename("training.earlyStopping.patience", "an integer (needs evalEverySteps)"),
    ),
    (
        (
            "sequenceLen",
            "sequence_len",
            "maxLength",
            "max_length",
            "cutoffLen",
            "cutoff_len",
            "seqLength",
            "contextLength",
            "maxSourceLength",
        ),
        Rename("dataset.maxSeqLength", "tokens per example"),
    ),
    (
        ("datasets", "dataPath", "data_path", "trainFile", "train_file", "dataFiles"),
        Rename("dataset.sources", "a list of files or s3:// prefixes", lambda value: None),
    ),
    (
        (
            "baseModel",
            "base_model",
            "modelName",
            "model_name",
            "modelNameOrPath",
            "model_name_or_path",
            "modelId",
        ),
        Rename("model.source", "hf://org/name, s3://bucket/prefix or a path", lambda v: None),
    ),
    (
        ("loraR", "lora_r", "rank", "loraRank"),
        Rename("method.lora.r", "an integer"),
    ),
    (("loraAlpha", "lora_alpha"), Rename("method.lora.alpha", "an integer")),
    (
        ("loraDropout", "lora_dropout"),
        Rename("method.lora.dropout", 'a decimal string such as "0.05"', _decimal_string),
    ),
    (
        ("loraTargetModules", "lora_target_modules", "target_modules"),
        Rename("method.lora.targetModules", "a list of module names", lambda value: None),
    ),
    (
        ("adapter", "peftType", "finetuningType", "finetuning_type"),
        Rename("method.type", "lora, qlora, dora, full, prefix or prompt", lambda value: None),
    ),
    (
        ("prompt_tuning_init_text", "promptTuningInitText", "init_text"),
        Rename("method.prompt.initText", "the words, with init: text", str),
    ),
    (
        ("prompt_tuning_init", "promptTuningInit"),
        Rename("method.prompt.init", "random or text", lambda value: None),
    ),
    (
        ("prefix_projection", "prefixProjection"),
        Rename("method.prefix.projection", "true or false", _when_true("true")),
    ),
    (
        ("encoder_hidden_size", "encoderHiddenSize"),
        Rename("method.prefix.projectionHiddenSize", "the MLP's hidden size, with projection"),
    ),
    (
        ("loadIn4bit", "load_in_4bit"),
        Rename("method.type", "qlora (4-bit by default)", _when_true("qlora")),
    ),
    (
        ("loadIn8bit", "load_in_8bit"),
        Rename(
            "method.type",
            "qlora, with method.quantization.bits: 8",
            _when_true("qlora"),
        ),
    ),
    (
        ("outputDir", "output_dir", "outputPath"),
        Rename("output.uri", "s3://bucket/prefix, file:///dir or /dir", lambda value: None),
    ),
    (
        ("numGpus", "num_gpus", "gpu", "gpusPerNode", "nprocPerNode", "nproc_per_node"),
        Rename("resources.gpus", "GPUs per node"),
    ),
    (
        ("numNodes", "num_nodes", "nnodes", "replicas", "workers"),
        Rename("resources.nodes", "nodes (one pod each)"),
    ),
    (
        ("timeout", "timeoutSeconds", "deadline", "activeDeadline", "maxRuntimeSeconds"),
        Rename("activeDeadlineSeconds", "seconds"),
    ),
)


def _normal(name: str) -> str:
    return re.sub(r"[_\-]", "", name).lower()


RENAMES: dict[str, Rename] = {_normal(name): rename for names, rename in _TABLE for name in names}


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rename_hint(name: str, value: Any, spec_path: str = "spec") -> str | None:
    """The hint for an unknown field ``name`` that another tool uses, or None.

    ``spec_path`` is where the FineTuneJob spec is (``spec.template`` in a sweep)."""
    rename = RENAMES.get(_normal(name))
    if rename is None:
        return None
    leaf = rename.field.rsplit(".", 1)[-1]
    converted = rename.convert(value)
    write = f"; here: {leaf}: {_yaml_value(converted)}" if converted is not None else ""
    return (
        f"{name} is another tool's name: kubetune's field is {spec_path}.{rename.field}, "
        f"{rename.takes}{write}"
    )
