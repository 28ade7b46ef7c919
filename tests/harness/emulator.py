"""A Kubernetes API emulator good enough for kopf and the ``kubernetes`` client.

:class:`Emulator` subclasses ``kmock.KubernetesEmulator`` (pin ``kmock==0.8``: it uses
kmock's request objects and object store) and replaces its object semantics with those
of a real API server:

* metadata: ``resourceVersion`` (one cluster-wide counter, also on lists), ``uid``,
  ``creationTimestamp``, ``generation`` (bumped only when something other than
  ``metadata``/``status`` changes), ``generateName``, ``namespace`` from the URL;
* ``POST`` answers 201; ``PUT`` replaces; JSON-patch (a failed ``test`` answers 422),
  merge-patch, strategic-merge-patch (treated as a merge-patch); a stale
  ``metadata.resourceVersion`` in a body answers 409;
* the status subresource is kept apart: writes to the object keep its status, writes
  to ``/status`` change only the status;
* ``labelSelector`` and ``fieldSelector`` on lists and watches; lists carry ``kind``
  (``PodList``) and the current ``resourceVersion``;
* watches: race-free start (list + watch or a bare watch lose nothing), ``resourceVersion``
  to resume, ``timeoutSeconds``, ``sendInitialEvents``, ``BOOKMARK`` events, events
  re-typed when an object enters or leaves a selector, ``application/json`` streams;
* deletion with finalizers (``deletionTimestamp``, removal once they are gone) and a
  garbage collector for ``ownerReferences``;
* ``/api/v1/namespaces`` works, core discovery says ``groupVersion: v1``, Secrets'
  ``stringData`` is folded into ``data``; ``pods/log`` is served via ``pod_log_source``;
* every resource request is recorded in :attr:`Emulator.audit` (RBAC terms).

Responses are still produced by kmock reactions, so a test can inject faults with
kmock's DSL, e.g. ``emulator['patch', kmock.resource('v1/pods')] << 500``. The whole
emulator runs in one event loop and never awaits while changing state, so no locks.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import secrets
import string
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import multidict
import yaml
import yarl

from .audit import AuditEntry, AuditLog, rbac_verb, user_of
from .selectors import Selector, SelectorError, parse_field_selector, parse_label_selector

Body = dict[str, Any]
Response = kmock.Response  # type: ignore[attr-defined]  # exported, though not in __all__
Key = tuple[kmock.resource, str | None, str]

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"  # every kubetune CRD is served
NAMESPACE_SUBRESOURCES = {"status", "finalize"}
PATH_HEADER = "X-Emulator-Path"  # the real path of a request whose URL kmock cannot parse
FIXED_METADATA = (  # what no update can change
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
ALL_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge-patch: dicts merge recursively, ``None`` deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _without(body: Body, *keys: str) -> Body:
    return {key: value for key, value in body.items() if key not in keys}


def _kmock_path(path: str) -> str:
    """A path that kmock's own URL parser can digest, for the real one see ``_split_path``.

    kmock crashes on ``/api/v1/namespaces[/x[/status]]`` (it takes ``namespaces`` for the
    prefix of a namespaced URL) and has no route for ``/api/`` and ``/apis/``.
    """
    parts = path.strip("/").split("/")
    if _split_path(path) and parts[2:3] == ["namespaces"]:
        parts[2] = "_namespaces"
    return "/" + "/".join(parts)


def _split_path(
    path: str,
) -> tuple[kmock.resource, str | None, str | None, str | None] | None:
    """``(resource, namespace, name, subresource)`` of a resource URL, None for others."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in NAMESPACE_SUBRESOURCES:
        namespace, rest = rest[1], rest[2:]
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return kmock.resource(group, version, rest[0]), namespace, name, subresource


def _action(method: str, *, named: bool, watch: bool) -> kmock.action | None:
    """The kmock action of a resource request (PUT has none: it has a reaction of its own)."""
    if method == "GET":
        return kmock.action.WATCH if watch else kmock.action.FETCH if named else kmock.action.LIST
    if method == "DELETE":
        return kmock.action.DELETE if named else None  # deletecollection: not emulated
    return {"POST": kmock.action.CREATE, "PATCH": kmock.action.UPDATE}.get(method)


@dataclasses.dataclass(frozen=True)
class _Event:
    """One change of one object, numbered by the resourceVersion it produced."""

    revision: int
    resource: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: Body
    old: Body | None


