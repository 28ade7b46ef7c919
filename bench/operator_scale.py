"""How the operator scales: N FineTuneJobs applied at once, then trainers reporting progress.

For each N (``--jobs 100,500,1000``):

* a fresh Kubernetes API emulator (``tests/harness``) is served from this process, and
  ``kubetune operator`` runs as a separate process against it (as the operator's service
  account), so that its memory and CPU can be measured alone with psutil: RSS is polled
  every 50 ms (idle before any job, and peak), CPU seconds (user + sys) are read per phase;
* **apply**: N FineTuneJobs are created as fast as a few client threads can (raw HTTP, no
  ``kubernetes`` client, so the bench costs little CPU); each job's creation and the first
  appearance of its workload, the attempt Job ``<job>-attempt-1`` (batch/v1, Indexed), are
  timestamped *inside the emulator*, at the moment the change is committed (a recorder
  stands in for a watch there), so the latency does not include any client's delay.
  Reported: apply → Job p50/p95/max, the time from the first apply until all N attempt
  Jobs exist, and until all N jobs have a status;
* **the Job controller's part** is played by :class:`JobStandIn`, a thread of this process
  with its own keep-alive connection: for each attempt Job, as soon as it is committed, it
  creates the Job's pods exactly as the harness's ``JobController`` would
  (``harness.jobs.pod_for``: ``<job>-attempt-1-<index>-<5 random>``, the template's labels,
  label and annotation ``batch.kubernetes.io/job-completion-index``, a controller
  ownerReference to the Job) and writes the Job's status (``startTime``, ``active``,
  ``ready``), so the operator sees the events a cluster would send it. The harness's
  ``JobController`` itself is not run: each of its passes filters all pods for every Job
  and passes follow every event, so at 1,000 jobs it would take a core of this process
  from the emulator and the bench would measure the harness. The stand-in's CPU is
  reported on its own (``job_stand_in``), next to the operator's and the emulator's;
* **progress**: for ``--progress-jobs`` jobs the bench plays kubelet (pod status Running
  and ready, podIP 127.0.0.(10+i); the Job's ``ready`` count follows) and trainer (the
  trainer's own ``ProgressServer`` on that IP, at ``--trainer-progress-port``), bumps the
  step at a known time and measures until the job's ``status.progress.step`` shows it (the
  operator polls every ``--progress-interval`` seconds, so expect about half of it at the
  median); pod Running → job ``Running`` is timed too;
* **finish** (with progress): the same jobs' pods end (Succeeded, exit code 0, the
  trainer's result as termination message) and their Jobs get ``SuccessCriteriaMet`` then
  ``Complete``, as the Job controller writes them; reported: Job Complete → job
  ``Succeeded``;
* **running** (``--running-jobs K``, default 0: off; after the phases above): K jobs run
  and report at once, for issue 12's target "1,000 jobs running and reporting: step →
  status p95 ≤ 15 s at the default poll interval, operator ≤ 0.25 core". The bench plays
  kubelet for K pods as the progress phase does (Running and ready, a podIP of its own,
  127.1.x.y: Linux routes all of 127/8 to loopback; the Job's ``ready`` 1) and one
  :class:`TrainerStandIn` stands in for the K trainers: one asyncio thread listening on
  the progress port at each of the K IPs, answering ``GET /progress`` with the JSON the
  trainer's ``ProgressServer`` serves (``ProgressState.as_json()``), for the pod the
  socket's local address names (K real ``ProgressServer`` instances, a thread per request
  each, would cost this process more than the operator under test). Once every job's
  status shows step 1, the window of ``--running-seconds`` opens: each trainer advances
  one step every ``--running-step-seconds`` on its own clock (staggered by a random
  offset), so the moment a step became visible at its endpoint is known exactly. Reported
  over the window: step visible → the job's committed ``status.progress.step`` ≥ it
  (p50/p95/max over all jobs and steps; steps still unreported when the window closes are
  waited for, frozen, and any never reported are counted), the operator's share of a
  core, its API requests per second (and by verb), the trainer GETs served and the time
  between two GETs of the same trainer (the operator's poll period, round included).
  Unless ``--progress-interval`` is given, the operator then runs with its own default
  poll interval (the flag is not passed; the JSON's ``config.progress_interval`` says
  which), for all phases of the run;
* the emulator is the harness's with two costs that grow with the number of requests
  and objects taken out (:class:`BenchEmulator`; ``--harness-emulator`` serves the stock
  one, which then sets the pace itself); its CPU (its thread in this process) is reported
  next to the operator's, and every request the operator made is counted from the
  emulator's audit log, so a slow emulator is not mistaken for a slow operator;
* a correct operator makes exactly one attempt Job per job here (no pod ever fails): any
  other Job is reported as ``extra_jobs`` ("WRONG" in the table), and so is any pod the
  stand-in did not create (``unexpected_pods``: the operator creates no pods itself).

Pods stay Pending (there is no kubelet) except those the bench starts. Targets (issue):
1,000 jobs → all workloads (attempt Jobs) within 60 s, operator peak RSS ≤ 300 MB,
apply → workload p50 ≤ 150 ms; with 1,000 jobs running, step → status p95 ≤ 15 s and
the operator ≤ 0.25 core (checked when ``--running-jobs`` ≥ 1000). "MB" here is MiB.
Linux only (the trainers listen on 127.0.0.x and 127.1.x.y aliases).

    .venv/bin/python bench/operator_scale.py                      # 100, 500, 1000 jobs
    .venv/bin/python bench/operator_scale.py --jobs 300 --apply-rate 10 --progress-rounds 0
    .venv/bin/python bench/operator_scale.py --jobs 1000 --py-spy /tmp/prof
    .venv/bin/python bench/operator_scale.py --jobs 1000 --running-jobs 1000 \
        --running-seconds 90 --progress-rounds 0      # issue 12's "1,000 running" target

Prints a table, then one JSON line with everything. ``--py-spy DIR`` also records the
operator's GIL-holding thread with py-spy during the apply phase (``DIR/operator-N.txt``)
and the running window (``DIR/operator-N-running.txt``): collapsed stacks; the JSON gets
the CPU split into buckets, kopf / kubernetes client / our code, and the hottest
functions; numbers taken while profiling are not clean.
``--operator-cmd`` runs another build of the operator (e.g. a patched copy) for A/B runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import platform
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the harness
sys.path.insert(0, str(ROOT / "trainer-image"))  # the trainer's ProgressServer

import attrs  # noqa: E402
import kmock  # noqa: E402
import psutil  # noqa: E402
from harness import ADMIN_USER, OPERATOR_USER, EmulatorServer  # noqa: E402
from harness import emulator as emulator_module  # noqa: E402
from harness.emulator import Emulator, _Watch  # noqa: E402
from harness.jobs import JOB_CONTROLLER_USER, is_true, pod_for, set_condition  # noqa: E402
from harness.operator_process import OperatorProcess  # noqa: E402
from harness.selectors import parse_field_selector, parse_label_selector  # noqa: E402

from kubetune_trainer.progress import ProgressServer, ProgressState  # noqa: E402

NAMESPACE = "default"
JOBS_PATH = f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/finetunejobs"
PODS_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods"
ATTEMPT_JOBS_PATH = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"  # the operator's workloads
TARGET_ALL_JOBS_S = 60.0
TARGET_PEAK_RSS_MB = 300.0
TARGET_P50_MS = 150.0
TARGET_RUNNING_STEP_P95_S = 15.0  # with 1,000 jobs running and reporting
TARGET_RUNNING_CORE = 0.25
MB = 1024 * 1024
KUBETUNE = Path(sys.executable).parent / "kubetune"


# --------------------------------------------------------------------------- small helpers


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": _round(percentile(ms, 50)),
        "p95_ms": _round(percentile(ms, 95)),
        "max_ms": _round(max(ms) if ms else None),
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def job_manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "hf://bench/tiny-model"},
            "dataset": {"sources": [f"s3://bench-data/{name}/train.jsonl"], "format": "alpaca"},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
            "training": {"epochs": 1, "batchSize": 4},
            "output": {"uri": f"s3://bench-artifacts/{name}"},
            # gpus: 0, as the e2e tests: with a GPU the pod's limit is an int, which the
            # kubernetes client (>= 35, pydantic-validated) refuses before sending it
            "resources": {"gpus": 0},
        },
    }


class Http:
    """One keep-alive connection to the emulator, as the admin user (cheap, no models)."""

    def __init__(self, url: str, user: str = ADMIN_USER) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.auth = f"Bearer {user}"

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> tuple[int, bytes]:
        headers = {"Authorization": self.auth, "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- the emulator


SIMPLE_SELECTOR = re.compile(r"([A-Za-z0-9._/-]+)==?([A-Za-z0-9._-]*)")


def _order(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"].get("namespace") or "", obj["metadata"]["name"]


@attrs.define(kw_only=True)
class BenchEmulator(Emulator):
    """The harness emulator with the costs that grow with the cluster taken out.

    The harness emulator is built for tests with a few dozen objects; two of its costs
    grow with what it has served, and at a few hundred jobs they, not the operator, set
    the pace (see docs/benchmarks.md):

    * kmock (0.8) keeps every request for test assertions and, to pick the reaction for
      a new request, tests ``request in reaction`` by iterating *all* requests recorded
      so far through the reaction's filters: quadratic. Here a request is forgotten once
      it is answered (the harness emulator's ``forget_answered``);
    * every LIST walks kmock's whole store (all kinds) and sorts all objects of the kind
      before applying the selectors. Here the live objects are indexed per kind, and a
      ``key=value`` label selector (the operator's LISTs of a job's Jobs and pods) is tried with a
      dict lookup before the harness's own selector check.

    Also counts the operator's responses by method and status.
    """

    _live_index: dict[kmock.resource, dict[Any, dict[str, Any]]] = attrs.field(
        factory=dict, init=False
    )
    responses: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    async def __call__(self, raw_request: Any) -> Any:
        response = await super().__call__(raw_request)
        if raw_request.headers.get("Authorization") == f"Bearer {OPERATOR_USER}":
            self.responses[f"{raw_request.method} {response.status}"] += 1
        return response

    def _commit(self, key: Any, type_: str, obj: dict[str, Any], old: Any) -> dict[str, Any]:
        stored = super()._commit(key, type_, obj, old)
        live = self._live_index.setdefault(key[0], {})
        if type_ == "DELETED":
            live.pop(key, None)
        else:
            live[key] = stored
        return stored

    def _live(self, resource: kmock.resource) -> list[dict[str, Any]]:
        return sorted(self._live_index.get(resource, {}).values(), key=_order)

    async def _serve_list(self, request: kmock.Request) -> Any:
        info = self._info(request)
        labels, fields = self._selectors(request)
        assert request.resource is not None
        view = _Watch(request.resource, request.namespace, None, labels, fields)
        live: Any = self._live_index.get(request.resource, {}).values()
        if simple := SIMPLE_SELECTOR.fullmatch(request.params.get("labelSelector") or ""):
            key, value = simple.groups()
            live = [o for o in live if (o["metadata"].get("labels") or {}).get(key) == value]
        return {
            "apiVersion": self._api_version(request.resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": sorted((o for o in live if view.sees(o)), key=_order),
        }


def bench_emulator(harness: bool) -> Emulator:
    """A :class:`BenchEmulator` (or the harness's own), set up as ``make_emulator`` does."""
    if harness:
        return emulator_module.make_emulator()
    original = emulator_module.Emulator
    setattr(emulator_module, "Emulator", BenchEmulator)  # noqa: B010
    try:  # make_emulator() constructs whatever emulator_module.Emulator is
        return emulator_module.make_emulator(forget_answered=True)
    finally:
        setattr(emulator_module, "Emulator", original)  # noqa: B010


# --------------------------------------------------------------------------- recording


class Recorder:
    """Stands in for a watch queue inside the emulator: timestamps every committed change.

    ``put_nowait`` is called by the emulator, in its loop, the moment a change is stored
    (the same instant a real watch would be fed), so the times carry no client delay.
    ``on_attempt`` is called there with each new attempt Job (the Job controller's cue).
    """

    def __init__(self, on_attempt: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_attempt = on_attempt
        self.job_added: dict[str, float] = {}
        self.job_status: dict[str, float] = {}  # first time the job had a status.state
        self.job_states: dict[str, dict[str, float]] = collections.defaultdict(dict)
        self.attempt_added: dict[str, float] = {}  # the operator's batch/v1 Jobs
        self.attempt_complete: dict[str, float] = {}  # their Complete condition
        self.pod_added: dict[str, float] = {}
        self.steps: dict[str, dict[int, float]] = collections.defaultdict(dict)
        self.events: collections.Counter[str] = collections.Counter()

    def put_nowait(self, event: Any) -> None:
        if event is None:  # the emulator is closing its watches
            return
        now = time.monotonic()
        obj = event.obj
        name = obj["metadata"]["name"]
        kind = obj.get("kind", "?")
        self.events[f"{kind} {event.type}"] += 1
        if kind == "Pod":
            if event.type == "ADDED":
                self.pod_added.setdefault(name, now)
        elif kind == "Job":
            if event.type == "ADDED" and name not in self.attempt_added:
                self.attempt_added[name] = now
                if self.on_attempt is not None:
                    self.on_attempt(obj)
            if is_true(obj, "Complete"):
                self.attempt_complete.setdefault(name, now)
        elif kind == "FineTuneJob":
            if event.type == "ADDED":
                self.job_added.setdefault(name, now)
            status = obj.get("status") or {}
            if state := status.get("state"):
                self.job_status.setdefault(name, now)
                self.job_states[name].setdefault(state, now)
            step = (status.get("progress") or {}).get("step")
            if step is not None:
                self.steps[name].setdefault(int(step), now)


def install_recorder(
    server: EmulatorServer, on_attempt: Callable[[dict[str, Any]], None] | None = None
) -> Recorder:
    recorder = Recorder(on_attempt)
    everything = parse_label_selector(None), parse_field_selector(None)

    def install() -> None:
        for resource in RECORDED:
            watch = _Watch(kmock.resource(resource), None, None, *everything)
            watch.queue = recorder  # type: ignore[assignment]
            server.emulator._watches.add(watch)

    server.call(install)
    return recorder


RECORDED = ("v1/pods", "batch/v1/jobs", "kubetune.io/v1alpha1/finetunejobs")


class JobStandIn(threading.Thread):
    """Plays kube-controller-manager's Job controller for the attempt Jobs, and no more.

    For each attempt Job (fed by the :class:`Recorder` as it is committed) it creates one
    pod per index (``parallelism``), built by the harness's own ``pod_for`` (so exactly the
    pods its ``JobController`` makes), then writes the Job's status as the controller does
    (``startTime``, ``active``, ``ready: 0``). One thread, one keep-alive connection, as the
    Job controller's service account. The later transitions (a pod Running and ready, the
    Job Complete) are written by the progress and finish phases through :meth:`patch`.
    Not emulated: everything about failures, suspension and deletion (none happens here).
    """

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="job-stand-in")
        self.url = url
        self._jobs: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._api = Http(url, JOB_CONTROLLER_USER)  # connects on first use
        self._lock = threading.Lock()  # one request at a time on the connection
        self.fed = 0
        self.done = 0
        self.pods: dict[str, list[str]] = {}  # attempt Job → its pods by index
        self.pod_names: set[str] = set()
        self.errors: list[str] = []

    def put(self, job: dict[str, Any]) -> None:
        self.fed += 1
        self._jobs.put(job)

    def idle(self) -> bool:
        return self.done >= self.fed

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._start(job)
            except Exception as exc:  # reported in the result
                self.errors.append(f"{job['metadata']['name']}: {exc}")
            finally:
                self.done += 1

    def stop(self) -> None:
        self._jobs.put(None)
        self.join(10)
        with self._lock:
            self._api.close()

    def _start(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        if spec.get("suspend"):  # Kueue's business (no queue in this bench)
            return
        indexed = spec.get("completionMode") == "Indexed"
        names = []
        for index in range(int(spec.get("parallelism", 1))):
            body = json.dumps(pod_for(job, index if indexed else None)).encode()
            created = self._request("POST", PODS_PATH, body, "application/json", 201)
            names.append(created["metadata"]["name"])
        self.pods[meta["name"]] = names
        self.pod_names.update(names)
        self.patch_job(meta["name"], {"startTime": rfc3339(), "active": len(names), "ready": 0})

    def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(patch).encode()
        return self._request("PATCH", path, body, "application/merge-patch+json", 200)

    def patch_job(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.patch(f"{ATTEMPT_JOBS_PATH}/{name}/status", {"status": status})

    def _request(
        self, method: str, path: str, body: bytes, content_type: str, expect: int
    ) -> dict[str, Any]:
        with self._lock:
            status, answer = self._api.request(method, path, body, content_type)
        if status != expect:
            raise RuntimeError(f"{method} {path}: {status} {answer[:300]!r}")
        return dict(json.loads(answer))


class TrainerStandIn(threading.Thread):
    """Stands in for the trainers of the running phase: their ``/progress`` endpoints.

    One asyncio loop in one thread listens on ``port`` at each trainer's IP (one socket
    per IP; which trainer was asked is the connection's local address) and answers
    ``GET /progress`` with the JSON the trainer's ``ProgressServer`` serves: a
    ``ProgressState.as_json()`` with this trainer's step filled in (epoch, loss, percent,
    ETA and tokens follow it), then closes the connection, as ``ProgressServer`` does for
    the operator's ``urllib`` (``Connection: close``). Anything else gets a 404.

    Steps: 1 until :meth:`open` (``begin``, ``end``); then trainer i shows step 2 from
    ``begin + offset_i`` (offset uniform in [0, period)), step 3 a period later, and so
    on, while the step's time is before ``end``; after ``end`` the steps stay. The step is
    computed per request, so the instant a step became visible is its boundary, exactly.
    """

    TOTAL_STEPS = 100_000

    def __init__(self, ips: list[str], port: int, period: float) -> None:
        super().__init__(daemon=True, name="trainer-stand-in")
        self.ips, self.port, self.period = ips, port, period
        self.offsets = {ip: random.uniform(0.0, period) for ip in ips}
        self.begin = self.end = float("inf")
        self.gets = 0  # /progress GETs answered
        self.gaps: list[float] = []  # between two GETs of one trainer, inside the window
        self._last_get: dict[str, float] = {}
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        state = ProgressState(phase="training", step=1, total_steps=self.TOTAL_STEPS)
        state.learning_rate, state.tokens_per_second = 1e-4, 1000.0
        self._template = state.as_json()

    # -- the clock

    def open(self, begin: float, end: float) -> None:
        self.begin, self.end = begin, end

    def step(self, ip: str, now: float) -> int:
        first = self.begin + self.offsets[ip]  # step 2 from here
        last = min(now, self.end - 1e-9)
        return 1 if last < first else 2 + int((last - first) // self.period)

    def visible(self, ip: str) -> dict[int, float]:
        """Step → the moment it became visible, for the steps of the window."""
        first = self.begin + self.offsets[ip]
        steps, step, at = {}, 2, first
        while at < self.end:
            steps[step] = at
            step, at = step + 1, first + (step - 1) * self.period
        return steps

    # -- the server

    def body(self, ip: str, now: float) -> bytes:
        step = self.step(ip, now)
        data = dict(self._template)
        total = self.TOTAL_STEPS
        data.update(
            step=step,
            epoch=step / total,
            train_loss=2.0 / step,
            percent=int(100 * step / total),
            eta_seconds=int(self.period * (total - step)),
            trained_tokens=4096 * step,
        )
        if self.begin <= now <= self.end:
            if (last := self._last_get.get(ip)) is not None and last >= self.begin:
                self.gaps.append(now - last)
            self._last_get[ip] = now
        self.gets += 1
        return json.dumps(data).encode()

    def run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        servers = []
        try:
            for ip in self.ips:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((ip, self.port))
                sock.listen(128)
                sock.setblocking(False)
                servers.append(
                    loop.run_until_complete(loop.create_server(self._endpoint, sock=sock))
                )
        except Exception as exc:  # reported by start()
            self.errors.append(f"listening on {len(servers)}th IP: {exc!r}")
        self._ready.set()
        if not self.errors:
            loop.run_forever()
        for server in servers:
            server.close()
        pending = asyncio.all_tasks(loop)  # connections being accepted as it stopped
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    def start(self) -> None:
        super().start()
        self._ready.wait(60)
        if self.errors:
            raise RuntimeError(f"the trainer stand-in could not listen: {self.errors}")

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self.join(10)

    def _endpoint(self) -> asyncio.Protocol:
        return _Endpoint(self)


class _Endpoint(asyncio.Protocol):
    """One connection to a trainer stand-in: one request, one answer, closed."""

    def __init__(self, trainers: TrainerStandIn) -> None:
        self.trainers = trainers
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        method, path, *_ = [*self.buffer.split(b"\r\n", 1)[0].split(b" "), b"", b""]
        if method == b"GET" and path.startswith(b"/progress"):
            ip = self.transport.get_extra_info("sockname")[0]
            try:
                body = self.trainers.body(ip, time.monotonic())
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            except Exception as exc:  # e.g. an IP no trainer has
                self.trainers.errors.append(repr(exc))
                body, head = b"", b"HTTP/1.1 500 Internal Server Error\r\n"
        else:
            body, head = b"", b"HTTP/1.1 404 Not Found\r\n"
        length = f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        self.transport.write(head + length + body)
        self.transport.close()


def running_ip(index: int) -> str:
    """The pod IP of the index-th running job: 127.1.0.1, ... (250 per /24)."""
    return f"127.1.{index // 250}.{1 + index % 250}"


def rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Sampler(threading.Thread):
    """Polls the operator's RSS every ``interval`` seconds and keeps the peak."""

    def __init__(self, process: psutil.Process, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.process, self.interval = process, interval
        self.peak = 0
        self.last = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.last, self.peak = rss, max(self.peak, rss)
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(2)


class CpuClock:
    """CPU seconds (user + sys) of the operator, of named threads of this process (the
    emulator, the Job stand-in) and of this whole process."""

    def __init__(self, operator: psutil.Process, threads: dict[str, int]) -> None:
        self.operator, self.threads = operator, threads
        self.me = psutil.Process()

    def read(self) -> dict[str, float]:
        op = self.operator.cpu_times()
        me = self.me.cpu_times()
        mine = {t.id: t.user_time + t.system_time for t in self.me.threads()}
        return {
            "operator": op.user + op.system,
            **{name: mine.get(tid, 0.0) for name, tid in self.threads.items()},
            "bench_process": me.user + me.system,
            "wall": time.monotonic(),
        }

    @staticmethod
    def delta(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
        return {key: round(end[key] - start[key], 2) for key in start}


# --------------------------------------------------------------------------- the phases


@contextmanager
def operator_process(
    kubeconfig: Path, log_dir: Path, args: argparse.Namespace, progress_port: int
) -> Iterator[OperatorProcess]:
    """``kubetune operator`` (or ``--operator-cmd``) as a process of its own (the harness's)."""
    interval = ["--progress-interval", str(args.progress_interval)]
    if args.progress_interval_from == "operator default":
        interval = []  # the operator's own default, as deployed
    operator = OperatorProcess(
        kubeconfig,
        log_dir,
        command=shlex.split(args.operator_cmd) if args.operator_cmd else None,
        args=[
            "--image",
            "ghcr.io/kubetune/trainer:bench",
            *interval,
            "--resync-interval",
            str(args.resync_interval),
            "--trainer-progress-port",
            str(progress_port),
        ],
    )
    with operator:
        operator.start()
        yield operator


def apply_jobs(url: str, names: list[str], threads: int, rate: float = 0.0) -> dict[str, Any]:
    """Create the jobs from ``threads`` clients, at most ``rate`` a second (0: no limit)."""
    bodies = {name: json.dumps(job_manifest(name)).encode() for name in names}
    queue = collections.deque(enumerate(names))
    lock = threading.Lock()
    round_trips: list[float] = []
    errors: list[str] = []

    def client() -> None:
        api = Http(url)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    index, name = queue.popleft()
                if rate:
                    time.sleep(max(0.0, begin + index / rate - time.monotonic()))
                start = time.monotonic()
                status, body = api.request("POST", JOBS_PATH, bodies[name], "application/json")
                elapsed = time.monotonic() - start
                with lock:
                    round_trips.append(elapsed)
                    if status != 201:
                        errors.append(f"{name}: {status} {body[:200]!r}")
        finally:
            api.close()

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    begin = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        "seconds": round(time.monotonic() - begin, 2),
        "create_round_trip": summary_ms(round_trips),
        "errors": errors[:5],
        "error_count": len(errors),
    }


def operator_requests(server: EmulatorServer) -> collections.Counter[str]:
    entries = server.call(lambda: server.emulator.audit.entries(OPERATOR_USER))
    return collections.Counter(f"{e.verb} {e.rbac_resource}" for e in entries)


def attempt_of(name: str) -> str:
    return f"{name}-attempt-1"


def start_pod(stand_in: JobStandIn, name: str, ip: str) -> None:
    """Play kubelet for the job's rank-0 pod (Running, ready, ``ip``) and the Job
    controller for its Job (``ready: 1``)."""
    container = {
        "name": "trainer",
        "image": "ghcr.io/kubetune/trainer:bench",
        "imageID": "",
        "containerID": f"bench://{name}",
        "ready": True,
        "started": True,
        "restartCount": 0,
        "state": {"running": {"startedAt": rfc3339()}},
    }
    patch = {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "containerStatuses": [container],
        }
    }
    pod = stand_in.pods[attempt_of(name)][0]  # rank 0: one node per job here
    stand_in.patch(f"{PODS_PATH}/{pod}/status", patch)
    stand_in.patch_job(attempt_of(name), {"ready": 1})  # as the Job controller counts


def progress_phase(
    server: EmulatorServer,
    recorder: Recorder,
    stand_in: JobStandIn,
    names: list[str],
    states: list[ProgressState],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Start the pods of ``names`` (Running, podIP 127.0.0.(10+i)); time step bumps."""
    started: dict[str, float] = {}
    for i, name in enumerate(names):
        started[name] = time.monotonic()
        start_pod(stand_in, name, f"127.0.0.{10 + i}")
    if not wait_until(lambda: all(1 in recorder.steps[n] for n in names), args.timeout):
        missing = [n for n in names if 1 not in recorder.steps[n]]
        found = {n: describe(server, stand_in, n) for n in missing[:5]}
        raise RuntimeError(f"the operator never reported progress of {found}")
    first_report = [recorder.steps[n][1] - started[n] for n in names]
    to_running = [
        recorder.job_states[n]["Running"] - started[n]
        for n in names
        if "Running" in recorder.job_states[n]
    ]

    latencies: list[float] = []
    for round_ in range(args.progress_rounds):
        time.sleep(random.uniform(0.3, 0.3 + args.progress_interval))  # de-phase from polls
        step = 2 + round_
        bumped: dict[str, float] = {}
        for name, state in zip(names, states, strict=True):
            state.step = step
            state.epoch = step / state.total_steps
            state.train_loss = 2.0 / step
            bumped[name] = time.monotonic()

        def reported(step: int = step) -> bool:
            return all(step in recorder.steps[n] for n in names)

        if not wait_until(reported, 30):
            raise RuntimeError(f"step {step} never reached the status of every job")
        latencies += [recorder.steps[n][step] - bumped[n] for n in names]
    return {
        "jobs": len(names),
        "rounds": args.progress_rounds,
        "running_to_state_running": summary_ms(to_running),
        "running_to_first_progress": summary_ms(first_report),
        "step_to_status": summary_ms(latencies),
    }


def finish_phase(
    server: EmulatorServer,
    recorder: Recorder,
    stand_in: JobStandIn,
    names: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """End the pods of ``names`` (Succeeded, the trainer's result as termination message),
    then write their Jobs' ends as the Job controller does; time Complete → Succeeded."""
    for name in names:
        result = {
            "artifact": {
                "uri": f"s3://bench-artifacts/{name}/adapter",
                "digest": "sha256:" + "0" * 64,
                "sizeBytes": 1024,
            },
            "metrics": {"train_loss": 0.5, "tokens_per_second": 1000.0},
            "stats": {},
        }
        terminated = {
            "exitCode": 0,
            "reason": "Completed",
            "message": json.dumps(result),
            "startedAt": rfc3339(),
            "finishedAt": rfc3339(),
        }
        container = {
            "name": "trainer",
            "image": "ghcr.io/kubetune/trainer:bench",
            "imageID": "",
            "containerID": f"bench://{name}",
            "ready": False,
            "started": False,
            "restartCount": 0,
            "state": {"terminated": terminated},
        }
        pod = stand_in.pods[attempt_of(name)][0]
        patch = {"status": {"phase": "Succeeded", "containerStatuses": [container]}}
        stand_in.patch(f"{PODS_PATH}/{pod}/status", patch)
        # The Job controller: the index succeeded → SuccessCriteriaMet, then Complete.
        message = "Reached expected number of succeeded pods"
        conditions = set_condition([], "SuccessCriteriaMet", "True", "CompletionsReached", message)
        counts = {"active": 0, "ready": 0, "succeeded": 1, "completedIndexes": "0"}
        stand_in.patch_job(attempt_of(name), {**counts, "conditions": conditions})
        conditions = set_condition(conditions, "Complete", "True", "CompletionsReached", message)
        status = {**counts, "conditions": conditions, "completionTime": rfc3339()}
        stand_in.patch_job(attempt_of(name), status)

    def succeeded() -> bool:
        return all("Succeeded" in recorder.job_states[n] for n in names)

    if not wait_until(succeeded, args.timeout):
        missing = [n for n in names if "Succeeded" not in recorder.job_states[n]]
        found = {n: describe(server, stand_in, n) for n in missing[:5]}
        raise RuntimeError(f"the operator never reported success of {found}")
    latencies = [
        recorder.job_states[n]["Succeeded"] - recorder.attempt_complete[attempt_of(n)]
        for n in names
    ]
    return {"jobs": len(names), "complete_to_succeeded": summary_ms(latencies)}


def running_phase(
    server: EmulatorServer,
    recorder: Recorder,
    stand_in: JobStandIn,
    names: list[str],
    args: argparse.Namespace,
    clock: CpuClock,
    alive: Callable[[], bool],
    progress_port: int,
    profile_pid: int | None = None,
) -> dict[str, Any]:
    """K jobs running and reporting at once (see the module's docstring); with
    ``--py-spy`` the operator is profiled during the window."""
    ips = [running_ip(i) for i in range(len(names))]
    trainers = TrainerStandIn(ips, progress_port, args.running_step_seconds)
    trainers.start()
    try:
        clock.threads["trainer_stand_in"] = trainers.native_id or 0
        return _running(
            server, recorder, stand_in, names, ips, trainers, args, clock, alive, profile_pid
        )
    finally:
        trainers.stop()
        clock.threads.pop("trainer_stand_in", None)


def _running(
    server: EmulatorServer,
    recorder: Recorder,
    stand_in: JobStandIn,
    names: list[str],
    ips: list[str],
    trainers: TrainerStandIn,
    args: argparse.Namespace,
    clock: CpuClock,
    alive: Callable[[], bool],
    profile_pid: int | None,
) -> dict[str, Any]:
    # -- ramp: every pod Running, every job's status at step 1 ------------------------------
    ramp = time.monotonic()
    started: dict[str, float] = {}
    for name, ip in zip(names, ips, strict=True):
        started[name] = time.monotonic()
        start_pod(stand_in, name, ip)
    pods_s = time.monotonic() - ramp

    def reporting() -> bool:
        return alive() and all(recorder.steps.get(n) for n in names)

    if not wait_until(reporting, args.timeout, 0.2):
        missing = [n for n in names if not recorder.steps.get(n)]
        found = {n: describe(server, stand_in, n) for n in missing[:5]}
        raise RuntimeError(f"{len(missing)} running jobs never reported progress: {found}")
    ramp_s = time.monotonic() - ramp
    first_report = [min(recorder.steps[n].values()) - started[n] for n in names]

    # -- the window: every trainer steps on its own clock ----------------------------------
    result: dict[str, Any] = {}
    profiler = start_py_spy(args, profile_pid, len(names), "running") if profile_pid else None
    requests0 = operator_requests(server)
    gets0 = trainers.gets
    cpu0 = clock.read()
    begin = cpu0["wall"]
    end = begin + args.running_seconds
    trainers.open(begin, end)
    while (left := end - time.monotonic()) > 0:
        alive()
        time.sleep(min(1.0, left))
    cpu1 = clock.read()
    gets1 = trainers.gets
    requests1 = operator_requests(server)
    stop_py_spy(profiler, result)
    window = CpuClock.delta(cpu0, cpu1)
    wall = max(window["wall"], 1e-9)

    # -- drain: the steps stopped at ``end``; wait for the last ones to reach the status ----
    visible = {n: trainers.visible(ip) for n, ip in zip(names, ips, strict=True)}
    last = {n: max(v, default=1) for n, v in visible.items()}

    def caught_up() -> bool:
        return alive() and all(max(recorder.steps[n], default=0) >= last[n] for n in names)

    drain_timeout = max(30.0, 4 * args.progress_interval + 10)
    drained = wait_until(caught_up, drain_timeout, 0.2)
    drain_s = time.monotonic() - end

    latencies: list[float] = []
    unreported = 0
    for name in names:
        reported = recorder.steps[name]  # step → first time the status showed it
        for step, at in visible[name].items():
            times = [t for s, t in reported.items() if s >= step and t >= at]
            if times:
                latencies.append(min(times) - at)
            else:
                unreported += 1
    requests = requests1 - requests0
    total_requests = sum(requests.values())
    latency = summary_ms(latencies)
    result = {
        "jobs": len(names),
        "seconds": args.running_seconds,
        "progress_interval": args.progress_interval,
        "progress_interval_from": args.progress_interval_from,
        "step_seconds": args.running_step_seconds,
        "ramp": {
            "pods_running_s": round(pods_s, 2),
            "all_reporting_s": round(ramp_s, 2),
            "pod_running_to_first_progress": summary_ms(first_report),
        },
        "steps_visible": sum(len(v) for v in visible.values()),
        "steps_unreported": unreported,
        "drained": drained,
        "drain_s": round(drain_s, 2),
        "step_to_status": latency,
        "cpu_s": window,
        "core_share": {k: round(v / wall, 3) for k, v in window.items() if k != "wall"},
        "operator_requests": dict(sorted(requests.items())),
        "operator_requests_per_s": round(total_requests / wall, 1),
        "trainer_gets": gets1 - gets0,
        "trainer_gets_per_s": round((gets1 - gets0) / wall, 1),
        # the operator's CPU per trainer poll (its GET, the status PATCH when the step
        # moved, the watch event of that PATCH, and its share of the resync)
        "operator_cpu_ms_per_poll": round(1000 * window["operator"] / max(gets1 - gets0, 1), 2),
        "poll_gap": summary_ms(trainers.gaps),
        "trainer_errors": trainers.errors[:5],
        **result,  # py_spy, when profiled
    }
    result["targets"] = {
        "step_to_status_p95_le_15s": (latency["p95_ms"] or 1e12)
        <= 1000 * TARGET_RUNNING_STEP_P95_S,
        "operator_core_le_0.25": result["core_share"]["operator"] <= TARGET_RUNNING_CORE,
    }
    return result


def describe(server: EmulatorServer, stand_in: JobStandIn, name: str) -> str:
    """A job's state, its attempt Job's conditions and its pod's phase, for errors."""
    job = server.object("kubetune.io/v1alpha1/finetunejobs", NAMESPACE, name) or {}
    attempt = server.object("batch/v1/jobs", NAMESPACE, attempt_of(name)) or {}
    conditions = [
        f"{c.get('type')}={c.get('status')}"
        for c in (attempt.get("status") or {}).get("conditions") or []
    ]
    pods = stand_in.pods.get(attempt_of(name)) or []
    pod = server.object("v1/pods", NAMESPACE, pods[0]) if pods else None
    state = (job.get("status") or {}).get("state")
    phase = ((pod or {}).get("status") or {}).get("phase")
    return f"job {state}, attempt Job {conditions or 'no conditions'}, pod {phase}"


def run_one(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    names = [f"scale-{i:05d}" for i in range(n)]
    progress_names = names[: min(args.progress_jobs, n)]
    result: dict[str, Any] = {"jobs": n, "load_avg_1m_before": round(os.getloadavg()[0], 2)}
    with ExitStack() as stack:
        server = stack.enter_context(EmulatorServer(bench_emulator(args.harness_emulator)))
        stand_in = JobStandIn(server.url)
        stand_in.start()
        stack.callback(stand_in.stop)
        recorder = install_recorder(server, on_attempt=stand_in.put)
        emulator_tid = next(
            t.native_id or 0 for t in threading.enumerate() if t.name == "kube-emulator"
        )

        # The trainers: the trainer's own progress server on each future pod IP.
        progress_port = free_port()
        states = []
        for i in range(len(progress_names)):
            state = ProgressState(phase="training", step=1, total_steps=10_000)
            state.learning_rate, state.tokens_per_second = 1e-4, 1000.0
            stack.enter_context(ProgressServer(state, progress_port, host=f"127.0.0.{10 + i}"))
            states.append(state)

        kubeconfig = server.write_kubeconfig(workdir / f"kubeconfig-{n}", user=OPERATOR_USER)
        proc = stack.enter_context(
            operator_process(kubeconfig, workdir / f"operator-{n}", args, progress_port)
        )
        log_path = proc.log_path
        assert proc.pid is not None
        operator = psutil.Process(proc.pid)
        sampler = Sampler(operator, args.sample_interval)
        sampler.start()
        stack.callback(sampler.stop)
        clock = CpuClock(
            operator, {"emulator": emulator_tid, "job_stand_in": stand_in.native_id or 0}
        )
        t_launch = time.monotonic()

        def alive() -> bool:
            if not proc.alive:
                raise RuntimeError(f"the operator exited: {log_tail(log_path)}")
            return True

        def ready() -> bool:
            # the recorder's three, and the operator's: FineTuneJobs, Jobs and pods
            watches = len(RECORDED) + 3
            return alive() and proc.healthy() and server.emulator.watch_count >= watches

        if not wait_until(ready, 60, 0.05):
            raise RuntimeError(f"the operator did not become ready: {log_tail(log_path)}")
        result["startup_s"] = round(time.monotonic() - t_launch, 2)
        time.sleep(args.idle_seconds)
        result["idle_rss_mb"] = round(operator.memory_info().rss / MB, 1)
        result["startup_cpu_s"] = round(sum(operator.cpu_times()[:2]), 2)

        # -- apply ------------------------------------------------------------------------
        profiler = start_py_spy(args, proc.pid, n)
        cpu0 = clock.read()
        applied = apply_jobs(server.url, names, args.clients, args.apply_rate)
        if applied["error_count"]:
            raise RuntimeError(f"applies failed: {applied['errors']}")
        first_jobs = {attempt_of(name) for name in names}
        all_jobs = wait_until(
            lambda: alive() and len(first_jobs & recorder.attempt_added.keys()) >= n,
            args.timeout,
            0.05,
        )
        cpu_jobs = clock.read()
        jobs_done = cpu_jobs["wall"]
        wait_until(lambda: alive() and len(recorder.job_status) >= n, args.timeout, 0.05)
        wait_until(lambda: alive() and stand_in.idle(), args.timeout, 0.05)
        wait_until(lambda: alive() and quiet(recorder, operator), args.timeout, 0.1)
        settled = time.monotonic()
        cpu1 = clock.read()
        stop_py_spy(profiler, result)

        first_apply = min(recorder.job_added.values())
        latencies = [
            recorder.attempt_added[attempt_of(name)] - recorder.job_added[name]
            for name in names
            if attempt_of(name) in recorder.attempt_added
        ]
        status_latencies = [
            recorder.job_status[name] - recorder.job_added[name]
            for name in names
            if name in recorder.job_status
        ]
        last_job = max((recorder.attempt_added.get(j, 0.0) for j in first_jobs), default=0.0)
        # a correct operator makes exactly one attempt Job per job here (no pod ever
        # fails), and no pod at all: the stand-in makes them all
        extra_jobs = sorted(recorder.attempt_added.keys() - first_jobs)
        unexpected_pods = sorted(recorder.pod_added.keys() - stand_in.pod_names)
        requests = operator_requests(server)
        result.update(
            apply=applied,
            jobs_created=len(recorder.attempt_added),
            extra_jobs=len(extra_jobs),
            extra_job_examples=extra_jobs[:5],
            unexpected_pods=len(unexpected_pods),
            unexpected_pod_examples=unexpected_pods[:5],
            all_jobs=all_jobs,
            all_jobs_s=round(last_job - first_apply, 2),
            apply_to_job=summary_ms(latencies),
            apply_to_status=summary_ms(status_latencies),
            all_status_s=round(max(recorder.job_status.values(), default=0.0) - first_apply, 2),
            settled_s=round(settled - first_apply, 2),
            jobs_seen_s=round(jobs_done - first_apply, 2),
            stand_in={
                "pods_created": len(stand_in.pod_names),
                "all_pods_s": round(max(recorder.pod_added.values(), default=0.0) - first_apply, 2),
                "errors": stand_in.errors[:5],
                "error_count": len(stand_in.errors),
            },
            apply_cpu_s=CpuClock.delta(cpu0, cpu1),
            # until all attempt Jobs exist: CPU seconds and share of one core (1.0: a core)
            jobs_cpu_s=(jobs_cpu := CpuClock.delta(cpu0, cpu_jobs)),
            jobs_core_share={
                k: round(v / max(jobs_cpu["wall"], 1e-9), 2)
                for k, v in jobs_cpu.items()
                if k != "wall"
            },
            operator_cpu_ms_per_job=round(1000 * jobs_cpu["operator"] / n, 1),
            apply_peak_rss_mb=round(sampler.peak / MB, 1),
            operator_requests=dict(sorted(requests.items())),
            operator_requests_per_job=round(sum(requests.values()) / n, 1),
            emulator_events=dict(sorted(recorder.events.items())),
        )
        if stand_in.errors:
            raise RuntimeError(f"the Job stand-in failed: {stand_in.errors[:5]}")
        if isinstance(server.emulator, BenchEmulator):
            result["operator_responses"] = dict(sorted(server.emulator.responses.items()))

        # -- steady state: N Pending jobs, nothing changing (resyncs only) ----------------
        if args.steady_seconds:
            cpu_steady = clock.read()
            time.sleep(args.steady_seconds)
            steady = CpuClock.delta(cpu_steady, clock.read())
            result["steady"] = {
                "seconds": args.steady_seconds,
                "operator_cpu_s": steady["operator"],
                "operator_core_share": round(steady["operator"] / steady["wall"], 3),
                "emulator_cpu_s": steady["emulator"],
                "job_stand_in_cpu_s": steady["job_stand_in"],
                "rss_mb": round(operator.memory_info().rss / MB, 1),
            }

        # -- progress ---------------------------------------------------------------------
        if progress_names and args.progress_rounds:
            cpu2 = clock.read()
            result["progress"] = progress_phase(
                server, recorder, stand_in, progress_names, states, args
            )
            result["progress"]["cpu_s"] = CpuClock.delta(cpu2, clock.read())
            if args.finish:
                cpu3 = clock.read()
                result["finish"] = finish_phase(server, recorder, stand_in, progress_names, args)
                result["finish"]["cpu_s"] = CpuClock.delta(cpu3, clock.read())

        # -- running: K jobs running and reporting at once --------------------------------
        busy = set(progress_names if args.progress_rounds else ())
        running_names = [name for name in names if name not in busy][: args.running_jobs]
        if running_names:
            result["running"] = running_phase(
                server,
                recorder,
                stand_in,
                running_names,
                args,
                clock,
                alive,
                progress_port,
                proc.pid,
            )

        result["peak_rss_mb"] = round(sampler.peak / MB, 1)
        result["rss_samples"] = sampler.samples
        result["total_cpu_s"] = round(sum(operator.cpu_times()[:2]), 2)
        result["operator_threads"] = operator.num_threads()
        result["log_lines"] = sum(1 for _ in log_path.open("rb"))
        result["targets"] = {
            "all_jobs_within_60s": all_jobs and result["all_jobs_s"] <= TARGET_ALL_JOBS_S,
            "peak_rss_le_300mb": result["peak_rss_mb"] <= TARGET_PEAK_RSS_MB,
            "apply_to_job_p50_le_150ms": (result["apply_to_job"]["p50_ms"] or 1e9) <= TARGET_P50_MS,
        }
        if len(running_names) >= 1000:  # the "1,000 jobs running and reporting"
            for key, ok in result["running"]["targets"].items():
                result["targets"][f"running_{key}"] = ok
    return result


def quiet(recorder: Recorder, operator: psutil.Process, seconds: float = 1.0) -> bool:
    """The operator has caught up: no change committed and under 10% of a core used for
    ``seconds``."""
    changes, cpu = sum(recorder.events.values()), sum(operator.cpu_times()[:2])
    time.sleep(seconds)
    idle = sum(operator.cpu_times()[:2]) - cpu < 0.1 * seconds
    return idle and sum(recorder.events.values()) == changes


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- py-spy


def start_py_spy(
    args: argparse.Namespace, pid: int, n: int, phase: str = ""
) -> tuple[Any, Path] | None:
    if not args.py_spy:
        return None
    binary = args.py_spy_bin or shutil.which("py-spy")
    binary = binary or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not binary:
        raise SystemExit("--py-spy: no py-spy found (pip install py-spy, or --py-spy-bin)")
    out = Path(args.py_spy) / f"operator-{n}{phase and '-' + phase}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
    command += ["--rate", "100", "--gil", "--nonblocking"]  # where the CPU goes
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    return proc, out


def stop_py_spy(profiler: tuple[Any, Path] | None, result: dict[str, Any]) -> None:
    if profiler is None:
        return
    proc, out = profiler
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    if out.exists():
        result["py_spy"] = {"file": str(out), **hot_functions(out)}


# Where the operator's CPU goes: the first rule whose pattern is in a sample's stack wins.
PROFILE_BUCKETS = (
    ("kubernetes client: our API calls", ("KubeApi._call",)),
    ("our decisions: reconcile(), Job manifest", ("reconcile (kubetune_operator/reconcile.py",)),
    ("our progress polls", ("fetch_progress", "status_from_progress")),
    ("logging", ("Logger.log", "LoggerAdapter.", "Logger._log", "Logger.handle")),
    ("kopf: its patches (finalizer, annotations)", ("patch_and_check", "patch_obj (kopf")),
    ("kopf: posting Events", ("_poster_worker", "post_event")),
    ("kopf: watch streams", ("infinite_watch", "watch_objs", "continuous_watch")),
    ("kopf: timers", ("kopf/_core/engines/daemons.py",)),
    ("kopf: event processing, executor dispatch", ("kopf/_core/reactor", "kopf/_core/actions")),
)


def hot_functions(path: Path, top: int = 15) -> dict[str, Any]:
    """Buckets and the hottest functions (self, inclusive) from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")[1:]  # the first is the thread (or the process)
        total += samples
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
        bucket = next(
            (name for name, marks in PROFILE_BUCKETS if any(m in stack for m in marks)),
            "other: event loop, threads",
        )
        buckets[bucket] += samples

    def share(counter: collections.Counter[str], n: int) -> list[tuple[str, float]]:
        return [(f, round(100 * c / max(total, 1), 1)) for f, c in counter.most_common(n)]

    return {
        "samples": total,
        "buckets_pct": share(buckets, len(PROFILE_BUCKETS) + 1),
        "self_pct": share(own, top),
        "inclusive_pct": share(inclusive, 2 * top),
    }


# --------------------------------------------------------------------------- output


def print_table(results: list[dict[str, Any]]) -> None:
    def progress(key: str) -> Callable[[dict[str, Any]], Any]:
        return lambda r: r.get("progress", {}).get("step_to_status", {}).get(key)

    def running(
        get: Callable[[dict[str, Any]], Any], scale: float = 1.0
    ) -> Callable[[dict[str, Any]], Any]:
        def value(r: dict[str, Any]) -> Any:
            if "running" not in r or (v := get(r["running"])) is None:
                return None
            return round(v / scale, 2) if scale != 1.0 else v

        return value

    columns: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("jobs", lambda r: r["jobs"]),
        ("all Jobs s", lambda r: r["all_jobs_s"]),
        ("→Job p50 ms", lambda r: r["apply_to_job"]["p50_ms"]),
        ("p95", lambda r: r["apply_to_job"]["p95_ms"]),
        ("max", lambda r: r["apply_to_job"]["max_ms"]),
        ("idle MB", lambda r: r["idle_rss_mb"]),
        ("peak MB", lambda r: r["peak_rss_mb"]),
        ("op CPU s", lambda r: r["jobs_cpu_s"]["operator"]),
        ("ms/job", lambda r: r["operator_cpu_ms_per_job"]),
        ("op core", lambda r: r["jobs_core_share"]["operator"]),
        ("emu core", lambda r: r["jobs_core_share"]["emulator"]),
        ("stand-in core", lambda r: r["jobs_core_share"]["job_stand_in"]),
        ("req/job", lambda r: r["operator_requests_per_job"]),
        ("total CPU s", lambda r: r["total_cpu_s"]),
        ("step p50 ms", progress("p50_ms")),
        ("p95", progress("p95_ms")),
        ("run jobs", lambda r: r.get("running", {}).get("jobs")),
        ("run step p50 s", running(lambda x: x["step_to_status"]["p50_ms"], 1000)),
        ("p95 s", running(lambda x: x["step_to_status"]["p95_ms"], 1000)),
        ("max s", running(lambda x: x["step_to_status"]["max_ms"], 1000)),
        ("run op core", running(lambda x: x["core_share"]["operator"])),
        ("run req/s", running(lambda x: x["operator_requests_per_s"])),
        (
            "done p50 ms",
            lambda r: r.get("finish", {}).get("complete_to_succeeded", {}).get("p50_ms"),
        ),
        ("targets", _verdict),
    ]
    rows = [[str(h) for h, _ in columns]]
    rows += [["-" if (v := get(r)) is None else str(v) for _, get in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        "→Job: job created → its attempt Job created (both as committed in the API); op CPU "
        "s, ms/job, op/emu/stand-in core: the operator's CPU seconds, per job, and the share "
        "of one core used by the operator / the emulator / the bench's Job-controller stand-in, "
        "from the first apply until all attempt Jobs existed; req/job: the operator's API "
        "requests per job until it went quiet; total CPU s: the operator's, start to end; "
        "step: trainer step bump → status.progress.step; done: Job Complete → job Succeeded; "
        "run: the running phase (--running-jobs), run step: a step visible at the trainer "
        "endpoint → status.progress.step ≥ it, run op core: the operator's share of a core "
        "and run req/s: its API requests per second, over --running-seconds"
    )


def _verdict(result: dict[str, Any]) -> str:
    missed = [name for name, ok in result["targets"].items() if not ok]
    verdict = "MISSED " + ",".join(missed) if missed else "ok"
    if result["extra_jobs"]:
        verdict += f"; WRONG: {result['extra_jobs']} extra Jobs (a job got a 2nd attempt)"
    if result["unexpected_pods"]:
        verdict += f"; WRONG: {result['unexpected_pods']} pods not made by the Job controller"
    return verdict


EPILOG = """\
With --running-jobs K (after the other phases; jobs of the progress phase excluded when it
runs), the table's "run" columns and the JSON's results[].running give, over
--running-seconds: step_to_status (a step visible at its trainer's endpoint → the job's
committed status.progress.step ≥ it; p50/p95/max ms over all jobs and steps; issue 12:
p95 ≤ 15 s with 1,000 jobs), core_share (operator ≤ 0.25 core with 1,000 jobs),
operator_requests(_per_s), operator_cpu_ms_per_poll, trainer_gets(_per_s), poll_gap (two
GETs of one trainer apart), steps_visible / steps_unreported, the ramp to all reporting,
and progress_interval with where it came from (progress_interval_from)."""


def operator_default_progress_interval() -> float:
    """The ``kubetune operator`` CLI's default ``--progress-interval`` (this checkout's)."""
    from kubetune_operator.cli import build_parser

    return float(build_parser().parse_args(["operator"]).progress_interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG)
    parser.add_argument(
        "--jobs", default="100,500,1000", help="comma-separated job counts (default 100,500,1000)"
    )
    parser.add_argument("--clients", type=int, default=4, help="client threads applying jobs")
    parser.add_argument(
        "--apply-rate", type=float, default=0.0, help="jobs per second (default 0: all at once)"
    )
    parser.add_argument("--progress-jobs", type=int, default=20, help="jobs reporting progress")
    parser.add_argument("--progress-rounds", type=int, default=5, help="step bumps per job")
    parser.add_argument(
        "--no-finish",
        dest="finish",
        action="store_false",
        help="after progress, do not end the progress jobs (pods Succeeded, Jobs Complete)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=None,
        help="operator --progress-interval (default: 1 s, or with --running-jobs the "
        "operator's own default, the flag not passed)",
    )
    parser.add_argument(
        "--running-jobs",
        type=int,
        default=0,
        help="after the other phases, K jobs running and reporting at once (default 0: "
        "off); their trainers' endpoints are served by one stand-in at pod IPs 127.1.x.y",
    )
    parser.add_argument(
        "--running-seconds", type=float, default=120.0, help="length of the running window"
    )
    parser.add_argument(
        "--running-step-seconds",
        type=float,
        default=3.0,
        help="each running trainer's seconds per step (staggered; default 3)",
    )
    parser.add_argument(
        "--resync-interval", type=float, default=60.0, help="operator --resync-interval"
    )
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="idle before applying")
    parser.add_argument(
        "--steady-seconds",
        type=float,
        default=0.0,
        help="after the apply phase, measure the operator's CPU this long (default: skip; "
        "use at least --resync-interval to include a resync)",
    )
    parser.add_argument("--sample-interval", type=float, default=0.05, help="RSS poll seconds")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-phase limit, seconds")
    parser.add_argument(
        "--operator-cmd",
        help=f"run the operator with this command instead of {KUBETUNE} (then 'operator ...')",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        help="profile the apply phase into DIR (and the running window, with --running-jobs)",
    )
    parser.add_argument("--py-spy-bin", help="the py-spy executable (default: from PATH)")
    parser.add_argument(
        "--harness-emulator",
        action="store_true",
        help="serve the harness's emulator as it is (its CPU grows with what it served)",
    )
    parser.add_argument("--log-dir", help="keep the operator logs here (default: discarded)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    counts = [int(x) for x in args.jobs.split(",") if x.strip()]
    if args.progress_jobs > 200:
        parser.error("--progress-jobs: at most 200 (pod IPs 127.0.0.10-209)")
    if args.running_jobs > 250 * 250:
        parser.error("--running-jobs: at most 62500 (pod IPs 127.1.0.1-127.1.249.250)")
    if args.progress_interval is not None:
        args.progress_interval_from = "--progress-interval"
    elif args.running_jobs:
        args.progress_interval = operator_default_progress_interval()
        args.progress_interval_from = "operator default"
    else:
        args.progress_interval, args.progress_interval_from = 1.0, "bench default"

    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-scale-") as tmp:
        workdir = Path(args.log_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in counts:
            print(f"… {n} jobs", file=sys.stderr, flush=True)
            results.append(run_one(n, args, workdir))
    print_table(results)
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    config = {k: v for k, v in vars(args).items() if k not in ("py_spy_bin",)}
    report = {"benchmark": "operator_scale", "machine": machine, "config": config}
    print(json.dumps({**report, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
