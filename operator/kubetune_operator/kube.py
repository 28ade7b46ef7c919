"""The few Kubernetes API calls the operator makes, in one place.

Every call here is one the chart's RBAC must grant (and nothing more): FineTuneJobs
get/list/watch/patch (+ status and finalizers through kopf), pods
create/list/watch/delete, events create. No Secrets, ever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api.types import GROUP, PLURAL, VERSION
from .workload import pod_selector

log = logging.getLogger("kubetune.operator")
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
        self.custom = client.CustomObjectsApi(api_client)
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

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status; a job deleted meanwhile is not an error."""
        try:
            self._call(
                "patch_job_status",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, {"status": status}
                ),
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        pods = self._call(
            "list_pods",
            lambda: self.core.list_namespaced_pod(namespace, label_selector=pod_selector(job_name)),
        )
        return [self.core.api_client.sanitize_for_serialization(p) for p in pods.items]

    def create_pod(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create a pod; False when it already exists (a retried or repeated reconcile)."""
        try:
            self._call("create_pod", lambda: self.core.create_namespaced_pod(namespace, manifest))
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self._call("delete_pod", lambda: self.core.delete_namespaced_pod(name, namespace))
        except ApiException as error:
            if error.status != 404:
                raise