@dataclasses.dataclass(eq=False)
class _Watch:
    """One open watch request: its filters and the queue of events to send."""

    resource: kmock.resource
    namespace: str | None
    name: str | None
    labels: Selector
    fields: Selector
    queue: asyncio.Queue[_Event | None] = dataclasses.field(default_factory=asyncio.Queue)

    def sees(self, obj: Body | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and self.labels(obj)
            and self.fields(obj)
        )

    def translate(self, event: _Event) -> Body | None:
        """The event as this watch sends it, re-typed if the object crossed its filters."""
        new, old = self.sees(event.obj), self.sees(event.old)
        if event.type == "MODIFIED" and new != old:
            return {"type": "ADDED" if new else "DELETED", "object": event.obj}
        return {"type": event.type, "object": event.obj} if new else None


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server semantics kopf and clients rely on."""

    bookmark_interval: float = 5.0
    # kmock keeps every request for assertions and matches each new one against all of
    # them (quadratic): long runs (chaos loops, benchmarks) forget a request once answered.
    forget_answered: bool = False
    audit: AuditLog = attrs.field(factory=AuditLog)
    pod_log_source: Callable[[str, str], str | None] | None = None
    _revision: int = attrs.field(default=0, init=False)
    _history: list[_Event] = attrs.field(factory=list, init=False)
    _watches: set[_Watch] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # registers our _serve_* overrides as fallbacks
        self.fallback[kmock.method.PUT] << self._serve_replace
        (self.fallback**1)[kmock.action.FETCH, kmock.subresource("log")] << self._serve_log

    # -- routing ----------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path = raw_request.path
        hidden = _kmock_path(path)
        if hidden != path:
            raw_request = raw_request.clone(
                rel_url=yarl.URL(hidden).with_query(raw_request.query),
                headers=multidict.CIMultiDict({**raw_request.headers, PATH_HEADER: path}),
            )
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> Any:
        routed = self._route(request)
        if routed is not request:  # kmock matches reactions by identity of recorded requests
            self._requests[self._requests.index(request)] = request = routed
        if request.resource is not None and request.resource.plural is not None:
            self.audit.record(self._audit_entry(request))
        try:
            # Skip KubernetesEmulator._handle(): it mutates its store before any reaction.
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        finally:
            if self.forget_answered:
                raw = request._raw_request
                self._requests[:] = [r for r in self._requests if r._raw_request is not raw]

    def _route(self, request: kmock.Request) -> kmock.Request:
        """Re-parse a resource URL into the request's resource, namespace, name, action."""
        parsed = _split_path(request.headers.get(PATH_HEADER, request.url.path))
        if parsed is None:
            return request  # discovery and other non-resource URLs
        resource, namespace, name, subresource = parsed
        watch = request.params.get("watch") in ("true", "1")
        return attrs.evolve(
            request,
            resource=resource,
            namespace=namespace,
            name=name,
            subresource=subresource,
            action=_action(request.method.value, named=name is not None, watch=watch),
        )

    def _audit_entry(self, request: kmock.Request) -> AuditEntry:
        assert request.resource is not None and request.resource.plural is not None
        return AuditEntry(
            verb=rbac_verb(
                request.method.value,
                named=request.name is not None,
                watch=request.action == kmock.action.WATCH,
            ),
            group=request.resource.group or "",
            resource=request.resource.plural,
            subresource=request.subresource,
            namespace=request.namespace,
            name=request.name,
            user=user_of(request.headers),
        )

    async def _serve_version(self, request: kmock.Request) -> Any:
        result: Any = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")  # kmock says "/v1"
        return result

    async def _serve_api(self, request: kmock.Request) -> Any:
        result: Any = await super()._serve_api(request)
        address = f"{request.url.host}:{request.url.port}"  # required by the kubernetes client
        result["serverAddressByClientCIDRs"] = [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
        ]
        return result

    # -- the store --------------------------------------------------------------------

    def _info(self, request: kmock.Request) -> kmock.ResourceInfo:
        if request.resource is None or request.resource not in self.resources:
            raise _error(404, "NotFound", f"the server could not find {request.resource}")
        return self.resources[request.resource]

    def _key(self, request: kmock.Request) -> Key:
        assert request.resource is not None
        return request.resource, request.namespace, request.name or ""

    def _get(self, key: Key) -> Body | None:
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].last.raw
        return None

    def _existing(self, request: kmock.Request) -> tuple[kmock.ResourceInfo, Key, Body]:
        info = self._info(request)
        key = self._key(request)
        if (obj := self._get(key)) is None:
            raise _error(404, "NotFound", f'{info.kind} "{key[2]}" not found', name=key[2])
        return info, key, obj

    def _live(self, resource: kmock.resource) -> list[Body]:
        found = [
            obj.last.raw
            for (res, _, _), obj in self.objects.items()
            if res == resource and not obj.deleted
        ]
        return sorted(
            found, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"])
        )

    def _commit(self, key: Key, type_: str, obj: Body, old: Body | None) -> Body:
        """Give ``obj`` the next resourceVersion, store (or drop) it and publish the event."""
        self._revision += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._revision)
        if type_ == "DELETED":
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        event = _Event(self._revision, key[0], type_, obj, old)
        self._history.append(event)
        for watch in self._watches:
            if watch.resource == key[0]:
                watch.queue.put_nowait(event)
        return obj

    def _normalize(self, key: Key, obj: Body) -> None:
        """Server-side conversions: Secrets' ``stringData`` becomes base64 ``data``."""
        if key[0] == kmock.resource("v1/secrets") and "stringData" in obj:
            encoded = {
                k: base64.b64encode(str(v).encode()).decode()
                for k, v in (obj.pop("stringData") or {}).items()
            }
            obj["data"] = {**(obj.get("data") or {}), **encoded}

    # -- create -----------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request) -> Any:
        info = self._info(request)
        if request.subresource:
            raise _error(405, "MethodNotAllowed", f"POST to {request.subresource} is not emulated")
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        namespace = self._namespace_for(info, request, meta)
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5)
            )
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
        key = (self._key(request)[0], namespace, meta["name"])
        if self._get(key) is not None:
            raise _error(409, "AlreadyExists", f'{info.kind} "{meta["name"]}" already exists')
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if "status" in info.subresources:
            obj.pop("status", None)
        obj.setdefault("apiVersion", self._api_version(key[0]))
        obj.setdefault("kind", info.kind)
        self._normalize(key, obj)
        return Response(status=201, payload=self._commit(key, "ADDED", obj, None))

    def _namespace_for(
        self, info: kmock.ResourceInfo, request: kmock.Request, meta: Body
    ) -> str | None:
        if not info.namespaced:
            meta.pop("namespace", None)
            return None
        namespace = request.namespace or meta.get("namespace") or "default"
        if meta.get("namespace", namespace) != namespace:
            raise _error(400, "BadRequest", "the namespace of the object does not match the URL")
        meta["namespace"] = namespace
        return namespace

    @staticmethod
    def _api_version(resource: kmock.resource) -> str:
        return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)

    # -- read -------------------------------------------------------------------------

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        info, _, obj = self._existing(request)
        if request.subresource not in (None, *({"status"} & info.subresources)):
            raise _error(404, "NotFound", f"subresource {request.subresource} is not emulated")
        return obj

    async def _serve_log(self, request: kmock.Request) -> Any:
        """``pods/log``: the text that ``pod_log_source(namespace, name)`` gives."""
        _, key, _ = self._existing(request)
        if key[0] != kmock.resource("v1/pods"):
            raise _error(404, "NotFound", "only pods have logs")
        text = (self.pod_log_source(key[1] or "", key[2]) if self.pod_log_source else None) or ""
        lines = text.splitlines(keepends=True)
        tail = request.params.get("tailLines")
        body = "".join(lines[-int(tail) :] if tail else lines).encode()
        return Response(headers={"Content-Type": "text/plain"}, payload=body)

    def _selectors(self, request: kmock.Request) -> tuple[Selector, Selector]:
        try:
            return (
                parse_label_selector(request.params.get("labelSelector")),
                parse_field_selector(request.params.get("fieldSelector")),
            )
        except SelectorError as exc:
            raise _error(400, "BadRequest", str(exc)) from exc

    async def _serve_list(self, request: kmock.Request) -> Any:
        info = self._info(request)
        labels, fields = self._selectors(request)
        assert request.resource is not None
        view = _Watch(request.resource, request.namespace, None, labels, fields)  # for .sees()
        return {
            "apiVersion": self._api_version(request.resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._revision)},  # limit/continue: ignored
            "items": [obj for obj in self._live(request.resource) if view.sees(obj)],
        }

    # -- watch ------------------------------------------------------------------------

    def _serve_watch(self, request: kmock.Request) -> Any:  # sync: registers at once
        info = self._info(request)
        labels, fields = self._selectors(request)
        assert request.resource is not None
        watch = _Watch(request.resource, request.namespace, request.name, labels, fields)
        since = request.params.get("resourceVersion") or "0"
        if not since.isdigit():
            raise _error(400, "BadRequest", f"invalid resourceVersion {since!r}")
        initial = request.params.get("sendInitialEvents") == "true" or since == "0"
        # No await from here until the watch is registered: no change can slip in between.
        if initial:
            backlog: list[Body] = [
                {"type": "ADDED", "object": o} for o in self._live(watch.resource)
            ]
            backlog = [event for event in backlog if watch.sees(event["object"])]
        else:
            events = (e for e in self._history if e.revision > int(since))
            backlog = [
                t for e in events if e.resource == watch.resource if (t := watch.translate(e))
            ]
        if request.params.get("sendInitialEvents") == "true":
            backlog.append(self._bookmark(info, watch.resource, initial_end=True))
        self._watches.add(watch)
        if self._closing:
            watch.queue.put_nowait(None)  # the server is stopping: end after the backlog
        bookmarks = request.params.get("allowWatchBookmarks") == "true"
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        stream = self._stream(watch, info, backlog, bookmarks=bookmarks, timeout=timeout)
        return Response(headers={"Content-Type": "application/json"}, payload=stream)

    def _bookmark(
        self, info: kmock.ResourceInfo, resource: kmock.resource, initial_end: bool = False
    ) -> Body:
        meta: Body = {"resourceVersion": str(self._revision)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"apiVersion": self._api_version(resource), "kind": info.kind, "metadata": meta}
        return {"type": "BOOKMARK", "object": obj}

    async def _stream(
        self,
        watch: _Watch,
        info: kmock.ResourceInfo,
        backlog: list[Body],
        *,
        bookmarks: bool,
        timeout: float | None,
    ) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            yield b""  # send the headers now, even if nothing happens for a while
            for item in backlog:
                yield item
            while True:
                waits = [self.bookmark_interval] if bookmarks else []
                if deadline is not None:
                    waits.append(deadline - loop.time())
                wait = min(waits, default=None)
                if wait is not None and wait <= 0:
                    return  # timeoutSeconds is over
                try:
                    event = await asyncio.wait_for(watch.queue.get(), timeout=wait)
                except TimeoutError:
                    if bookmarks:
                        yield self._bookmark(info, watch.resource)
                    continue
                if event is None:  # the emulator is closing
                    return
                if (translated := watch.translate(event)) is not None:
                    yield translated
        finally:
            self._watches.discard(watch)

    def history(self, resource: str) -> list[tuple[str, Body]]:
        """Every change of ``resource`` (e.g. ``"v1/pods"``) so far, oldest first, as
        ``(ADDED | MODIFIED | DELETED, object)``: what a watch from the start would see.
        Call it in the emulator's loop (``server.call``)."""
        wanted = kmock.resource(resource)
        return [(e.type, e.obj) for e in self._history if e.resource == wanted]

    @property
    def watch_count(self) -> int:
        """How many watch streams are open (a test can wait for its watch to be live)."""
        return len(self._watches)

    def close_watches(self) -> None:
        """End all open watch streams (before the server stops, so it does not wait)."""
        self._closing = True
        for watch in list(self._watches):
            watch.queue.put_nowait(None)

    def reopen(self) -> None:
        """Serve watches again after :meth:`close_watches` (a restarted server): objects
        and their change history are kept, so a watch resumes from its resourceVersion."""
        self._closing = False
        self._watches.clear()

    # -- update -----------------------------------------------------------------------

    async def _serve_update(self, request: kmock.Request) -> Any:
        info, key, old = self._existing(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, request.data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _error(422, "Invalid", f"the JSON patch failed: {exc}") from exc
        elif content_type in ("application/apply-patch+yaml", "application/apply-patch+cbor"):
            raise _error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        elif isinstance(request.data, dict):
            self._check_preconditions(old, request.data)
            new = merge_patch(old, request.data)  # also for strategic-merge-patch
        else:
            raise _error(400, "BadRequest", "the patch must be a JSON object or a JSON patch")
        return self._write(info, key, old, new, request.subresource)

    async def _serve_replace(self, request: kmock.Request) -> Any:
        info, key, old = self._existing(request)
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        self._check_preconditions(old, request.data)
        return self._write(info, key, old, copy.deepcopy(request.data), request.subresource)

    @staticmethod
    def _check_preconditions(old: Body, body: Body) -> None:
        """A ``resourceVersion`` or ``uid`` in the body must be the object's (else 409)."""
        meta = body.get("metadata") or {}
        for field in ("resourceVersion", "uid"):
            if meta.get(field) and meta[field] != old["metadata"].get(field):
                raise _error(409, "Conflict", f"precondition failed: {field} {meta[field]}")

    def _write(
        self, info: kmock.ResourceInfo, key: Key, old: Body, new: Body, subresource: str | None
    ) -> Body:
        """Store an updated object: keep what clients cannot change, bump the generation."""
        if subresource not in (None, *({"status"} & info.subresources)):
            raise _error(404, "NotFound", f"subresource {subresource} is not emulated")
        has_status = "status" in info.subresources
        if subresource == "status":  # only the status changes
            new = {
                **_without(old, "status"),
                **({"status": new["status"]} if "status" in new else {}),
            }
        elif has_status:  # the status does not change
            new = {
                **_without(new, "status"),
                **({"status": old["status"]} if "status" in old else {}),
            }
        meta = new["metadata"] = dict(new.get("metadata") or {})
        for field in FIXED_METADATA:
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        meta["resourceVersion"] = old["metadata"].get("resourceVersion")
        ignored = ("metadata", "status") if has_status else ("metadata",)
        changed_spec = _without(new, *ignored) != _without(old, *ignored)
        meta["generation"] = old["metadata"].get("generation", 1) + (1 if changed_spec else 0)
        self._normalize(key, new)
        if new == old:
            return old  # a no-op: no new resourceVersion, no event
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, new)
        return self._commit(key, "MODIFIED", new, old)

    # -- delete -----------------------------------------------------------------------

    async def _serve_delete(self, request: kmock.Request) -> Any:
        _, key, obj = self._existing(request)
        if request.subresource:
            raise _error(405, "MethodNotAllowed", "DELETE on a subresource")
        return self._delete(key, obj)

    def _delete(self, key: Key, obj: Body) -> Body:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj  # already terminating
        if meta.get("finalizers"):
            marked = merge_patch(obj, {"metadata": {"deletionTimestamp": _now()}})
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(key, "MODIFIED", marked, obj)
        return self._remove(key, obj)

    def _remove(self, key: Key, obj: Body) -> Body:
        """Drop the object, then garbage-collect the objects it owned."""
        gone = self._commit(key, "DELETED", obj, obj)
        self._collect_garbage()
        return gone

    def _collect_garbage(self) -> None:
        """Delete objects whose owners (by ``ownerReferences`` uid) are all gone."""
        alive = {o["metadata"].get("uid") for o in self._all_live().values()}
        for key in list(self._all_live()):
            obj = self._get(key)  # it may be gone by now: collected by a nested collection
            owners = {
                ref.get("uid")
                for ref in (obj or {}).get("metadata", {}).get("ownerReferences") or []
            }
            if obj is not None and owners and not owners & alive:
                self._delete(key, obj)

    def _all_live(self) -> dict[Key, Body]:
        return {key: obj.last.raw for key, obj in self.objects.items() if not obj.deleted}


