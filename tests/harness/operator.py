"""Run a kopf operator against the emulator, in its own thread and event loop.

kopf 1.45 cancels, on exit, every task of its event loop created after it started (a
pytest-asyncio loop would lose its own), so the operator gets a loop of its own::

    registry = kopf.OperatorRegistry()

    @kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs", registry=registry)
    def created(**_: Any) -> None: ...

    with OperatorThread(registry, server.connection_info()):
        ...  # create objects through the API and wait for the operator's effects

For the real operator, pass its registry (``kopf.get_default_registry()`` once its
modules are imported) and, if it has a login handler of its own, no credentials.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import kopf


def harness_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """kopf settings for the emulator: no CRD scanning, no peering."""
    import kopf

    settings = settings if settings is not None else kopf.OperatorSettings()
    settings.scanning.disabled = True  # the emulator has no CRD objects to scan
    settings.peering.standalone = True  # and no peering CRD
    return settings


class OperatorThread:
    """``kopf.operator()`` in a daemon thread; ``start()`` waits until it is ready."""

    def __init__(
        self,
        registry: kopf.OperatorRegistry,
        credentials: kopf.ConnectionInfo | None = None,
        *,
        settings: kopf.OperatorSettings | None = None,
        namespaces: list[str] | None = None,
        memo: Any = None,
    ) -> None:
        import kopf

        self.registry = registry
        self.settings = harness_settings(settings)
        self.namespaces = namespaces
        self.memo = memo
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if credentials is not None:

            @kopf.on.login(registry=registry)
            def login(**_: Any) -> kopf.ConnectionInfo:
                return credentials

    def start(self, timeout: float = 15.0) -> Self:
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            raise RuntimeError("the operator failed to start") from self.error
        if not self._ready.is_set():
            raise TimeoutError("the operator did not become ready")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("the operator did not stop")

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
        import kopf

        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    standalone=True,
                    clusterwide=not self.namespaces,
                    namespaces=self.namespaces or (),
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                    memo=self.memo,
                )
            )
        except BaseException as exc:
            self.error = exc
            self._ready.set()
