"""An audit log of the emulator's API requests, in the terms of Kubernetes RBAC.

Every request to a resource is recorded as an :class:`AuditEntry` with the RBAC verb
(get, list, watch, create, update, patch, delete, deletecollection), the API group,
the resource, the subresource, the namespace, the name and the user. The user is the
bearer token the client sent (the kubeconfigs written by the harness use the user's
name as the token), so the operator's requests can be told apart from the kubelet's
and the test's own.

A Helm chart's RBAC rules can then be checked against what a client really did::

    missing = server.emulator.audit.uncovered(rules, user=OPERATOR_USER)
    assert not missing
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

ANONYMOUS = "system:anonymous"


class AuditEntry(NamedTuple):
    """One API request, as an RBAC authorizer sees it."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None = None
    user: str = ANONYMOUS

    @property
    def rbac_resource(self) -> str:
        """The resource as written in RBAC rules: ``pods`` or ``pods/status``."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def rbac_verb(method: str, *, named: bool, watch: bool) -> str:
    """The RBAC verb of an HTTP request to a resource URL."""
    method = method.upper()
    if method == "GET":
        return "watch" if watch else "get" if named else "list"
    if method == "DELETE":
        return "delete" if named else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def user_of(headers: Mapping[str, str]) -> str:
    """The user behind a request: its bearer token, or anonymous."""
    auth = headers.get("Authorization") or headers.get("authorization") or ""
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ANONYMOUS


def _matches(patterns: Iterable[str], value: str) -> bool:
    return any(pattern in ("*", value) for pattern in patterns)


def rule_allows(rule: Mapping[str, Any], entry: AuditEntry) -> bool:
    """Whether one RBAC PolicyRule (``apiGroups``/``resources``/``verbs``) allows a request.

    ``resourceNames`` restricts only requests that name an object, as in Kubernetes.
    The rule's scope (Role vs. ClusterRole, namespaces) is left to the caller.
    """
    resources = rule.get("resources") or []
    allowed_resource = _matches(resources, entry.rbac_resource) or (
        entry.subresource is not None and f"*/{entry.subresource}" in resources
    )
    names = rule.get("resourceNames") or []
    return (
        _matches(rule.get("apiGroups") or [], entry.group)
        and allowed_resource
        and _matches(rule.get("verbs") or [], entry.verb)
        and (not names or entry.name in names)
    )


class AuditLog:
    """A thread-safe, append-only list of :class:`AuditEntry` records."""

    def __init__(self) -> None:
        self._entries: list[AuditEntry] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[AuditEntry], None]] = []

    def record(self, entry: AuditEntry) -> None:
        with self._lock:
            self._entries.append(entry)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(entry)

    def listen(self, listener: Callable[[AuditEntry], None]) -> Callable[[], None]:
        """Call ``listener(entry)`` for each request as it arrives, before the emulator
        handles it (in the emulator's thread: keep it short). A fault test can, say,
        SIGKILL a client at its n-th create. Returns a function that stops the calls."""
        with self._lock:
            self._listeners.append(listener)

        def stop() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return stop

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def entries(self, user: str | None = None) -> list[AuditEntry]:
        """A snapshot of the entries, optionally of one user only."""
        with self._lock:
            return [e for e in self._entries if user is None or e.user == user]

    def permissions(self, user: str | None = None) -> set[tuple[str, str, str]]:
        """The distinct ``(verb, group, resource[/subresource])`` triples used."""
        return {(e.verb, e.group, e.rbac_resource) for e in self.entries(user)}

    def uncovered(
        self, rules: Iterable[Mapping[str, Any]], user: str | None = None
    ) -> list[AuditEntry]:
        """The entries that none of the RBAC rules allows."""
        rules = list(rules)
        return [e for e in self.entries(user) if not any(rule_allows(r, e) for r in rules)]
