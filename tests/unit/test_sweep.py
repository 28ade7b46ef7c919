"""The pure sweep controller: trials named and built deterministically, the Optuna study
rebuilt from the trials alone (so a restart asks for the same next trial), pruning,
the failure limit, success with the best trial."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from optuna.trial import TrialState

from kubetune_operator.api.sweep import parse_sweep
from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.sweep import (
    INTERMEDIATE_ANNOTATION,
    PARAMS_ANNOTATION,
    PRUNED_ANNOTATION,
    PRUNER_ANNOTATION,
    SWEEP_LABEL,
    TRIAL_LABEL,
    Space,
    SweepDecision,
    build_study,
    reconcile_sweep,
    trial_name,
    view_trial,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _body(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "template": {
            "model": {"source": "hf://org/model"},
            "dataset": {"sources": ["s3://data/train.jsonl"]},
            "method": {"type": "lora", "lora": {"alpha": 16}},
            "training": {"maxSteps": 40, "evalEverySteps": 10},
            "output": {"uri": "s3://artifacts/sweeps/lr/"},
        },
        "parameters": [
            {"path": "training.learningRate", "type": "logUniform", "low": "1e-5", "high": "1e-2"},
            {"path": "method.lora.r", "type": "categorical", "values": [4, 8, 16]},
        ],
        "maxTrials": 6,
        "parallelTrials": 2,
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {
            "name": "lr",
            "namespace": "ml",
            "uid": "sweep-uid",
            "generation": 1,
            "labels": {
                "kueue.x-k8s.io/queue-name": "team-a",
                "kueue.x-k8s.io/priority-class": "research",
                "app": "not-copied",
            },
        },
        "spec": spec,
    }


def _objective(params: dict[str, Any]) -> float:
    """A made-up loss landscape: best near learningRate 1e-3 with r 8."""
    learning_rate = params.get("training.learningRate", 1e-3)
    return round(abs(math.log10(learning_rate) + 3) + params["method.lora.r"] / 16, 4)


def _params(child: dict[str, Any]) -> dict[str, Any]:
    return json.loads(child["metadata"]["annotations"][PARAMS_ANNOTATION])


def _finish(child: dict[str, Any], state: str = "Succeeded", value: float | None = None) -> None:
    """Play the FineTuneJob controller: the trial ended."""
    name = child["metadata"]["name"]
    status: dict[str, Any] = {"state": state, "progress": {"step": 40, "totalSteps": 40}}
    if state == "Succeeded":
        loss = _objective(_params(child)) if value is None else value
        status["metrics"] = {"evalLoss": loss, "trainLoss": loss + 0.1}
        status["artifact"] = {"uri": f"s3://artifacts/sweeps/lr/{name}/adapter"}
    else:
        status["message"] = "the trainer ran out of memory"
    child["status"] = status


def _apply(decision: SweepDecision, body: dict[str, Any], children: list[dict[str, Any]]) -> None:
    """Play the handlers: create, annotate, suspend, write status."""
    children += copy.deepcopy(decision.create_trials)
    for child in children:
        name = child["metadata"]["name"]
        child["metadata"].setdefault("annotations", {}).update(
            decision.annotate_trials.get(name, {})
        )
        if name in decision.stop_trials:
            child["spec"]["suspend"] = True
    body["status"] = decision.status


def _run(body: dict[str, Any], children: list[dict[str, Any]], rounds: int) -> SweepDecision:
    """Reconcile, finish the running trials, repeat."""
    decision = reconcile_sweep(body, children, now=NOW)
    for _ in range(rounds):
        _apply(decision, body, children)
        for child in children:
            if "status" not in child:
                _finish(child)
        decision = reconcile_sweep(body, children, now=NOW)
    return decision


# --------------------------------------------------------------------------- trials


def test_first_reconcile_creates_parallel_trials_named_labelled_owned_and_applied() -> None:
    decision = reconcile_sweep(_body(), [], now=NOW)
    assert [t["metadata"]["name"] for t in decision.create_trials] == ["lr-0", "lr-1"]
    trial = decision.create_trials[0]
    meta = trial["metadata"]
    assert meta["namespace"] == "ml"
    assert meta["labels"] == {
        SWEEP_LABEL: "lr",
        TRIAL_LABEL: "0",
        "kueue.x-k8s.io/queue-name": "team-a",
        "kueue.x-k8s.io/priority-class": "research",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "name": "lr",
            "uid": "sweep-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    params = _params(trial)
    spec = trial["spec"]
    assert spec["output"]["uri"] == "s3://artifacts/sweeps/lr/lr-0"
    assert spec["training"]["learningRate"] == f"{params['training.learningRate']:.6g}"
    assert isinstance(spec["training"]["learningRate"], str)
    assert spec["method"]["lora"] == {"alpha": 16, "r": params["method.lora.r"]}
    assert spec["training"]["maxSteps"] == 40
    parse_manifest(trial)  # a valid FineTuneJob
    assert decision.status["state"] == "Running"
    assert decision.status["counts"]["running"] == 2
    assert [e.reason for e in decision.events].count("TrialCreated") == 2


def test_trial_names_are_deterministic_and_continue_after_the_highest_number() -> None:
    assert trial_name("lr", 7) == "lr-7"
    body = _body(parallelTrials=3)
    first = reconcile_sweep(body, [], now=NOW).create_trials
    again = reconcile_sweep(body, [], now=NOW).create_trials
    assert first == again
    # Trial lr-1 was deleted by hand: the next is lr-3, never a reused lr-1.
    children = [copy.deepcopy(first[0]), copy.deepcopy(first[2])]
    names = [t["metadata"]["name"] for t in reconcile_sweep(body, children).create_trials]
    assert names == ["lr-3"]


def test_a_restart_between_two_creates_asks_for_the_same_trial() -> None:
    body = _body()
    both = reconcile_sweep(body, [], now=NOW).create_trials
    # The operator died after creating lr-0: the restarted one asks for lr-1 again.
    after_restart = reconcile_sweep(body, [copy.deepcopy(both[0])], now=NOW).create_trials
    assert after_restart == [both[1]]
    # And nothing more while both run.
    assert reconcile_sweep(body, copy.deepcopy(both), now=NOW).create_trials == []


def test_the_study_rebuilt_from_the_trials_is_the_study_that_produced_them() -> None:
    body = _body()
    children: list[dict[str, Any]] = []
    _apply(_run(body, children, rounds=2), body, children)  # 4 finished, 2 just created
    spec = parse_sweep(body).spec
    space = Space(spec)
    views = [view_trial(c, "evalLoss") for c in children]
    study = build_study(spec, space, [v for v in views if v is not None])
    assert len(study.trials) == len(children) == 6
    for trial, child in zip(study.trials, children, strict=True):
        assert trial.params == _params(child)
        if "status" in child:
            assert trial.state == TrialState.COMPLETE
            assert trial.value == child["status"]["metrics"]["evalLoss"]
        else:
            assert trial.state == TrialState.RUNNING
    # Finishing two trials: the next asks are the same from any copy of the trials.
    for child in children[4:]:
        _finish(child)
    one = reconcile_sweep(body, copy.deepcopy(children), now=NOW).create_trials
    two = reconcile_sweep(copy.deepcopy(body), copy.deepcopy(children), now=NOW).create_trials
    assert one == two
    assert [t["metadata"]["name"] for t in one] == []  # maxTrials 6 reached
    assert len({json.dumps(_params(c), sort_keys=True) for c in children}) == 6  # no repeats


def test_success_names_the_best_trial_and_its_artifact() -> None:
    body = _body()
    children: list[dict[str, Any]] = []
    decision = _run(body, children, rounds=3)
    status = decision.status
    assert status["state"] == "Succeeded", status["message"]
    assert status["counts"] == {
        "total": 6,
        "running": 0,
        "succeeded": 6,
        "failed": 0,
        "pruned": 0,
        "done": 6,
    }
    values = {c["metadata"]["name"]: c["status"]["metrics"]["evalLoss"] for c in children}
    best = min(values, key=lambda name: values[name])
    assert status["bestTrial"]["name"] == best
    assert status["bestTrial"]["value"] == values[best]
    assert status["bestTrial"]["artifactUri"] == f"s3://artifacts/sweeps/lr/{best}/adapter"
    assert set(status["bestTrial"]["parameters"]) == {"training.learningRate", "method.lora.r"}
    assert [row["name"] for row in status["trials"]] == [f"lr-{n}" for n in range(6)]
    assert all(isinstance(v, str) for v in status["trials"][0]["parameters"].values())
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Stalled": "False", "Reconciling": "False"}
    assert status["completionTime"] == "2026-05-01T12:00:00Z"
    assert "SweepCompleted" in [e.reason for e in decision.events]
    # Nothing more happens.
    _apply(decision, body, children)
    again = reconcile_sweep(body, children, now=NOW)
    assert again.create_trials == [] and again.status["state"] == "Succeeded"
    assert "SweepCompleted" not in [e.reason for e in again.events]


def test_maximize_picks_the_highest_value() -> None:
    body = _body(objective={"metric": "evalLoss", "direction": "maximize"}, maxTrials=2)
    children: list[dict[str, Any]] = []
    decision = _run(body, children, rounds=1)
    values = {c["metadata"]["name"]: c["status"]["metrics"]["evalLoss"] for c in children}
    assert decision.status["bestTrial"]["name"] == max(values, key=lambda n: values[n])


def test_more_failed_trials_than_max_failed_trials_fail_the_sweep() -> None:
    body = _body(maxFailedTrials=1, parallelTrials=2)
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    _finish(children[0], "Failed")
    decision = reconcile_sweep(body, children, now=NOW)
    assert decision.status["state"] == "Running"  # one failure is tolerated
    assert [t["metadata"]["name"] for t in decision.create_trials] == ["lr-2"]
    assert "TrialFailed" in [e.reason for e in decision.events]
    _apply(decision, body, children)
    _finish(children[1], "Invalid")
    decision = reconcile_sweep(body, children, now=NOW)
    assert decision.create_trials == []
    status = decision.status
    assert status["state"] == "Failed"
    assert status["message"] == (
        "2 trials failed, more than maxFailedTrials (1): no new trials start; 1 still running"
    )
    assert status["counts"]["failed"] == 2
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "False", "Stalled": "True", "Reconciling": "False"}


def test_a_trial_that_succeeds_without_the_objective_counts_as_failed() -> None:
    body = _body(maxTrials=1, parallelTrials=1)
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    children[0]["status"] = {"state": "Succeeded", "metrics": {"trainLoss": 1.0}}
    status = reconcile_sweep(body, children, now=NOW).status
    assert status["counts"]["failed"] == 1
    assert status["state"] == "Failed"
    assert "none reported evalLoss" in status["message"]


def test_invalid_sweep_is_marked_invalid_and_creates_nothing() -> None:
    body = _body()
    body["spec"]["parameters"][1]["path"] = "method.lora.rank"
    decision = reconcile_sweep(body, [], now=NOW)
    assert decision.create_trials == []
    assert decision.status["state"] == "Invalid"
    assert (
        "spec.parameters[1].path: 'method.lora.rank' is not a field" in decision.status["message"]
    )
    assert [(e.reason, e.action) for e in decision.events] == [("InvalidSpec", "ValidateSpec")]
    assert decision.events[0].since  # names the Event: one across operator restarts
    body = _body()
    body["spec"]["template"]["output"]["uri"] = "/tmp/local"
    status = reconcile_sweep(body, [], now=NOW).status
    assert status["state"] == "Invalid"
    assert status["message"].startswith("spec.template.output.uri: must be an s3:// URI")


def test_grid_runs_every_combination_once_then_succeeds() -> None:
    body = _body(
        parameters=[
            {"path": "method.lora.r", "type": "categorical", "values": [4, 8]},
            {"path": "training.warmupPercent", "type": "int", "low": 0, "high": 10, "step": 5},
        ],
        algorithm={"type": "grid", "seed": 3},
        maxTrials=20,
        parallelTrials=4,
    )
    children: list[dict[str, Any]] = []
    decision = _run(body, children, rounds=2)
    combos = {json.dumps(_params(c), sort_keys=True) for c in children}
    assert len(children) == len(combos) == 6
    assert decision.status["state"] == "Succeeded"


# --------------------------------------------------------------------------- pruning


def _running(child: dict[str, Any], step: int, eval_loss: float) -> None:
    child["status"] = {
        "state": "Running",
        "progress": {"step": step, "totalSteps": 40},
        "metrics": {"evalLoss": eval_loss, "trainLoss": eval_loss},
    }


def test_intermediate_values_are_recorded_on_the_trial_at_their_eval_step() -> None:
    body = _body(pruning={"type": "median", "startupTrials": 1})
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    _running(children[0], 13, 2.5)  # the latest eval ran at step 10
    decision = reconcile_sweep(body, children, now=NOW)
    recorded = decision.annotate_trials["lr-0"][INTERMEDIATE_ANNOTATION]
    assert json.loads(recorded) == {"10": 2.5}
    _apply(decision, body, children)
    _running(children[0], 17, 2.5)  # no new evaluation yet: nothing to write
    assert "lr-0" not in reconcile_sweep(body, children, now=NOW).annotate_trials
    _running(children[0], 21, 2.1)
    decision = reconcile_sweep(body, children, now=NOW)
    assert json.loads(decision.annotate_trials["lr-0"][INTERMEDIATE_ANNOTATION]) == {
        "10": 2.5,
        "20": 2.1,
    }


def _with_history(child: dict[str, Any], history: dict[int, float]) -> None:
    child["metadata"]["annotations"][INTERMEDIATE_ANNOTATION] = json.dumps(
        {str(k): v for k, v in history.items()}
    )


@pytest.mark.parametrize(
    "pruning",
    [
        {"type": "median", "startupTrials": 2},
        {"type": "successiveHalving", "minResource": 10, "reductionFactor": 2},
    ],
)
def test_a_clearly_worse_trial_is_pruned_suspended_and_recorded_as_pruned(
    pruning: dict[str, Any],
) -> None:
    body = _body(pruning=pruning, parallelTrials=3, maxTrials=5)
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    assert len(children) == 3
    # Two good trials finished, with their evaluations on record.
    for child, loss in zip(children[:2], (1.0, 1.1), strict=True):
        _with_history(child, {10: loss + 0.5, 20: loss + 0.2, 30: loss + 0.1, 40: loss})
        _finish(child, value=loss)
    if pruning["type"] == "successiveHalving":
        # What the pruner recorded while they ran (their rungs).
        for child, loss in zip(children[:2], (1.5, 1.6), strict=True):
            child["metadata"]["annotations"][PRUNER_ANNOTATION] = json.dumps(
                {"completed_rung_0": loss}
            )
    # The third is far worse at its first evaluation.
    _running(children[2], 11, 4.0)
    decision = reconcile_sweep(body, children, now=NOW)
    assert decision.stop_trials == ["lr-2"]
    reason = decision.annotate_trials["lr-2"][PRUNED_ANNOTATION]
    assert reason.startswith("pruned at step 10: evalLoss 4 is worse than")
    assert "TrialPruned" in [e.reason for e in decision.events]
    status = decision.status
    assert status["counts"]["pruned"] == 1 and status["counts"]["failed"] == 0
    assert status["trials"][2]["state"] == "Pruned"
    # Its slot is free: two new trials fill the 3 parallel slots up to maxTrials 5.
    assert [t["metadata"]["name"] for t in decision.create_trials] == ["lr-3", "lr-4"]

    # After the handlers applied it (suspended, annotated), it stays pruned.
    _apply(decision, body, children)
    children[2]["status"]["state"] = "Suspended"
    again = reconcile_sweep(body, children, now=NOW)
    assert again.stop_trials == [] and again.status["counts"]["pruned"] == 1
    assert "TrialPruned" not in [e.reason for e in again.events]


def test_a_good_running_trial_is_not_pruned() -> None:
    body = _body(pruning={"type": "median", "startupTrials": 2}, parallelTrials=3)
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    for child, loss in zip(children[:2], (1.0, 1.1), strict=True):
        _with_history(child, {10: loss + 0.5, 20: loss + 0.2})
        _finish(child, value=loss)
    _running(children[2], 11, 1.2)
    decision = reconcile_sweep(body, children, now=NOW)
    assert decision.stop_trials == [] and decision.status["counts"]["pruned"] == 0
    assert decision.status["trials"][2]["state"] == "Running"


def test_a_trials_own_evaluation_history_feeds_the_pruner() -> None:
    """status.evaluations holds every recent evaluation, so a poll that missed one (the
    status shows only the latest eval loss) loses nothing."""
    body = _body(pruning={"type": "median", "startupTrials": 1}, parallelTrials=2)
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    children[0]["status"] = {
        "state": "Succeeded",
        "metrics": {"evalLoss": 1.0},
        "evaluations": [
            {"step": 0, "evalLoss": 7.0},  # before training: not an intermediate value
            {"step": 10, "evalLoss": 1.5},
            {"step": 20, "evalLoss": 1.2},
        ],
    }
    _running(children[1], 27, 4.0)  # latest eval at 20; the one at 10 only in the history
    children[1]["status"]["evaluations"] = [
        {"step": 10, "evalLoss": 4.5},
        {"step": 20, "evalLoss": 4.0},
    ]
    decision = reconcile_sweep(body, children, now=NOW)
    assert decision.stop_trials == ["lr-1"]
    recorded = json.loads(decision.annotate_trials["lr-1"][INTERMEDIATE_ANNOTATION])
    assert recorded == {"10": 4.5, "20": 4.0}


def test_a_trial_marked_pruned_but_not_yet_suspended_is_suspended() -> None:
    """The operator annotated the trial as pruned and died before suspending it."""
    body = _body(pruning={"type": "median", "startupTrials": 1})
    children = copy.deepcopy(reconcile_sweep(body, [], now=NOW).create_trials)
    _running(children[0], 13, 2.5)
    children[0]["metadata"]["annotations"][PRUNED_ANNOTATION] = "pruned at step 10: ..."
    decision = reconcile_sweep(body, children, now=NOW)
    assert decision.stop_trials == ["lr-0"]
    children[0]["spec"]["suspend"] = True
    assert reconcile_sweep(body, children, now=NOW).stop_trials == []


def test_trials_cleaned_up_after_their_ttl_change_nothing_in_the_sweep() -> None:
    """A finished trial's Jobs and pods are deleted after its TTL (the job reconciler
    records WorkloadsDeleted): the sweep reads only its trials' status, so its result,
    its trials and its decisions stay the same."""
    from kubetune_operator.reconcile import reconcile

    body = _body()
    children: list[dict[str, Any]] = []
    decision = _run(body, children, rounds=3)
    assert decision.status["state"] == "Succeeded"
    _apply(decision, body, children)
    before = reconcile_sweep(body, children, now=NOW)
    for child in children:
        child["status"]["completionTime"] = "2026-05-01T11:00:00Z"
        child["metadata"].update(namespace="ns", uid=f"uid-{child['metadata']['name']}")
        cleaned = reconcile(child, [], [], image="t", now=NOW, ttl_seconds_after_finished=0)
        assert any(c["type"] == "WorkloadsDeleted" for c in cleaned.status["conditions"])
        child["status"] = cleaned.status
    after = reconcile_sweep(body, children, now=NOW)
    assert after.status == before.status
    assert after.create_trials == [] and after.stop_trials == [] and after.events == []
