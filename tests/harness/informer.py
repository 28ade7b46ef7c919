"""A list-and-watch cache of one resource, for the harness's controllers.

:class:`Informer` keeps the live objects of one resource (optionally one namespace and a
label selector) in memory, as client-go's informers do: a LIST, then a WATCH from the
list's ``resourceVersion``, resumed after each ``timeoutSeconds`` and re-listed every
``resync_interval`` seconds (or at once after a watch error), so that a missed event
heals. Each change calls ``on_change(type, obj)`` from the informer's thread, with
``type`` ADDED, MODIFIED or DELETED; a re-list reports the differences it finds the same
way. A controller that writes an object can :meth:`Informer.remember` the answer, so that
its next decision does not depend on the watch having caught up (a newer
``resourceVersion`` in the cache is never replaced by an older one).

Controllers read it with :meth:`Informer.items` and so need few requests: kmock matches
every request against all it has served, so polling LISTs would slow a long test down.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

from .client import Body, KubeClient

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


def object_key(obj: Body) -> ObjectKey:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def _version(obj: Body) -> int:
    version = str(obj.get("metadata", {}).get("resourceVersion") or "0")
    return int(version) if version.isdigit() else 0


class Informer:
    """The live objects at ``path`` (a collection URL), kept current by a watch thread."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        *,
        label_selector: str | None = None,
        on_change: Callable[[str, Body], None] | None = None,
        resync_interval: float = 5.0,
        watch_timeout: int = 5,
    ) -> None:
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.on_change = on_change
        self.resync_interval = resync_interval
        self.watch_timeout = watch_timeout
        self._objects: dict[ObjectKey, Body] = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread; returns once the first LIST is in the cache."""
        self._thread = threading.Thread(target=self._loop, name=f"informer{self.path}", daemon=True)
        self._thread.start()
        if not self._synced.wait(timeout):
            raise TimeoutError(f"could not list {self.path}")

    def stop(self) -> None:
        """Stop the thread (the caller closes the client, which aborts the watch)."""
        self._stopping.set()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the cache --------------------------------------------------------------------

    def items(self) -> list[Body]:
        """A snapshot of the live objects (do not modify them)."""
        with self._lock:
            return list(self._objects.values())

    def get(self, namespace: str | None, name: str) -> Body | None:
        with self._lock:
            return self._objects.get((namespace or "", name))

    def remember(self, obj: Body) -> None:
        """Put an object the caller has just written (the API's answer) into the cache."""
        self._apply("MODIFIED", obj, notify=False)

    def forget(self, obj: Body) -> None:
        """Drop an object the caller has just deleted."""
        self._apply("DELETED", obj, notify=False)

    def _apply(self, type_: str, obj: Body, *, notify: bool = True) -> None:
        key = object_key(obj)
        uid = obj["metadata"].get("uid")
        replaced = None
        with self._lock:
            cached = self._objects.get(key)
            same = cached is not None and cached["metadata"].get("uid") == uid
            if type_ == "DELETED":
                if not same:
                    return  # already gone, or a newer namesake
                del self._objects[key]
            else:
                if cached is not None and _version(cached) > _version(obj):
                    return  # the cache is newer (remembered from a write)
                if same and cached == obj:
                    return
                if cached is not None and not same:
                    replaced = cached  # a namesake replaced the object we had
                self._objects[key] = obj
                type_ = "MODIFIED" if same else "ADDED"
        if notify and self.on_change is not None:
            if replaced is not None:
                self.on_change("DELETED", replaced)
            self.on_change(type_, obj)

    # -- list and watch ---------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                version = self._relist()
                listed_at = time.monotonic()
                while not self._stopping.is_set():
                    if time.monotonic() - listed_at >= self.resync_interval:
                        break  # re-list: heal whatever a watch may have missed
                    params = {
                        "resourceVersion": version,
                        "labelSelector": self.label_selector or "",
                    }
                    for event in self.client.watch(self.path, params, timeout=self.watch_timeout):
                        obj = event["object"]
                        version = obj.get("metadata", {}).get("resourceVersion") or version
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self._apply(event["type"], obj)
                        if time.monotonic() - listed_at >= self.resync_interval:
                            break
            except Exception:  # also what a watch aborted by the client's close() raises
                if not self._stopping.is_set():
                    traceback.print_exc()
                    self._stopping.wait(0.2)

    def _relist(self) -> str:
        listed = self.client.get(self.path, labelSelector=self.label_selector or "")
        version = str(listed["metadata"]["resourceVersion"])
        fresh = {object_key(obj): obj for obj in listed.get("items") or []}
        with self._lock:  # what is not listed is gone, unless remembered after the LIST
            gone = [
                obj
                for key, obj in self._objects.items()
                if key not in fresh and _version(obj) <= _version({"metadata": listed["metadata"]})
            ]
        for obj in gone:
            self._apply("DELETED", obj)
        for obj in fresh.values():
            self._apply("ADDED", obj)
        self._synced.set()
        return version
