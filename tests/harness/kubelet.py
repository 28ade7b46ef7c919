"""A kubelet for the emulator: it runs each pod's first container as a local process.

:class:`Kubelet` watches pods through the real HTTP API (optionally only one namespace
or those matching a label selector) and, for every new pod, in a thread of its own:

1. writes ``status.phase: Pending`` with a pod IP of its own, ``127.0.0.N`` (N = 2, 3, …
   in order, wrapping after 254 and skipping running pods; Linux routes all of 127/8 to
   the loopback);
2. starts the first container's ``command`` + ``args`` (or, for an image listed in
   ``images``, that stand-in command instead) with the container's env: plain values,
   ``fieldRef`` (``status.podIP``, ``metadata.name``/``namespace``/``uid``/``labels['…']``/
   ``annotations['…']`` (e.g. the Job controller's ``JOB_COMPLETION_INDEX``),
   ``spec.nodeName``),
   ``secretKeyRef``/``configMapKeyRef`` and ``envFrom`` (read from the API: the kubelet may
   read Secrets, the operator must not; while one is missing the pod waits with
   ``CreateContainerConfigError``), ``$(VAR)`` expansion, plus ``PATH`` (with this
   interpreter's directory first, so ``python -m …`` finds the venv), ``HOME``,
   ``PYTHONPATH`` of the test process, ``PYTHONUNBUFFERED=1`` and ``HOSTNAME`` (the pod's
   ``spec.hostname``, else its name); then the harness's pod network
   (:mod:`harness.network`): an env value that is exactly a pod's cluster DNS name
   (``<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]``, with a headless Service
   ``<subdomain>`` selecting the pod) is replaced by that pod's IP, waiting (at most
   ``dns_timeout``) while the pod has no IP yet; and ``PET_MASTER_PORT``/``MASTER_PORT``
   become a free port of the rank-0 pod that ``PET_MASTER_ADDR``/``MASTER_ADDR`` names,
   the same for all its peers (each pod has its own port space in a cluster; here
   torchrun's store binds all interfaces, so two rank-0 pods would collide);
3. writes ``phase: Running`` with ``containerStatuses[0].state.running``;
4. when the process exits, writes ``state.terminated`` (``exitCode``, 128+N for signal N;
   ``reason`` Completed/Error; ``message`` from the termination message file, or the log
   tail under ``FallbackToLogsOnError``; ``finishedAt``) and ``Succeeded``/``Failed``.
   Only ``restartPolicy: Never`` is emulated: nothing is ever restarted.

Paths: the container's ``terminationMessagePath`` and its ``volumeMounts`` do not exist
here. Each pod gets a directory; every occurrence of those paths in ``command``, ``args``
and env values is **rewritten** to the pod's file or directory (emptyDir and others: per
pod; a PVC: one directory per claim, shared by pods, so checkpoints survive attempts;
``hostPath``: kept). ``KUBETUNE_TERMINATION_MESSAGE_PATH`` is **also set** to the pod's
termination message file (the container's own env entries come later and win; the
operator's ``/dev/termination-log`` value is rewritten to the same file). The working
directory is the pod's directory.

A deleted pod (``deletionTimestamp`` or gone) gets SIGTERM, then SIGKILL after
``terminationGracePeriodSeconds`` (default 30; ``max_grace_period`` caps it for tests).
``spec.activeDeadlineSeconds`` (counted from the process start) is enforced the same
way, and the pod ends ``Failed`` with ``reason: DeadlineExceeded``. Each pod's stdout and
stderr go to one log file: :meth:`Kubelet.logs`, :meth:`Kubelet.dump_logs`, and
``pods/log`` when wired to the emulator (``emulator.pod_log_source = kubelet.read_log``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .client import Body, KubeClient, KubeError
from .network import ClusterDNS, PortMap, apply_network
from .server import KUBELET_USER

TERMINATION_MESSAGE_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MESSAGE_LIMIT = 4096  # bytes of a termination message, as in Kubernetes
FALLBACK_LOG_LINES = 80
CONFIG_RETRY_SECONDS = 1.0
HOST_IP = "127.0.0.1"
NODE_NAME = "harness-node"
INHERITED_ENV = ("PATH", "HOME", "PYTHONPATH")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


class ContainerConfigError(Exception):
    """The container cannot start (e.g. a missing Secret); the pod stays Pending."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(eq=False)
