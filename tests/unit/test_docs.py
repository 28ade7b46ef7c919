"""The docs agree with the code: the field reference is generated and current, every
condition reason the operator can set is explained, links resolve, and the YAML
snippets are valid values and valid FineTuneJob fields."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api.crd import openapi_schema
from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.docs import field_reference_markdown
from kubetune_trainer.errors import ExitCode

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"
TROUBLESHOOTING = DOCS / "troubleshooting.md"
INSTALL = DOCS / "install.md"
CHART_README = ROOT / "helm" / "kubetune" / "README.md"
EXAMPLE_JOB = ROOT / "examples" / "llama-8b-qlora.yaml"


# --------------------------------------------------------------------------- reference


def test_reference_is_generated_output() -> None:
    assert REFERENCE.read_text() == field_reference_markdown(), (
        "docs/reference.md is stale: regenerate it with `kubetune docs > docs/reference.md`"
    )


def _fields(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, sub in (schema.get("properties") or {}).items():
        sub_path = f"{path}.{name}" if path else name
        out.append((sub_path, sub))
        out += _fields(sub, sub_path)
        if isinstance(sub.get("items"), dict):
            out += _fields(sub["items"], sub_path + "[]")
    return out


def test_reference_documents_every_field_default_bound_and_rule() -> None:
    text = field_reference_markdown()
    fields = _fields(openapi_schema())
    assert len(fields) > 80  # the walk found the whole API
    for path, schema in fields:
        rows = [line for line in text.splitlines() if line.startswith(f"| `{path}` |")]
        assert len(rows) == 1, path
        row = rows[0]
        if "default" in schema:
            assert json.dumps(schema["default"], separators=(", ", ": ")) in row, path
        for value in schema.get("enum") or []:
            assert f"`{json.dumps(value)}`" in row, (path, value)
        for bound, sign in (("minimum", "≥"), ("maximum", "≤")):
            if bound in schema:
                assert f"{sign} {schema[bound]}" in row, (path, bound)
        if schema.get("description"):
            first_words = " ".join(schema["description"].split()[:3])
            assert first_words.replace("<", "&lt;").replace("|", "\\|") in row, path
        for rule in schema.get("x-kubernetes-validations") or []:
            if schema.get("properties"):
                assert rule["rule"] in text and rule["message"].split()[0] in text, path
            else:
                assert rule["rule"] in row, (path, rule)


def test_reference_links_point_at_sections() -> None:
    text = REFERENCE.read_text()
    anchors = _anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) > 20
    assert set(links) <= anchors


# --------------------------------------------------------------------------- troubleshooting


def _reconcile_reasons() -> set[str]:
    """Every condition reason literal in the operator's decisions (reconcile.py)."""
    source = (ROOT / "operator" / "kubetune_operator" / "reconcile.py").read_text()
    reasons: set[str] = set()

    def literal(node: ast.AST) -> None:
        value = node.value if isinstance(node, ast.Constant) else None
        if isinstance(value, str) and re.fullmatch(r"[A-Z][A-Za-z]+", value):
            reasons.add(value)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            position = {"Failure": 0, "_fail": 2, "condition": 2, "state": 1}.get(name)
            if position is not None and len(node.args) > position:
                literal(node.args[position])
        elif isinstance(node, ast.FunctionDef) and node.name in (
            "_pending_reason",
            "_pod_pending_reason",
        ):
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple):
                    literal(ret.value.elts[0])
    return reasons


NORMAL = {"Valid", "AttemptCreated", "Pending", "Training", "Retrying", "Completed", "Resumed"}
NORMAL |= {"SpecUnchanged", "Admitted", "PendingAdmission", "AttemptFailed"}
BRIEF = {  # the reasons users meet most; each must have its own section
    "InvalidSpec",
    "Unschedulable",
    "ImagePullBackOff",
    "OOMKilled",
    "DatasetInvalid",
    "ModelInvalid",
    "CredentialsInvalid",
    "ConfigInvalid",
    "Unsupported",
    "StorageUnavailable",
    "Preempted",
    "InternalError",
    "TrainerCrashed",
    "DeadlineExceeded",
    "BackoffLimitExceeded",
    "PodDeleted",
    "SpecChangedWhileRunning",
    "Suspended",
    "CreateContainerConfigError",
}


