"""The trainer workload of one attempt: a batch/v1 Indexed Job (+ a headless Service).

One attempt of a FineTuneJob is one Indexed Job named ``<job>-attempt-<n>`` with one pod
per node (``completions = parallelism = spec.resources.nodes``). Inside each pod torchrun
starts one trainer process per GPU (or ``distributed.processesPerNode`` on CPU); the
pod's completion index is torchrun's node rank, and rank 0's pod is reachable at the
stable DNS name ``<job>-attempt-<n>-0.<service>`` through a headless Service shared by
the job's attempts. A world size of 1 runs the trainer directly, without torchrun.

Why a Job at all (and not bare pods): Kubernetes' batch API is what a platform's queue
(Kueue) admits, suspends and preempts, and the Job controller already creates one pod per
index, gives it a stable hostname, and fails the attempt as a whole (stopping the other
ranks) when any pod fails. ``backoffLimit: 0`` keeps the operator's own attempt loop in
charge: retries depend on the trainer's exit code, resume from the newest checkpoint and
deadlines span attempts, so one Job is one attempt and a retry is a new Job.

Why an Indexed Job and not a JobSet: an attempt is a single group of identical ranks,
which an Indexed Job expresses fully, and every cluster has the Job controller; JobSet
is another controller and CRD for a platform team to install, and its extras (several
replicated groups, restarting the whole set) duplicate what the attempt loop already
does. JobSet can come later as an optional backend.

Deterministic names make creation idempotent: a second create answers 409. Everything
here is pure: a FineTuneJob in, manifests (dicts) out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import GPU_ACCOUNTING_ENV, MODEL_CACHE_ENV, ReportingConfig

from .api.types import API_VERSION, KIND, FineTuneJob
from .translate import (
    HUB_TOKEN_ENV,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_TOKEN_ENV,
    MLFLOW_USERNAME_ENV,
    trainer_config,
)

DEFAULT_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
PROGRESS_PORT = 8080
RENDEZVOUS_PORT = 29500  # torchrun's default master port
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TRAINER_UID = 10001
JOB_LABEL = "kubetune.io/job"
ATTEMPT_LABEL = "kubetune.io/attempt"
SPEC_ANNOTATION = "kubetune.io/spec"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/name": "trainer"}
GRACE_SECONDS = 120  # time for the trainer to upload a checkpoint after SIGTERM
# torchrun forwards SIGTERM to its workers and SIGKILLs them after this (its default, 30 s,
# is too short to upload a checkpoint); a little less than the pod's grace period, so that
# torchrun still reports the workers' exit before the kubelet kills the container.
TORCHRUN_SHUTDOWN_SECONDS = GRACE_SECONDS - 10
# Set by the Job controller on each pod of an Indexed Job: torchrun's node rank.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# Kueue's labels, copied from the FineTuneJob onto each attempt Job.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_LABELS = (QUEUE_LABEL, PRIORITY_LABEL)
# The shared model cache (a ReadWriteMany PVC: the chart's modelCache.claimName or a
# FineTunePolicy's spec.modelCache.claimName), mounted here in every trainer pod.
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_MOUNT = "/var/cache/kubetune/models"
# Everything the trainer's libraries write goes to the scratch emptyDir at /tmp: the root
# filesystem is read-only, and the user may be any UID (OpenShift assigns one per
# namespace), whose home directory does not exist in the image.
WRITABLE_ENV = {
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "HF_HOME": "/tmp/hf",  # the hub client's cache and token (hf:// without a model cache)
    "XDG_CACHE_HOME": "/tmp/.cache",
    "TRITON_CACHE_DIR": "/tmp/.cache/triton",  # Liger's Triton kernels (GPU fast paths)
    "TORCHINDUCTOR_CACHE_DIR": "/tmp/.cache/torchinductor",
    "MPLCONFIGDIR": "/tmp/.cache/matplotlib",  # the loss plot
}
# A pod's hostname is "<attempt Job>-<index>" and must be a DNS label (63 characters);
# indexes stay below 100 (spec.resources.nodes <= 64).
MAX_ATTEMPT_NAME = 60


def attempt_name(job_name: str, attempt: int) -> str:
    """The Job of ``attempt``: ``<job>-attempt-<n>``, shortened with a hash if too long."""
    name = f"{job_name}-attempt-{attempt}"
    if len(name) <= MAX_ATTEMPT_NAME:
        return name
    suffix = f"-{hashlib.sha256(job_name.encode()).hexdigest()[:8]}-attempt-{attempt}"
    return job_name[: MAX_ATTEMPT_NAME - len(suffix)].rstrip("-") + suffix


def service_name(job_name: str) -> str:
    """The headless Service of a multi-node job (a DNS-1035 label: starts with a letter)."""
    return f"ftj-{job_name}"


def rank0_address(job_name: str, attempt: int) -> str:
    """Rank 0's DNS name (resolved through the pod's search path in its namespace)."""
    return f"{attempt_name(job_name, attempt)}-0.{service_name(job_name)}"


def job_selector(job_name: str) -> str:
    """Selects the attempt Jobs and the pods of one FineTuneJob."""
    return f"{JOB_LABEL}={job_name}"


pod_selector = job_selector


def kueue_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """The FineTuneJob's Kueue labels, which every attempt Job carries."""
    return {k: v for k, v in (labels or {}).items() if k in KUEUE_LABELS}


