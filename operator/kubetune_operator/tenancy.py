"""The operator's side of FineTunePolicies: what the handlers read for the pure deciders.

- the namespace's policies, from a kopf index (``tenant_policies``, a watch: no API call
  per reconcile), or a LIST before the index is known;
- for a job that may start under ``maxConcurrentJobs``: a per-namespace lock held from
  counting the namespace's running jobs (a LIST of FineTuneJobs and one of attempt Jobs,
  read live so that a Job created a moment ago counts) until the decision is applied, so
  two waiting jobs never take the same free slot;
- which namespaces had a slot freed (a job ended or was suspended), so the Reconciler
  re-checks the jobs waiting there at once, in creation order.

The deciding is in :mod:`kubetune_operator.policy` and :func:`~kubetune_operator.reconcile.
reconcile`; this module only gathers and serialises.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .api.policy import FineTunePolicy, parse_policy
from .api.validation import InvalidManifest
from .kube import KubeApi
from .policy import Slots, concurrency, concurrency_limit, uses_queue

log = logging.getLogger("kubetune.operator")

# States in which a job holds no concurrency slot.
_NO_SLOT = ("Succeeded", "Failed", "Invalid", "Suspended")


def slim_policy(body: Any) -> dict[str, Any]:
    """What the policies index keeps of a FineTunePolicy."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": dict(body.get("spec") or {}),
    }


class Tenancy:
    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.index: Any = None  # kopf index: namespace -> the namespace's policies
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._freed: set[str] = set()
        self._freed_lock = threading.Lock()

    def policies(self, namespace: str) -> list[FineTunePolicy]:
        if self.index is not None:
            bodies = list(self.index.get(namespace) or ())
        else:
            bodies = self.api.list_policies(namespace)
        policies = []
        for body in bodies:
            try:
                policies.append(parse_policy(slim_policy(body)))
            except InvalidManifest as invalid:  # the CRD's schema makes this rare
                name = (body.get("metadata") or {}).get("name")
                log.warning(f"FineTunePolicy {namespace}/{name} is ignored: {invalid}")
        return policies

    @contextmanager
    def slots(
        self, body: dict[str, Any], jobs: list[dict[str, Any]], policies: list[FineTunePolicy]
    ) -> Iterator[Slots | None]:
        """The namespace's slots as ``body`` sees them, with the namespace locked until the
        block ends; None (and no lock, no LIST) when the job cannot be starting: no limit
        applies, or one of its attempts runs."""
        status = body.get("status") or {}
        running = any(_runs(job) for job in jobs)
        ended = status.get("state") in ("Succeeded", "Failed")
        if concurrency_limit(policies) is None or uses_queue(body, policies) or running or ended:
            yield None
            return
        namespace = body["metadata"]["namespace"]
        with self._locks[namespace]:
            everyone = self.api.list_all_jobs([namespace])
            attempt_jobs = self.api.list_attempt_jobs(namespace)
            yield concurrency(body, everyone, attempt_jobs, policies)

    def note(self, namespace: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Remember ``namespace`` when a job there left a state that holds a slot."""
        if new.get("state") in _NO_SLOT and old.get("state") not in _NO_SLOT:
            with self._freed_lock:
                self._freed.add(namespace)

    def take_freed(self) -> list[str]:
        with self._freed_lock:
            freed, self._freed = sorted(self._freed), set()
        return freed


def _runs(job: dict[str, Any]) -> bool:
    """An attempt Job that runs or will (not finished, suspended or being deleted)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    finished = any(
        x.get("type") in ("Complete", "Failed") and x.get("status") == "True" for x in conditions
    )
    suspended = bool((job.get("spec") or {}).get("suspend"))
    return not (finished or suspended or (job.get("metadata") or {}).get("deletionTimestamp"))
