"""GPU-hour accounting on the harness: a 2-node job with 4 GPUs per node, whose pods'
start times the test moves an hour and more into the past (as an admin may patch
pods/status), finishes while the operator is down; the restarted operator's
status.gpuSeconds is GPUs × each pod's held time from the pods' own timestamps, and the
two operator processes' /metrics counters add up to it, each counting only what it saw
added.

Stand-in trainers (no training): each pod waits for a file, then reports a result.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from harness import ADMIN_USER, OPERATOR_USER, EmulatorServer, JobController, Kubelet
from harness.client import KubeClient
from harness.network import free_port
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.api.types import GROUP, PLURAL, VERSION
from kubetune_operator.handlers import OperatorConfig
from kubetune_operator.runner import Operator, OperatorOptions, OperatorThread

pytestmark = pytest.mark.e2e

NAMESPACE = "default"
GPUS, NODES = 4, 2
# Each pod waits for the release file, then writes a result and exits 0.
HOLD = """
import json, os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
result = {"artifact": {"uri": "s3://bucket/acct/adapter", "digest": "sha256:00",
                       "sizeBytes": 1}, "metrics": {"train_loss": 1.0}}
with open(os.environ["KUBETUNE_TERMINATION_MESSAGE_PATH"], "w") as handle:
    json.dump(result, handle)
"""


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait(what: str, predicate: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)
    return value


def counter(port: int) -> float:
    """kubetune_gpu_seconds_total{namespace="default"} from an operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubetune_gpu_seconds_total":
                assert set(sample.labels) == {"namespace"}  # no per-job label
                if sample.labels["namespace"] == NAMESPACE:
                    return float(sample.value)
    return 0.0


@pytest.fixture
def node(kube: EmulatorServer, job_controller: JobController, tmp_path: Path) -> Iterator[Path]:
    """A kubelet whose trainer image waits for the returned file."""
    release = tmp_path / "release"
    images = {"fake:hold": [sys.executable, "-c", HOLD, str(release)]}
    with Kubelet(kube.url, tmp_path / "kubelet", max_grace_period=1, images=images):
        yield release


def start_operator(kube: EmulatorServer, tmp_path: Path, port: int) -> OperatorThread:
    kubeconfig = kube.write_kubeconfig(tmp_path / "operator-kubeconfig", OPERATOR_USER)
    options = OperatorOptions(
        config=OperatorConfig(
            image="fake:hold", progress_interval_seconds=1.0, resync_interval_seconds=3.0
        ),
        kubeconfig=str(kubeconfig),
        metrics_address="127.0.0.1",
        metrics_port=port,
        liveness_endpoint=None,
    )
    return Operator(options).start_in_thread()


def test_gpu_seconds_from_the_pods_timestamps_across_an_operator_restart(
    kube: EmulatorServer, node: Path, tmp_path: Path
) -> None:
    admin = kube.api_client(ADMIN_USER)
    core = kubernetes.client.CoreV1Api(admin)
    custom = kubernetes.client.CustomObjectsApi(admin)
    raw = KubeClient(kube.url, token=ADMIN_USER)

    def status() -> dict[str, Any]:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "acct")
        return job.get("status") or {}

    def pods() -> list[Any]:
        return core.list_namespaced_pod(NAMESPACE, label_selector="kubetune.io/job=acct").items

    first_port = free_port()
    first = start_operator(kube, tmp_path, first_port)
    try:
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "metadata": {"name": "acct", "namespace": NAMESPACE},
                "spec": {
                    "model": {"source": "s3://bucket/models/tiny"},
                    "dataset": {"sources": ["s3://bucket/data/train.jsonl"]},
                    "output": {"uri": "s3://bucket/jobs/acct"},
                    "resources": {"gpus": GPUS, "nodes": NODES},
                },
            },
        )

        def all_running() -> list[Any]:
            found = pods()
            phases = [(p.status.phase if p.status else None) for p in found]
            return found if phases == ["Running"] * NODES else []

        running = wait("both pods running", all_running)
        # Move each pod's start (when its node handed it the GPUs) into the past.
        moved = {}
        for index, pod in enumerate(sorted(running, key=lambda p: p.metadata.name)):
            start = pod.status.start_time - timedelta(seconds=3600 + 600 * index)
            moved[pod.metadata.name] = rfc3339(start)
            path = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod.metadata.name}/status"
            raw.patch(path, {"status": {"startTime": moved[pod.metadata.name]}})
        wait("the moved start times counted", lambda: status().get("gpuSeconds", 0) >= 4 * 7800)
        assert status()["state"] == "Running"
        seen_by_first = counter(first_port)
    finally:
        first.stop()
    written_by_first = status()["gpuSeconds"]
    counted_by_first = first.operator.metrics.registry.get_sample_value(
        "kubetune_gpu_seconds_total", {"namespace": NAMESPACE}
    )
    assert seen_by_first <= counted_by_first == written_by_first

    # The pods hold their GPUs 2 s more, then finish, while no operator runs.
    time.sleep(2)
    node.touch()
    wait("pods finished", lambda: all(p.status.phase == "Succeeded" for p in pods()))

    second_port = free_port()
    second = start_operator(kube, tmp_path, second_port)
    try:
        wait(
            "Succeeded, final",
            lambda: status().get("state") == "Succeeded" and status()["gpuUsage"][0].get("final"),
        )
        final = status()
        expected = 0
        for pod in pods():
            assert rfc3339(pod.status.start_time) == moved[pod.metadata.name]  # the pod's own
            finished = pod.status.container_statuses[0].state.terminated.finished_at
            expected += GPUS * int((finished - pod.status.start_time).total_seconds())
        assert final["gpuSeconds"] == expected
        assert final["gpuHours"] == round(expected / 3600, 2)
        assert final["gpuUsage"] == [
            {"attempt": 1, "gpusPerPod": GPUS, "gpuSeconds": expected, "final": True}
        ]
        assert written_by_first < expected
        # The restarted operator counts only what it added; together: the status.
        wait("the counter", lambda: counter(second_port) == expected - written_by_first, 10)
    finally:
        second.stop()
        raw.close()
