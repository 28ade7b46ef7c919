"""A throwaway Prometheus (Debian's package) on loopback, scraping the given targets.

The tests need ``prometheus`` and ``promtool``. On PATH (``.ci/run`` installs Debian's
package) they are used as they are; otherwise the first test that needs them fetches
Debian's package into ``.kubetune/tools/`` (``apt-get download`` + ``dpkg-deb -x``, no
root needed: both binaries are self-contained), so that the README's test command passes
by itself on a fresh machine. Where apt has no package lists yet, they are refreshed
first when that is allowed (root, or sudo without a password).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from harness.network import free_port

TOOLS = Path(__file__).resolve().parents[1] / ".kubetune" / "tools" / "prometheus"
_lock = threading.Lock()


def find_prometheus() -> str | None:
    return _find("prometheus")


def find_promtool() -> str | None:
    return _find("promtool")


def _find(binary: str) -> str | None:
    """The binary on PATH, else from Debian's package fetched into TOOLS (None: cannot)."""
    found = shutil.which(binary)
    if found:
        return found
    with _lock:
        local = TOOLS / "usr" / "bin" / binary
        if not local.exists():
            _fetch_debian_package()
        return str(local) if local.exists() else None


def _fetch_debian_package() -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-prometheus-deb-") as scratch:
        if not _apt_download(scratch) and _may_refresh_apt_lists():
            _apt_download(scratch)
        debs = sorted(Path(scratch).glob("prometheus_*.deb"))
        if not debs:
            return
        staging = TOOLS.with_name("prometheus.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        shutil.rmtree(TOOLS, ignore_errors=True)
        staging.rename(TOOLS)  # complete or absent, never half-extracted


def _apt_download(directory: str) -> bool:
    result = subprocess.run(
        ["apt-get", "download", "-qq", "prometheus"],
        cwd=directory,
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _may_refresh_apt_lists() -> bool:
    """Refresh apt's package lists where allowed (a fresh image may have none)."""
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return False
        if subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode:
            return False
        sudo = ["sudo", "-n"]
    update = subprocess.run([*sudo, "apt-get", "update", "-qq"], capture_output=True, check=False)
    return update.returncode == 0


@dataclass(frozen=True)
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the query returns a sample (the first scrape takes a few seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
            except OSError:
                result = []
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never answered {promql!r}")


@contextmanager
def run_prometheus(binary: str, targets: list[str]) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (host:port) every second."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kubetune-prometheus-") as scratch:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "kubetune", "static_configs": [{"targets": targets}]}],
        }
        config_path = Path(scratch) / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={scratch}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server = Prometheus(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"{server.url}/-/ready", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            yield server
        finally:
            process.kill()
            process.wait(10)
