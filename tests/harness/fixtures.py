"""pytest fixtures for the cluster-free harness; import them into a conftest.py::

    from harness.fixtures import kube, kubelet, pytest_runtest_makereport  # noqa: F401

``kube`` is a started :class:`~harness.server.EmulatorServer` (FineTuneJob CRD loaded,
namespace ``default``); ``kubelet`` a started :class:`~harness.kubelet.Kubelet` on it
(grace periods capped at 5 s, ``pods/log`` wired); ``job_controller`` a started
:class:`~harness.jobs.JobController` (batch/v1 Jobs become pods); ``kueue`` a started
:class:`~harness.kueue.Kueue` (its Workload CRD installed into ``kube`` first; no quota
until the test calls ``kueue.set_quota``). The hook adds the pods' logs to the report of
a failed test.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from .emulator import install_kueue_crd
from .jobs import JobController
from .kubelet import Kubelet
from .kueue import Kueue
from .server import EmulatorServer

_KUBELET = pytest.StashKey[Kubelet]()


@pytest.fixture
def kube() -> Iterator[EmulatorServer]:
    """An emulated API server on 127.0.0.1, in a thread of its own."""
    with EmulatorServer() as server:
        yield server


@pytest.fixture
def kubelet(
    kube: EmulatorServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Kubelet]:
    """A kubelet running the pods of ``kube`` as local processes under ``tmp_path``."""
    with Kubelet(kube.url, tmp_path / "kubelet", max_grace_period=5) as node:
        kube.emulator.pod_log_source = node.read_log
        request.node.stash[_KUBELET] = node
        yield node
        kube.emulator.pod_log_source = None


@pytest.fixture
def job_controller(kube: EmulatorServer) -> Iterator[JobController]:
    """The Job controller of ``kube``: Indexed Jobs, suspend, backoffLimit, deadlines."""
    with JobController(kube.url) as controller:
        yield controller


@pytest.fixture
def kueue(kube: EmulatorServer) -> Iterator[Kueue]:
    """A Kueue stand-in on ``kube``: admits Jobs labelled with a queue name, by GPU quota."""
    kube.call(lambda: install_kueue_crd(kube.emulator))
    with Kueue(kube.url) as stand_in:
        yield stand_in


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Attach the kubelet's pod logs to the report of a failed test."""
    outcome = yield
    report = outcome.get_result()
    node = item.stash.get(_KUBELET, None)
    if node is not None and report.failed:
        report.sections.append(("kubelet pod logs", node.dump_logs() or "(no pods)"))
