"""The harness's batch/v1 Job controller, cluster DNS and Kueue stand-in, with real
processes as pods: what the operator's Indexed Jobs per attempt rely on."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import ADMIN_USER, EmulatorServer, JobController, KubeClient, Kubelet, Kueue
from harness.jobs import COMPLETION_INDEX, condition, format_indexes, is_true, parse_indexes
from harness.network import parse_pod_name

pytestmark = pytest.mark.integration

T = TypeVar("T")
JOBS = "batch/v1/jobs"
WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"

PRINT_ENV = (
    "import os; print('index', os.environ['JOB_COMPLETION_INDEX'], 'host', os.environ['HOSTNAME'])"
)
SLEEP = "import time; print('sleeping', flush=True); time.sleep(60)"


def indexed_job(name: str, code: str, completions: int = 2, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python", "command": ["python", "-c", code]}
    template = {
        "metadata": {"labels": {"app": name}, "annotations": {"note": "kept"}},
        "spec": {"restartPolicy": "Never", "containers": [container]},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": template,
            **spec,
        },
    }


@pytest.fixture
def admin(kube: EmulatorServer) -> KubeClient:
    return KubeClient(kube.url, token=ADMIN_USER)


def create(admin: KubeClient, job: dict[str, Any]) -> dict[str, Any]:
    return admin.create("/apis/batch/v1/namespaces/default/jobs", job)


def patch_job(admin: KubeClient, name: str, spec: dict[str, Any]) -> None:
    admin.patch(f"/apis/batch/v1/namespaces/default/jobs/{name}", {"spec": spec})


def pods(admin: KubeClient, job: str) -> list[dict[str, Any]]:
    listed = admin.get("/api/v1/namespaces/default/pods", labelSelector=f"job-name={job}")
    return sorted(listed["items"], key=lambda p: p["metadata"]["name"])


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition of ``type_``, which must be there."""
    found = condition(obj, type_)
    assert found is not None, f"no {type_} condition in {obj}"
    return dict(found)


def has(type_: str, status: str = "True") -> Any:
    return lambda obj: (found := condition(obj, type_)) is not None and found["status"] == status


def eventually(probe: Callable[[], T], predicate: Callable[[T], Any], timeout: float = 15) -> T:
    """Poll ``probe()`` until ``predicate`` holds for its value; the value."""
    deadline = time.monotonic() + timeout
    while not predicate(value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"never matched; last: {value}")
        time.sleep(0.05)
    return value


def wait_pods(kube: EmulatorServer, admin: KubeClient, job: str, predicate: Any) -> list[Any]:
    """Poll the Job's pods until ``predicate(pods)``."""
    return eventually(lambda: pods(admin, job), predicate)


def running(count: int) -> Any:
    return lambda ps: (
        len(ps) == count and all(p.get("status", {}).get("phase") == "Running" for p in ps)
    )


# -- the Job controller ---------------------------------------------------------------


