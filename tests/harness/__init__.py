"""A cluster-free Kubernetes for tests: an API emulator, a kubelet and a kopf runner.

* :mod:`harness.emulator`: :class:`Emulator` (kmock 0.8 fixed up) and :func:`make_emulator`;
* :mod:`harness.server`: :class:`EmulatorServer`, the emulator on real HTTP in a thread
  (restartable on its port, objects kept), kubeconfigs, ``kubernetes`` API clients and
  kopf credentials per user;
* :mod:`harness.kubelet`: :class:`Kubelet`, which runs pods as local processes;
* :mod:`harness.network`: the pods' cluster DNS names and own ports, for the kubelet;
* :mod:`harness.jobs`: :class:`JobController`, batch/v1 Jobs (Indexed, suspend, failures);
* :mod:`harness.kueue`: :class:`Kueue`, a stand-in admitting queued Jobs by GPU quota;
* :mod:`harness.informer`: :class:`Informer`, the list-and-watch cache of both;
* :mod:`harness.operator`: :class:`OperatorThread`, kopf in its own thread and loop;
* :mod:`harness.operator_process`: :class:`OperatorProcess`, ``kubetune operator`` as a
  process of its own (SIGKILL and restart; forked from a preloaded one for speed);
* :mod:`harness.audit`: the RBAC-shaped audit log of the emulator;
* :mod:`harness.fixtures`: pytest fixtures ``kube``, ``kubelet``, ``job_controller``, ``kueue``.
"""

from .audit import AuditEntry, AuditLog, rule_allows
from .client import KubeClient, KubeError
from .emulator import Emulator, install_kueue_crd, make_emulator
from .informer import Informer
from .jobs import JobController
from .kubelet import Kubelet, PodRun
from .kueue import Kueue
from .operator import OperatorThread, harness_settings
from .operator_process import OperatorProcess
from .server import ADMIN_USER, KUBELET_USER, OPERATOR_USER, EmulatorServer

__all__ = [
    "ADMIN_USER",
    "KUBELET_USER",
    "OPERATOR_USER",
    "AuditEntry",
    "AuditLog",
    "Emulator",
    "EmulatorServer",
    "Informer",
    "JobController",
    "KubeClient",
    "KubeError",
    "Kubelet",
    "Kueue",
    "OperatorProcess",
    "OperatorThread",
    "PodRun",
    "harness_settings",
    "install_kueue_crd",
    "make_emulator",
    "rule_allows",
]