def _crd_resource(path: Path) -> tuple[str, kmock.ResourceInfo]:
    """The ``group/version/plural`` key and the discovery info of a CRD manifest."""
    crd = yaml.safe_load(path.read_text())
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("storage", True))
    names = spec["names"]
    info = kmock.ResourceInfo(
        kind=names["kind"],
        singular=names.get("singular"),
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        verbs=ALL_VERBS,
        shortnames=names.get("shortNames", []),
        categories=names.get("categories", []),
        subresources=set(version.get("subresources") or {}),
    )
    return f"{spec['group']}/{version['name']}/{names['plural']}", info


KUEUE_WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"


def install_kueue_crd(emulator: Emulator) -> None:
    """Serve Kueue's ``Workload`` kind (as if Kueue's CRDs were installed), status included.

    Call it before the server starts, or in its loop (``server.call(lambda: ...)``).
    """
    emulator.resources[KUEUE_WORKLOADS] = kmock.ResourceInfo(
        kind="Workload",
        singular="workload",
        namespaced=True,
        verbs=ALL_VERBS,
        shortnames=["wl"],
        categories=["kueue"],
        subresources={"status"},
    )


def make_emulator(
    *, namespaces: tuple[str, ...] = ("default",), kueue: bool = False, **kwargs: Any
) -> Emulator:
    """An emulator with the built-in kinds (batch/v1 Jobs and v1 Services included), the
    kubetune CRDs (crds/), the given namespaces and, with ``kueue``, Kueue's Workload CRD."""
    emulator = Emulator(**kwargs)
    with warnings.catch_warnings():  # kmock 0.8 uses the deprecated importlib.resources API
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    for crd_path in sorted(CRD_DIR.glob("*.yaml")):
        key, info = _crd_resource(crd_path)
        emulator.resources[key] = info
    if kueue:
        install_kueue_crd(emulator)
    namespace_resource = kmock.resource("v1/namespaces")
    for name in namespaces:
        meta = {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now()}
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}
        emulator._commit((namespace_resource, None, name), "ADDED", obj, None)
    return emulator
