"""The operator killed at any point, and the API server restarted under it, loses nothing.

* ``test_operator_sigkilled_at_random_points_heals``: the real operator (``kubetune
  operator``, a process of its own) is SIGKILLed once in each of 30 seeded trials, at
  one of: right after its n-th Job create, Event post or status patch reached the API
  server (the write lands, the operator never sees the answer), at a random delay after
  a FineTuneJob is applied, right after its Job delete for a deleted FineTuneJob, or at
  a random delay after such a delete; then restarted at once. Half the applied jobs fail
  their first attempt (retryable), so kills also fall around retries. After the last
  restart everything must settle: exactly the Jobs each job needs (each created once),
  every job Succeeded with a complete status consistent with its Jobs, every deleted job
  gone with its Jobs and pods, every state the status ever showed has its Event, every
  retry its Warning Event, and ``Retrying`` (where shown) holds until the next attempt
  runs.
* ``test_api_server_restart_under_a_running_operator``: the emulated API server stops
  for a second and starts again on its port (objects and history kept); a job applied, a
  job that fails once and a job suspended right after are all handled by the same
  operator process.

Stand-in trainers (tests/e2e/fake_trainer.py) keep each trial cheap. Timings are printed
(``-s``) for docs/reliability.md, never asserted. ``KUBETUNE_FAULT_SEED`` replays a run
(``KUBETUNE_FAULT_TRIALS`` changes the number of trials).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from harness import (
    ADMIN_USER,
    OPERATOR_USER,
    AuditEntry,
    EmulatorServer,
    JobController,
    Kubelet,
    OperatorProcess,
    make_emulator,
)
from kubernetes.client.exceptions import ApiException

from kubetune_operator.api.types import GROUP, PLURAL, VERSION
from kubetune_operator.events import REPORTING_CONTROLLER
from kubetune_operator.workload import service_name

pytestmark = pytest.mark.e2e

FAKE_TRAINER = str(Path(__file__).with_name("fake_trainer.py"))
IMAGES = {
    "fake:ok": [sys.executable, FAKE_TRAINER],
    "fake:flaky": [sys.executable, FAKE_TRAINER, "fail-once"],
    "fake:sleep": [sys.executable, FAKE_TRAINER, "sleep"],
}
NAMESPACE = "default"
SEED = int(os.environ.get("KUBETUNE_FAULT_SEED", "15"))
TRIALS = int(os.environ.get("KUBETUNE_FAULT_TRIALS", "30"))
TRIGGER_WAIT_S = 3.0  # a kill point not reached by then: the kill comes at the trial's end
KILL_POINTS = ("create", "event", "status", "apply+delay", "delete", "delete+delay")
FTJ = f"{GROUP}/{VERSION}/{PLURAL}"


def manifest(name: str, image: str, nodes: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "image": image,
            "model": {"source": "s3://bucket/models/tiny"},
            "dataset": {"sources": ["s3://bucket/data/train.jsonl"], "format": "alpaca"},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
            "training": {"maxSteps": 4, "batchSize": 2},
            "output": {"uri": f"s3://bucket/jobs/{name}"},
            "retryLimit": 2,
            "resources": {"nodes": nodes},  # 2: an Indexed Job of 2 pods and a Service
        },
    }


class Cluster:
    """The emulator, the Job controller, a kubelet with stand-in trainers and the real
    operator as a process, as the admin sees them."""

    def __init__(self, server: EmulatorServer, tmp: Path) -> None:
        self.server = server
        client = server.api_client(ADMIN_USER)
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        kubeconfig = server.write_kubeconfig(tmp / "operator-kubeconfig", OPERATOR_USER)
        self.operator = OperatorProcess(
            kubeconfig,
            tmp / "operator-logs",
            preload=True,
            args=["--image", "fake:ok", "--progress-interval", "1", "--resync-interval", "3"],
        )
        self.started_at = 0  # the operator's audit entries before its latest start

    def apply(self, name: str, image: str, nodes: int = 1) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, manifest(name, image, nodes)
        )

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": spec}
        )

    def jobs(self, name: str) -> list[Any]:
        selector = f"kubetune.io/job={name}"
        return self.batch.list_namespaced_job(NAMESPACE, label_selector=selector).items

    def pods(self, name: str) -> list[Any]:
        selector = f"kubetune.io/job={name}"
        return self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"never: {what}\noperator log:\n{self.operator.log_tail()}")
            time.sleep(0.05)

    def state(self, name: str) -> str | None:
        return ((self.get(name) or {}).get("status") or {}).get("state")

    def start_operator(self) -> None:
        self.started_at = len(self.server.emulator.audit.entries(OPERATOR_USER))
        self.operator.start()

    def wait_watching(self) -> None:
        """Until the operator started last has opened its watches."""
        wanted = {"finetunejobs", "jobs", "pods"}

        def watching() -> bool:
            entries = self.server.emulator.audit.entries(OPERATOR_USER)[self.started_at :]
            return wanted <= {e.resource for e in entries if e.verb == "watch"}

        self.wait("the restarted operator's watches", watching, 15)

    def kill_at(self, verb: str, resource: str, n: int) -> Callable[[], None]:
        """SIGKILL the operator when its ``n``-th ``verb resource`` request arrives (the
        request is still served: its write lands, its answer is lost)."""
        seen = 0
        pid = self.operator.pid

        def listener(entry: AuditEntry) -> None:
            nonlocal seen
            if entry.user == OPERATOR_USER and (entry.verb, entry.rbac_resource) == (
                verb,
                resource,
            ):
                seen += 1
                if seen == n and pid is not None:
                    os.kill(pid, signal.SIGKILL)

        return self.server.emulator.audit.listen(listener)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    emulator = make_emulator(forget_answered=True)  # thousands of requests: see the notes
    with (
        EmulatorServer(emulator) as server,
        JobController(server.url),
        Kubelet(server.url, tmp_path / "kubelet", max_grace_period=1, images=IMAGES),
    ):
        cluster = Cluster(server, tmp_path)
        with cluster.operator:
            yield cluster


@dataclass
class Trial:
    number: int
    point: str
    detail: str
    job: str
    fired: bool = False  # the kill happened at its point (else at the trial's end)
    seconds: float = 0.0  # from the trial's start to the operator's restart
    nodes: int = 1


def _run_trial(cluster: Cluster, trial: Trial, rng: random.Random, flaky: bool) -> None:
    """One trial: its action, one SIGKILL (at its point, at its delay, or after
    ``TRIGGER_WAIT_S``) and a restart. A kill at a request waits for the restarted
    operator's watches first (the request is then its work, not its start's); a kill at a
    delay may also hit its start."""
    operator = cluster.operator
    started = time.monotonic()
    if "delay" not in trial.point:
        cluster.wait_watching()
    stop_listening: Callable[[], None] = lambda: None  # noqa: E731
    delay = None
    if trial.point in ("create", "event", "status"):
        verb, resource = {
            "create": ("create", "jobs"),
            "event": ("create", "events"),
            "status": ("patch", "finetunejobs/status"),
        }[trial.point]
        n = (
            rng.randint(1, 2 if flaky else 1)
            if trial.point == "create"
            else rng.randint(1, 3 if flaky else 2)
        )
        if trial.point == "create" and (trial.number // len(KILL_POINTS)) % 2 == 0:
            # two nodes: the rendezvous Service is created before the Job
            trial.nodes, resource = 2, "services"
        trial.detail = f"at {verb} {resource} #{n}"
        stop_listening = cluster.kill_at(verb, resource, n)
        cluster.apply(trial.job, "fake:flaky" if flaky else "fake:ok", trial.nodes)
    elif trial.point == "apply+delay":
        delay = rng.uniform(0.0, 1.2)
        trial.detail = f"{delay:.2f} s after apply"
        cluster.apply(trial.job, "fake:flaky" if flaky else "fake:ok")
    else:  # a running job deleted: kill at its Job's delete, or at a delay after it
        cluster.apply(trial.job, "fake:sleep")
        cluster.wait(f"{trial.job} Running", lambda: cluster.state(trial.job) == "Running", 30)
        if trial.point == "delete":
            trial.detail = "at delete jobs #1"
            stop_listening = cluster.kill_at("delete", "jobs", 1)
        else:
            delay = rng.uniform(0.0, 0.6)
            trial.detail = f"{delay:.2f} s after delete"
        cluster.delete(trial.job)
    try:
        if delay is not None:
            time.sleep(delay)
        else:
            deadline = time.monotonic() + TRIGGER_WAIT_S
            while operator.alive and time.monotonic() < deadline:
                time.sleep(0.01)
        trial.fired = not operator.alive
        operator.kill()
    finally:
        stop_listening()
    cluster.start_operator()
    trial.seconds = time.monotonic() - started


def _status_history(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Each FineTuneJob's statuses as committed, oldest first (by uid)."""
    changes = cluster.server.call(lambda: cluster.server.emulator.history(FTJ))
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, obj in changes:
        status = obj.get("status") or {}
        uid = obj["metadata"]["uid"]
        if status and (not history[uid] or history[uid][-1] != status):
            history[uid].append(status)
    return history