class PodRun:
    """What the kubelet knows about one pod it runs (looked up by uid, or by name)."""

    namespace: str
    name: str
    uid: str
    ip: str
    directory: Path
    deleted: threading.Event = dataclasses.field(default_factory=threading.Event)
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    thread: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "container.log"

    @property
    def message_path(self) -> Path:
        return self.directory / "termination-log"

    @property
    def status_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Kubelet:
    """Plays the kubelet for the pods of an emulated cluster (see the module docstring)."""

    def __init__(
        self,
        url: str,
        workdir: str | Path,
        *,
        user: str = KUBELET_USER,
        namespace: str | None = None,
        label_selector: str | None = None,
        max_grace_period: float | None = None,
        images: Mapping[str, list[str]] | None = None,
        poll_interval: float = 0.05,
        dns_timeout: float = 60.0,
    ) -> None:
        self.client = KubeClient(url, token=user)
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.label_selector = label_selector
        self.max_grace_period = max_grace_period
        self.images = dict(images or {})
        self.poll_interval = poll_interval
        self.dns = ClusterDNS(self.client, timeout=dns_timeout)
        self.ports = PortMap()
        self._runs: dict[str, PodRun] = {}  # by uid
        self._next_ip = 2
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stop_grace = 2.0
        self._watching = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        """Start watching; returns once the first watch request is answered."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._watch_loop, name="kubelet", daemon=True)
        self._thread.start()
        if not self._watching.wait(timeout):
            raise TimeoutError("the kubelet could not watch pods")
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop watching, terminate all running containers, join all threads."""
        self._stop_grace = grace
        self._stopping.set()
        for run in self.runs():
            run.deleted.set()
        for run in self.runs():
            if run.thread is not None:
                run.thread.join(grace + 5)
        self.client.close()  # aborts the watch
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- for tests --------------------------------------------------------------------

    def runs(self) -> list[PodRun]:
        """All pods this kubelet has run or runs, oldest first."""
        with self._lock:
            return list(self._runs.values())

    def run(self, name: str, namespace: str | None = None) -> PodRun:
        """The newest run of the pod ``name`` (KeyError if the kubelet never saw it)."""
        for run in reversed(self.runs()):
            if run.name == name and namespace in (None, run.namespace):
                return run
        raise KeyError(f"no pod {name!r} has been run")

    def kill(self, name: str, sig: int = signal.SIGKILL, namespace: str | None = None) -> None:
        """Send a signal to a pod's process, e.g. to kill a trainer mid-run."""
        process = self.run(name, namespace).process
        if process is None:
            raise RuntimeError(f"pod {name!r} has no process (yet)")
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)

    def wait_finished(self, name: str, timeout: float = 30.0, namespace: str | None = None) -> int:
        """Wait until the pod's process ended and its status was written; its exit code."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(KeyError):
                run = self.run(name, namespace)
                if run.finished.wait(max(0.0, deadline - time.monotonic())):
                    return -1 if run.exit_code is None else run.exit_code
            if time.monotonic() >= deadline:
                raise TimeoutError(f"pod {name!r} did not finish in {timeout}s")
            time.sleep(self.poll_interval)

    def logs(self, name: str, namespace: str | None = None) -> str:
        """The pod's stdout and stderr so far."""
        return self.run(name, namespace).log()

    def read_log(self, namespace: str, name: str) -> str | None:
        """The log of a pod, for ``Emulator.pod_log_source``; None if never run."""
        try:
            return self.run(name, namespace).log()
        except KeyError:
            return None

    def dump_logs(self) -> str:
        """All pods' logs, with headers: for debugging a failing test."""
        sections = [
            f"----- pod {r.namespace}/{r.name} ip={r.ip} exit={r.exit_code} -----\n{r.log()}"
            for r in self.runs()
        ]
        return "\n".join(sections)

    # -- watching ---------------------------------------------------------------------

    def _watch_loop(self) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods" if self.namespace else "/api/v1/pods"
        version = ""
        while not self._stopping.is_set():
            params = {"labelSelector": self.label_selector or ""}
            if version:
                params["resourceVersion"] = version
            try:
                for event in self.client.watch(path, params, on_open=self._watching.set):
                    version = event["object"]["metadata"].get("resourceVersion", version)
                    self._on_event(event["type"], event["object"])
            except Exception:  # also what a watch aborted by stop() raises
                if not self._stopping.is_set():
                    traceback.print_exc()
                    time.sleep(0.2)

    def _on_event(self, type_: str, pod: Body) -> None:
        if type_ not in ("ADDED", "MODIFIED", "DELETED"):
            return
        meta = pod["metadata"]
        with self._lock:
            run = self._runs.get(meta["uid"])
        if type_ == "DELETED" or meta.get("deletionTimestamp"):
            if run is not None:
                run.deleted.set()
        elif run is None and pod.get("status", {}).get("phase", "Pending") == "Pending":
            self._admit(pod)

    def _admit(self, pod: Body) -> None:
        meta = pod["metadata"]
        directory = self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            run = PodRun(meta["namespace"], meta["name"], meta["uid"], self._free_ip(), directory)
            self._runs[run.uid] = run
        run.thread = threading.Thread(
            target=self._run_pod, args=(run, pod), name=f"pod-{run.name}", daemon=True
        )
        run.thread.start()

    def _free_ip(self) -> str:
        """The next 127.0.0.N (N = 2, 3, …, 254, then 2 again) no unfinished pod holds.

        Called with the lock held.
        """
        taken = {run.ip for run in self._runs.values() if not run.finished.is_set()}
        for _ in range(253):
            ip = f"127.0.0.{self._next_ip}"
            self._next_ip = self._next_ip + 1 if self._next_ip < 254 else 2
            if ip not in taken:
                return ip
        raise RuntimeError("no free pod IP left in 127.0.0.2-254")

    # -- running a pod ----------------------------------------------------------------

    def _run_pod(self, run: PodRun, pod: Body) -> None:
        started = _now()
        try:
            self._write_status(
                run,
                phase="Pending",
                hostIP=HOST_IP,
                podIP=run.ip,
                podIPs=[{"ip": run.ip}],
                startTime=started,
                conditions=[{"type": "PodScheduled", "status": "True"}],
            )
            prepared = self._prepare_until_ready(run, pod)
            if prepared is None:
                return  # deleted while waiting
            run.process = self._spawn(run, *prepared)
            running = {"running": {"startedAt": (container_started := _now())}}
            self._write_status(
                run, phase="Running", containerStatuses=[self._container_status(pod, running)]
            )
            deadline_exceeded = self._supervise(run, pod, started_at=time.monotonic())
            self._report_exit(run, pod, deadline_exceeded, container_started)
        except Exception:
            traceback.print_exc()
        finally:
            self.ports.forget(run.uid)
            run.finished.set()

    def _prepare_until_ready(
        self, run: PodRun, pod: Body
    ) -> tuple[list[str], dict[str, str]] | None:
        """The command and env; while they cannot be made (a Secret is missing), the pod
        waits with the reason in its container status, retried every second until deleted."""
        reported = None
        while not run.deleted.is_set():
            try:
                argv, env = self._prepare(run, pod)
                env = self._network(run, pod, env)
                return None if run.deleted.is_set() else (argv, env)
            except ContainerConfigError as exc:
                if exc.message != reported:
                    waiting = {"waiting": {"reason": exc.reason, "message": exc.message}}
                    status = self._container_status(pod, waiting)
                    self._write_status(run, containerStatuses=[status])
                    reported = exc.message
            run.deleted.wait(CONFIG_RETRY_SECONDS)
        return None

    def _network(self, run: PodRun, pod: Body, env: dict[str, str]) -> dict[str, str]:
        """Pod DNS names in env values become IPs, master ports become the pod's own (see
        :mod:`harness.network`); names that stay unresolved are noted in the pod's log."""
        resolved, unresolved = self.dns.resolve(pod, run.ip, env.values(), run.deleted)
        if unresolved and not run.deleted.is_set():
            with run.log_path.open("a") as log:
                names = ", ".join(unresolved)
                log.write(f"harness cluster DNS: no pod answers to {names} (left as is)\n")
        return apply_network(env, resolved, pod, run.ip, self.ports)

    def _spawn(self, run: PodRun, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with run.log_path.open("ab") as log:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=run.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cleaned up as a whole
            )

    def _supervise(self, run: PodRun, pod: Body, started_at: float) -> bool:
        """Wait for the process to end; stop it when deleted or past its deadline.

        Returns whether ``activeDeadlineSeconds`` ran out.
        """
        assert run.process is not None
        spec = pod.get("spec", {})
        deadline = spec.get("activeDeadlineSeconds")
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        if self.max_grace_period is not None:
            grace = min(grace, self.max_grace_period)
        while run.process.poll() is None:
            if run.deleted.is_set():
                stopping = self._stopping.is_set()
                self._terminate(run.process, min(grace, self._stop_grace) if stopping else grace)
            elif deadline is not None and time.monotonic() - started_at >= deadline:
                self._terminate(run.process, grace)
                return True
            else:
                run.deleted.wait(self.poll_interval)
        self._kill_group(run.process)
        return False

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
        """SIGTERM, then SIGKILL after the grace period."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            Kubelet._kill_group(process)
            process.wait()

    @staticmethod
    def _kill_group(process: subprocess.Popen[bytes]) -> None:
        """Kill whatever the container left behind (its process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def _report_exit(
        self, run: PodRun, pod: Body, deadline_exceeded: bool, started_at: str
    ) -> None:
        assert run.process is not None
        code = run.process.returncode
        run.exit_code = code if code >= 0 else 128 - code
        terminated = {
            "exitCode": run.exit_code,
            "reason": "Completed" if run.exit_code == 0 else "Error",
            "message": self._termination_message(run, pod),
            "startedAt": started_at,
            "finishedAt": _now(),
        }
        status: Body = {
            "phase": "Succeeded" if run.exit_code == 0 and not deadline_exceeded else "Failed",
            "containerStatuses": [self._container_status(pod, {"terminated": terminated})],
        }
        if deadline_exceeded:
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        self._write_status(run, **status)

    def _termination_message(self, run: PodRun, pod: Body) -> str:
        message = ""
        if run.message_path.exists():
            message = run.message_path.read_bytes()[:MESSAGE_LIMIT].decode(errors="replace")
        container = pod["spec"]["containers"][0]
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and fallback and run.exit_code != 0:
            tail = "".join(run.log().splitlines(keepends=True)[-FALLBACK_LOG_LINES:])
            message = tail.encode()[-2048:].decode(errors="replace")
        return message

    def _container_status(self, pod: Body, state: Body) -> Body:
        container = pod["spec"]["containers"][0]
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "containerID": f"harness://{pod['metadata']['uid']}",
            "ready": "running" in state,
            "started": "running" in state,
            "restartCount": 0,
            "state": state,
        }

    def _write_status(self, run: PodRun, **status: Any) -> None:
        """Merge-patch pods/status, only if the pod is still the same (uid precondition)."""
        body = {"metadata": {"uid": run.uid}, "status": status}
        try:
            self.client.patch(run.status_path, body)
        except KubeError as exc:
            if exc.status not in (404, 409):  # gone, or replaced by a namesake
                raise

    # -- the container's command and environment ------------------------------------

    def _prepare(self, run: PodRun, pod: Body) -> tuple[list[str], dict[str, str]]:
        container = pod["spec"]["containers"][0]
        # A stand-in image the kubelet was given replaces the container's command: it plays
        # an image whose real contents a test does not need (e.g. a fake trainer).
        stand_in = self.images.get(container.get("image", ""))
        command = stand_in or container.get("command")
        if not command:
            raise ContainerConfigError(
                "CreateContainerError", f"no command and no entrypoint for {container.get('image')}"
            )
        rewrite = self._path_rewriter(run, pod, container)
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env["HOSTNAME"] = pod["spec"].get("hostname") or pod["metadata"]["name"]
        env[TERMINATION_MESSAGE_ENV] = str(run.message_path)
        for source in container.get("envFrom") or []:
            env.update({k: rewrite(v) for k, v in self._env_from(pod, source).items()})
        for entry in container.get("env") or []:
            value = self._env_value(run, pod, entry)
            if value is not None:
                env[entry["name"]] = rewrite(_VAR_REF.sub(lambda m: env.get(m[1], m[0]), value))
        args = [
            rewrite(_VAR_REF.sub(lambda m: env.get(m[1], m[0]), arg))
            for arg in [*([] if stand_in else command), *(container.get("args") or [])]
        ]
        # A stand-in command is a host path (e.g. this venv's python, which may itself lie
        # under /tmp): it is not rewritten as if it were inside the container's volumes.
        return [*(stand_in or []), *args], env

    def _env_value(self, run: PodRun, pod: Body, entry: Body) -> str | None:
        if "valueFrom" not in entry:
            return str(entry.get("value", ""))
        source = entry["valueFrom"]
        if "fieldRef" in source:
            return self._field(run, pod, source["fieldRef"]["fieldPath"])
        for kind, ref_key in (("secrets", "secretKeyRef"), ("configmaps", "configMapKeyRef")):
            if ref_key in source:
                ref = source[ref_key]
                data = self._read_data(pod, kind, ref["name"], optional=ref.get("optional", False))
                if ref["key"] not in data and not ref.get("optional", False):
                    raise ContainerConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {kind[:-1]} {ref['name']}",
                    )
                return data.get(ref["key"])
        return None  # resourceFieldRef and others: not emulated

    def _env_from(self, pod: Body, source: Body) -> dict[str, str]:
        prefix = source.get("prefix", "")
        for kind, ref_key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
            if ref_key in source:
                ref = source[ref_key]
                data = self._read_data(pod, kind, ref["name"], optional=ref.get("optional", False))
                return {prefix + k: v for k, v in data.items()}
        return {}

    def _field(self, run: PodRun, pod: Body, path: str) -> str:
        meta = pod["metadata"]
        if match := _LABEL_REF.match(path):
            return str((meta.get(match[1]) or {}).get(match[2], ""))
        fields: dict[str, str] = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "status.podIP": run.ip,
            "status.hostIP": HOST_IP,
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        }
        if path not in fields:
            raise ContainerConfigError("CreateContainerConfigError", f"unsupported fieldRef {path}")
        return fields[path]

    def _read_data(self, pod: Body, kind: str, name: str, optional: bool) -> dict[str, str]:
        """The data of a Secret (base64-decoded) or a ConfigMap, read through the API."""
        path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/{kind}/{name}"
        try:
            obj = self.client.get(path)
        except KubeError as exc:
            if exc.status == 404 and optional:
                return {}
            if exc.status == 404:
                raise ContainerConfigError(
                    "CreateContainerConfigError", f'{kind[:-1]} "{name}" not found'
                ) from exc
            raise
        data = obj.get("data") or {}
        if kind == "secrets":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return dict(data)

    def _path_rewriter(self, run: PodRun, pod: Body, container: Body) -> Any:
        """A function rewriting the container's paths (mounts, termination log) to local ones."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mapping: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            local = self._volume_dir(run, pod, volumes.get(mount["name"], {"name": mount["name"]}))
            if local is not None:
                mapping[mount["mountPath"].rstrip("/") or "/"] = str(
                    local / mount.get("subPath", "")
                )
        message_path = container.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
        mapping[message_path] = str(run.message_path)
        alternatives = "|".join(re.escape(p) for p in sorted(mapping, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w./-])(?:{alternatives})(?![\w.-])")
        return lambda text: pattern.sub(lambda m: mapping[m[0]], text)

    def _volume_dir(self, run: PodRun, pod: Body, volume: Body) -> Path | None:
        """The local directory standing for a volume; None to keep the path as it is."""
        if "hostPath" in volume:
            return None
        local: Path
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            local = self.workdir / "claims" / pod["metadata"]["namespace"] / claim
        else:
            local = run.directory / "volumes" / volume["name"]
        local.mkdir(parents=True, exist_ok=True)
        for kind, ref_key, name_key in (
            ("secrets", "secret", "secretName"),
            ("configmaps", "configMap", "name"),
        ):
            if ref_key in volume:
                ref = volume[ref_key]
                files = self._read_data(pod, kind, ref[name_key], ref.get("optional", False))
                for key, value in files.items():
                    (local / key).write_text(value)
        return local
