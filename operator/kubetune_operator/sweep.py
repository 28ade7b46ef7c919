"""Decide what a FineTuneSweep needs next, from the sweep and its trials. Pure: no API calls.

A sweep's trials are ordinary FineTuneJobs. The kopf handlers list the sweep's trials (label
``kubetune.io/sweep=<sweep>``), call :func:`reconcile_sweep` and apply the
:class:`SweepDecision`: create the new trials, merge-patch the annotations, suspend the
pruned trials, write the status, emit the events.

Stateless and restart-safe: nothing lives in the operator's memory between calls. Each
call rebuilds an in-memory Optuna study from the trials themselves — the parameters of
each are recorded on it at creation (annotation ``kubetune.io/sweep-params``), its result
is its status (Succeeded → COMPLETE with the objective from ``status.metrics``;
Failed/Invalid → FAIL; annotated ``kubetune.io/sweep-pruned`` → PRUNED; anything else →
RUNNING), its intermediate objective values are recorded on it as they are observed
(``kubetune.io/sweep-intermediate``) — and asks Optuna (ask-and-tell) for the next trials.
Trial names are deterministic (``<sweep>-<n>``, n one more than the highest existing), and
the sampler is seeded from ``algorithm.seed`` and n, so a restarted operator asks for
exactly the trial it would have asked for, and an existing trial is always seen before a
new one is made: no duplicates.

Pruned trials are suspended, not deleted: a deleted trial would take its recorded
parameters and results with it (the study would forget it, and its number could be
reused), while a suspended one keeps them, keeps its newest checkpoint (resume it by hand
to finish it) and frees its GPUs at once.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from . import conditions as c
from .api.policy import FineTunePolicy
from .api.sweep import (
    API_VERSION,
    JOB_KIND,
    KIND,
    FineTuneSweep,
    FineTuneSweepSpec,
    SpecField,
    apply_parameters,
    format_decimal,
    parse_sweep,
    shown,
    spec_field,
    spec_value,
    template_dict,
)
from .api.types import FineTuneJobSpec
from .api.validation import InvalidManifest, Problem, problems_of
from .memory import ARCHITECTURE_ANNOTATION
from .policy import POLICY_VIOLATION, sweep_violations
from .reconcile import Event, transition_origin
from .workload import KUEUE_LABELS

# Labels on every trial (a FineTuneJob).
SWEEP_LABEL = "kubetune.io/sweep"  # the sweep's name
TRIAL_LABEL = "kubetune.io/trial"  # the trial's number, "0", "1", ...
# Annotations on every trial.
PARAMS_ANNOTATION = "kubetune.io/sweep-params"  # JSON {path: value}, set at creation
INTERMEDIATE_ANNOTATION = "kubetune.io/sweep-intermediate"  # JSON {step: objective value}
PRUNER_ANNOTATION = "kubetune.io/sweep-pruner-state"  # JSON: what the pruner keeps per trial
PRUNED_ANNOTATION = "kubetune.io/sweep-pruned"  # why the trial was pruned

TERMINAL_STATES = ("Succeeded", "Failed", "Invalid")
# Retries of an ask whose parameters together make an invalid trial spec (each value alone
# is valid; a combination may break a cross-field rule).
_ASK_ATTEMPTS = 10


@dataclass
class SweepDecision:
    """What the handlers apply, in this order: create, annotate, stop, status, events."""

    status: dict[str, Any]  # the sweep's full new status
    create_trials: list[dict[str, Any]] = field(default_factory=list)  # FineTuneJob manifests
    annotate_trials: dict[str, dict[str, str]] = field(default_factory=dict)  # merge-patch
    stop_trials: list[str] = field(default_factory=list)  # pruned: set spec.suspend true
    events: list[Event] = field(default_factory=list)


# --------------------------------------------------------------------------- naming


def trial_name(sweep: str, number: int) -> str:
    """The FineTuneJob of trial ``number``: ``<sweep>-<number>``."""
    return f"{sweep}-{number}"


def trial_output_uri(base: str, name: str) -> str:
    """Where a trial writes: ``<template.output.uri>/<trial name>`` (its adapter in
    ``.../adapter``, its checkpoints in ``.../checkpoints``)."""
    return f"{base.rstrip('/')}/{name}"


# --------------------------------------------------------------------------- the space


class Space:
    """The sweep's parameters as Optuna distributions, and the fields they set."""

    def __init__(self, spec: FineTuneSweepSpec) -> None:
        self.fields: dict[str, SpecField] = {}
        self.distributions: dict[str, BaseDistribution] = {}
        self.grid_size: int | None = 1 if spec.algorithm.type == "grid" else None
        for param in spec.parameters:
            self.fields[param.path] = spec_field(param.path)
            distribution: BaseDistribution
            if param.type == "categorical":
                distribution = CategoricalDistribution(list(param.values or []))
                size = len(param.values or [])
            elif param.type == "int":
                low, high, step = int(param.low or 0), int(param.high or 0), param.step or 1
                distribution = IntDistribution(low, high, step=step)
                size = (high - low) // step + 1
            else:
                distribution = FloatDistribution(
                    float(str(param.low)), float(str(param.high)), log=param.type == "logUniform"
                )
                size = 0
            self.distributions[param.path] = distribution
            if self.grid_size is not None:
                self.grid_size *= size

    def fits(self, params: dict[str, Any]) -> bool:
        """Whether recorded parameters belong to this space (the spec may have changed)."""
        if set(params) != set(self.distributions):
            return False
        try:
            return all(
                d._contains(d.to_internal_repr(params[p])) for p, d in self.distributions.items()
            )
        except (ValueError, TypeError):
            return False

    def rounded(self, params: dict[str, Any]) -> dict[str, Any]:
        """Floats as their decimal strings say (what the trial really runs with)."""
        out = dict(params)
        for path, distribution in self.distributions.items():
            if isinstance(distribution, FloatDistribution):
                value = float(format_decimal(float(out[path])))
                out[path] = min(max(value, distribution.low), distribution.high)
        return out

    def spec_values(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{path: value}`` in the form each FineTuneJob field takes."""
        return {path: spec_value(self.fields[path], params[path]) for path in self.fields}

    def shown(self, params: dict[str, Any]) -> dict[str, str]:
        return {path: shown(value) for path, value in self.spec_values(params).items()}


# --------------------------------------------------------------------------- trials


@dataclass
class TrialView:
    """What the sweep needs to know about one trial (a child FineTuneJob)."""

    name: str
    number: int
    params: dict[str, Any]
    job_state: str
    state: TrialState
    value: float | None
    intermediate: dict[int, float]
    pruner_state: dict[str, Any]
    pruned: str | None
    artifact_uri: str | None
    message: str
    annotations: dict[str, str] = field(default_factory=dict)
    suspended: bool = False  # the trial's spec.suspend

    @property
    def finished(self) -> bool:
        return self.state != TrialState.RUNNING

    @property
    def table_state(self) -> str:
        return "Pruned" if self.pruned is not None else self.job_state


def _json_annotation(annotations: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(annotations.get(key) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _number(meta: dict[str, Any]) -> int | None:
    label = (meta.get("labels") or {}).get(TRIAL_LABEL)
    tail = str(meta.get("name", "")).rsplit("-", 1)[-1]
    for text in (label, tail):
        if text is not None and str(text).isdigit():
            return int(text)
    return None


def objective_value(status: dict[str, Any], metric: str) -> float | None:
    """A trial's objective from its status.metrics (perplexity from evalLoss if need be)."""
    metrics = status.get("metrics") or {}
    value = metrics.get(metric)
    if value is None and metric == "perplexity" and metrics.get("evalLoss") is not None:
        value = _objective(float(metrics["evalLoss"]), metric)
    return None if value is None else float(value)


def _objective(eval_loss: float, metric: str) -> float:
    """The objective an eval loss stands for (evalLoss, or perplexity)."""
    return math.exp(min(eval_loss, 50.0)) if metric == "perplexity" else eval_loss


def _observed_step(status: dict[str, Any], metric: str, eval_every: int) -> int | None:
    """The step the latest objective value in the status belongs to: evaluations run every
    ``eval_every`` steps, so the latest eval loss is from the last multiple of it."""
    step = int((status.get("progress") or {}).get("step") or 0)
    if step <= 0:
        return None
    if metric != "trainLoss" and eval_every > 0:
        return step - step % eval_every or None
    return step


def view_trial(child: dict[str, Any], metric: str, eval_every: int = 0) -> TrialView | None:
    """The trial a child FineTuneJob is (None when it is not one of a sweep's trials)."""
    meta = child.get("metadata") or {}
    number = _number(meta)
    if number is None:
        return None
    annotations = dict(meta.get("annotations") or {})
    status = child.get("status") or {}
    job_state = status.get("state") or "Pending"
    value = objective_value(status, metric)
    pruned = annotations.get(PRUNED_ANNOTATION)
    intermediate: dict[int, float] = {}
    for key, item in _json_annotation(annotations, INTERMEDIATE_ANNOTATION).items():
        if str(key).isdigit() and isinstance(item, int | float):
            intermediate[int(key)] = float(item)
    if metric != "trainLoss":  # the trainer's own record of its evaluations, when it has one
        for evaluation in status.get("evaluations") or []:
            step, loss = evaluation.get("step"), evaluation.get("evalLoss")
            if isinstance(step, int) and step > 0 and isinstance(loss, int | float):
                intermediate[step] = _objective(float(loss), metric)
    state = TrialState.RUNNING
    if pruned is not None:
        state = TrialState.PRUNED
    elif job_state == "Succeeded":
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
    elif job_state in ("Failed", "Invalid"):
        state = TrialState.FAIL
    message = str(status.get("message") or "")
    if job_state == "Succeeded" and value is None:
        message = f"the trial reported no {metric}"
    return TrialView(
        name=str(meta.get("name", "")),
        number=number,
        params=_json_annotation(annotations, PARAMS_ANNOTATION),
        job_state=job_state,
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        intermediate=intermediate,
        pruner_state=_json_annotation(annotations, PRUNER_ANNOTATION),
        pruned=pruned,
        artifact_uri=(status.get("artifact") or {}).get("uri"),
        suspended=bool((child.get("spec") or {}).get("suspend")),
        message=message,
        annotations=annotations,
    )


def observe_intermediate(
    view: TrialView, child: dict[str, Any], metric: str, eval_every: int
) -> bool:
    """Add the child's latest objective value (if new) to ``view.intermediate``; returns
    whether it added one. A value is new when it differs from the latest recorded one."""
    if view.pruned is not None:
        return False
    status = child.get("status") or {}
    step = _observed_step(status, metric, eval_every)
    metrics = status.get("metrics") or {}
    raw = metrics.get("trainLoss" if metric == "trainLoss" else "evalLoss")
    if step is None or raw is None:
        return False
    value = float(raw) if metric == "trainLoss" else _objective(float(raw), metric)
    if view.intermediate and view.intermediate[max(view.intermediate)] == value:
        return False
    if view.intermediate and step < max(view.intermediate):
        return False
    view.intermediate[step] = value
    return True


def _intermediate_json(intermediate: dict[int, float]) -> str:
    return json.dumps({str(k): intermediate[k] for k in sorted(intermediate)})


# --------------------------------------------------------------------------- the study


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _seed(seed: int, number: int) -> int:
    """The sampler's seed for trial ``number``: a function of the sweep's seed and the
    number only, so a study rebuilt after a restart asks for the same trial."""
    return (seed * 1_000_003 + number) % (2**32)


def make_sampler(spec: FineTuneSweepSpec, number: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``algorithm.type``, seeded for trial ``number``.

    grid is Optuna's BruteForceSampler: it enumerates the finite space from the trials'
    parameters alone (GridSampler keeps its grid ids in trial system attributes, which a
    study rebuilt from the trials would have to forge)."""
    seed = _seed(spec.algorithm.seed, number)
    if spec.algorithm.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.algorithm.type == "grid":
        return optuna.samplers.BruteForceSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(spec: FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    pruning = spec.pruning
    if pruning is None:
        return optuna.pruners.NopPruner()
    if pruning.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=5 if pruning.startupTrials is None else pruning.startupTrials,
            n_warmup_steps=pruning.warmupSteps or 0,
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource="auto" if pruning.minResource is None else pruning.minResource,
        reduction_factor=pruning.reductionFactor or 4,
    )


def frozen_trial(view: TrialView, space: Space) -> FrozenTrial:
    """The Optuna trial a sweep trial is."""
    return optuna.trial.create_trial(
        state=view.state,
        params=view.params,
        distributions=space.distributions,
        value=view.value if view.state == TrialState.COMPLETE else None,
        intermediate_values=dict(view.intermediate),
        system_attrs=dict(view.pruner_state),
    )


def build_study(
    spec: FineTuneSweepSpec, space: Space, views: Iterable[TrialView], *, number: int = 0
) -> optuna.Study:
    """An in-memory study holding the trials (in number order) whose parameters fit the
    space, with the sampler seeded for trial ``number``."""
    _quiet()
    study = optuna.create_study(
        direction=spec.objective.direction,
        sampler=make_sampler(spec, number),
        pruner=make_pruner(spec),
    )
    for view in sorted(views, key=lambda v: v.number):
        if space.fits(view.params):
            study.add_trial(frozen_trial(view, space))
    return study


def trial_spec_problems(template: dict[str, Any], values: dict[str, Any]) -> list[Problem]:
    """Whether the template with these values is a valid FineTuneJob spec."""
    try:
        FineTuneJobSpec.model_validate(apply_parameters(template, values))
    except ValidationError as error:
        return problems_of(error, root=FineTuneJobSpec, prefix="spec")
    return []


def ask(
    spec: FineTuneSweepSpec, space: Space, views: list[TrialView], number: int
) -> dict[str, Any] | None:
    """The parameters of trial ``number``, given the existing trials; None when no valid
    combination was found (``_ASK_ATTEMPTS`` asks gave invalid trial specs)."""
    study = build_study(spec, space, views, number=number)
    template = template_dict(spec)
    for _ in range(_ASK_ATTEMPTS):
        trial = study.ask(fixed_distributions=space.distributions)
        params = space.rounded({path: trial.params[path] for path in space.distributions})
        if not trial_spec_problems(template, space.spec_values(params)):
            return params
        study.tell(trial, state=TrialState.FAIL)
    return None


def grid_exhausted(space: Space, views: Iterable[TrialView]) -> bool:
    if space.grid_size is None:
        return False
    seen = {json.dumps(v.params, sort_keys=True) for v in views if space.fits(v.params)}
    return len(seen) >= space.grid_size


def trial_manifest(
    body: dict[str, Any], sweep: FineTuneSweep, space: Space, number: int, params: dict[str, Any]
) -> dict[str, Any]:
    """The FineTuneJob of trial ``number`` with ``params`` applied to the template."""
    meta = body.get("metadata") or {}
    name = trial_name(sweep.metadata.name, number)
    spec = apply_parameters(template_dict(sweep.spec), space.spec_values(params))
    spec.pop("suspend", None)
    output = dict(spec.get("output") or {})
    output["uri"] = trial_output_uri(str(output.get("uri", "")), name)
    spec["output"] = output
    labels = {SWEEP_LABEL: sweep.metadata.name, TRIAL_LABEL: str(number)}
    for key in KUEUE_LABELS:
        value = (meta.get("labels") or {}).get(key)
        if value:
            labels[key] = value
    annotations = {PARAMS_ANNOTATION: json.dumps(params)}  # in spec.parameters order
    architecture = (meta.get("annotations") or {}).get(ARCHITECTURE_ANNOTATION)
    if architecture:  # each trial's memory is checked at its own parameters (memory.py)
        annotations[ARCHITECTURE_ANNOTATION] = architecture
    metadata: dict[str, Any] = {"name": name, "labels": labels, "annotations": annotations}
    if meta.get("namespace"):
        metadata["namespace"] = meta["namespace"]
    if meta.get("uid"):
        metadata["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": sweep.metadata.name,
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {"apiVersion": API_VERSION, "kind": JOB_KIND, "metadata": metadata, "spec": spec}


# --------------------------------------------------------------------------- reconcile


_STATE_ACTIONS = {"Invalid": "ValidateSpec", "Succeeded": "CompleteSweep", "Failed": "FailSweep"}


class _Builder:
    """The new status and the actions of one reconcile."""

    def __init__(self, body: dict[str, Any], now: datetime) -> None:
        meta = body.get("metadata") or {}
        self.now = now
        self.generation = meta.get("generation")
        self.old = dict(body.get("status") or {})
        self.status = dict(self.old)
        self.status["observedGeneration"] = self.generation
        self.conditions: list[dict[str, Any]] = list(self.old.get("conditions") or [])
        self.decision = SweepDecision(status=self.status)
        self.since = transition_origin(self.old)  # names the Events (see events.py)

    def event(self, type_: str, reason: str, message: str, action: str = "ObserveTrials") -> None:
        self.decision.events.append(Event(type_, reason, message, action, self.since))

    def annotate(self, name: str, key: str, value: str) -> None:
        self.decision.annotate_trials.setdefault(name, {})[key] = value

    def state(self, state: str, reason: str, message: str, *, warning: bool = False) -> None:
        if self.old.get("state") != state:
            action = _STATE_ACTIONS.get(state, "ObserveTrials")
            self.event("Warning" if warning else "Normal", reason, message, action)
        self.status["state"] = state
        self.status["message"] = message
        if state in ("Succeeded", "Failed") and not self.status.get("completionTime"):
            self.status["completionTime"] = c.now_rfc3339(self.now)
        elif state not in ("Succeeded", "Failed"):
            self.status.pop("completionTime", None)

    def finish(self) -> SweepDecision:
        """Ready, Stalled and Reconciling from the state, as for a FineTuneJob."""
        state = str(self.status.get("state"))
        message = str(self.status.get("message") or "")
        for type_, value in (
            (c.READY, state == "Succeeded"),
            (c.STALLED, state in ("Failed", "Invalid")),
            (c.RECONCILING, state in ("Pending", "Running")),
        ):
            self.conditions = c.set_condition(
                self.conditions,
                type_,
                value,
                state,
                message,
                generation=self.generation,
                now=self.now,
            )
        self.status["conditions"] = self.conditions
        return self.decision


def _sweep_document(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec"),
    }


def _storage_problems(spec: FineTuneSweepSpec) -> list[Problem]:
    output = spec.template.output
    if output is not None and not output.uri.startswith("s3://"):
        return [
            Problem(
                "spec.template.output.uri",
                f"must be an s3:// URI on a cluster (got {output.uri!r})",
                "a pod's local disk is gone when it exits; use object storage",
            )
        ]
    return []


def _describe(params: dict[str, str]) -> str:
    return ", ".join(f"{path}={value}" for path, value in params.items())


def _prune(b: _Builder, spec: FineTuneSweepSpec, space: Space, views: list[TrialView]) -> None:
    """Ask the pruner about every running trial with intermediate values; a pruned trial is
    annotated (so it stays pruned) and listed in stop_trials. What the pruner keeps per
    trial (successive halving's rungs) is recorded on the trial too."""
    if spec.pruning is None:
        return
    study = build_study(spec, space, views)
    fitting = [v for v in sorted(views, key=lambda v: v.number) if space.fits(v.params)]
    against = (
        "the median of the finished trials at that step"
        if spec.pruning.type == "median"
        else "the best 1/reductionFactor of the trials at that rung"
    )
    for index, view in enumerate(fitting):
        if view.finished or not view.intermediate:
            continue
        pruned = study.pruner.prune(study, study.trials[index])
        attrs = study.trials[index].system_attrs  # what the pruner keeps (rungs)
        if attrs != view.pruner_state:
            view.pruner_state = dict(attrs)
            b.annotate(view.name, PRUNER_ANNOTATION, json.dumps(attrs, sort_keys=True))
        if pruned:
            step = max(view.intermediate)
            metric = spec.objective.metric
            reason = (
                f"pruned at step {step}: {metric} {view.intermediate[step]:.4g} is worse "
                f"than {against}"
            )
            view.pruned = reason
            view.state = TrialState.PRUNED
            b.annotate(view.name, PRUNED_ANNOTATION, reason)
            b.decision.stop_trials.append(view.name)
            b.event("Normal", "TrialPruned", f"trial {view.name} {reason}", "PruneTrial")


def _best(views: list[TrialView], direction: str) -> TrialView | None:
    complete = [v for v in views if v.state == TrialState.COMPLETE and v.value is not None]
    if not complete:
        return None
    sign = 1.0 if direction == "minimize" else -1.0
    return min(complete, key=lambda v: (sign * float(v.value or 0.0), v.number))


def _trial_events(b: _Builder, views: list[TrialView], metric: str) -> None:
    """An event when a trial is first seen finished."""
    old = {row.get("name"): row.get("state") for row in b.old.get("trials") or []}
    for view in views:
        if not view.finished or view.pruned is not None:
            continue
        if old.get(view.name) == view.table_state:
            continue
        if view.state == TrialState.COMPLETE:
            b.event("Normal", "TrialSucceeded", f"trial {view.name}: {metric} {view.value:.4g}")
        else:
            detail = f": {view.message}" if view.message else ""
            b.event("Warning", "TrialFailed", f"trial {view.name} {view.job_state.lower()}{detail}")


def reconcile_sweep(
    body: dict[str, Any],
    trials: list[dict[str, Any]],
    *,
    now: datetime | None = None,
    require_object_storage: bool = True,
    policies: Sequence[FineTunePolicy] = (),
) -> SweepDecision:
    """The next step for the FineTuneSweep ``body`` given its ``trials`` (the FineTuneJobs
    labelled ``kubetune.io/sweep=<name>``, with their status) and its namespace's
    FineTunePolicies (trials that would break them are not created: the sweep is Invalid,
    reason PolicyViolation).

    ``require_object_storage`` is False only for ``kubetune sweep`` (local outputs)."""
    b = _Builder(body, now or datetime.now(UTC))
    try:
        sweep = parse_sweep(_sweep_document(body))
        problems = _storage_problems(sweep.spec) if require_object_storage else []
    except InvalidManifest as invalid:
        problems = invalid.problems
    if problems:
        message = "; ".join(str(p).replace("\n    hint:", " — hint:") for p in problems)
        b.state("Invalid", "InvalidSpec", message, warning=True)
        return b.finish()
    refused = sweep_violations(sweep.spec, policies) if policies else []
    if refused:
        b.state("Invalid", POLICY_VIOLATION, "; ".join(v.message for v in refused), warning=True)
        return b.finish()
    spec = sweep.spec
    space = Space(spec)
    metric = spec.objective.metric
    eval_every = spec.template.training.evalEverySteps
    name = sweep.metadata.name

    views: list[TrialView] = []
    for child in trials:
        labels = (child.get("metadata") or {}).get("labels") or {}
        view = view_trial(child, metric, eval_every)
        if labels.get(SWEEP_LABEL) != name or view is None:
            continue
        observe_intermediate(view, child, metric, eval_every)
        recorded = _intermediate_json(view.intermediate)
        if view.intermediate and view.annotations.get(INTERMEDIATE_ANNOTATION) != recorded:
            b.annotate(view.name, INTERMEDIATE_ANNOTATION, recorded)
        views.append(view)
    views.sort(key=lambda v: v.number)

    # A trial marked pruned but still running (the operator stopped between annotating and
    # suspending it) is suspended now.
    for view in views:
        if view.pruned and not view.suspended and view.job_state not in TERMINAL_STATES:
            b.decision.stop_trials.append(view.name)
    _prune(b, spec, space, views)
    _trial_events(b, views, metric)

    # New trials for the free slots, while the budget and the failure limit allow.
    failed = sum(v.state == TrialState.FAIL for v in views)
    running = sum(not v.finished for v in views)
    too_many_failures = failed > spec.maxFailedTrials
    next_number = max((v.number for v in views), default=-1) + 1
    unfit = False
    if not too_many_failures:
        free = min(spec.parallelTrials - running, spec.maxTrials - len(views))
        for _ in range(max(free, 0)):
            if grid_exhausted(space, views):
                break
            params = ask(spec, space, views, next_number)
            if params is None:
                unfit = True
                break
            manifest = trial_manifest(body, sweep, space, next_number, params)
            b.decision.create_trials.append(manifest)
            shown_params = space.shown(params)
            b.event(
                "Normal",
                "TrialCreated",
                f"created trial {manifest['metadata']['name']}: {_describe(shown_params)}",
                "CreateTrial",
            )
            views.append(
                TrialView(
                    name=manifest["metadata"]["name"],
                    number=next_number,
                    params=params,
                    job_state="Pending",
                    state=TrialState.RUNNING,
                    value=None,
                    intermediate={},
                    pruner_state={},
                    pruned=None,
                    artifact_uri=None,
                    message="",
                )
            )
            next_number += 1

    _write_status(b, spec, space, views)
    counts = b.status["counts"]
    best = b.status.get("bestTrial")
    exhausted = len(views) >= spec.maxTrials or grid_exhausted(space, views)
    if too_many_failures:
        still = f"; {counts['running']} still running" if counts["running"] else ""
        b.state(
            "Failed",
            "TooManyFailedTrials",
            f"{failed} trials failed, more than maxFailedTrials ({spec.maxFailedTrials}): "
            f"no new trials start{still}",
            warning=True,
        )
    elif unfit and counts["running"] == 0:
        b.state(
            "Failed",
            "NoValidTrial",
            f"{_ASK_ATTEMPTS} parameter combinations in a row gave an invalid trial spec; "
            "narrow the parameters so that they combine into valid FineTuneJob specs",
            warning=True,
        )
    elif exhausted and counts["running"] == 0:
        if best is None:
            b.state(
                "Failed",
                "NoTrialSucceeded",
                f"all {counts['total']} trials finished and none reported {metric}",
                warning=True,
            )
        else:
            b.state(
                "Succeeded",
                "SweepCompleted",
                f"{counts['total']} trials; best {best['name']} with {metric} "
                f"{best['value']:.4g} ({_describe(best['parameters'])})",
            )
    else:
        best_text = f"; best {best['name']} ({metric} {best['value']:.4g})" if best else ""
        b.state(
            "Running",
            "TrialsRunning",
            f"{counts['done']}/{spec.maxTrials} trials done, {counts['running']} running"
            + best_text,
        )
    return b.finish()


def _write_status(
    b: _Builder, spec: FineTuneSweepSpec, space: Space, views: list[TrialView]
) -> None:
    counts = {
        "total": len(views),
        "running": sum(not v.finished for v in views),
        "succeeded": sum(v.state == TrialState.COMPLETE for v in views),
        "failed": sum(v.state == TrialState.FAIL for v in views),
        "pruned": sum(v.state == TrialState.PRUNED for v in views),
    }
    counts["done"] = counts["succeeded"] + counts["failed"] + counts["pruned"]
    b.status["counts"] = counts
    b.status["trials"] = [
        {
            "name": v.name,
            "parameters": _shown_params(space, v.params),
            "state": v.table_state,
            **({"value": v.value} if v.value is not None else {}),
        }
        for v in views
    ]
    best = _best(views, spec.objective.direction)
    if best is None:
        b.status.pop("bestTrial", None)
    else:
        b.status["bestTrial"] = {
            "name": best.name,
            "parameters": _shown_params(space, best.params),
            "value": best.value,
            **({"artifactUri": best.artifact_uri} if best.artifact_uri else {}),
        }


def _shown_params(space: Space, params: dict[str, Any]) -> dict[str, str]:
    """Recorded parameters as strings; those of an older spec are shown as recorded."""
    if space.fits(params):
        return space.shown(params)
    return {path: shown(value) for path, value in params.items()}
