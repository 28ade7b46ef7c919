"""How the operator scales: N FineTuneJobs applied at once, then trainers reporting progress.

For each N (``--jobs 100,500,1000``):

* a fresh Kubernetes API emulator (``tests/harness``) is served from this process, and
  ``kubetune operator`` runs as a separate process against it (as the operator's service
  account), so that its memory and CPU can be measured alone with psutil: RSS is polled
  every 50 ms (idle before any job, and peak), CPU seconds (user + sys) are read per phase;
* **apply**: N FineTuneJobs are created as fast as a few client threads can (raw HTTP, no
  ``kubernetes`` client, so the bench costs little CPU); each job's creation and the first
  appearance of its pod ``<job>-attempt-1`` are timestamped *inside the emulator*, at the
  moment the change is committed (a recorder stands in for a watch there), so the latency
  does not include any client's delay. Reported: apply → pod p50/p95/max, the time from
  the first apply until all N pods exist, and until all N jobs have a status;
* **progress**: for ``--progress-jobs`` jobs the bench plays kubelet (pod status Running,
  podIP 127.0.0.(10+i)) and trainer (the trainer's own ``ProgressServer`` on that IP, at
  ``--trainer-progress-port``), bumps the step at a known time and measures until the
  job's ``status.progress.step`` shows it (the operator polls every ``--progress-interval``
  seconds, so expect about half of it at the median);
* the emulator is the harness's with two costs that grow with the number of requests
  and objects taken out (:class:`BenchEmulator`; ``--harness-emulator`` serves the stock
  one, which then sets the pace itself); its CPU (its thread in this process) is reported
  next to the operator's, and every request the operator made is counted from the
  emulator's audit log, so a slow emulator is not mistaken for a slow operator;
* a correct operator makes exactly one pod per job here: any other pod is reported as
  ``extra_pods`` (and "WRONG" in the table).

Pods stay Pending (there is no kubelet) except those the bench starts. Targets (issue):
1,000 jobs → all workloads within 60 s, operator peak RSS ≤ 300 MB, apply → pod p50 ≤ 150 ms.
"MB" here is MiB. Linux only (the trainers listen on 127.0.0.x aliases).

    .venv/bin/python bench/operator_scale.py                      # 100, 500, 1000 jobs
    .venv/bin/python bench/operator_scale.py --jobs 300 --apply-rate 10 --progress-rounds 0
    .venv/bin/python bench/operator_scale.py --jobs 1000 --py-spy /tmp/prof

Prints a table, then one JSON line with everything. ``--py-spy DIR`` also records the
operator's GIL-holding thread with py-spy during the apply phase (``DIR/operator-N.txt``,
collapsed stacks; the JSON gets the CPU split into buckets, kopf / kubernetes client / our
code, and the hottest functions); numbers taken while profiling are not clean.
``--operator-cmd`` runs another build of the operator (e.g. a patched copy) for A/B runs.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import platform
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
from harness.selectors import parse_field_selector, parse_label_selector  # noqa: E402

from kubetune_trainer.progress import ProgressServer, ProgressState  # noqa: E402

NAMESPACE = "default"
JOBS_PATH = f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/finetunejobs"
PODS_PATH = f"/api/v1/namespaces/{NAMESPACE}/pods"
TARGET_ALL_PODS_S = 60.0
TARGET_PEAK_RSS_MB = 300.0
TARGET_P50_MS = 150.0
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
      it is answered;
    * every LIST walks kmock's whole store (all kinds) and sorts all objects of the kind
      before applying the selectors. Here the live objects are indexed per kind, and a
      ``key=value`` label selector (the operator's LIST of a job's pods) is tried with a
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

    async def _handle(self, request: kmock.Request) -> Any:
        try:
            return await super()._handle(request)
        finally:
            raw = request._raw_request
            self._requests[:] = [r for r in self._requests if r._raw_request is not raw]

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
        return emulator_module.make_emulator()
    finally:
        setattr(emulator_module, "Emulator", original)  # noqa: B010


# --------------------------------------------------------------------------- recording


class Recorder:
    """Stands in for a watch queue inside the emulator: timestamps every committed change.

    ``put_nowait`` is called by the emulator, in its loop, the moment a change is stored
    (the same instant a real watch would be fed), so the times carry no client delay.
    """

    def __init__(self) -> None:
        self.job_added: dict[str, float] = {}
        self.job_status: dict[str, float] = {}  # first time the job had a status.state
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
        elif kind == "FineTuneJob":
            if event.type == "ADDED":
                self.job_added.setdefault(name, now)
            status = obj.get("status") or {}
            if status.get("state"):
                self.job_status.setdefault(name, now)
            step = (status.get("progress") or {}).get("step")
            if step is not None:
                self.steps[name].setdefault(int(step), now)


def install_recorder(server: EmulatorServer) -> Recorder:
    recorder = Recorder()
    everything = parse_label_selector(None), parse_field_selector(None)

    def install() -> None:
        for resource in ("v1/pods", "kubetune.io/v1alpha1/finetunejobs"):
            watch = _Watch(kmock.resource(resource), None, None, *everything)
            watch.queue = recorder  # type: ignore[assignment]
            server.emulator._watches.add(watch)

    server.call(install)
    return recorder


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
    """CPU seconds (user + sys) of the operator, the emulator thread and this process."""

    def __init__(self, operator: psutil.Process, emulator_tid: int) -> None:
        self.operator, self.emulator_tid = operator, emulator_tid
        self.me = psutil.Process()

    def read(self) -> dict[str, float]:
        op = self.operator.cpu_times()
        me = self.me.cpu_times()
        emulator = next((t for t in self.me.threads() if t.id == self.emulator_tid), None)
        return {
            "operator": op.user + op.system,
            "emulator": (emulator.user_time + emulator.system_time) if emulator else 0.0,
            "bench_process": me.user + me.system,
            "wall": time.monotonic(),
        }

    @staticmethod
    def delta(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
        return {key: round(end[key] - start[key], 2) for key in start}


# --------------------------------------------------------------------------- the phases


@contextmanager
def operator_process(
    kubeconfig: Path, log_path: Path, args: argparse.Namespace, progress_port: int
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    health_port = free_port()
    command = [
        *(shlex.split(args.operator_cmd) if args.operator_cmd else [str(KUBETUNE)]),
        "operator",
        "--kubeconfig",
        str(kubeconfig),
        "--image",
        "ghcr.io/kubetune/trainer:bench",
        "--metrics-port",
        str(free_port()),
        "--health-port",
        str(health_port),
        "--progress-interval",
        str(args.progress_interval),
        "--resync-interval",
        str(args.resync_interval),
        "--trainer-progress-port",
        str(progress_port),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc, health_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


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


def progress_phase(
    server: EmulatorServer,
    recorder: Recorder,
    names: list[str],
    states: list[ProgressState],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Start the pods of ``names`` (Running, podIP 127.0.0.(10+i)); time step bumps."""
    api = Http(server.url)
    try:
        for i, name in enumerate(names):
            ip = f"127.0.0.{10 + i}"
            patch = {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "image": "ghcr.io/kubetune/trainer:bench",
                            "imageID": "",
                            "containerID": f"bench://{name}",
                            "ready": True,
                            "started": True,
                            "restartCount": 0,
                            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                        }
                    ],
                }
            }
            status, body = api.request(
                "PATCH",
                f"{PODS_PATH}/{name}-attempt-1/status",
                json.dumps(patch).encode(),
                "application/merge-patch+json",
            )
            if status != 200:
                raise RuntimeError(f"cannot start pod of {name}: {status} {body[:300]!r}")
    finally:
        api.close()
    started = time.monotonic()
    if not wait_until(lambda: all(1 in recorder.steps[n] for n in names), args.timeout):
        missing = [n for n in names if 1 not in recorder.steps[n]]
        found = {n: describe(server, n) for n in missing[:5]}
        raise RuntimeError(f"the operator never reported progress of {found}")
    first_report = [recorder.steps[n][1] - started for n in names]

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
        "running_to_first_progress": summary_ms(first_report),
        "step_to_status": summary_ms(latencies),
    }