def test_indexed_job_runs_every_index_to_completion(
    kube: EmulatorServer, kubelet: Kubelet, job_controller: JobController, admin: KubeClient
) -> None:
    job = create(admin, indexed_job("ij", PRINT_ENV))
    done = kube.wait_for(JOBS, "default", "ij", has("Complete"))
    assert done is not None
    status = done["status"]
    assert (status["succeeded"], status["failed"], status["active"]) == (2, 0, 0)
    assert status["completedIndexes"] == "0-1"
    assert status["startTime"] and status["completionTime"]
    assert is_true(done, "SuccessCriteriaMet")
    assert cond(done, "Complete")["reason"] == "CompletionsReached"

    for index, pod in enumerate(pods(admin, "ij")):
        meta, spec = pod["metadata"], pod["spec"]
        assert re.fullmatch(rf"ij-{index}-[a-z0-9]{{5}}", meta["name"])
        assert spec["hostname"] == f"ij-{index}"
        assert meta["labels"] == {
            "app": "ij",
            "batch.kubernetes.io/job-name": "ij",
            "job-name": "ij",
            "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
            "controller-uid": job["metadata"]["uid"],
            "batch.kubernetes.io/job-completion-index": str(index),
        }
        assert meta["annotations"] == {
            "note": "kept",
            "batch.kubernetes.io/job-completion-index": str(index),
        }
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": "ij",
                "uid": job["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert pod["status"]["phase"] == "Succeeded"
        assert kubelet.logs(meta["name"]) == f"index {index} host ij-{index}\n"

    admin.delete("/apis/batch/v1/namespaces/default/jobs/ij")
    wait_pods(kube, admin, "ij", lambda ps: not ps)  # garbage-collected with the Job


FAIL_ONE = (
    "import os, sys, time\n"
    "if os.environ['JOB_COMPLETION_INDEX'] == '1':\n"
    "    time.sleep(0.5); sys.exit(1)\n"
    "time.sleep(60)\n"
)


def test_a_failed_index_fails_the_job_and_stops_the_others(
    kube: EmulatorServer, kubelet: Kubelet, job_controller: JobController, admin: KubeClient
) -> None:
    create(admin, indexed_job("fj", FAIL_ONE))
    failed = kube.wait_for(JOBS, "default", "fj", has("Failed"))
    assert failed is not None
    assert cond(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    assert is_true(failed, "FailureTarget")
    assert (failed["status"]["failed"], failed["status"]["active"]) == (1, 0)
    assert "completionTime" not in failed["status"]
    left = pods(admin, "fj")  # the failed pod stays, the other one was deleted
    assert [(p["metadata"]["labels"]["job-name"], p["status"]["phase"]) for p in left] == [
        ("fj", "Failed")
    ]
    sleeper = next(r for r in kubelet.runs() if r.name.startswith("fj-0-"))
    assert kubelet.wait_finished(sleeper.name, timeout=10) == 128 + signal.SIGTERM


def test_a_pod_deleted_while_running_fails_the_job(
    kube: EmulatorServer, kubelet: Kubelet, job_controller: JobController, admin: KubeClient
) -> None:
    create(admin, indexed_job("dj", SLEEP, completions=1))
    (pod,) = wait_pods(kube, admin, "dj", running(1))
    admin.delete(f"/api/v1/namespaces/default/pods/{pod['metadata']['name']}")
    failed = kube.wait_for(JOBS, "default", "dj", has("Failed"))
    assert cond(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    assert failed is not None and failed["status"]["failed"] == 1
    assert pods(admin, "dj") == []  # no replacement


def test_suspend_deletes_pods_and_resume_recreates_them(
    kube: EmulatorServer, kubelet: Kubelet, job_controller: JobController, admin: KubeClient
) -> None:
    create(admin, indexed_job("sj", SLEEP))
    first = {p["metadata"]["name"] for p in wait_pods(kube, admin, "sj", running(2))}

    patch_job(admin, "sj", {"suspend": True})
    suspended = kube.wait_for(JOBS, "default", "sj", has("Suspended"))
    assert suspended is not None
    assert cond(suspended, "Suspended")["reason"] == "JobSuspended"
    assert "startTime" not in suspended["status"]
    wait_pods(kube, admin, "sj", lambda ps: not ps)
    for name in first:
        assert kubelet.wait_finished(name, timeout=10) == 128 + signal.SIGTERM
    assert (kube.object(JOBS, "default", "sj") or {})["status"]["failed"] == 0

    patch_job(admin, "sj", {"suspend": False})
    resumed = kube.wait_for(JOBS, "default", "sj", has("Suspended", "False"))
    assert resumed is not None
    assert cond(resumed, "Suspended")["reason"] == "JobResumed"
    second = wait_pods(kube, admin, "sj", running(2))
    assert {p["metadata"]["name"] for p in second}.isdisjoint(first)
    assert sorted(p["spec"]["hostname"] for p in second) == ["sj-0", "sj-1"]
    assert resumed["status"]["startTime"]


def test_active_deadline_fails_the_job(
    kube: EmulatorServer, kubelet: Kubelet, job_controller: JobController, admin: KubeClient
) -> None:
    create(admin, indexed_job("tj", SLEEP, activeDeadlineSeconds=1))
    failed = kube.wait_for(JOBS, "default", "tj", has("Failed"))
    assert cond(failed, "Failed")["reason"] == "DeadlineExceeded"
    wait_pods(kube, admin, "tj", lambda ps: not ps)


# -- cluster DNS and ports ------------------------------------------------------------

RENDEZVOUS = """
import os, socket, time
index = os.environ['JOB_COMPLETION_INDEX']
addr, port = os.environ['PET_MASTER_ADDR'], int(os.environ['PET_MASTER_PORT'])
print(index, addr, port, os.environ['FQDN'], flush=True)
if index == '0':
    server = socket.create_server((addr, port))
    connection, _ = server.accept()
    message = connection.recv(100).decode()
    open(os.environ['KUBETUNE_TERMINATION_MESSAGE_PATH'], 'w').write(message)
else:
    for _ in range(100):
        try:
            sock = socket.create_connection((addr, port), timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    sock.sendall(('hello from ' + os.environ['POD_IP']).encode())
"""


def test_rank_zero_is_reachable_by_its_dns_name(
    kube: EmulatorServer, kubelet: Kubelet, job_controller: JobController, admin: KubeClient
) -> None:
    admin.create(
        "/api/v1/namespaces/default/services",
        {
            "metadata": {"name": "ddp"},
            "spec": {"clusterIP": "None", "selector": {"job-name": "rv"}},
        },
    )
    job = indexed_job("rv", RENDEZVOUS)
    template = job["spec"]["template"]["spec"]
    template["subdomain"] = "ddp"
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    template["containers"][0]["env"] = [
        {"name": "PET_MASTER_ADDR", "value": "rv-0.ddp"},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "FQDN", "value": "rv-1.ddp.default.svc.cluster.local"},
        pod_ip,
    ]
    create(admin, job)
    done = kube.wait_for(JOBS, "default", "rv", has("Complete"), timeout=30)
    assert done is not None
    rank0, rank1 = pods(admin, "rv")
    ip0, ip1 = rank0["status"]["podIP"], rank1["status"]["podIP"]
    message = rank0["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    assert message == f"hello from {ip1}"  # a real TCP connection from index 1 to index 0
    lines = [kubelet.logs(p["metadata"]["name"]).split() for p in (rank0, rank1)]
    assert [line[:2] for line in lines] == [["0", ip0], ["1", ip0]]
    assert lines[0][2] == lines[1][2] != "29500"  # the rank-0 pod's own port, for both
    assert [line[3] for line in lines] == [ip1, ip1]  # the full name resolves too


# -- Kueue ----------------------------------------------------------------------------


def queued_job(name: str, queue: str = "team") -> dict[str, Any]:
    job = indexed_job(name, SLEEP, completions=1, suspend=True)
    job["metadata"]["labels"] = {
        "kueue.x-k8s.io/queue-name": queue,
        "kueue.x-k8s.io/priority-class": "low",
    }
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    return job


def test_kueue_admits_by_quota_and_preempts(
    kube: EmulatorServer,
    kubelet: Kubelet,
    job_controller: JobController,
    kueue: Kueue,
    admin: KubeClient,
) -> None:
    first = create(admin, queued_job("q1"))

    def workload(job: str, predicate: Any) -> dict[str, Any]:
        kube.wait_for(JOBS, "default", job, lambda j: kueue.workload("default", job) is not None)
        found = kueue.workload("default", job)
        assert found is not None
        name = found["metadata"]["name"]
        obj = kube.wait_for(WORKLOADS, "default", name, lambda w: w is not None and predicate(w))
        assert obj is not None
        return obj

    pending = workload("q1", has("QuotaReserved", "False"))
    assert re.fullmatch(r"job-q1-[0-9a-f]{5}", pending["metadata"]["name"])
    assert pending["metadata"]["labels"] == {"kueue.x-k8s.io/job-uid": first["metadata"]["uid"]}
    assert pending["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]
    assert pending["spec"]["queueName"] == "team"
    assert pending["spec"]["priorityClassName"] == "low"
    assert pending["spec"]["podSets"][0]["count"] == 1
    reserved = condition(pending, "QuotaReserved")
    assert reserved is not None and reserved["reason"] == "Pending"
    assert reserved["message"] == (
        "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu "
        "in flavor default-flavor, request > maximum capacity (1 > 0)"
    )
    assert has("Admitted", "False")(pending)
    assert (kube.object(JOBS, "default", "q1") or {})["spec"]["suspend"] is True
    assert pods(admin, "q1") == []

    kueue.set_quota("team", 1)
    admitted = workload("q1", has("Admitted"))
    assert is_true(admitted, "QuotaReserved")
    assert admitted["status"]["admission"]["clusterQueue"] == "team"
    wait_pods(kube, admin, "q1", running(1))

    create(admin, queued_job("q2"))  # the queue is full: it waits
    waiting = workload("q2", has("QuotaReserved", "False"))
    assert cond(waiting, "QuotaReserved")["message"].endswith(
        "insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 1 more needed"
    )

    kueue.preempt("default", "q1")
    evicted = workload("q1", has("Evicted"))
    assert cond(evicted, "Evicted")["reason"] == "Preempted"
    assert cond(evicted, "Evicted")["message"] == (
        "Preempted to accommodate a higher priority Workload"
    )
    assert has("Admitted", "False")(evicted) and "admission" not in evicted["status"]
    kube.wait_for(JOBS, "default", "q1", lambda j: j is not None and j["spec"]["suspend"])
    kube.wait_for(JOBS, "default", "q1", has("Suspended"))
    wait_pods(kube, admin, "q1", lambda ps: not ps)
    workload("q2", has("Admitted"))  # q1's quota went to the next in line
    wait_pods(kube, admin, "q2", running(1))
    assert has("Admitted", "False")(kueue.workload("default", "q1"))  # held: no new quota yet

    kueue.set_quota("team", 2)
    readmitted = workload("q1", has("Evicted", "False"))
    assert is_true(readmitted, "Admitted")
    wait_pods(kube, admin, "q1", running(1))
    assert kueue.usage("team") == 2

    admin.delete("/apis/batch/v1/namespaces/default/jobs/q1")  # frees its quota
    kube.wait_for(WORKLOADS, "default", readmitted["metadata"]["name"], lambda w: w is None)
    eventually(lambda: kueue.usage("team"), lambda used: used == 1)


ALL_REDUCE = """
import os, torch, torch.distributed as dist
dist.init_process_group('gloo')
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
print('rank', dist.get_rank(), 'of', dist.get_world_size(), 'sum', int(value.item()), flush=True)
dist.destroy_process_group()
"""


def test_torchrun_ranks_meet_across_pods(
    kube: EmulatorServer,
    kubelet: Kubelet,
    job_controller: JobController,
    admin: KubeClient,
    tmp_path: Path,
) -> None:
    """Two pods, one torchrun node each, rendezvous at rank 0's DNS name (gloo on CPU)."""
    pytest.importorskip("torch")
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    admin.create(
        "/api/v1/namespaces/default/services",
        {"metadata": {"name": "tr"}, "spec": {"clusterIP": "None", "selector": {"job-name": "tr"}}},
    )
    argv = ["python", "-m", "torch.distributed.run", str(script)]
    job = indexed_job("tr", "", completions=2)
    template = job["spec"]["template"]["spec"]
    template["subdomain"] = "tr"
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
    template["containers"][0] |= {
        "command": argv,
        "env": [
            {"name": "PET_NNODES", "value": "2"},
            {"name": "PET_NPROC_PER_NODE", "value": "1"},
            {"name": "PET_NODE_RANK", "valueFrom": index},
            {"name": "PET_MASTER_ADDR", "value": "tr-0.tr.default.svc"},
            {"name": "PET_MASTER_PORT", "value": "29500"},
        ],
    }
    create(admin, job)
    done = kube.wait_for(JOBS, "default", "tr", has("Complete"), timeout=60)
    assert done is not None
    logs = [kubelet.logs(p["metadata"]["name"]) for p in pods(admin, "tr")]
    assert "rank 0 of 2 sum 3" in logs[0] and "rank 1 of 2 sum 3" in logs[1], logs


def test_pod_dns_names_and_index_ranges() -> None:
    assert parse_pod_name("j-0.svc1", "ns") == ("j-0", "svc1", "ns")
    assert parse_pod_name("j-0.svc1.team", "ns") == ("j-0", "svc1", "team")
    assert parse_pod_name("j-0.svc1.team.svc", "ns") == ("j-0", "svc1", "team")
    assert parse_pod_name("j-0.svc1.team.svc.cluster.local", "ns") == ("j-0", "svc1", "team")
    for value in ("127.0.0.1", "localhost", "http://a.b", "a.b.c.d", "A.b", "s3.x.y.svc.other"):
        assert parse_pod_name(value, "ns") is None, value
    assert format_indexes([5, 0, 2, 1]) == "0-2,5"
    assert parse_indexes("0-2,5") == {0, 1, 2, 5} and parse_indexes("") == set()
