"""The trainer workload of a FineTuneJob: one bare Pod per attempt.

Why a Pod and not a batch/v1 Job: each attempt must resume from the newest checkpoint
and the decision to retry depends on the trainer's exit code (retryable or not), on
suspend, and on deadlines that span attempts. The operator already owns all of that, so
a Job would add a second retry loop to fight with. Deterministic names
(``<job>-attempt-<n>``) make creation idempotent: a second create answers 409.

Everything here is pure: a FineTuneJob in, a Pod manifest (a dict) out.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.config import ReportingConfig

from .api.types import API_VERSION, KIND, FineTuneJob
from .translate import HUB_TOKEN_ENV, trainer_config

DEFAULT_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
PROGRESS_PORT = 8080
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TRAINER_UID = 10001
JOB_LABEL = "kubetune.io/job"
ATTEMPT_LABEL = "kubetune.io/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/name": "trainer"}
GRACE_SECONDS = 120  # time for the trainer to upload a checkpoint after SIGTERM


def pod_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-attempt-{attempt}"


def pod_selector(job_name: str) -> str:
    return f"{JOB_LABEL}={job_name}"


def _env(job: FineTuneJob, config_json: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_CONFIG", "value": config_json},
        {"name": "KUBETUNE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
    output = job.spec.output
    if output is not None and output.credentialsSecretRef is not None:
        ref = output.credentialsSecretRef
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", ref.name, ref.accessKeyIdKey),
            _secret_env("AWS_SECRET_ACCESS_KEY", ref.name, ref.secretAccessKeyKey),
        ]
    token = job.spec.model.tokenSecretRef
    if token is not None:
        env.append(_secret_env(HUB_TOKEN_ENV, token.name, token.key))
    return env


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """An env var the kubelet fills from a Secret: the operator never reads it."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _resources(job: FineTuneJob) -> dict[str, Any]:
    res = job.spec.resources
    # Quantities are strings in a Pod (the kubernetes client rejects ints there).
    limits: dict[str, str] = {}
    if res.gpus:
        limits[res.gpuResourceName] = str(res.gpus)
    if res.cpu is not None:
        limits["cpu"] = str(res.cpu)
    if res.memory is not None:
        limits["memory"] = str(res.memory)
    requests = {k: v for k, v in limits.items() if k in ("cpu", "memory")}
    return {"limits": limits, "requests": requests} if limits else {}


def trainer_pod(
    job: FineTuneJob,
    *,
    uid: str,
    attempt: int,
    image: str,
    deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The Pod manifest for one attempt of ``job``."""
    name = job.metadata.name
    config = trainer_config(
        job,
        reporting=ReportingConfig(progress_port=PROGRESS_PORT, progress_bar=False, loss_plot=True),
    )
    res = job.spec.resources
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the trainer gets no Kubernetes API rights
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "trainer",
                "image": job.spec.image or image,
                "command": ["python", "-m", "kubetune_trainer"],
                "env": _env(job, config.model_dump_json(exclude_defaults=False)),
                "ports": [{"name": "progress", "containerPort": PROGRESS_PORT}],
                "resources": _resources(job),
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "scratch", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if res.nodeSelector:
        spec["nodeSelector"] = dict(res.nodeSelector)
    if res.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    if res.affinity:
        spec["affinity"] = res.affinity
    if res.priorityClassName:
        spec["priorityClassName"] = res.priorityClassName
    if deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = max(1, deadline_seconds)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, attempt),
            "namespace": job.metadata.namespace,
            "labels": {**MANAGED_BY, JOB_LABEL: name, ATTEMPT_LABEL: str(attempt)},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }
