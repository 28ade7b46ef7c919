"""The attempt Job: restricted pods, secrets by reference, placement from the spec, torchrun's
rank wiring, Kueue labels, DNS-safe names."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.workload import (
    COMPLETION_INDEX,
    MODEL_CACHE_MOUNT,
    MODEL_CACHE_VOLUME,
    QUEUE_LABEL,
    RENDEZVOUS_PORT,
    attempt_job,
    attempt_name,
    rank0_address,
    rank_service,
    service_name,
    with_model_cache,
    with_trainer_uid,
)
from kubetune_trainer.config import MODEL_CACHE_ENV, TrainerConfig

pytestmark = pytest.mark.unit


def _manifest() -> dict[str, Any]:
    with open("examples/llama-8b-qlora.yaml") as handle:
        return yaml.safe_load(handle)


def _job(**labels: str) -> dict[str, Any]:
    job = parse_manifest(_manifest())
    return attempt_job(
        job, uid="uid-1", attempt=2, image="trainer:1", deadline_seconds=500, labels=labels
    )


def _pod() -> dict[str, Any]:
    template: dict[str, Any] = _job()["spec"]["template"]
    return template


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_one_attempt_is_one_indexed_job_that_never_retries_by_itself() -> None:
    job = _job()
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 1
    assert spec["backoffLimit"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["suspend"] is False  # no queue: runs at once
    assert spec["activeDeadlineSeconds"] == 500
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["name"] == "llama3-8b-support-qlora-attempt-2"
    assert job["metadata"]["ownerReferences"][0]["controller"] is True
    assert job["metadata"]["labels"]["kubetune.io/job"] == "llama3-8b-support-qlora"
    assert job["metadata"]["labels"]["kubetune.io/attempt"] == "2"


def test_pod_runs_restricted_and_without_api_rights() -> None:
    spec = _pod()["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]


def test_secrets_reach_the_pod_only_by_reference() -> None:
    env = _env(_pod())
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
    assert pod["metadata"]["labels"]["kubetune.io/job"] == "llama3-8b-support-qlora"
    assert "hf_" not in json.dumps(pod)  # no secret values, only references


def test_one_process_runs_the_trainer_directly() -> None:
    pod = _pod()
    assert pod["spec"]["containers"][0]["command"] == ["python", "-m", "kubetune_trainer"]
    assert not any(name.startswith("PET_") for name in _env(pod))
    assert "subdomain" not in pod["spec"]


def test_several_gpus_on_one_node_run_under_torchrun_standalone() -> None:
    manifest = _manifest()
    manifest["spec"]["resources"]["gpus"] = 8
    pod = attempt_job(parse_manifest(manifest), uid="u", attempt=1, image="t")["spec"]["template"]
    env = _env(pod)
    assert pod["spec"]["containers"][0]["command"] == ["torchrun", "--module", "kubetune_trainer"]
    assert env["PET_NNODES"]["value"] == "1" and env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert env["PET_STANDALONE"]["value"] == "1"
    # torchrun's SIGTERM-to-SIGKILL wait fits inside the pod's grace period.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert 30 < int(env["PET_SHUTDOWN_TIMEOUT"]["value"]) < grace
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_several_nodes_get_rank_wiring_from_the_downward_api() -> None:
    manifest = _manifest()
    manifest["spec"]["resources"].update(nodes=4, gpus=8)
    ftj = parse_manifest(manifest)
    job = attempt_job(ftj, uid="u", attempt=3, image="t")
    pod = job["spec"]["template"]
    env = _env(pod)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert env["PET_NNODES"]["value"] == "4" and env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        f"metadata.annotations['{COMPLETION_INDEX}']"
    )
    service = service_name("llama3-8b-support-qlora")
    assert env["PET_MASTER_ADDR"]["value"] == f"llama3-8b-support-qlora-attempt-3-0.{service}"
    assert env["PET_MASTER_PORT"]["value"] == str(RENDEZVOUS_PORT)
    assert pod["spec"]["subdomain"] == service
    assert {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT} in pod["spec"]["containers"][0][
        "ports"
    ]
    headless = rank_service(ftj, uid="u")
    assert headless is not None and headless["metadata"]["name"] == service
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_cpu_jobs_run_processes_per_node() -> None:
    manifest = _manifest()
    manifest["spec"]["resources"].update(nodes=2, gpus=0)
    manifest["spec"]["method"] = {"type": "lora"}
    manifest["spec"]["distributed"] = {"processesPerNode": 2}
    ftj = parse_manifest(manifest)
    assert ftj.spec.world_size == 4
    env = _env(attempt_job(ftj, uid="u", attempt=1, image="t")["spec"]["template"])
    assert env["PET_NPROC_PER_NODE"]["value"] == "2"


def test_queued_jobs_carry_kueues_labels_and_start_suspended() -> None:
    job = _job(**{QUEUE_LABEL: "team-a", "kueue.x-k8s.io/priority-class": "p", "other": "x"})
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert "other" not in job["metadata"]["labels"]
    assert QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name", ["a", "x" * 40, "y" * 52, "9" + "z" * 51])
def test_names_stay_valid_dns_labels(name: str) -> None:
    for attempt in (1, 9, 123):
        job = attempt_name(name, attempt)
        assert len(f"{job}-63") <= 63, job  # the pod hostname of index 63
        assert job.endswith(f"-attempt-{attempt}")
        assert job == attempt_name(name, attempt)  # deterministic
        assert len(rank0_address(name, attempt).split(".")[0]) <= 63
    service = service_name(name)
    assert len(service) <= 63 and service[0].isalpha()
    assert attempt_name("x" * 52, 1) != attempt_name("x" * 51 + "y", 1)


def test_job_is_accepted_by_the_kubernetes_client_models() -> None:
    """The client validates request bodies: quantities must be strings, not ints."""
    from kubernetes.client import ApiClient, V1Job

    job = ApiClient()._ApiClient__deserialize(_job(), V1Job)
    assert job.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert job.spec.completion_mode == "Indexed"


def _tracked_pod(mlflow: dict[str, Any], **tracking: Any) -> dict[str, Any]:
    manifest = _manifest()
    manifest["spec"]["tracking"] = {"mlflow": mlflow, **tracking}
    job = parse_manifest(manifest)
    template: dict[str, Any] = attempt_job(
        job, uid="u", attempt=1, image="trainer:1", deadline_seconds=None, labels={}
    )["spec"]["template"]
    return template


def test_mlflow_settings_reach_the_trainer_and_credentials_only_by_reference() -> None:
    token = {"name": "mlflow-auth", "key": "token"}
    pod = _tracked_pod(
        {"trackingUri": "https://mlflow.example", "tokenSecretRef": token, "tags": {"team": "nlp"}}
    )
    env = _env(pod)
    assert env["MLFLOW_TRACKING_TOKEN"] == {
        "name": "MLFLOW_TRACKING_TOKEN",
        "valueFrom": {"secretKeyRef": token},
    }
    assert "MLFLOW_TRACKING_USERNAME" not in env and "MLFLOW_TRACKING_PASSWORD" not in env
    config = TrainerConfig.from_json(env["KUBETUNE_CONFIG"]["value"])
    mlflow = config.tracking.mlflow
    assert mlflow is not None and mlflow.tracking_uri == "https://mlflow.example"
    assert mlflow.experiment == "ml-team"  # default: the job's namespace
    assert mlflow.run_name == "llama3-8b-support-qlora"  # default: the job's name
    assert mlflow.tags == {"team": "nlp"}
    assert config.tracking.tensorboard is True
    assert "mlflow-auth" not in env["KUBETUNE_CONFIG"]["value"]  # no secret names in config

    user, password = {"name": "mlflow-basic", "key": "user"}, {"name": "mlflow-basic", "key": "pw"}
    pod = _tracked_pod(
        {
            "trackingUri": "http://mlflow:5000",
            "experiment": "support-bot",
            "runName": "r1",
            "usernameSecretRef": user,
            "passwordSecretRef": password,
        },
        tensorboard=False,
    )
    env = _env(pod)
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == user
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    assert "MLFLOW_TRACKING_TOKEN" not in env
    assert all("value" not in e for n, e in env.items() if n.startswith("MLFLOW_"))
    config = TrainerConfig.from_json(env["KUBETUNE_CONFIG"]["value"])
    assert config.tracking.mlflow is not None
    assert (config.tracking.mlflow.experiment, config.tracking.mlflow.run_name) == (
        "support-bot",
        "r1",
    )
    assert config.tracking.tensorboard is False


def test_without_tracking_no_mlflow_and_tensorboard_on() -> None:
    env = _env(_pod())
    assert not [name for name in env if name.startswith("MLFLOW_")]
    config = TrainerConfig.from_json(env["KUBETUNE_CONFIG"]["value"])
    assert config.tracking.mlflow is None and config.tracking.tensorboard is True


# -- per-attempt NetworkPolicy -------------------------------------------------------------

OPERATOR_LABELS = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "operator"}


def _policy(egress: Any = None) -> dict[str, Any]:
    from kubetune_operator.workload import NetworkPolicyConfig, attempt_network_policy

    config = NetworkPolicyConfig.from_json(
        json.dumps(
            {"operatorNamespace": "kubetune-system", "operatorPodLabels": OPERATOR_LABELS}
            | ({} if egress is None else {"egress": egress})
        ),
        progress_port=8080,
    )
    return attempt_network_policy(_job(), config)


def test_an_attempts_network_policy_selects_exactly_its_pods_and_lets_in_the_operator() -> None:
    job = _job()
    policy = _policy()
    pods = job["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"]["name"] == job["metadata"]["name"]  # <job>-attempt-2
    assert policy["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert policy["spec"]["podSelector"] == {"matchLabels": pods}
    assert (
        pods["kubetune.io/attempt"] == "2" and pods["kubetune.io/job"] == "llama3-8b-support-qlora"
    )
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]
    operator, peers = policy["spec"]["ingress"]
    assert operator == {
        "from": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}
                },
                "podSelector": {"matchLabels": OPERATOR_LABELS},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 8080}],
    }
    assert peers == {"from": [{"podSelector": {"matchLabels": pods}}]}  # rendezvous: any port


def test_restricted_egress_allows_dns_the_attempts_pods_and_the_configured_rules() -> None:
    store = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443}]}
    policy = _policy(egress=[store])
    pods = policy["spec"]["podSelector"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    dns, peers, configured = policy["spec"]["egress"]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert peers == {"to": [{"podSelector": pods}]}
    assert configured == store
    assert _policy(egress=[])["spec"]["egress"][2:] == []  # DNS and the ranks only


def test_network_policy_is_accepted_by_the_kubernetes_client_models() -> None:
    from kubernetes.client import ApiClient, V1NetworkPolicy

    policy = ApiClient()._ApiClient__deserialize(
        _policy(egress=[{"ports": [{"port": 443}]}]), V1NetworkPolicy
    )
    assert policy.spec.ingress[0].ports[0].port == 8080


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nope", "not JSON"),
        ('{"operatorPodLabels": {"a": "b"}}', "operatorNamespace"),
        ('{"operatorNamespace": "ns"}', "operatorPodLabels"),
        ('{"operatorNamespace": "ns", "operatorPodLabels": {"a": 1}}', "strings"),
        ('{"operatorNamespace": "ns", "operatorPodLabels": {"a": "b"}, "egress": {}}', "list"),
    ],
)
def test_a_bad_network_policy_setting_says_what_is_wrong(text: str, says: str) -> None:
    from kubetune_operator.workload import NetworkPolicyConfig

    with pytest.raises(ValueError, match=says):
        NetworkPolicyConfig.from_json(text)


# --------------------------------------------------------------------------- writable paths


def _mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath → its volume, for the trainer container."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]] for m in pod["spec"]["containers"][0]["volumeMounts"]
    }


def _volume_of(pod: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume that holds ``path`` in the trainer container (None: the root filesystem)."""
    mounts = _mounts(pod)
    best = max((m for m in mounts if path == m or path.startswith(m + "/")), key=len, default=None)
    return mounts[best] if best is not None else None


