"""The whole product on the cluster-free harness: emulated API server, local kubelet,
real SeaweedFS, real Prometheus, the real operator and real training."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from harness import ADMIN_USER, OPERATOR_USER, EmulatorServer, JobController, Kubelet
from harness.network import free_port
from kubernetes.client.exceptions import ApiException
from seaweedfs import SeaweedFS

from kubetune_operator.api.types import GROUP, PLURAL, VERSION
from kubetune_operator.handlers import OperatorConfig
from kubetune_operator.runner import Operator, OperatorOptions, OperatorThread
from kubetune_trainer.storage import Store, open_store

TRAINER_IMAGE = "kubetune-trainer:e2e"


@dataclass
class Cluster:
    """Helpers over the harness, as a user with kubectl would see the cluster."""

    kube: EmulatorServer
    kubelet: Kubelet
    s3: SeaweedFS
    bucket: str
    tmp: Path
    operator_thread: OperatorThread | None = None
    metrics_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        client = self.kube.api_client(ADMIN_USER)
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.store: Store = open_store(f"s3://{self.bucket}", endpoint_url=self.s3.endpoint_url)

    # -- the operator --------------------------------------------------------------------

    def start_operator(self, **config: Any) -> OperatorThread:
        """The operator in a thread; ``config``: OperatorConfig fields to set (e.g. the
        TTL after finishing, the per-attempt NetworkPolicy)."""
        kubeconfig = self.kube.write_kubeconfig(self.tmp / "operator-kubeconfig", OPERATOR_USER)
        settings: dict[str, Any] = {
            "image": TRAINER_IMAGE,
            "progress_interval_seconds": 1.0,
            "resync_interval_seconds": 3.0,
        }
        options = OperatorOptions(
            config=OperatorConfig(**{**settings, **config}),
            kubeconfig=str(kubeconfig),
            metrics_address="127.0.0.1",
            metrics_port=self.metrics_port,
            liveness_endpoint=None,
        )
        self.operator_thread = Operator(options).start_in_thread()
        return self.operator_thread

    def stop_operator(self) -> None:
        if self.operator_thread is not None:
            self.operator_thread.stop()
            self.operator_thread = None

    # -- objects ---------------------------------------------------------------------------

    def create_namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name}})

    def create_storage_secret(self, namespace: str, name: str = "s3-credentials") -> None:
        self.core.create_namespaced_secret(
            namespace,
            {
                "metadata": {"name": name},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": self.s3.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
                },
            },
        )

    def tiny_job(self, name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": {"source": f"s3://{self.bucket}/models/tiny"},
            "dataset": {
                "sources": [f"s3://{self.bucket}/data/train.jsonl"],
                "format": "alpaca",
                "maxSeqLength": 128,
            },
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": "0.0"}},
            "training": {
                "maxSteps": 24,
                "batchSize": 8,
                "gradientAccumulationSteps": 1,
                "learningRate": "3e-3",
                "scheduler": "constant",
                "warmupPercent": 0,
                "checkpointEverySteps": 6,
            },
            "output": {
                "uri": f"s3://{self.bucket}/jobs/{namespace}/{name}",
                "endpoint": self.s3.endpoint_url,
                "credentialsSecretRef": {"name": "s3-credentials"},
            },
            "resources": {"gpus": 1},  # the default; the local kubelet ignores limits
        }
        for key, value in spec.items():
            body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": body,
        }

    def apply(self, job: dict[str, Any]) -> dict[str, Any]:
        namespace = job["metadata"]["namespace"]
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)

    def get(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_spec(self, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str, namespace: str = "default") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def pods(self, job: str, namespace: str = "default") -> list[Any]:
        selector = f"kubetune.io/job={job}"
        return self.core.list_namespaced_pod(namespace, label_selector=selector).items

    def jobs(self, job: str, namespace: str = "default") -> list[Any]:
        """The attempt Jobs of a FineTuneJob."""
        selector = f"kubetune.io/job={job}"
        return self.batch.list_namespaced_job(namespace, label_selector=selector).items

    def pod_name(
        self, job: str, attempt: int = 1, index: int = 0, namespace: str = "default"
    ) -> str:
        """The name of the pod of ``index`` (torchrun's node rank) in ``attempt``."""
        for pod in self.pods(job, namespace):
            labels = pod.metadata.labels or {}
            annotations = pod.metadata.annotations or {}
            if labels.get("kubetune.io/attempt") == str(attempt) and annotations.get(
                "batch.kubernetes.io/job-completion-index"
            ) == str(index):
                return str(pod.metadata.name)
        raise AssertionError(f"no pod {index} of attempt {attempt} of {namespace}/{job}")

    def events(self, namespace: str = "default") -> list[Any]:
        return self.core.list_namespaced_event(namespace).items

    def wait(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        what: str,
        namespace: str = "default",
        timeout: float = 180.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            job = self.get(name, namespace)
            if job is not None and predicate(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"{namespace}/{name} never reached {what}; last: {job}")

    def wait_state(self, name: str, state: str, namespace: str = "default", **kw: Any) -> dict:
        return self.wait(
            name, lambda j: (j.get("status") or {}).get("state") == state, state, namespace, **kw
        )


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in job["status"]["conditions"] if c["type"] == type_)


@pytest.fixture
def cluster(
    kube: EmulatorServer,
    kubelet: Kubelet,
    job_controller: JobController,
    seaweedfs: SeaweedFS,
    tiny_model: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cluster]:
    """The harness (API, kubelet, Job controller) with the tiny model and data in S3, a
    storage Secret, and the operator.

    The test process gets the S3 keys to read results; pods get them only from the Secret
    (the kubelet passes pods no environment of the test's beyond PATH and the like).
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    bucket = seaweedfs.create_bucket()
    cluster = Cluster(kube, kubelet, seaweedfs, bucket, tmp_path)
    cluster.store.upload_dir(tiny_model, "models/tiny")
    cluster.store.upload_file(tiny_dataset, "data/train.jsonl")
    cluster.create_storage_secret("default")
    cluster.start_operator()
    try:
        yield cluster
    finally:
        cluster.stop_operator()