def _owner(job: FineTuneJob, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _env(job: FineTuneJob, config_json: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_CONFIG", "value": config_json},
        {"name": "KUBETUNE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        *({"name": k, "value": v} for k, v in WRITABLE_ENV.items()),
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
    mlflow = job.spec.tracking.mlflow
    if mlflow is not None:
        for name, secret in (
            (MLFLOW_TOKEN_ENV, mlflow.tokenSecretRef),
            (MLFLOW_USERNAME_ENV, mlflow.usernameSecretRef),
            (MLFLOW_PASSWORD_ENV, mlflow.passwordSecretRef),
        ):
            if secret is not None:
                env.append(_secret_env(name, secret.name, secret.key))
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


def _rank_env(job: FineTuneJob, attempt: int) -> list[dict[str, Any]]:
    """torchrun's settings, as its ``PET_*`` environment (one entry per command-line flag)."""
    spec = job.spec
    env = [
        {"name": "PET_NNODES", "value": str(spec.resources.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.processes_per_node)},
        {"name": "PET_SHUTDOWN_TIMEOUT", "value": str(TORCHRUN_SHUTDOWN_SECONDS)},
    ]
    if spec.resources.nodes == 1:
        # One node: torchrun's standalone rendezvous on the pod's loopback (a free port).
        return [*env, {"name": "PET_STANDALONE", "value": "1"}]
    rank = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
    return [
        *env,
        {"name": "PET_NODE_RANK", "valueFrom": rank},
        {"name": "PET_MASTER_ADDR", "value": rank0_address(job.metadata.name, attempt)},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
    ]


def command(job: FineTuneJob) -> list[str]:
    """One process runs the trainer directly; several run under torchrun."""
    if job.spec.world_size == 1:
        return ["python", "-m", "kubetune_trainer"]
    return ["torchrun", "--module", "kubetune_trainer"]


def _pod_spec(
    job: FineTuneJob, attempt: int, image: str, uid: str, gpu_seconds_before: int | None = None
) -> dict[str, Any]:
    config = trainer_config(
        job,
        reporting=ReportingConfig(progress_port=PROGRESS_PORT, progress_bar=False, loss_plot=True),
        job_uid=uid,
    )
    res = job.spec.resources
    env = _env(job, config.model_dump_json(exclude_defaults=False))
    ports = [{"name": "progress", "containerPort": PROGRESS_PORT}]
    if job.spec.world_size > 1:
        env += _rank_env(job, attempt)
    if gpu_seconds_before is not None:  # for the artifact's manifest (GPU time at publish)
        accounting = {
            "earlierAttemptsGpuSeconds": gpu_seconds_before,
            "gpusPerPod": res.gpus,
            "pods": res.nodes,
        }
        env.append({"name": GPU_ACCOUNTING_ENV, "value": json.dumps(accounting)})
    if res.nodes > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})
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
                "command": command(job),
                "env": env,
                "ports": ports,
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
    if res.nodes > 1:
        spec["subdomain"] = service_name(job.metadata.name)
    if res.nodeSelector:
        spec["nodeSelector"] = dict(res.nodeSelector)
    if res.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    if res.affinity:
        spec["affinity"] = res.affinity
    if res.priorityClassName:
        spec["priorityClassName"] = res.priorityClassName
    return spec


def attempt_job(
    job: FineTuneJob,
    *,
    uid: str,
    attempt: int,
    image: str,
    labels: Mapping[str, str] | None = None,
    deadline_seconds: int | None = None,
    started_spec: str | None = None,
    gpu_seconds_before: int | None = None,
) -> dict[str, Any]:
    """The Indexed Job of one attempt of ``job``.

    ``labels`` are the FineTuneJob's own labels: its Kueue labels are copied, and then
    the Job is created suspended for Kueue to admit (the operator never un-suspends it,
    and never edits its template: Kueue injects node selectors on admission).
    ``started_spec`` (the spec the attempt runs with, as JSON) is kept as an annotation.
    ``gpu_seconds_before`` (the earlier attempts' GPU-seconds) reaches the trainer as
    ``$KUBETUNE_GPU_ACCOUNTING``, for the GPU time its artifact's manifest records.
    """
    name = job.metadata.name
    nodes = job.spec.resources.nodes
    queue = kueue_labels(labels)
    pod_labels = {**MANAGED_BY, JOB_LABEL: name, ATTEMPT_LABEL: str(attempt)}
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": 0,  # one Job is one attempt; the operator decides on retries
        "podReplacementPolicy": "Failed",
        "suspend": QUEUE_LABEL in queue,
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": _pod_spec(job, attempt, image, uid, gpu_seconds_before),
        },
    }
    if deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = max(1, deadline_seconds)
    metadata: dict[str, Any] = {
        "name": attempt_name(name, attempt),
        "namespace": job.metadata.namespace,
        "labels": {**pod_labels, **queue},
        "ownerReferences": [_owner(job, uid)],
    }
    if started_spec is not None:
        metadata["annotations"] = {SPEC_ANNOTATION: started_spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def with_model_cache(job: Mapping[str, Any], claim_name: str | None) -> dict[str, Any]:
    """An attempt Job (as :func:`attempt_job` builds it) whose trainer pods mount the
    shared model cache, the ReadWriteMany PVC ``claim_name`` of the job's namespace, at
    :data:`MODEL_CACHE_MOUNT` and name it in ``$KUBETUNE_MODEL_CACHE``: the trainer then
    downloads each s3:// or hf:// base model once for all attempts and jobs (see
    kubetune_trainer/model_cache.py). None: the Job unchanged (no cache)."""
    result: dict[str, Any] = json.loads(json.dumps(job))
    if not claim_name:
        return result
    pod = result["spec"]["template"]["spec"]
    pod["volumes"].append(
        {"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": {"claimName": claim_name}}
    )
    for container in pod["containers"]:
        container["volumeMounts"].append(
            {"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_MOUNT}
        )
        container["env"].append({"name": MODEL_CACHE_ENV, "value": MODEL_CACHE_MOUNT})
    return result


def with_trainer_uid(job: Mapping[str, Any], uid: int | None) -> dict[str, Any]:
    """An attempt Job whose trainer pods run as ``uid`` (also their group and fsGroup),
    or, for None, as whatever user the platform assigns: no runAsUser, runAsGroup or
    fsGroup, as OpenShift's restricted SCC requires (it picks a UID from the namespace's
    range, and refuses pods that name another). runAsNonRoot stays; nothing the trainer
    writes depends on the UID (see :data:`WRITABLE_ENV`)."""
    result: dict[str, Any] = json.loads(json.dumps(job))
    security = result["spec"]["template"]["spec"]["securityContext"]
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        if uid is None:
            security.pop(key, None)
        else:
            security[key] = uid
    return result


def rank_service(job: FineTuneJob, *, uid: str) -> dict[str, Any] | None:
    """The headless Service that gives rank 0 a DNS name (multi-node jobs only).

    One per FineTuneJob, shared by its attempts: each attempt's pods have hostnames of
    their own. ``publishNotReadyAddresses`` because the trainer has no readiness probe and
    rendezvous happens before anything could be ready.
    """
    if job.spec.resources.nodes == 1:
        return None
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": job.metadata.namespace,
            "labels": {**MANAGED_BY, JOB_LABEL: name},
            "ownerReferences": [_owner(job, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**MANAGED_BY, JOB_LABEL: name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


# --------------------------------------------------------------------------- isolation


@dataclass(frozen=True)
class NetworkPolicyConfig:
    """What an attempt's NetworkPolicy lets in and out (the chart's ``networkPolicy.perJob``).

    ``operator_namespace`` and ``operator_pod_labels`` select the operator's pods, which
    alone may reach a trainer's progress port (``progress_port``). ``egress``: None leaves
    the trainers' egress unrestricted; a list (NetworkPolicyEgressRule objects, e.g. an
    ipBlock and port of the object store or the hub) restricts it to DNS, the attempt's
    own pods and these rules.
    """

    operator_namespace: str
    operator_pod_labels: Mapping[str, str]
    progress_port: int = PROGRESS_PORT
    egress: tuple[Mapping[str, Any], ...] | None = None

    @classmethod
    def from_json(cls, text: str, progress_port: int = PROGRESS_PORT) -> NetworkPolicyConfig:
        """From ``{"operatorNamespace": ..., "operatorPodLabels": {...}, "egress": [...]}``
        (``kubetune operator --job-network-policy``; the chart renders it)."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"--job-network-policy is not JSON: {error}") from None
        if not isinstance(data, dict):
            raise ValueError("--job-network-policy must be a JSON object")
        namespace = data.get("operatorNamespace")
        labels = data.get("operatorPodLabels")
        egress = data.get("egress")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("--job-network-policy needs operatorNamespace (a namespace name)")
        if not isinstance(labels, dict) or not labels:
            raise ValueError(
                "--job-network-policy needs operatorPodLabels: the operator pods' labels"
            )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("--job-network-policy: operatorPodLabels must map strings to strings")
        if egress is not None and (
            not isinstance(egress, list) or not all(isinstance(r, dict) for r in egress)
        ):
            raise ValueError(
                "--job-network-policy: egress must be a list of NetworkPolicy egress rules"
            )
        return cls(
            operator_namespace=namespace,
            operator_pod_labels=dict(labels),
            progress_port=progress_port,
            egress=None if egress is None else tuple(egress),
        )


DNS_PORTS = ({"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53})


def attempt_network_policy(job: Mapping[str, Any], config: NetworkPolicyConfig) -> dict[str, Any]:
    """The NetworkPolicy of one attempt, from its Job (as :func:`attempt_job` builds it).

    Named like the attempt's Job and owned by the FineTuneJob, it selects exactly the
    attempt's pods (their job and attempt labels). Ingress: the operator's pods on the
    progress port, and the attempt's own pods on any port (torchrun's rendezvous, NCCL
    and gloo use ephemeral ports); nothing else, so no other job's pods. Egress: see
    :class:`NetworkPolicyConfig` (DNS and the attempt's own pods are always allowed).
    """
    meta = job["metadata"]
    pods = {"matchLabels": dict(job["spec"]["template"]["metadata"]["labels"])}
    operator = {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": config.operator_namespace}
        },
        "podSelector": {"matchLabels": dict(config.operator_pod_labels)},
    }
    spec: dict[str, Any] = {
        "podSelector": pods,
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [operator], "ports": [{"protocol": "TCP", "port": config.progress_port}]},
            {"from": [{"podSelector": pods}]},
        ],
    }
    if config.egress is not None:
        spec["policyTypes"].append("Egress")
        spec["egress"] = [
            {"ports": [dict(p) for p in DNS_PORTS]},
            {"to": [{"podSelector": pods}]},
            *(json.loads(json.dumps(rule)) for rule in config.egress),
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "labels": dict(pods["matchLabels"]),
            "ownerReferences": [dict(o) for o in meta.get("ownerReferences") or []],
        },
        "spec": spec,
    }
