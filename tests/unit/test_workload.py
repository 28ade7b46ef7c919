"""The trainer pod: restricted security, secrets by reference, placement from the spec."""

from __future__ import annotations

import json

import pytest
import yaml

from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.workload import trainer_pod
from kubetune_trainer.config import TrainerConfig

pytestmark = pytest.mark.unit


def _pod() -> dict:
    with open("examples/llama-8b-qlora.yaml") as handle:
        job = parse_manifest(yaml.safe_load(handle))
    return trainer_pod(job, uid="uid-1", attempt=2, image="trainer:1", deadline_seconds=500)


def test_pod_runs_restricted_and_without_api_rights() -> None:
    pod = _pod()
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert spec["restartPolicy"] == "Never"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]


def test_secrets_reach_the_pod_only_by_reference() -> None:
    env = {e["name"]: e for e in _pod()["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    config = TrainerConfig.from_json(env["KUBETUNE_CONFIG"]["value"])
    assert config.model.token_env == "HF_TOKEN"
    assert config.method.type == "qlora" and config.reporting.progress_port == 8080


def test_placement_resources_and_identity_come_from_the_spec() -> None:
    pod = _pod()
    spec = pod["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"] == {
        "nvidia.com/gpu": "1",
        "cpu": "8",
        "memory": "64Gi",
    }
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert spec["priorityClassName"] == "ml-training"
    assert spec["activeDeadlineSeconds"] == 500
    assert pod["metadata"]["name"] == "llama3-8b-support-qlora-attempt-2"
    assert pod["metadata"]["labels"]["kubetune.io/job"] == "llama3-8b-support-qlora"
    assert pod["metadata"]["ownerReferences"][0]["controller"] is True
    assert "hf_" not in json.dumps(pod)  # no secret values, only references


def test_pod_is_accepted_by_the_kubernetes_client_models() -> None:
    """The client validates request bodies: quantities must be strings, not ints."""
    from kubernetes.client import ApiClient, V1Pod

    pod = ApiClient()._ApiClient__deserialize(_pod(), V1Pod)
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
