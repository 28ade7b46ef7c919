"""What the harness's controllers share: informers, one reconcile thread, start and stop.

A :class:`Controller` lists and watches through its :class:`~harness.informer.Informer`
caches, and runs :meth:`Controller.reconcile_all` in a thread of its own whenever a cache
changes, and at least every ``sync_interval`` seconds (so a missed event heals). It is a
context manager: ``with JobController(url) as controller: ...``.
"""

from __future__ import annotations

import threading
import traceback
from types import TracebackType
from typing import Self

from .client import Body, KubeClient
from .informer import Informer


class Controller:
    name = "controller"

    def __init__(self, url: str, *, user: str, sync_interval: float) -> None:
        self.client = KubeClient(url, token=user)
        self.sync_interval = sync_interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def informers(self) -> tuple[Informer, ...]:
        """The caches, in the order they are started (and stopped in reverse)."""
        raise NotImplementedError

    def reconcile_all(self) -> None:
        """One pass over the cached objects."""
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self, type_: str = "", obj: Body | None = None) -> None:
        """Run a pass soon (an informer's ``on_change``)."""
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        """Start the caches and the reconcile thread; returns once every cache is listed."""
        for informer in self.informers():
            informer.start(timeout)
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reconciling and watching (pods keep running: stop the kubelet for that)."""
        self._stopping.set()
        self._wake.set()
        informers = self.informers()[::-1]
        for informer in informers:
            informer.stop()
        if self._thread is not None:
            self._thread.join(10)
        self.client.close()  # aborts the watches
        for informer in informers:
            informer.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.sync_interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.reconcile_all()
            except Exception:
                if not self._stopping.is_set():
                    traceback.print_exc()
