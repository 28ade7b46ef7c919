"""The FineTuneSweep API (kubetune.io/v1alpha1): a hyperparameter search whose trials are
ordinary FineTuneJobs.

As for FineTuneJob, these pydantic models are the single source of the CRD (``kubetune crd
--kind FineTuneSweep``), its defaults, enums, bounds and CEL rules, of the field reference
(docs/sweep-reference.md) and of the operator's parsing. What the API server cannot check
with CEL — that a parameter's ``path`` names a real field of a FineTuneJob spec, that its
space suits that field, and that the template with each bound applied is still a valid
FineTuneJob spec — is checked here (:func:`sweep_problems`), with messages that name the
sweep's field (``spec.parameters[0].high: ...``); the operator marks such a sweep Invalid.

Trials: trial ``n`` is the FineTuneJob ``<sweep name>-<n>`` (n = 0, 1, ...) in the sweep's
namespace, and writes under ``<template.output.uri>/<trial name>/`` (its adapter at
``.../<trial name>/adapter``, its checkpoints at ``.../<trial name>/checkpoints``).
"""

from __future__ import annotations

import copy
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from .rules import ApiModel, Rule
from .types import (
    _DECIMAL,
    _EMPTY_DEFAULT,
    API_VERSION,
    Condition,
    FineTuneJobSpec,
    ObjectMeta,
)
from .types import KIND as JOB_KIND
from .validation import InvalidManifest, Problem, parse_document, problems_of

KIND = "FineTuneSweep"
PLURAL = "finetunesweeps"
SINGULAR = "finetunesweep"
SHORT_NAMES = ["fts"]

JOB_NAME_LIMIT = 52  # FineTuneJob names (ObjectMeta.name in types.py)
# Room for "-<n>" with n up to 9999 (maxTrials is at most 1000).
MAX_NAME_LENGTH = JOB_NAME_LIMIT - 5

# Fields a parameter may not set: the sweep decides them per trial.
RESERVED_PATHS = ("output", "suspend")


def _no_bool_or_float(value: Any) -> Any:
    """YAML's true/1.5 would silently become 1 / a float: ask for the written forms."""
    if isinstance(value, bool):
        raise ValueError(f'write booleans as the strings "true" or "false" (got {value})')
    if isinstance(value, float):
        raise ValueError(f'write decimal numbers as strings such as "{value:g}" (got {value})')
    return value


IntOrString = Annotated[
    int | str,
    BeforeValidator(_no_bool_or_float),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


# --------------------------------------------------------------------------- spec


ParameterType = Literal["logUniform", "uniform", "int", "categorical"]


class SweepParameter(ApiModel):
    """One field of the trials' FineTuneJob spec to search over, and its space."""

    path: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*$",
        description=(
            "The field of the FineTuneJob spec (relative to spec) this parameter sets, "
            "e.g. training.learningRate or method.lora.r."
        ),
        examples=["training.learningRate"],
    )
    type: ParameterType = Field(
        description=(
            "The space: logUniform (decimal, sampled on a log scale: learning rates), "
            "uniform (decimal), int (integers from low to high, every step), or "
            "categorical (one of values)."
        ),
    )
    low: IntOrString | None = Field(
        default=None,
        description=(
            'Lowest value (inclusive): a decimal string such as "1e-5" for logUniform and '
            "uniform, an integer for int."
        ),
    )
    high: IntOrString | None = Field(
        default=None,
        description=(
            'Highest value (inclusive): a decimal string such as "1e-3" for logUniform and '
            "uniform, an integer for int."
        ),
    )
    step: int | None = Field(
        default=None, ge=1, description="For int: only every step-th value from low (default 1)."
    )
    values: list[IntOrString] | None = Field(
        default=None,
        min_length=1,
        description=(
            'For categorical: the choices, written as the field takes them (8, "2e-4", '
            '"cosine"; "true"/"false" for boolean fields).'
        ),
    )

    rules = (
        Rule(
            cel="self.type == 'categorical' || (has(self.low) && has(self.high))",
            message="logUniform, uniform and int spaces need low and high",
            holds=lambda m: m.type == "categorical" or (m.low is not None and m.high is not None),
            field_path=".high",
        ),
        Rule(
            cel="self.type != 'categorical' || has(self.values)",
            message="categorical spaces need values",
            holds=lambda m: m.type != "categorical" or m.values is not None,
            field_path=".values",
        ),
        Rule(
            cel="self.type == 'categorical' || !has(self.values)",
            message="values applies only to type categorical",
            holds=lambda m: m.type == "categorical" or m.values is None,
            field_path=".values",
        ),
        Rule(
            cel="self.type != 'categorical' || (!has(self.low) && !has(self.high))",
            message="low and high do not apply to type categorical",
            holds=lambda m: m.type != "categorical" or (m.low is None and m.high is None),
            field_path=".low",
        ),
        Rule(
            cel="!has(self.step) || self.type == 'int'",
            message="step applies only to type int",
            holds=lambda m: m.step is None or m.type == "int",
            field_path=".step",
        ),
    )


