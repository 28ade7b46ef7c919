"""The few Kubernetes API calls the operator makes, in one place.

Every call here is one the chart's RBAC must grant (and nothing more): FineTuneJobs
get/list/watch/patch/create (+ status; sweeps create and patch their trials, and kopf
takes off the finalizer older versions put on jobs), FineTuneSweeps get/list/watch (+
status patch, and kopf's finalizer), FineTunePolicies list/watch (read only), batch Jobs
create/list/watch/patch/delete, pods list/watch, Services create/delete, NetworkPolicies
create/delete (per-attempt isolation, TTL cleanup), Kueue Workloads list, events create.
No Secrets, ever.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api.policy import PLURAL as POLICY_PLURAL
from .api.sweep import PLURAL as SWEEP_PLURAL
from .api.types import GROUP, PLURAL, VERSION
from .workload import MANAGED_BY, job_selector

log = logging.getLogger("kubetune.operator")
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
T = TypeVar("T")


def load_configuration(kubeconfig: str | None = None) -> client.Configuration:
    """In-cluster service account, or the given kubeconfig file (explicitly, not $KUBECONFIG
    read at import time)."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    # kopf runs up to 16 handlers at once; the default pool of 10 discards connections.
    configuration.connection_pool_maxsize = 32
    return configuration


