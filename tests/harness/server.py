"""Serve an :class:`~harness.emulator.Emulator` over real HTTP from a background thread.

The emulator gets its own thread and event loop, so synchronous tests, the kubelet
harness and a kopf operator (in its own thread and loop) can all talk to it at once::

    with EmulatorServer() as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", user="admin")
        core = kubernetes.client.CoreV1Api(server.api_client())
        ...

Clients are told apart by user: the kubeconfigs, API clients and kopf credentials made
here send the user's name as the bearer token, which the audit log records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import kmock
import yaml

from .emulator import Emulator, make_emulator

if TYPE_CHECKING:
    import kopf
    import kubernetes.client

T = TypeVar("T")

ADMIN_USER = "admin"
OPERATOR_USER = "system:serviceaccount:kubetune-system:kubetune-operator"
KUBELET_USER = "system:node:harness"


class EmulatorServer:
    """An emulator listening on 127.0.0.1 (a free port), run by a background thread."""

    def __init__(self, emulator: Emulator | None = None, *, start_timeout: float = 10.0) -> None:
        self.emulator = emulator if emulator is not None else make_emulator()
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.url = ""
        self.port: int | None = None  # chosen at the first start, kept by restart()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Self:
        """Start the thread and wait until the server accepts connections."""
        self._ready.clear()
        self._failure = None
        self.emulator.reopen()
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout):
            raise TimeoutError("the emulator did not start in time")
        if self._failure is not None:
            raise RuntimeError("the emulator failed to start") from self._failure
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the watch streams, stop the server and join the thread."""
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        self._thread = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server and start it again on the same port after ``down_seconds``,
        with every object and its history kept (as an API server restarted over the same
        etcd): watches are cut, clients reconnect and resume from their resourceVersion."""
        self.stop()
        time.sleep(down_seconds)
        deadline = time.monotonic() + self._start_timeout
        while True:  # the port may take a moment to be free again
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(), or lost after a clean start
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with (
            self.emulator,
            kmock.Server(self.emulator, host="127.0.0.1", port=self.port) as server,
        ):
            self.url = str(server.url).rstrip("/")
            self.port = server.url.port
            self._ready.set()
            await self._stopping.wait()
            self.emulator.close_watches()
            await asyncio.sleep(0)  # let the streams see the end and finish their responses

    # -- helpers ----------------------------------------------------------------------

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn()`` in the emulator's loop (to read or seed its state consistently)."""
        assert self._loop is not None, "the server is not started"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object (e.g. ``object("v1/pods", "default", "p")``), or None if absent."""
        key = (kmock.resource(resource), namespace, name)
        return self.call(lambda: self.emulator._get(key))

    def wait_for(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[dict[str, Any] | None], bool],
        timeout: float = 15.0,
    ) -> dict[str, Any] | None:
        """Poll a stored object until ``predicate(obj)`` (obj is None while absent)."""
        deadline = time.monotonic() + timeout
        while True:
            obj = self.object(resource, namespace, name)
            if predicate(obj):
                return obj
            if time.monotonic() > deadline:
                raise TimeoutError(f"{resource} {namespace}/{name} never matched; last: {obj}")
            time.sleep(0.02)

    def kubeconfig(self, user: str = ADMIN_USER, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig dict for this server; the user's name is its bearer token."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": user, "user": {"token": user}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": user, "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }

    def write_kubeconfig(
        self, path: str | Path, user: str = ADMIN_USER, namespace: str = "default"
    ) -> Path:
        """Write :meth:`kubeconfig` to ``path``; pass it explicitly (``KUBECONFIG`` is read
        by the ``kubernetes`` package at import time)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.kubeconfig(user, namespace)))
        return path

    def api_client(self, user: str = ADMIN_USER) -> kubernetes.client.ApiClient:
        """A ``kubernetes`` API client for this server, authenticated as ``user``."""
        import kubernetes.client

        config = kubernetes.client.Configuration(host=self.url)
        config.api_key = {"BearerToken": user}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return kubernetes.client.ApiClient(config)

    def connection_info(self, user: str = OPERATOR_USER) -> kopf.ConnectionInfo:
        """kopf credentials for this server; return them from an ``@kopf.on.login`` handler."""
        import kopf

        return kopf.ConnectionInfo(
            server=self.url, token=user, scheme="Bearer", default_namespace="default"
        )