class Objective(ApiModel):
    """What the search optimizes: a metric every trial reports in its status."""

    metric: Literal["evalLoss", "trainLoss", "perplexity"] = Field(
        default="evalLoss",
        description=(
            "The trial's final status.metrics value to optimize: evalLoss (held-out loss), "
            "trainLoss or perplexity (exp(evalLoss))."
        ),
    )
    direction: Literal["minimize", "maximize"] = Field(
        default="minimize", description="minimize (losses, perplexity) or maximize."
    )


class Algorithm(ApiModel):
    """How the next trial's parameters are chosen (Optuna's samplers)."""

    type: Literal["tpe", "random", "grid"] = Field(
        default="tpe",
        description=(
            "tpe: Bayesian search (Optuna's TPE; random for the first 10 trials); random; "
            "grid: every combination once, in a random order (int and categorical "
            "parameters only)."
        ),
    )
    seed: int = Field(
        default=0,
        ge=0,
        description="Seed of the sampler: the same sweep and results give the same trials.",
    )


class Pruning(ApiModel):
    """Stop clearly worse trials early, from their intermediate objective values
    (evaluations every template.training.evalEverySteps steps)."""

    type: Literal["median", "successiveHalving"] = Field(
        description=(
            "median: stop a trial whose value at a step is worse than the median of the "
            "finished trials at that step; successiveHalving: asynchronous successive "
            "halving (keep the best 1/reductionFactor at each rung)."
        ),
    )
    startupTrials: int | None = Field(
        default=None,
        ge=0,
        description="median: finished trials needed before any pruning (default 5).",
    )
    warmupSteps: int | None = Field(
        default=None,
        ge=0,
        description="median: never prune a trial before this step (default 0).",
    )
    minResource: int | None = Field(
        default=None,
        ge=1,
        description=(
            "successiveHalving: steps before the first rung (default: 1/100 of the longest "
            "finished trial's steps)."
        ),
    )
    reductionFactor: int | None = Field(
        default=None,
        ge=2,
        description="successiveHalving: keep the best 1/reductionFactor at each rung (default 4).",
    )

    rules = (
        Rule(
            cel="self.type == 'median' || (!has(self.startupTrials) && !has(self.warmupSteps))",
            message="startupTrials and warmupSteps apply only to type median",
            holds=lambda m: (
                m.type == "median" or (m.startupTrials is None and m.warmupSteps is None)
            ),
            field_path=".type",
        ),
        Rule(
            cel=(
                "self.type == 'successiveHalving' || "
                "(!has(self.minResource) && !has(self.reductionFactor))"
            ),
            message="minResource and reductionFactor apply only to type successiveHalving",
            holds=lambda m: (
                m.type == "successiveHalving"
                or (m.minResource is None and m.reductionFactor is None)
            ),
            field_path=".type",
        ),
    )


