"""A cluster-free Kubernetes for tests: an API emulator, a kubelet and a kopf runner.

* :mod:`harness.emulator`: :class:`Emulator` (kmock 0.8 fixed up) and :func:`make_emulator`;
* :mod:`harness.server`: :class:`EmulatorServer`, the emulator on real HTTP in a thread,
  kubeconfigs, ``kubernetes`` API clients and kopf credentials per user;
* :mod:`harness.kubelet`: :class:`Kubelet`, which runs pods as local processes;
* :mod:`harness.operator`: :class:`OperatorThread`, kopf in its own thread and loop;
* :mod:`harness.audit`: the RBAC-shaped audit log of the emulator;
* :mod:`harness.fixtures`: pytest fixtures ``kube`` and ``kubelet``.
"""

from .audit import AuditEntry, AuditLog, rule_allows
from .client import KubeClient, KubeError
from .emulator import Emulator, make_emulator
from .kubelet import Kubelet, PodRun
from .operator import OperatorThread, harness_settings
from .server import ADMIN_USER, KUBELET_USER, OPERATOR_USER, EmulatorServer

__all__ = [
    "ADMIN_USER",
    "KUBELET_USER",
    "OPERATOR_USER",
    "AuditEntry",
    "AuditLog",
    "Emulator",
    "EmulatorServer",
    "KubeClient",
    "KubeError",
    "Kubelet",
    "OperatorThread",
    "PodRun",
    "harness_settings",
    "make_emulator",
    "rule_allows",
]