def describe(server: EmulatorServer, name: str) -> str:
    """A job's state and its pod's phase, for error messages."""
    job = server.object("kubetune.io/v1alpha1/finetunejobs", NAMESPACE, name) or {}
    pod = server.object("v1/pods", NAMESPACE, f"{name}-attempt-1") or {}
    state = (job.get("status") or {}).get("state")
    return f"job {state}, pod {(pod.get('status') or {}).get('phase')}"


def run_one(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    names = [f"scale-{i:05d}" for i in range(n)]
    progress_names = names[: min(args.progress_jobs, n)]
    result: dict[str, Any] = {"jobs": n, "load_avg_1m_before": round(os.getloadavg()[0], 2)}
    with ExitStack() as stack:
        server = stack.enter_context(EmulatorServer(bench_emulator(args.harness_emulator)))
        recorder = install_recorder(server)
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
        log_path = workdir / f"operator-{n}.log"
        proc, health_port = stack.enter_context(
            operator_process(kubeconfig, log_path, args, progress_port)
        )
        operator = psutil.Process(proc.pid)
        sampler = Sampler(operator, args.sample_interval)
        sampler.start()
        stack.callback(sampler.stop)
        clock = CpuClock(operator, emulator_tid)
        t_launch = time.monotonic()

        def alive() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the operator exited: {log_tail(log_path)}")
            return True

        def ready() -> bool:
            # two watches are the recorder's; the operator's: FineTuneJobs and pods
            return alive() and healthy(health_port) and server.emulator.watch_count >= 4

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
        first_pods = {f"{name}-attempt-1" for name in names}
        all_pods = wait_until(
            lambda: alive() and len(first_pods & recorder.pod_added.keys()) >= n,
            args.timeout,
            0.05,
        )
        cpu_pods = clock.read()
        pods_done = cpu_pods["wall"]
        wait_until(lambda: alive() and len(recorder.job_status) >= n, args.timeout, 0.05)
        wait_until(lambda: alive() and quiet(recorder, operator), args.timeout, 0.1)
        settled = time.monotonic()
        cpu1 = clock.read()
        stop_py_spy(profiler, result)

        first_apply = min(recorder.job_added.values())
        latencies = [
            recorder.pod_added[f"{name}-attempt-1"] - recorder.job_added[name]
            for name in names
            if f"{name}-attempt-1" in recorder.pod_added
        ]
        status_latencies = [
            recorder.job_status[name] - recorder.job_added[name]
            for name in names
            if name in recorder.job_status
        ]
        last_pod = max((recorder.pod_added.get(pod, 0.0) for pod in first_pods), default=0.0)
        # a correct operator makes exactly one pod per job here (no pod ever fails)
        extra_pods = sorted(recorder.pod_added.keys() - first_pods)
        requests = operator_requests(server)
        result.update(
            apply=applied,
            pods_created=len(recorder.pod_added),
            extra_pods=len(extra_pods),
            extra_pod_examples=extra_pods[:5],
            all_pods=all_pods,
            all_pods_s=round(last_pod - first_apply, 2),
            apply_to_pod=summary_ms(latencies),
            apply_to_status=summary_ms(status_latencies),
            all_status_s=round(max(recorder.job_status.values(), default=0.0) - first_apply, 2),
            settled_s=round(settled - first_apply, 2),
            pods_seen_s=round(pods_done - first_apply, 2),
            apply_cpu_s=CpuClock.delta(cpu0, cpu1),
            # until all pods exist: CPU seconds and share of one core (1.0: a full core)
            pods_cpu_s=(pods_cpu := CpuClock.delta(cpu0, cpu_pods)),
            pods_core_share={
                k: round(v / max(pods_cpu["wall"], 1e-9), 2)
                for k, v in pods_cpu.items()
                if k != "wall"
            },
            operator_cpu_ms_per_job=round(1000 * pods_cpu["operator"] / n, 1),
            apply_peak_rss_mb=round(sampler.peak / MB, 1),
            operator_requests=dict(sorted(requests.items())),
            operator_requests_per_job=round(sum(requests.values()) / n, 1),
            emulator_events=dict(sorted(recorder.events.items())),
        )
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
                "rss_mb": round(operator.memory_info().rss / MB, 1),
            }

        # -- progress ---------------------------------------------------------------------
        if progress_names and args.progress_rounds:
            cpu2 = clock.read()
            result["progress"] = progress_phase(server, recorder, progress_names, states, args)
            result["progress"]["cpu_s"] = CpuClock.delta(cpu2, clock.read())

        result["peak_rss_mb"] = round(sampler.peak / MB, 1)
        result["rss_samples"] = sampler.samples
        result["total_cpu_s"] = round(sum(operator.cpu_times()[:2]), 2)
        result["operator_threads"] = operator.num_threads()
        result["log_lines"] = sum(1 for _ in log_path.open("rb"))
        result["targets"] = {
            "all_pods_within_60s": all_pods and result["all_pods_s"] <= TARGET_ALL_PODS_S,
            "peak_rss_le_300mb": result["peak_rss_mb"] <= TARGET_PEAK_RSS_MB,
            "apply_to_pod_p50_le_150ms": (result["apply_to_pod"]["p50_ms"] or 1e9) <= TARGET_P50_MS,
        }
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