class FineTuneSweepSpec(ApiModel):
    """The FineTuneJob to vary, the parameters to search, the objective and the budget."""

    template: FineTuneJobSpec = Field(
        description=(
            "The spec every trial starts from (a FineTuneJob spec); each trial sets the "
            "parameters on it and writes under <output.uri>/<trial name>/."
        ),
    )
    parameters: list[SweepParameter] = Field(
        min_length=1,
        max_length=32,
        description="The fields to search over, each with its space.",
    )
    objective: Objective = Field(
        default_factory=Objective,
        description="The metric to optimize and its direction.",
        **_EMPTY_DEFAULT,
    )
    algorithm: Algorithm = Field(
        default_factory=Algorithm,
        description="tpe, random or grid, with a seed.",
        **_EMPTY_DEFAULT,
    )
    maxTrials: int = Field(
        ge=1, le=1000, description="Trials to run in all (pruned and failed ones included)."
    )
    parallelTrials: int = Field(
        default=1, ge=1, le=100, description="Trials running at the same time."
    )
    maxFailedTrials: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Failed trials tolerated; one more fails the sweep (no new trials start).",
    )
    pruning: Pruning | None = Field(
        default=None,
        description="Stop weak trials early (suspended and marked pruned). Default: off.",
    )

    rules = (
        Rule(
            cel="has(self.template.output)",
            message=(
                "template.output is required: each trial writes under "
                "<template.output.uri>/<trial name>/"
            ),
            holds=lambda m: m.template.output is not None,
            field_path=".template.output",
        ),
        Rule(
            cel="self.parallelTrials <= self.maxTrials",
            message="parallelTrials must be ≤ maxTrials",
            holds=lambda m: m.parallelTrials <= m.maxTrials,
            field_path=".parallelTrials",
        ),
        Rule(
            cel=(
                "!has(self.pruning) || self.objective.metric == 'trainLoss' || "
                "self.template.training.evalEverySteps > 0"
            ),
            message=(
                "pruning on evalLoss or perplexity needs template.training.evalEverySteps > 0 "
                "(intermediate evaluations to compare)"
            ),
            holds=lambda m: (
                m.pruning is None
                or m.objective.metric == "trainLoss"
                or m.template.training.evalEverySteps > 0
            ),
            field_path=".pruning",
        ),
        Rule(
            cel=(
                "self.algorithm.type != 'grid' || "
                "self.parameters.all(p, p.type == 'int' || p.type == 'categorical')"
            ),
            message=(
                "algorithm grid needs finite spaces: every parameter must be of type int or "
                "categorical (list the decimals you want as categorical values)"
            ),
            holds=lambda m: (
                m.algorithm.type != "grid"
                or all(p.type in ("int", "categorical") for p in m.parameters)
            ),
            field_path=".algorithm.type",
        ),
    )


# --------------------------------------------------------------------------- status

SweepState = Literal["Pending", "Running", "Succeeded", "Failed", "Invalid"]


class SweepCounts(ApiModel):
    """How many trials are in each state."""

    total: int = Field(default=0, ge=0, description="Trials created.")
    done: int = Field(default=0, ge=0, description="Finished trials: succeeded + failed + pruned.")
    running: int = Field(
        default=0, ge=0, description="Trials not finished (pending, queued, running, suspended)."
    )
    succeeded: int = Field(default=0, ge=0, description="Trials that reported the objective.")
    failed: int = Field(
        default=0, ge=0, description="Trials that failed, were invalid or reported no objective."
    )
    pruned: int = Field(default=0, ge=0, description="Trials stopped early by the pruner.")


class SweepTrial(ApiModel):
    """One row of the trial table."""

    name: str = Field(description="The trial's FineTuneJob.")
    parameters: dict[str, str] = Field(
        description="The values this trial set, by path, as written in its spec."
    )
    state: str = Field(description="The trial FineTuneJob's state, or Pruned.")
    value: float | None = Field(default=None, description="Its objective value, once finished.")


