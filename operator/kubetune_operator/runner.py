"""Run the operator: kopf with our registry, our login, our metrics endpoint."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client
from prometheus_client import start_http_server

from .handlers import OperatorConfig, Reconciler, build_registry, configure
from .kube import KubeApi, load_configuration
from .metrics import OperatorMetrics


@dataclass
class OperatorOptions:
    config: OperatorConfig = field(default_factory=OperatorConfig)
    kubeconfig: str | None = None
    namespaces: list[str] = field(default_factory=list)  # empty: cluster-wide
    metrics_address: str = "0.0.0.0"
    metrics_port: int | None = 9090
    liveness_endpoint: str | None = "http://0.0.0.0:8081/healthz"


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's connection from the same configuration our API client uses."""
    token = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get(
        "BearerToken"
    )
    scheme, _, token_value = (token or "").partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token_value or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class Operator:
    """One operator instance: its metrics, API client, reconciler and kopf registry."""

    def __init__(self, options: OperatorOptions) -> None:
        self.options = options
        self.metrics = OperatorMetrics()
        configuration = load_configuration(options.kubeconfig)
        self.api = KubeApi(
            configuration, on_error=lambda op: self.metrics.api_errors.labels(op).inc()
        )
        self.reconciler = Reconciler(self.api, options.config, self.metrics)
        self.reconciler.namespaces = list(options.namespaces)
        self.registry = build_registry(self.reconciler)

        @kopf.on.login(registry=self.registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return connection_info(configuration)

        @kopf.on.startup(registry=self.registry)
        def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
            configure(settings)
            settings.scanning.disabled = True  # the CRD is installed before the operator

    def serve_metrics(self) -> None:
        if self.options.metrics_port is not None:
            self._metrics_server, _ = start_http_server(
                self.options.metrics_port,
                addr=self.options.metrics_address,
                registry=self.metrics.registry,
            )

    def stop_metrics(self) -> None:
        server = getattr(self, "_metrics_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    def _kwargs(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "standalone": True,
            "clusterwide": not self.options.namespaces,
            "namespaces": list(self.options.namespaces),
            "liveness_endpoint": self.options.liveness_endpoint,
        }

    def run(self) -> None:
        """Run in the foreground until SIGINT/SIGTERM."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self.serve_metrics()
        kopf.run(**self._kwargs())

    def start_in_thread(self) -> OperatorThread:
        """Run in a thread with its own event loop (tests, benchmarks)."""
        self.serve_metrics()
        thread = OperatorThread(self)
        thread.start()
        if not thread.ready.wait(30) or thread.error is not None:
            raise RuntimeError("the operator did not start") from thread.error
        return thread


class OperatorThread(threading.Thread):
    def __init__(self, operator: Operator) -> None:
        super().__init__(daemon=True, name="kubetune-operator")
        self.operator = operator
        self.ready = threading.Event()
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    **self.operator._kwargs(), ready_flag=self.ready, stop_flag=self.stop_flag
                )
            )
        except BaseException as error:
            self.error = error
            self.ready.set()  # wake start_in_thread, which re-raises
            raise

    def stop(self, timeout: float = 30) -> None:
        self.stop_flag.set()
        self.join(timeout)
        self.operator.stop_metrics()