def test_every_cache_and_scratch_path_is_on_a_writable_volume() -> None:
    """Read-only root filesystem and any UID (OpenShift): what the trainer and its libraries
    write (home, temp files, the hub's and Triton's caches, matplotlib) lies on an
    emptyDir, never on the image's filesystem."""
    pod = _pod()
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = _env(pod)
    for name in (
        "HOME",
        "TMPDIR",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "MPLCONFIGDIR",
    ):
        volume = _volume_of(pod, env[name]["value"])
        assert volume is not None and "emptyDir" in volume, name
    assert MODEL_CACHE_ENV not in env  # no cache unless the platform sets one up


def test_the_model_cache_claim_is_mounted_and_named_to_the_trainer() -> None:
    job = _job()
    cached = with_model_cache(job, "kubetune-models")
    pod = cached["spec"]["template"]
    assert {
        "name": MODEL_CACHE_VOLUME,
        "persistentVolumeClaim": {"claimName": "kubetune-models"},
    } in pod["spec"]["volumes"]
    assert _volume_of(pod, MODEL_CACHE_MOUNT) == {
        "name": MODEL_CACHE_VOLUME,
        "persistentVolumeClaim": {"claimName": "kubetune-models"},
    }
    assert _env(pod)[MODEL_CACHE_ENV]["value"] == MODEL_CACHE_MOUNT
    assert MODEL_CACHE_ENV not in _env(job["spec"]["template"])  # the input is not changed
    assert with_model_cache(job, None) == job
    from kubernetes.client import ApiClient, V1Job

    parsed = ApiClient()._ApiClient__deserialize(cached, V1Job)
    volume = parsed.spec.template.spec.volumes[-1]
    assert volume.persistent_volume_claim.claim_name == "kubetune-models"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--job-network-policy", '{"operatorNamespace": "ns"}'], "operatorPodLabels"),
        (["--ttl-seconds-after-finished", "-1"], "0 or more"),
    ],
)
def test_the_operator_refuses_bad_isolation_settings_before_it_starts(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune_operator.cli import main

    assert main(["operator", "--kubeconfig", "/nonexistent", *args]) == 2
    assert says in capsys.readouterr().err


def test_trainer_pods_can_leave_the_uid_to_the_platform() -> None:
    """OpenShift's restricted SCC assigns a UID from the namespace's range and refuses
    pods that name another: with None the pod names no UID, group or fsGroup, and stays
    non-root; a UID of the platform team's choosing is set as user, group and fsGroup."""
    job = _job()
    security = job["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsUser"] == security["fsGroup"] == 10001  # the image's user
    assigned = with_trainer_uid(job, None)["spec"]["template"]["spec"]["securityContext"]
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(assigned)
    assert assigned["runAsNonRoot"] is True
    assert assigned["seccompProfile"] == {"type": "RuntimeDefault"}
    chosen = with_trainer_uid(job, 2000)["spec"]["template"]["spec"]["securityContext"]
    assert chosen["runAsUser"] == chosen["runAsGroup"] == chosen["fsGroup"] == 2000
    assert job["spec"]["template"]["spec"]["securityContext"] == security  # input unchanged