class BestTrial(ApiModel):
    """The succeeded trial with the best objective value."""

    name: str = Field(description="The trial's FineTuneJob.")
    parameters: dict[str, str] = Field(description="Its parameter values, by path.")
    value: float = Field(description="Its objective value.")
    artifactUri: str | None = Field(
        default=None, description="Its adapter (loads with PeftModel.from_pretrained)."
    )


class FineTuneSweepStatus(ApiModel):
    """What the operator observed. Written only by the operator."""

    state: SweepState | None = Field(default=None, description="One word for kubectl get.")
    observedGeneration: int | None = Field(
        default=None, description="The spec generation this status describes."
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, Stalled and Reconciling (kstatus), one per type."
    )
    counts: SweepCounts | None = Field(default=None, description="Trials by state.")
    trials: list[SweepTrial] | None = Field(
        default=None, description="Every trial: parameters, state and objective value."
    )
    bestTrial: BestTrial | None = Field(default=None, description="The best succeeded trial.")
    completionTime: str | None = Field(default=None, description="When the sweep finished.")
    message: str | None = Field(default=None, description="Human-readable summary.")


class SweepObjectMeta(ObjectMeta):
    """The parts of metadata kubetune reads; everything else is kept as is."""

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=(
            f"Sweep name: lowercase letters, digits and '-', at most {MAX_NAME_LENGTH} "
            "characters, so that its trials' names (<name>-<n>) stay FineTuneJob names."
        ),
    )


