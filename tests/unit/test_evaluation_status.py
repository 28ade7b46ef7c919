"""spec.evaluation through the API, the translation, and back onto status: the gate's
condition, status.promotedArtifact, the operator's gauges and the Argo CD health check."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lupa
import pytest
from prometheus_client import generate_latest

from kubetune_operator.api.validation import parse_manifest, validate_manifest
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.reconcile import reconcile, spec_json
from kubetune_operator.translate import trainer_config
from kubetune_operator.workload import ATTEMPT_LABEL, COMPLETION_INDEX, JOB_LABEL, SPEC_ANNOTATION

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 2, 3, 0, 0, tzinfo=UTC)
LUA = Path(__file__).parents[2] / "helm" / "kubetune" / "files" / "finetunejob-health.lua"
ARTIFACT = {"uri": "s3://out/job/adapter", "digest": "sha256:ab", "sizeBytes": 10}
GATE = {"metric": "exactMatch", "threshold": "0.3", "minImprovement": "0.1"}
EVALUATION = {"metrics": ["exactMatch", "rougeL"], "maxSamples": 16, "gate": GATE}


def _job(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"sources": ["s3://data/train.jsonl"]},
            "output": {"uri": "s3://out/job", "credentialsSecretRef": {"name": "s3"}},
            **spec,
        },
        "status": {"state": "Running", "attempts": 1},
    }


def _report(passed: bool | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "metrics": {
            "evalLoss": {"base": 7.1, "tuned": 1.2, "delta": -5.9},
            "exactMatch": {"base": 0.0, "tuned": 0.5625 if passed else 0.0, "delta": 0.5625},
        },
        "samples": 16,
        "headline": "exactMatch 0->0.5625 (+0.5625)",
    }
    if passed is not None:
        message = "gate passed: ok: ..." if passed else "gate failed: FAILED: exactMatch 0 >= 0.3"
        report["gate"] = {"metric": "exactMatch", "passed": passed, "message": message}
    return report


def _succeeded(job: dict[str, Any], report: dict[str, Any] | None) -> Any:
    started = spec_json(parse_manifest(job))
    result: dict[str, Any] = {"artifact": ARTIFACT, "metrics": {"train_loss": 1.0}}
    if report is not None:
        result["evaluation"] = report
    terminated = {"exitCode": 0, "reason": "Completed", "message": json.dumps(result)}
    attempt = {
        "metadata": {
            "name": "job-attempt-1",
            "uid": "a-1",
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: "1"},
            "annotations": {SPEC_ANNOTATION: started},
        },
        "spec": {"completions": 1, "parallelism": 1, "suspend": False},
        "status": {"conditions": [{"type": "Complete", "status": "True", "reason": ""}]},
    }
    pod = {
        "metadata": {
            "name": "job-attempt-1-0-abcde",
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: "1"},
            "annotations": {COMPLETION_INDEX: "0"},
        },
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [{"state": {"terminated": terminated}}],
        },
    }
    return reconcile(job, [attempt], [pod], image="trainer:test", now=NOW)


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), None)


# --------------------------------------------------------------------------- API


def test_evaluation_spec_translates_to_the_trainer_config() -> None:
    job = parse_manifest(
        _job(
            evaluation={
                **EVALUATION,
                "test": {"percent": 10},
                "retention": {"sources": ["s3://data/general.jsonl"]},
                "gate": {**GATE, "maxRetentionLossIncrease": "0.25"},
            }
        )
    )
    config = trainer_config(job).evaluation
    assert config is not None
    assert config.test_ratio == pytest.approx(0.1) and config.test_sources == []
    assert config.retention_sources == ["s3://data/general.jsonl"]
    assert config.metrics == ["exactMatch", "rougeL"]
    assert (config.max_samples, config.max_new_tokens, config.baseline) == (16, 64, True)
    assert config.gate is not None
    assert (config.gate.threshold, config.gate.min_improvement) == (0.3, 0.1)
    assert config.gate.max_retention_loss_increase == 0.25
    assert trainer_config(parse_manifest(_job())).evaluation is None


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        (
            {"gate": {"metric": "rougeL", "threshold": "0.3"}},
            "spec.evaluation.metrics: gate.metric is a task metric: list it in "
            "evaluation.metrics too",
        ),
        (
            {"gate": {"metric": "testLoss", "threshold": "2"}},
            "spec.evaluation.test: gate.metric testLoss needs evaluation.test",
        ),
        (
            {"gate": {"metric": "evalLoss", "threshold": "2", "maxRetentionLossIncrease": "1"}},
            "spec.evaluation.retention: gate.maxRetentionLossIncrease needs evaluation.retention",
        ),
        (
            {"baseline": False, "gate": {"metric": "evalLoss", "minImprovement": "0.05"}},
            "spec.evaluation.baseline: gate.minImprovement and gate.maxRetentionLossIncrease "
            "compare with the base model: keep baseline true",
        ),
        (
            {"gate": {"metric": "evalLoss"}},
            "spec.evaluation.gate.threshold: gate needs threshold or minImprovement (or both)",
        ),
        (
            {"test": {"percent": 10, "sources": ["s3://data/test.jsonl"]}},
            "spec.evaluation.test.percent: set test.percent or test.sources (one of them)",
        ),
        (
            {"metrics": ["accuracy"]},
            "spec.evaluation.metrics[0]: must be one of",
        ),
    ],
)
def test_evaluation_rules_name_the_field(evaluation: dict[str, Any], message: str) -> None:
    problems = [f"{p.path}: {p.message}" for p in validate_manifest(_job(evaluation=evaluation))]
    assert len(problems) == 1 and problems[0].startswith(message), problems


# --------------------------------------------------------------------------- status


def test_a_passed_gate_promotes_the_artifact() -> None:
    decision = _succeeded(_job(evaluation=EVALUATION), _report(True))
    status = decision.status
    assert status["state"] == "Succeeded"
    assert status["promotedArtifact"] == ARTIFACT == status["artifact"]
    condition = _condition(status, "EvaluationPassed")
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("True", "GatePassed")
    metrics = {m["name"]: m for m in status["evaluation"]["metrics"]}
    assert metrics["exactMatch"] == {
        "name": "exactMatch",
        "base": 0.0,
        "tuned": 0.5625,
        "delta": 0.5625,
    }
    assert status["evaluation"]["samples"] == 16
    assert status["evaluation"]["headline"] == "exactMatch 0->0.5625 (+0.5625)"


def test_a_failed_gate_keeps_the_artifact_but_does_not_promote_it() -> None:
    old = _job(evaluation=EVALUATION)
    old["status"]["promotedArtifact"] = ARTIFACT  # never left from anything earlier
    decision = _succeeded(old, _report(False))
    status = decision.status
    assert status["state"] == "Succeeded"  # the job did its work: the artifact is there
    assert status["artifact"] == ARTIFACT
    assert "promotedArtifact" not in status
    condition = _condition(status, "EvaluationPassed")
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "GateFailed")
    assert "exactMatch 0 >= 0.3" in condition["message"]
    assert "not promoted" in status["message"]
    assert status["evaluation"]["gate"]["passed"] is False


def test_without_a_gate_every_succeeded_job_is_promoted() -> None:
    decision = _succeeded(_job(evaluation={"metrics": ["exactMatch"]}), _report(None))
    assert decision.status["promotedArtifact"] == ARTIFACT
    assert _condition(decision.status, "EvaluationPassed") is None
    plain = _succeeded(_job(), None)
    assert plain.status["promotedArtifact"] == ARTIFACT and "evaluation" not in plain.status


def test_a_gate_without_a_report_is_unknown_and_not_promoted() -> None:
    decision = _succeeded(_job(evaluation=EVALUATION), None)
    assert "promotedArtifact" not in decision.status
    condition = _condition(decision.status, "EvaluationPassed")
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("Unknown", "NotEvaluated")


def test_operator_gauges_carry_the_evaluation() -> None:
    metrics = OperatorMetrics()
    status = _succeeded(_job(evaluation=EVALUATION), _report(False)).status
    metrics.observe_status("ns", "job", status)
    text = generate_latest(metrics.registry).decode()
    assert (
        'kubetune_job_evaluation{metric="evalLoss",model="base",name="job",namespace="ns"} 7.1'
        in text
    )
    assert 'kubetune_job_evaluation_gate_passed{name="job",namespace="ns"} 0.0' in text
    metrics.forget("ns", "job")
    text = generate_latest(metrics.registry).decode()
    assert 'name="job"' not in text


# --------------------------------------------------------------------------- Argo CD


def _argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = runtime.execute(f"return function(obj)\n{LUA.read_text()}\nend")
    result = check(runtime.table_from(obj, recursive=True))
    return {"status": result["status"], "message": result["message"]}


def test_argocd_health_is_degraded_when_the_gate_failed() -> None:
    failed = _job(evaluation=EVALUATION)
    failed["status"] = _succeeded(failed, _report(False)).status
    health = _argocd_health(failed)
    assert health["status"] == "Degraded"
    assert "not promoted: gate failed" in health["message"]
    passed = _job(evaluation=EVALUATION)
    passed["status"] = _succeeded(passed, _report(True)).status
    assert _argocd_health(passed)["status"] == "Healthy"