def _states(statuses: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (state, message) of each state change."""
    changes: list[tuple[str, str]] = []
    for status in statuses:
        state = status.get("state")
        if state and (not changes or changes[-1][0] != state):
            changes.append((state, status.get("message") or ""))
    return changes


def test_operator_sigkilled_at_random_points_heals(cluster: Cluster) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    cluster.start_operator()
    trials: list[Trial] = []
    flaky: set[str] = set()
    for number in range(TRIALS):
        point = KILL_POINTS[number % len(KILL_POINTS)]
        job = f"{'s' if point.startswith('delete') else 't'}{number:02d}"
        trial = Trial(number, point, "", job)
        is_flaky = not point.startswith("delete") and rng.random() < 0.5
        if is_flaky:
            flaky.add(job)
        _run_trial(cluster, trial, rng, is_flaky)
        trials.append(trial)
    trials_s = time.monotonic() - started

    applied = [t.job for t in trials if t.job.startswith("t")]
    deleted = [t.job for t in trials if t.job.startswith("s")]
    settle_started = time.monotonic()
    cluster.wait(
        "every applied job Succeeded",
        lambda: all(cluster.state(job) == "Succeeded" for job in applied),
        timeout=60,
    )
    cluster.wait(
        "every deleted job gone with its Jobs and pods",
        lambda: all(
            cluster.get(job) is None and not cluster.jobs(job) and not cluster.pods(job)
            for job in deleted
        ),
        timeout=30,
    )
    settle_s = time.monotonic() - settle_started

    # Exactly the Jobs (and rendezvous Services) each job needs, each created once.
    job_changes = cluster.server.call(lambda: cluster.server.emulator.history("batch/v1/jobs"))
    created = Counter(obj["metadata"]["name"] for kind, obj in job_changes if kind == "ADDED")
    assert max(created.values()) == 1, [name for name, n in created.items() if n > 1]
    services = cluster.server.call(lambda: cluster.server.emulator.history("v1/services"))
    services_created = Counter(o["metadata"]["name"] for kind, o in services if kind == "ADDED")
    two_nodes = {t.job for t in trials if t.nodes == 2}
    assert sorted(services_created.elements()) == sorted(service_name(j) for j in two_nodes)
    for job in applied:
        body = cluster.get(job)
        assert body is not None
        status, meta = body["status"], body["metadata"]
        expected = 2 if job in flaky else 1
        attempt_jobs = sorted(cluster.jobs(job), key=lambda j: j.metadata.name)
        names = [j.metadata.name for j in attempt_jobs]
        assert names == [f"{job}-attempt-{i}" for i in range(1, expected + 1)], "\n".join(
            map(
                str,
                [
                    job,
                    names,
                    *_states(_status_history(cluster)[meta["uid"]]),
                    *[
                        e
                        for e in cluster.server.emulator.audit.entries()
                        if e.verb == "delete" and (e.name or "").startswith(job)
                    ],
                    [t for t in trials if t.job == job],
                ],
            )
        )
        assert status["attempts"] == expected, (job, status)
        first_created = attempt_jobs[0].metadata.creation_timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert meta["creationTimestamp"] <= status["startTime"] <= first_created, (job, status)
        assert status["completionTime"] >= status["startTime"]
        assert status["observedGeneration"] == meta["generation"]
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert {conditions.get(t) for t in ("Accepted", "Succeeded", "Ready")} == {"True"}, (
            job,
            conditions,
        )
        assert conditions["Running"] == conditions["Reconciling"] == "False", (job, conditions)
        assert status["artifact"]["uri"] == "s3://bucket/fake/adapter"
        nodes = 2 if job in two_nodes else 1
        assert [j.spec.completions for j in attempt_jobs] == [nodes] * expected

    # Every state a status ever showed has its Event (posted before the status was).
    events = cluster.core.list_namespaced_event(NAMESPACE).items
    by_uid: dict[str, set[str]] = defaultdict(set)
    for event in events:
        by_uid[event.involved_object.uid].add(event.message)
        assert event.action not in (None, "Action?"), event
        assert event.reporting_component == REPORTING_CONTROLLER, event
        assert event.reporting_instance not in (None, "", "dev"), event
    transitions = 0
    for uid, statuses in _status_history(cluster).items():
        states = _states(statuses)
        transitions += len(states)
        for state, message in states:
            assert message in by_uid[uid], f"no Event for {state}: {message!r} ({uid})"
        names = [s for s, _ in states]
        if "Retrying" in names:  # defect 11: holds until the next attempt runs (or ends)
            after = names[names.index("Retrying") + 1 :]
            assert after[:1] in (["Running"], ["Succeeded"]), names
            retrying = dict(states)["Retrying"]
            assert "StorageUnavailable" in retrying, retrying
    # Every retry has its Warning Event, even one whose Retrying status a kill lost.
    uids = {cluster.get(job)["metadata"]["uid"]: job for job in flaky}  # type: ignore[index]
    retry_events = {
        uids[e.involved_object.uid]
        for e in events
        if e.involved_object.uid in uids
        and e.type == "Warning"
        and e.reason == "StorageUnavailable"
        and "attempt 2 of 3 started" in e.message
    }
    assert retry_events == flaky, flaky - retry_events
    history = _status_history(cluster)
    shown_retrying = sum(any(s.get("state") == "Retrying" for s in history[uid]) for uid in uids)

    fired = Counter(t.point for t in trials if t.fired)
    delayed = sum("delay" in t.point for t in trials)
    late = len(trials) - sum(fired.values()) - delayed
    print(
        f"\n[operator faults] seed {SEED}: {len(trials)} SIGKILLs: {dict(fired)} at a request, "
        f"{delayed} at a random delay, {late} when a point was not reached; "
        f"{len(two_nodes)} two-node jobs (Services created {len(services_created)}); "
        f"{len(applied)} jobs applied ({len(flaky)} retried once, {shown_retrying} shown as "
        f"Retrying), {len(deleted)} deleted; Jobs created {sum(created.values())}, "
        f"duplicates 0; {transitions} state changes, {len(events)} Events, none missing; "
        f"trials {trials_s:.1f} s, settled in {settle_s:.1f} s; operator starts "
        f"{cluster.operator.starts}"
    )
    for trial in trials:
        when = "at its delay" if "delay" in trial.point else "fired" if trial.fired else "late"
        print(
            f"  trial {trial.number:2d} {trial.job} {trial.point:13s} {trial.detail} "
            f"({when}) {trial.seconds:.1f} s"
        )


def test_api_server_restart_under_a_running_operator(cluster: Cluster) -> None:
    """The API server goes away for a second and comes back on its port with its objects
    (as over the same etcd); the operator keeps running and misses nothing: a job
    applied, a job changed and a job that fails and retries right after the restart are
    all handled."""
    server, operator = cluster.server, cluster.operator
    operator.start()
    cluster.apply("steady", "fake:sleep")
    cluster.wait("steady Running", lambda: cluster.state("steady") == "Running", 30)
    watches_before = len(
        [e for e in server.emulator.audit.entries(OPERATOR_USER) if e.verb == "watch"]
    )

    down_started = time.monotonic()
    server.restart(down_seconds=1.0)
    back = time.monotonic()
    cluster.apply("fresh", "fake:ok")
    cluster.apply("flaky", "fake:flaky")
    cluster.patch_spec("steady", {"suspend": True})

    cluster.wait("fresh Succeeded", lambda: cluster.state("fresh") == "Succeeded", 20)
    fresh_s = time.monotonic() - back
    cluster.wait("flaky Succeeded", lambda: cluster.state("flaky") == "Succeeded", 20)
    cluster.wait("steady Suspended", lambda: cluster.state("steady") == "Suspended", 20)
    cluster.wait("steady's pod stopped", lambda: not cluster.pods("steady"), 20)
    caught_up_s = time.monotonic() - back

    assert operator.alive and operator.starts == 1, "the operator must ride out the outage"

    def watches() -> list[Any]:
        return [e for e in server.emulator.audit.entries(OPERATOR_USER) if e.verb == "watch"]

    # Each watch reopens after kopf's own backoff, which can outlast the jobs' settling
    # (a finished attempt is read live): wait for all three rather than race them.
    reopened = {"finetunejobs", "jobs", "pods"}
    cluster.wait(
        "the watches reopened",
        lambda: {e.resource for e in watches()[watches_before:]} >= reopened,
        30,
    )
    flaky = cluster.get("flaky")
    assert flaky is not None and flaky["status"]["attempts"] == 2
    assert [j.metadata.name for j in cluster.jobs("fresh")] == ["fresh-attempt-1"]
    (paused,) = cluster.jobs("steady")
    assert paused.spec.suspend is True
    events = cluster.core.list_namespaced_event(NAMESPACE).items
    for uid, statuses in _status_history(cluster).items():
        messages = {e.message for e in events if e.involved_object.uid == uid}
        for state, message in _states(statuses):
            assert message in messages, f"no Event for {state}: {message!r}"
    print(
        f"\n[API restart] down {back - down_started:.1f} s; after it: a new job Succeeded "
        f"in {fresh_s:.1f} s, all three (new, retried, suspended) settled in "
        f"{caught_up_s:.1f} s; operator watches re-opened: {len(watches()) - watches_before}"
    )