class FineTuneSweep(ApiModel):
    """A hyperparameter search over FineTuneJobs, driven by Optuna."""

    apiVersion: Literal["kubetune.io/v1alpha1"] = Field(description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneSweep"] = Field(description="FineTuneSweep")
    metadata: SweepObjectMeta
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus | None = None


# --------------------------------------------------------------------------- fields

FieldKind = Literal["int", "decimal", "enum", "bool", "string"]


@dataclass(frozen=True)
class SpecField:
    """A scalar field of a FineTuneJob spec a parameter can set."""

    path: str
    kind: FieldKind
    choices: tuple[str, ...] = ()


class PathError(ValueError):
    """A parameter path that names no settable field."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, _UnionType) and len(args) == 1:
        return args[0]
    return annotation


_UnionType = type(int | str)


def _leaf(path: str, annotation: Any, metadata: list[Any]) -> SpecField | None:
    annotation = _unwrap(annotation)
    if annotation is bool:
        return SpecField(path, "bool")
    if annotation is int:
        return SpecField(path, "int")
    if typing.get_origin(annotation) is Literal:
        return SpecField(path, "enum", tuple(str(a) for a in typing.get_args(annotation)))
    if annotation is str:
        patterns = [getattr(m, "pattern", None) for m in metadata]
        return SpecField(path, "decimal" if _DECIMAL in patterns else "string")
    if typing.get_origin(annotation) in (typing.Union, _UnionType):
        return SpecField(path, "string")  # int-or-string quantities
    return None  # objects, lists, maps


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def settable_fields(model: type[BaseModel] = FineTuneJobSpec, prefix: str = "") -> list[SpecField]:
    """Every scalar field of the FineTuneJob spec a parameter may set."""
    out: list[SpecField] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if path.split(".")[0] in RESERVED_PATHS:
            continue
        sub = _model_of(info.annotation)
        if sub is not None:
            out += settable_fields(sub, f"{path}.")
            continue
        leaf = _leaf(path, info.annotation, list(info.metadata))
        if leaf is not None:
            out.append(leaf)
    return out


def spec_field(path: str) -> SpecField:
    """The field of a FineTuneJob spec that ``path`` names, or PathError saying why not."""
    known = [f.path for f in settable_fields()]
    close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else None
    if path.split(".")[0] in RESERVED_PATHS:
        raise PathError(
            f"{path!r} is set by the sweep for each trial, not by a parameter",
            "the trials write under <template.output.uri>/<trial name>/",
        )
    model: type[BaseModel] = FineTuneJobSpec
    parts = path.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "spec"
        info = model.model_fields.get(part)
        if info is None:
            fields = ", ".join(model.model_fields)
            raise PathError(
                f"{path!r} is not a field of a FineTuneJob spec ({where} has no field {part!r})",
                hint or f"fields of {where}: {fields}",
            )
        sub = _model_of(info.annotation)
        last = depth == len(parts) - 1
        if sub is not None and not last:
            model = sub
            continue
        if sub is not None:
            fields = ", ".join(f"{path}.{n}" for n in sub.model_fields)
            raise PathError(f"{path!r} is an object; name one of its fields", fields)
        if not last:
            raise PathError(f"{'.'.join(parts[: depth + 1])!r} has no fields", hint)
        leaf = _leaf(path, info.annotation, list(info.metadata))
        if leaf is None:
            raise PathError(f"{path!r} is a list or map; a parameter sets a single value", hint)
        return leaf
    raise PathError(f"{path!r} names no field", hint)  # pragma: no cover - parts is never empty


# --------------------------------------------------------------------------- values


def format_decimal(value: float) -> str:
    """A float as the decimal string a FineTuneJob field takes (6 significant digits)."""
    return f"{value:.6g}"


def spec_value(field: SpecField, value: Any) -> Any:
    """A parameter value in the form the FineTuneJob field takes."""
    if field.kind == "decimal":
        return format_decimal(value) if isinstance(value, float) else str(value)
    if field.kind == "bool" and isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    return value


def shown(value: Any) -> str:
    """A spec value as a short string (the status' parameter table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def apply_parameters(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec ``template`` with each ``{path: spec value}`` set (missing parent
    objects are created)."""
    spec = copy.deepcopy(template)
    for path, value in values.items():
        node = spec
        *parents, name = path.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[name] = value
    return spec


def template_dict(spec: FineTuneSweepSpec) -> dict[str, Any]:
    """The template as the user wrote it (defaults left to the FineTuneJob)."""
    return spec.template.model_dump(mode="json", exclude_unset=True)


# --------------------------------------------------------------------------- checks


def _space_problems(i: int, param: SweepParameter, field: SpecField) -> list[Problem]:
    at = f"spec.parameters[{i}]"
    kinds = {
        "int": "an integer field: use type int or categorical",
        "decimal": "a decimal field: use type logUniform, uniform or categorical",
        "enum": f"an enum field ({', '.join(field.choices)}): use type categorical",
        "bool": 'a boolean field: use type categorical with values "true" and "false"',
        "string": "a string field: use type categorical",
    }
    allowed = {
        "int": ("int", "categorical"),
        "decimal": ("logUniform", "uniform", "categorical"),
    }.get(field.kind, ("categorical",))
    if param.type not in allowed:
        return [Problem(f"{at}.type", f"{param.path} is {kinds[field.kind]} (got {param.type})")]
    problems: list[Problem] = []
    if param.type == "int":
        for name, bound in (("low", param.low), ("high", param.high)):
            if not isinstance(bound, int):
                problems.append(Problem(f"{at}.{name}", f"must be an integer (got {bound!r})"))
        if not problems and isinstance(param.low, int) and isinstance(param.high, int):
            step = param.step or 1
            if param.low > param.high:
                problems.append(
                    Problem(f"{at}.high", f"must be ≥ low ({param.low}) (got {param.high})")
                )
            elif (param.high - param.low) % step:
                problems.append(
                    Problem(
                        f"{at}.high",
                        f"high - low must be a multiple of step ({step}) (got {param.high})",
                    )
                )
    elif param.type in ("logUniform", "uniform"):
        numbers: dict[str, float] = {}
        for name, bound in (("low", param.low), ("high", param.high)):
            if not isinstance(bound, str) or not _is_decimal(bound):
                problems.append(
                    Problem(
                        f"{at}.{name}",
                        f'must be a decimal string such as "1e-4" (got {bound!r})',
                    )
                )
            else:
                numbers[name] = float(bound)
        if len(numbers) == 2:
            if numbers["low"] >= numbers["high"]:
                problems.append(
                    Problem(f"{at}.high", f"must be > low ({param.low}) (got {param.high!r})")
                )
            if param.type == "logUniform" and numbers["low"] <= 0:
                problems.append(
                    Problem(f"{at}.low", f"must be > 0 for logUniform (got {param.low!r})")
                )
    else:
        values = param.values or []
        if len(set(map(str, values))) != len(values):
            problems.append(Problem(f"{at}.values", f"must not repeat a value (got {values})"))
        for j, value in enumerate(values):
            if field.kind == "int" and not isinstance(value, int):
                problems.append(
                    Problem(f"{at}.values[{j}]", f"{param.path} takes integers (got {value!r})")
                )
            if field.kind == "bool" and value not in ("true", "false"):
                problems.append(
                    Problem(
                        f"{at}.values[{j}]",
                        f'{param.path} is a boolean: write "true" or "false" (got {value!r})',
                    )
                )
    return problems


def _is_decimal(text: str) -> bool:
    import re

    return re.match(_DECIMAL, text) is not None and math.isfinite(float(text))


def _trial_problems(template: dict[str, Any], path: str, value: Any, at: str) -> list[Problem]:
    """The template with ``path`` set to ``value`` must still be a valid FineTuneJob spec."""
    spec = apply_parameters(template, {path: value})
    try:
        FineTuneJobSpec.model_validate(spec, strict=True)
    except ValidationError as error:
        found = problems_of(error, root=FineTuneJobSpec, prefix="spec")
    else:
        return []
    out = []
    for problem in found:
        where = problem.path.removeprefix("spec.")
        if where == path:
            message = f"{path} {problem.message}"
        else:
            message = f"with {path} = {shown(value)!r} the trial spec is invalid: {where}: "
            message += problem.message
        out.append(Problem(at, message, problem.hint))
    return out


def sweep_problems(spec: FineTuneSweepSpec) -> list[Problem]:
    """What the API server cannot check: each parameter names a settable field of the
    FineTuneJob spec, its space suits the field, and every bound and value applied to the
    template still gives a valid FineTuneJob spec."""
    problems: list[Problem] = []
    template = template_dict(spec)
    seen: dict[str, int] = {}
    for i, param in enumerate(spec.parameters):
        at = f"spec.parameters[{i}]"
        try:
            field = spec_field(param.path)
        except PathError as error:
            problems.append(Problem(f"{at}.path", error.message, error.hint))
            continue
        if param.path in seen:
            problems.append(
                Problem(
                    f"{at}.path",
                    f"{param.path} is already set by spec.parameters[{seen[param.path]}]",
                )
            )
            continue
        seen[param.path] = i
        space = _space_problems(i, param, field)
        problems += space
        if space:
            continue
        if param.type == "categorical":
            for j, value in enumerate(param.values or []):
                problems += _trial_problems(
                    template, param.path, spec_value(field, value), f"{at}.values[{j}]"
                )
        else:
            for name, bound in (("low", param.low), ("high", param.high)):
                problems += _trial_problems(
                    template, param.path, spec_value(field, bound), f"{at}.{name}"
                )
    return problems


def parse_sweep(document: Any) -> FineTuneSweep:
    """Parse a FineTuneSweep manifest (a dict) with defaults applied and its parameters
    checked against the FineTuneJob API, or raise InvalidManifest naming each field."""
    sweep = parse_document(document, FineTuneSweep, KIND)
    problems = sweep_problems(sweep.spec)
    if problems:
        raise InvalidManifest(problems)
    return sweep


__all__ = [
    "API_VERSION",
    "JOB_KIND",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "FineTuneSweep",
    "FineTuneSweepSpec",
    "FineTuneSweepStatus",
    "SpecField",
    "apply_parameters",
    "parse_sweep",
    "spec_field",
    "spec_value",
    "sweep_problems",
]
