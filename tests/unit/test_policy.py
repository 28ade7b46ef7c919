"""FineTunePolicy: the operator's pure check, the chart's admission CEL (evaluated with
cel-python over the same table of cases: same verdicts, same messages), the defaults, the
concurrency count and what reconcile decides with them. No API server."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from chart_helpers import of_kind, render_manifests
from test_api_crd import _with_defaults

from kubetune_operator import conditions as c
from kubetune_operator.api.crd import (
    crd_filename,
    crd_yaml,
    openapi_schema,
    policy_openapi_schema,
)
from kubetune_operator.api.policy import KIND as POLICY_KIND
from kubetune_operator.api.policy import FineTunePolicy, parse_policy
from kubetune_operator.api.validation import InvalidManifest, parse_manifest
from kubetune_operator.docs import field_reference_markdown
from kubetune_operator.policy import (
    Slots,
    Violation,
    concurrency,
    violations,
    waits_for_slot,
    with_defaults,
)
from kubetune_operator.reconcile import reconcile
from kubetune_operator.sweep import reconcile_sweep
from kubetune_operator.tenancy import Tenancy
from kubetune_operator.workload import ATTEMPT_LABEL, JOB_LABEL, PRIORITY_LABEL, QUEUE_LABEL

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "model": {"source": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"sources": ["s3://data/train.jsonl"]},
    "output": {"uri": "s3://team-a/jobs/x"},
}


def _spec(**patch: Any) -> dict[str, Any]:
    spec = dict(BASE)
    for key, value in patch.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def _policy(name: str = "team-a", **spec: Any) -> FineTunePolicy:
    return parse_policy(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTunePolicy",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": spec,
        }
    )


def _parsed(spec: dict[str, Any]) -> Any:
    return parse_manifest(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "job", "namespace": "team-a"},
            "spec": spec,
        }
    ).spec


MODELS = {"allowedModelSources": ["hf://meta-llama/", "s3://approved-models/"]}
IMAGES = {"allowedImages": ["registry.example.com/kubetune/"]}
OUTPUTS = {"allowedOutputs": ["s3://team-a/"]}
METHODS = {"allowedMethods": ["lora", "qlora"]}
GPUS = {"maxGpusPerJob": 8}
NODES = {"maxNodes": 2}
EVERYTHING = {**MODELS, **IMAGES, **OUTPUTS, **METHODS, **GPUS, **NODES}

# (id, policy spec, job spec, the policy fields the job breaks, in order)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], list[str]]] = [
    ("empty-policy", {}, _spec(resources={"nodes": 64, "gpus": 64}), []),
    ("model-allowed", MODELS, _spec(), []),
    ("model-second-prefix", MODELS, _spec(model={"source": "s3://approved-models/m"}), []),
    ("model-refused", MODELS, _spec(model={"source": "hf://evil/model"}), ["allowedModelSources"]),
    (
        "model-prefix-is-not-a-substring",
        MODELS,
        _spec(model={"source": "s3://x/hf://meta-llama/"}),
        ["allowedModelSources"],
    ),
    ("model-empty-list", {"allowedModelSources": []}, _spec(), ["allowedModelSources"]),
    ("image-unset-is-the-operators", IMAGES, _spec(), []),
    ("image-allowed", IMAGES, _spec(image="registry.example.com/kubetune/trainer:1.2"), []),
    ("image-refused", IMAGES, _spec(image="docker.io/evil/trainer:latest"), ["allowedImages"]),
    ("image-override-forbidden", {"allowedImages": []}, _spec(image="x:1"), ["allowedImages"]),
    ("output-allowed", OUTPUTS, _spec(), []),
    ("output-sibling-bucket", OUTPUTS, _spec(output={"uri": "s3://team-ab/x"}), ["allowedOutputs"]),
    ("output-unset", OUTPUTS, _spec(output=None), []),
    ("method-default-lora", METHODS, _spec(), []),
    ("method-qlora", METHODS, _spec(method={"type": "qlora"}), []),
    ("method-full-refused", METHODS, _spec(method={"type": "full"}), ["allowedMethods"]),
    ("gpus-default-1", GPUS, _spec(), []),
    ("gpus-at-the-limit", GPUS, _spec(resources={"nodes": 2, "gpus": 4}), []),
    ("gpus-over", GPUS, _spec(resources={"nodes": 2, "gpus": 8}), ["maxGpusPerJob"]),
    ("gpus-one-node-over", GPUS, _spec(resources={"gpus": 9}), ["maxGpusPerJob"]),
    ("cpu-only-policy", {"maxGpusPerJob": 0}, _spec(resources={"gpus": 0}), []),
    ("cpu-only-policy-default-gpu", {"maxGpusPerJob": 0}, _spec(), ["maxGpusPerJob"]),
    ("nodes-at-the-limit", NODES, _spec(resources={"nodes": 2}), []),
    ("nodes-over", NODES, _spec(resources={"nodes": 3, "gpus": 0}), ["maxNodes"]),
    ("within-everything", EVERYTHING, _spec(resources={"nodes": 2, "gpus": 4}), []),
    (
        "breaks-everything",
        EVERYTHING,
        _spec(
            model={"source": "hf://other/m"},
            image="evil:1",
            output={"uri": "s3://elsewhere/x"},
            method={"type": "dora"},
            resources={"nodes": 4, "gpus": 8},
        ),
        [
            "allowedModelSources",
            "allowedImages",
            "allowedOutputs",
            "allowedMethods",
            "maxGpusPerJob",
            "maxNodes",
        ],
    ),
    (
        "limits-ignore-other-fields",
        {"maxConcurrentJobs": 0, "defaultQueueName": "q", "defaultPriorityClass": "low"},
        _spec(),
        [],
    ),
]
IDS = [case[0] for case in CASES]


# --------------------------------------------------------------------------- generated files


def test_policy_crd_and_reference_are_generated_output() -> None:
    crd_file = ROOT / "crds" / crd_filename(POLICY_KIND)
    assert crd_file.read_text() == crd_yaml(POLICY_KIND), (
        "stale: kubetune crd --kind FineTunePolicy > crds/finetunepolicies.kubetune.io.yaml"
    )
    assert (ROOT / "docs" / "policy-reference.md").read_text() == field_reference_markdown(
        POLICY_KIND
    ), "stale: kubetune docs --kind FineTunePolicy > docs/policy-reference.md"
    kubernetes_validate.validate(yaml.safe_load(crd_file.read_text()), "1.37.0", strict=True)
    schema = policy_openapi_schema()["properties"]["spec"]
    for name, node in schema["properties"].items():
        assert node.get("description") and node.get("type"), name


# --------------------------------------------------------------------------- the pure check


@pytest.mark.parametrize(("name", "rules", "spec", "broken"), CASES, ids=IDS)
def test_violations(name: str, rules: dict, spec: dict, broken: list[str]) -> None:
    found = violations(_parsed(spec), _policy(**rules))
    assert [v.rule for v in found] == [f"spec.{rule}" for rule in broken]
    for violation in found:
        # The message names the job's field, the policy and the policy's rule.
        assert violation.message.startswith(f"{violation.field}: ")
        assert "FineTunePolicy team-a" in violation.message
        assert violation.rule in violation.message


def test_messages_name_the_value_and_the_limit() -> None:
    spec = _parsed(_spec(resources={"nodes": 4, "gpus": 8}, image="evil:1"))
    found = violations(spec, _policy(**EVERYTHING))
    assert found == [
        Violation(
            "spec.image",
            "spec.allowedImages",
            "spec.image: 'evil:1' is not allowed by FineTunePolicy team-a: "
            "no entry of spec.allowedImages is a prefix of it",
        ),
        Violation(
            "spec.resources",
            "spec.maxGpusPerJob",
            "spec.resources: 32 GPUs (nodes × gpus) are over the limit of FineTunePolicy "
            "team-a: spec.maxGpusPerJob is 8",
        ),
        Violation(
            "spec.resources.nodes",
            "spec.maxNodes",
            "spec.resources.nodes: 4 is over the limit of FineTunePolicy team-a: "
            "spec.maxNodes is 2",
        ),
    ]


def test_policy_schema_refuses_wildcards_and_bad_limits() -> None:
    with pytest.raises(InvalidManifest) as refused:
        _policy(allowedImages=["registry/*"], maxNodes=0, allowedMethods=["lorax"])
    fields = {p.path for p in refused.value.problems}
    assert fields == {"spec.allowedImages[0]", "spec.maxNodes", "spec.allowedMethods[0]"}


def test_policy_methods_are_the_job_api_methods() -> None:
    """One enum: the policy's allowedMethods lists exactly the FineTuneJob's method types."""
    job_methods = openapi_schema()["properties"]["spec"]["properties"]["method"]["properties"]
    policy_methods = policy_openapi_schema()["properties"]["spec"]["properties"]
    assert policy_methods["allowedMethods"]["items"]["enum"] == job_methods["type"]["enum"]


# --------------------------------------------------------------------------- admission CEL


@functools.cache
def _admission() -> tuple[dict[str, Any], dict[str, Any]]:
    manifests = render_manifests()
    (policy,) = of_kind(manifests, "ValidatingAdmissionPolicy")
    (binding,) = of_kind(manifests, "ValidatingAdmissionPolicyBinding")
    return policy, binding


@functools.cache
def _program(expression: str) -> Any:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def _admit(job: dict[str, Any], policy: dict[str, Any]) -> list[tuple[str, str]]:
    """(policy field, message) of each validation the admission policy fails, evaluated
    as the API server does: variables first, then each validation with its message."""
    vap = _admission()[0]["spec"]
    activation: dict[str, Any] = {"object": job, "params": policy}
    values = {}
    for variable in vap["variables"]:
        context = {**activation, "variables": values}
        cel = {k: celpy.json_to_cel(v) for k, v in context.items()}
        values[variable["name"]] = _program(variable["expression"]).evaluate(cel)
    cel = {
        "object": celpy.json_to_cel(job),
        "params": celpy.json_to_cel(policy),
        "variables": celpy.celtypes.MapType(
            {celpy.celtypes.StringType(k): v for k, v in values.items()}
        ),
    }
    failed = []
    for validation in vap["validations"]:
        if not _program(validation["expression"]).evaluate(cel):
            rule = re.search(r"has\(params\.spec\.(\w+)\)", validation["expression"])
            assert rule is not None, validation["expression"]
            message = _program(validation["messageExpression"]).evaluate(cel)
            failed.append((f"spec.{rule.group(1)}", str(message)))
    return failed


def _job_object(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "team-a"},
        "spec": spec,
    }


@pytest.mark.parametrize("defaulted", [True, False], ids=["crd-defaults", "as-written"])
@pytest.mark.parametrize(("name", "rules", "spec", "broken"), CASES, ids=IDS)
def test_admission_cel_agrees_with_the_operator(
    name: str, rules: dict, spec: dict, broken: list[str], defaulted: bool
) -> None:
    """Same verdicts and the same messages, on the object after the API server's defaulting
    (what admission sees) and as written (the CEL's own fallbacks)."""
    job = _job_object(spec)
    if defaulted:
        job = _with_defaults(job, openapi_schema())
    policy = _policy(**rules).model_dump(mode="json", exclude_none=True)
    expected = [(v.rule, v.message) for v in violations(_parsed(spec), _policy(**rules))]
    assert _admit(job, policy) == expected
    assert [rule for rule, _ in expected] == [f"spec.{rule}" for rule in broken]


def _matches(operation: str, new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    (condition,) = _admission()[0]["spec"]["matchConditions"]
    schema = openapi_schema()
    cel = {
        "request": celpy.json_to_cel({"operation": operation}),
        "object": celpy.json_to_cel(_with_defaults(_job_object(new), schema)),
        "oldObject": celpy.json_to_cel(_with_defaults(_job_object(old or {}), schema)),
    }
    return bool(_program(condition["expression"]).evaluate(cel))


def test_admission_checks_creates_and_changes_of_policed_fields_only() -> None:
    spec = _spec()
    assert _matches("CREATE", spec, None)
    assert not _matches("UPDATE", {**spec, "suspend": True}, spec)  # suspending stays possible
    assert not _matches("UPDATE", {**spec, "retryLimit": 5}, spec)
    assert _matches("UPDATE", _spec(resources={"nodes": 2}), spec)
    assert _matches("UPDATE", _spec(image="x:1"), spec)
    assert _matches("UPDATE", _spec(output={"uri": "s3://other/x"}), spec)
    assert _matches("UPDATE", _spec(method={"type": "full"}), spec)
    assert _matches("UPDATE", _spec(model={"source": "hf://other/m"}), spec)


def test_admission_policy_and_binding_shape() -> None:
    policy, binding = _admission()
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["paramKind"] == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTunePolicy"}
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["finetunejobs"] and rule["apiGroups"] == ["kubetune.io"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    # Every FineTunePolicy of the job's own namespace; none there: allowed.
    assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
    off = render_manifests({"admissionPolicy": {"enabled": False}})
    assert not [m for m in off if m["kind"].startswith("ValidatingAdmissionPolicy")]


def test_tenants_cannot_write_policies() -> None:
    roles = {r["metadata"]["name"]: r for r in of_kind(render_manifests(), "ClusterRole")}
    edit, view = roles["kt-kubetune-edit"], roles["kt-kubetune-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for role in (edit, view):
        for rule in role["rules"]:
            if "finetunepolicies" in rule["resources"]:
                assert rule["verbs"] == ["get", "list", "watch"], role["metadata"]["name"]
    assert "create" in edit["rules"][0]["verbs"] and "finetunejobs" in edit["rules"][0]["resources"]
    admin = roles["kt-kubetune-policy-admin"]
    labels = admin["metadata"]["labels"]
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate") for k in labels)


# --------------------------------------------------------------------------- defaults


def test_defaults_fill_only_missing_kueue_labels() -> None:
    policy = _policy(defaultQueueName="team-a", defaultPriorityClass="low")
    assert with_defaults({"app": "x"}, [policy]) == {
        "app": "x",
        QUEUE_LABEL: "team-a",
        PRIORITY_LABEL: "low",
    }
    own = {QUEUE_LABEL: "mine", PRIORITY_LABEL: "high"}
    assert with_defaults(own, [policy]) == own
    first = _policy("a", defaultQueueName="first")
    assert with_defaults({}, [_policy("b", defaultQueueName="second"), first]) == {
        QUEUE_LABEL: "first"
    }


# --------------------------------------------------------------------------- concurrency


def _ftj(
    name: str,
    created: str,
    state: str | None = None,
    attempts: int = 0,
    labels: dict[str, str] | None = None,
    suspend: bool = False,
    reason: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if state:
        status = {"state": state, "attempts": attempts}
    if reason:
        status["conditions"] = [{"type": "Queued", "status": "True", "reason": reason}]
    return {
        "metadata": {"name": name, "creationTimestamp": created, "labels": labels or {}},
        "spec": {**BASE, "suspend": suspend},
        "status": status,
    }


def _batch_job(owner: str, *, finished: bool = False, suspend: bool = False) -> dict[str, Any]:
    conditions = [{"type": "Complete", "status": "True"}] if finished else []
    return {
        "metadata": {
            "name": f"{owner}-attempt-1",
            "labels": {JOB_LABEL: owner, ATTEMPT_LABEL: "1"},
        },
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions},
    }


LIMIT_2 = [_policy(maxConcurrentJobs=2)]


def test_running_jobs_hold_slots_and_older_waiting_jobs_go_first() -> None:
    me = _ftj("me", "2026-01-01T00:00:05Z")
    jobs = [
        _ftj("running", "2026-01-01T00:00:00Z", "Running", attempts=1),
        _ftj("just-created", "2026-01-01T00:00:01Z"),  # its Job exists, its status not yet
        _ftj("older-waiting", "2026-01-01T00:00:02Z", "Queued", reason="ConcurrencyLimit"),
        _ftj("newer-waiting", "2026-01-01T00:00:09Z", "Queued", reason="ConcurrencyLimit"),
        _ftj("done", "2026-01-01T00:00:00Z", "Succeeded", attempts=1),
        _ftj("refused", "2026-01-01T00:00:00Z", "Invalid"),
        _ftj("paused", "2026-01-01T00:00:00Z", "Suspended", attempts=1, suspend=True),
        _ftj("kueue", "2026-01-01T00:00:00Z", "Running", 1, labels={QUEUE_LABEL: "q"}),
        me,
    ]
    attempt_jobs = [
        _batch_job("just-created"),
        _batch_job("done", finished=True),
        _batch_job("paused", suspend=True),
    ]
    slots = concurrency(me, jobs, attempt_jobs, LIMIT_2)
    assert slots == Slots(limit=2, policy="team-a", running=2, ahead=1)
    assert not slots.free
    assert "FineTunePolicy team-a lets at most 2 jobs" in slots.message()
    assert "spec.maxConcurrentJobs" in slots.message()


def test_same_second_jobs_are_ordered_by_name() -> None:
    a, b = _ftj("a", "2026-01-01T00:00:00Z"), _ftj("b", "2026-01-01T00:00:00Z")
    one = [_policy(maxConcurrentJobs=1)]
    assert concurrency(a, [a, b], [], one).free
    assert not concurrency(b, [a, b], [], one).free


def test_no_limit_or_a_kueue_queue_means_no_count() -> None:
    me = _ftj("me", "2026-01-01T00:00:00Z")
    assert concurrency(me, [me], [], [_policy()]) is None
    queued = _ftj("me", "2026-01-01T00:00:00Z", labels={QUEUE_LABEL: "q"})
    assert concurrency(queued, [queued], [], LIMIT_2) is None
    by_default = [_policy(maxConcurrentJobs=1, defaultQueueName="q")]
    assert concurrency(me, [me], [], by_default) is None
    # The smallest limit of several policies applies.
    both = [_policy("a", maxConcurrentJobs=3), _policy("b", maxConcurrentJobs=1)]
    assert concurrency(me, [me], [], both) == Slots(1, "b", 0, 0)


# --------------------------------------------------------------------------- reconcile


NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def _body(**spec: Any) -> dict[str, Any]:
    return {
        **_job_object(_spec(**spec)),
        "metadata": {"name": "job", "namespace": "team-a", "uid": "u", "generation": 1},
        "status": {},
    }


def test_a_violating_job_is_refused_without_a_workload() -> None:
    decision = reconcile(
        _body(resources={"nodes": 4}),
        [],
        [],
        image="trainer:1",
        now=NOW,
        policies=[_policy(maxNodes=2)],
    )
    assert decision.create_job is None and decision.create_service is None
    status = decision.status
    assert status["state"] == "Invalid"
    accepted = c.get_condition(status["conditions"], c.ACCEPTED)
    assert accepted["status"] == "False" and accepted["reason"] == "PolicyViolation"
    assert accepted["message"] == (
        "spec.resources.nodes: 4 is over the limit of FineTunePolicy team-a: spec.maxNodes is 2"
    )
    (event,) = decision.events
    assert (event.type, event.reason) == ("Warning", "PolicyViolation")


def test_a_job_over_the_concurrency_limit_waits_then_starts() -> None:
    full = Slots(limit=1, policy="team-a", running=1, ahead=0)
    policies = [_policy(maxConcurrentJobs=1)]
    waiting = reconcile(_body(), [], [], image="t", now=NOW, policies=policies, slots=full)
    assert waiting.create_job is None
    assert waiting.status["state"] == "Queued"
    queued = c.get_condition(waiting.status["conditions"], c.QUEUED)
    assert queued["reason"] == "ConcurrencyLimit" and "team-a" in queued["message"]
    assert waits_for_slot(waiting.status)
    body = {**_body(), "status": waiting.status}
    free = Slots(limit=1, policy="team-a", running=0, ahead=0)
    started = reconcile(body, [], [], image="t", now=NOW, policies=policies, slots=free)
    assert started.create_job is not None
    assert started.status["state"] == "Pending"
    assert not waits_for_slot(started.status)


def test_default_queue_goes_on_the_attempt_job() -> None:
    policies = [_policy(defaultQueueName="team-a-queue", defaultPriorityClass="low")]
    decision = reconcile(_body(), [], [], image="t", now=NOW, policies=policies)
    assert decision.create_job is not None
    labels = decision.create_job["metadata"]["labels"]
    assert labels[QUEUE_LABEL] == "team-a-queue" and labels[PRIORITY_LABEL] == "low"
    assert decision.create_job["spec"]["suspend"] is True  # Kueue admits it


# --------------------------------------------------------------------------- sweeps


def _sweep(parameters: list[dict[str, Any]], **template: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "sw", "namespace": "team-a", "uid": "s", "generation": 1},
        "spec": {
            "template": {**_spec(**template), "training": {"maxSteps": 10}},
            "parameters": parameters,
            "objective": {"metric": "trainLoss"},
            "maxTrials": 4,
        },
    }


def test_a_sweep_whose_trials_would_break_the_policy_is_refused() -> None:
    nodes = {"path": "resources.nodes", "type": "int", "low": 1, "high": 4}
    gpus = {"path": "resources.gpus", "type": "categorical", "values": [1, 8]}
    policy = [_policy(maxNodes=2, maxGpusPerJob=8)]
    decision = reconcile_sweep(_sweep([nodes, gpus]), [], policies=policy)
    assert decision.create_trials == []
    assert decision.status["state"] == "Invalid"
    assert decision.status["message"] == (
        "spec.parameters[0]: with resources.nodes = 4 a trial breaks it: spec.resources.nodes: "
        "4 is over the limit of FineTunePolicy team-a: spec.maxNodes is 2; "
        "spec.parameters: with resources.nodes = 4, resources.gpus = 8 a trial breaks it: "
        "spec.resources: 32 GPUs (nodes × gpus) are over the limit of FineTunePolicy team-a: "
        "spec.maxGpusPerJob is 8"
    )
    (event,) = decision.events
    assert (event.type, event.reason) == ("Warning", "PolicyViolation")
    # The template itself, named as the sweep's field.
    template = reconcile_sweep(
        _sweep([gpus], image="evil:1"), [], policies=[_policy(allowedImages=["ok/"])]
    )
    assert template.status["message"].startswith("spec.template.image: 'evil:1' is not")


def test_a_sweep_within_the_policy_creates_trials() -> None:
    lr = {"path": "training.learningRate", "type": "logUniform", "low": "1e-5", "high": "1e-3"}
    decision = reconcile_sweep(_sweep([lr]), [], policies=[_policy(maxNodes=1, **MODELS)])
    assert decision.status["state"] != "Invalid" and decision.create_trials


# --------------------------------------------------------------------------- the operator's side


class _ListingApi:
    """The namespace's FineTuneJobs, attempt Jobs and policies, as the API lists them."""

    def __init__(self, jobs: list[dict], attempt_jobs: list[dict], policies: list[dict]) -> None:
        self.jobs, self.attempt_jobs, self.policies = jobs, attempt_jobs, policies
        self.calls: list[str] = []

    def list_all_jobs(self, namespaces: list[str]) -> list[dict]:
        self.calls.append(f"list_all_jobs {namespaces}")
        return self.jobs

    def list_attempt_jobs(self, namespace: str) -> list[dict]:
        self.calls.append(f"list_attempt_jobs {namespace}")
        return self.attempt_jobs

    def list_policies(self, namespace: str) -> list[dict]:
        self.calls.append(f"list_policies {namespace}")
        return self.policies


def test_tenancy_counts_live_only_for_a_job_that_may_start() -> None:
    running = _ftj("running", "2026-01-01T00:00:00Z", "Running", attempts=1)
    me = {**_ftj("me", "2026-01-01T00:00:01Z"), "metadata": {"name": "me", "namespace": "ns"}}
    policy = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTunePolicy",
        "metadata": {"name": "team-a", "namespace": "ns"},
        "spec": {"maxConcurrentJobs": 1},
    }
    api = _ListingApi([running, me], [_batch_job("running")], [policy])
    tenancy = Tenancy(api)  # type: ignore[arg-type]
    policies = tenancy.policies("ns")
    assert [p.spec.maxConcurrentJobs for p in policies] == [1]
    with tenancy.slots(me, [], policies) as slots:
        assert slots == Slots(limit=1, policy="team-a", running=1, ahead=0)
    assert api.calls == ["list_policies ns", "list_all_jobs ['ns']", "list_attempt_jobs ns"]
    api.calls.clear()
    with tenancy.slots(me, [_batch_job("me")], policies) as slots:  # its attempt runs
        assert slots is None
    with tenancy.slots(me, [], []) as slots:  # no limit
        assert slots is None
    assert api.calls == []
    tenancy.note("ns", {"state": "Running"}, {"state": "Succeeded"})
    tenancy.note("other", {"state": "Queued"}, {"state": "Running"})
    assert tenancy.take_freed() == ["ns"] and tenancy.take_freed() == []


def test_the_documented_policy_is_valid() -> None:
    text = (ROOT / "docs" / "multi-tenancy.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "FineTunePolicy" in b]
    assert blocks, "docs/multi-tenancy.md shows no FineTunePolicy"
    for block in blocks:
        policy = parse_policy(yaml.safe_load(block))
        assert policy.spec.maxGpusPerJob is not None