class KubeApi:
    """Thin, typed wrappers; API errors are counted by ``on_error(operation)``."""

    def __init__(
        self, configuration: client.Configuration, on_error: Callable[[str], None] | None = None
    ) -> None:
        api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self._on_error = on_error or (lambda operation: None)

    def _call(self, operation: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except ApiException as error:
            if error.status not in (404, 409):
                self._on_error(operation)
            raise

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                "get_job",
                lambda: self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name
                ),
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_job_status(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch the status and return the job as written; a job deleted meanwhile
        is not an error (None)."""
        try:
            return self._call(
                "patch_job_status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": status}
                ),
            )
        except ApiException as error:
            if error.status != 404:
                raise
            return None

    def list_all_jobs(self, namespaces: list[str]) -> list[dict[str, Any]]:
        """Every FineTuneJob in ``namespaces`` (empty: cluster-wide), for the resync."""
        if not namespaces:
            answers = [
                self._call(
                    "list_all_jobs",
                    lambda: self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL),
                )
            ]
        else:
            answers = [
                self._call(
                    "list_all_jobs",
                    lambda ns=ns: self.custom.list_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL
                    ),
                )
                for ns in namespaces
            ]
        return [item for answer in answers for item in (answer or {}).get("items") or []]

    # -- sweeps ---------------------------------------------------------------------------

    def get_sweep(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                "get_sweep",
                lambda: self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, SWEEP_PLURAL, name
                ),
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_sweep_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self._call(
                "patch_sweep_status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, SWEEP_PLURAL, name, {"status": status}
                ),
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def list_trials(self, namespace: str, sweep: str, label: str) -> list[dict[str, Any]]:
        """The FineTuneJobs labelled ``label=sweep`` (a sweep's trials)."""
        answer = self._call(
            "list_trials",
            lambda: self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, label_selector=f"{label}={sweep}"
            ),
        )
        return list((answer or {}).get("items") or [])

    def create_trial(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create a trial FineTuneJob; False when it already exists."""
        return self._create(
            "create_trial",
            lambda: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, manifest, _preload_content=False
            ),
        )

    def patch_trial(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a trial FineTuneJob the sweep owns (annotations, spec.suspend)."""
        try:
            self._call(
                "patch_trial",
                lambda: self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, patch
                ),
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def _items(self, operation: str, call: Callable[[], Any]) -> list[dict[str, Any]]:
        """A LIST's items as the API server sent them (JSON), not through the client's
        models and back: at scale that round trip was most of a LIST's cost."""
        return list((_raw(self._call(operation, call)) or {}).get("items") or [])

    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The trainer pods of every attempt of one FineTuneJob."""
        return self._items(
            "list_pods",
            lambda: self.core.list_namespaced_pod(
                namespace, label_selector=job_selector(job_name), _preload_content=False
            ),
        )

    def list_jobs(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The attempt Jobs of one FineTuneJob."""
        return self._items(
            "list_jobs",
            lambda: self.batch.list_namespaced_job(
                namespace, label_selector=job_selector(job_name), _preload_content=False
            ),
        )

    def list_attempt_jobs(self, namespace: str) -> list[dict[str, Any]]:
        """Every attempt Job of the namespace (for its FineTunePolicy's maxConcurrentJobs)."""
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        return self._items(
            "list_attempt_jobs",
            lambda: self.batch.list_namespaced_job(
                namespace, label_selector=selector, _preload_content=False
            ),
        )

    def list_policies(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's FineTunePolicies (read only: the platform team writes them); none
        while their CRD is not installed (an upgrade that skipped `kubectl apply` of crds/)."""
        try:
            answer = self._call(
                "list_policies",
                lambda: self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, POLICY_PLURAL
                ),
            )
        except ApiException as error:
            if error.status == 404:
                return []
            raise
        return list((answer or {}).get("items") or [])

    def list_workloads(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        """Kueue's Workloads of the Job with ``job_uid``; none when Kueue is not installed
        or the operator may not read them (the job then shows a generic queued message)."""
        try:
            answer = self._call(
                "list_workloads",
                lambda: self.custom.list_namespaced_custom_object(
                    KUEUE_GROUP,
                    KUEUE_VERSION,
                    namespace,
                    "workloads",
                    label_selector=f"{KUEUE_JOB_UID_LABEL}={job_uid}",
                ),
            )
        except ApiException as error:
            if error.status in (403, 404):
                return []
            raise
        return list((answer or {}).get("items") or [])

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create an attempt Job; False when it already exists (a repeated reconcile)."""
        # Posted as the plain object it is: BatchV1Api would first convert the manifest
        # into its V1Job models and back (at scale, most of the operator's client time).
        return self._create(
            "create_job",
            lambda: self.custom.create_namespaced_custom_object(
                "batch", "v1", namespace, "jobs", manifest, _preload_content=False
            ),
        )

    def create_service(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create the rank-0 Service; False when it already exists."""
        return self._create(
            "create_service",
            lambda: self.core.create_namespaced_service(
                namespace, manifest, _preload_content=False
            ),
        )

    def _create(self, operation: str, call: Callable[[], Any]) -> bool:
        """``call`` (made with ``_preload_content=False``: the answer is not needed, and
        the client's models would cost more than the request)."""
        try:
            _raw(self._call(operation, call))
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def post_event(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create a core/v1 Event; False when one of that name exists (posted before a
        crash: see :mod:`kubetune_operator.events`)."""
        return self._create(
            "post_event",
            lambda: self.core.create_namespaced_event(namespace, manifest, _preload_content=False),
        )

    def suspend_job(self, namespace: str, name: str) -> None:
        """Suspend a Job: the Job controller stops its pods (the trainer checkpoints)."""
        try:
            _raw(
                self._call(
                    "patch_job",
                    lambda: self.batch.patch_namespaced_job(
                        name, namespace, {"spec": {"suspend": True}}, _preload_content=False
                    ),
                )
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (in the background) its pods, which get their grace period."""
        try:
            _raw(
                self._call(
                    "delete_job",
                    lambda: self.batch.delete_namespaced_job(
                        name, namespace, propagation_policy="Background", _preload_content=False
                    ),
                )
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def create_network_policy(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create an attempt's NetworkPolicy; False when it already exists."""
        return self._create(
            "create_network_policy",
            lambda: self.networking.create_namespaced_network_policy(
                namespace, manifest, _preload_content=False
            ),
        )

    def delete_network_policy(self, namespace: str, name: str) -> None:
        """Delete an attempt's NetworkPolicy (TTL cleanup); one already gone is no error."""
        self._delete(
            "delete_network_policy",
            lambda: self.networking.delete_namespaced_network_policy(
                name, namespace, _preload_content=False
            ),
        )

    def delete_service(self, namespace: str, name: str) -> None:
        """Delete a job's rank-0 Service (TTL cleanup); one already gone is no error."""
        self._delete(
            "delete_service",
            lambda: self.core.delete_namespaced_service(name, namespace, _preload_content=False),
        )

    def _delete(self, operation: str, call: Callable[[], Any]) -> None:
        try:
            _raw(self._call(operation, call))
        except ApiException as error:
            if error.status != 404:
                raise


def _raw(response: Any) -> Any:
    """The JSON of an answer requested with ``_preload_content=False`` (read, and the
    connection given back to the pool)."""
    try:
        data = response.data
    finally:
        response.release_conn()
    return json.loads(data) if data else None
