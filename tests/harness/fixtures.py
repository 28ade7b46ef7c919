"""pytest fixtures for the cluster-free harness; import them into a conftest.py::

    from harness.fixtures import kube, kubelet, pytest_runtest_makereport  # noqa: F401

``kube`` is a started :class:`~harness.server.EmulatorServer` (FineTuneJob CRD loaded,
namespace ``default``); ``kubelet`` a started :class:`~harness.kubelet.Kubelet` on it
(grace periods capped at 5 s, ``pods/log`` wired). The hook adds the pods' logs to the
report of a failed test.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from .kubelet import Kubelet
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