def start_py_spy(args: argparse.Namespace, pid: int, n: int) -> tuple[Any, Path] | None:
    if not args.py_spy:
        return None
    binary = args.py_spy_bin or shutil.which("py-spy")
    if not binary:
        raise SystemExit("--py-spy: no py-spy found (pip install py-spy, or --py-spy-bin)")
    out = Path(args.py_spy) / f"operator-{n}.txt"
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
    ("our decisions: reconcile(), pod manifest", ("reconcile (kubetune_operator/reconcile.py",)),
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

    columns: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("jobs", lambda r: r["jobs"]),
        ("all pods s", lambda r: r["all_pods_s"]),
        ("→pod p50 ms", lambda r: r["apply_to_pod"]["p50_ms"]),
        ("p95", lambda r: r["apply_to_pod"]["p95_ms"]),
        ("max", lambda r: r["apply_to_pod"]["max_ms"]),
        ("idle MB", lambda r: r["idle_rss_mb"]),
        ("peak MB", lambda r: r["peak_rss_mb"]),
        ("op CPU s", lambda r: r["pods_cpu_s"]["operator"]),
        ("ms/job", lambda r: r["operator_cpu_ms_per_job"]),
        ("op core", lambda r: r["pods_core_share"]["operator"]),
        ("emu core", lambda r: r["pods_core_share"]["emulator"]),
        ("req/job", lambda r: r["operator_requests_per_job"]),
        ("total CPU s", lambda r: r["total_cpu_s"]),
        ("step p50 ms", progress("p50_ms")),
        ("p95", progress("p95_ms")),
        ("targets", _verdict),
    ]
    rows = [[str(h) for h, _ in columns]]
    rows += [["-" if (v := get(r)) is None else str(v) for _, get in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        "→pod: job created → its pod created (both as committed in the API); op CPU s, "
        "ms/job, op/emu core: the operator's CPU seconds, per job, and the share of one core "
        "used by the operator / the emulator, from the first apply until all pods existed; "
        "req/job: the operator's API requests per job until it went quiet; total CPU s: the "
        "operator's, start to end; step: trainer step bump → status.progress.step"
    )


def _verdict(result: dict[str, Any]) -> str:
    missed = [name for name, ok in result["targets"].items() if not ok]
    verdict = "MISSED " + ",".join(missed) if missed else "ok"
    if result["extra_pods"]:
        verdict += f"; WRONG: {result['extra_pods']} extra pods (a job got a 2nd attempt)"
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        "--progress-interval", type=float, default=1.0, help="operator --progress-interval"
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
    parser.add_argument("--py-spy", metavar="DIR", help="profile the apply phase into DIR")
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