def test_every_reason_the_operator_sets_is_explained() -> None:
    text = TROUBLESHOOTING.read_text()
    headings = set(re.findall(r"^### (\S+)$", text, re.M))
    found = _reconcile_reasons()
    # The AST walk sees the reasons reconcile.py really sets.
    assert {"InvalidSpec", "Unschedulable", "OOMKilled", "PodDeleted", "Suspended"} <= found
    exit_reasons = {code.reason for code in ExitCode if code is not ExitCode.OK}
    failures = (found | exit_reasons | BRIEF) - NORMAL
    assert failures - headings == set(), "reasons without a section in troubleshooting.md"
    normal_table = set(re.findall(r"^\| `([A-Za-z]+)` \|", text, re.M))
    assert (found & NORMAL) - normal_table == set()
    # Sections are in order, so a reader can find them.
    ordered = re.findall(r"^### (\S+)$", text, re.M)
    assert ordered == sorted(ordered, key=str.lower)


def test_troubleshooting_says_how_to_look_and_fix() -> None:
    text = TROUBLESHOOTING.read_text()
    for command in ("kubectl get ftj", "kubectl describe ftj", "kubectl logs"):
        assert command in text
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    for section in sections:
        title = section.split("\n", 1)[0]
        assert re.search(r"\*\*(State|Condition)\*\*", section), title
        assert "**Fix**" in section, title


# --------------------------------------------------------------------------- install


def test_install_covers_the_setup() -> None:
    text = INSTALL.read_text()
    for needle in (
        "helm install kubetune ./helm/kubetune",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "tokenSecretRef",
        "device plugin",
        "tolerations",
        "nodeSelector",
        "ServiceMonitor",
        "PodMonitor",
        "rbac:\n  mode: namespaced",
        "watchNamespaces",
    ):
        assert needle in text, needle


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def test_install_job_snippets_are_valid_finetunejob_fields() -> None:
    base = yaml.safe_load(EXAMPLE_JOB.read_text())
    snippets = [b for b in _yaml_blocks(INSTALL.read_text()) if b.startswith("spec:")]
    assert len(snippets) >= 3
    for snippet in snippets:
        parse_manifest(_merge(base, yaml.safe_load(snippet)))  # raises with the field


def test_install_values_snippets_render_the_chart() -> None:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    snippets = [b for b in _yaml_blocks(INSTALL.read_text()) if b.startswith("# values-")]
    assert len(snippets) == 2
    with helm.Chart.load(ROOT / "helm" / "kubetune") as chart:
        for snippet in snippets:
            chart.render(yaml.safe_load(snippet), name="kubetune", namespace="kubetune-system")


# --------------------------------------------------------------------------- links


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


DOC_FILES = sorted({*DOCS.glob("*.md"), CHART_README})


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans hold no links (a CEL regex has "](")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked.read_text()), f"{path.name}: no #{anchor} in {target}"


def _value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """The leaf keys of values.yaml (an empty map is a leaf)."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths += _value_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def test_chart_readme_lists_every_value() -> None:
    values = yaml.safe_load((ROOT / "helm" / "kubetune" / "values.yaml").read_text())
    text = CHART_README.read_text()
    documented = set(re.findall(r"`([A-Za-z][\w.]*)`", text))
    paths = _value_paths(values)
    assert "monitoring.prometheusRule.noProgressMinutes" in paths
    missing = []
    for path in paths:
        parts = path.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if not prefixes & documented:
            missing.append(path)
    assert missing == []
