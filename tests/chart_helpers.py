"""Render the Helm chart offline (helm-python-sdk: Helm's Go library, no helm binary).

Shared by tests/unit/test_chart.py and by tests that compare the operator's actual API
calls with the RBAC rules the chart grants (:func:`chart_rbac_rules`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "helm" / "kubetune"
RELEASE = "kt"
RELEASE_NAMESPACE = "kubetune-system"

Manifest = dict[str, Any]


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = RELEASE_NAMESPACE,
) -> dict[str, str]:
    """Template path → rendered text, exactly as ``helm template`` would produce it.

    Values are validated against values.schema.json first (a HelmValuesError names the
    key); crds/ is not rendered (it is in ``Chart.crds``).
    """
    import helm_python as helm

    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values, name=name, namespace=namespace)


def render_manifests(
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = RELEASE_NAMESPACE,
) -> list[Manifest]:
    """Every Kubernetes object the chart renders (NOTES.txt and empty documents left out)."""
    manifests: list[Manifest] = []
    for path, text in sorted(render_chart(values, name=name, namespace=namespace).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests.append(document)
    return manifests


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m.get("kind") == kind]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every pod template (and bare pod) among ``manifests``."""
    for manifest in manifests:
        kind = manifest.get("kind")
        spec = manifest.get("spec") or {}
        label = f"{kind}/{manifest['metadata']['name']}"
        if kind == "Pod":
            yield label, spec
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield label, spec["template"]["spec"]
        elif kind == "CronJob":
            yield label, spec["jobTemplate"]["spec"]["template"]["spec"]


def chart_rbac_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The policy rules the chart grants the operator's service account.

    Only roles bound to the operator's service account count (not the tenants' aggregated
    ClusterRoles). In cluster mode: the ClusterRole's rules. In namespaced mode every
    watched namespace gets its own Role with the same rules; they are checked to be
    identical and returned once. Raises AssertionError when the chart renders no role, or
    roles that differ.
    """
    manifests = render_manifests(values)
    bound = {  # (kind, name) of the roles the chart binds to a service account: the operator's
        (b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in of_kind(manifests, "ClusterRoleBinding") + of_kind(manifests, "RoleBinding")
        if any(s.get("kind") == "ServiceAccount" for s in b["subjects"])
    }
    roles = [  # the tenants' aggregated ClusterRoles are bound to no service account
        r
        for r in of_kind(manifests, "ClusterRole") + of_kind(manifests, "Role")
        if (r["kind"], r["metadata"]["name"]) in bound
    ]
    assert roles, "the chart rendered no ClusterRole or Role"
    rules = [role.get("rules") or [] for role in roles]
    assert all(r == rules[0] for r in rules), f"roles grant different rules: {rules}"
    return list(rules[0])
