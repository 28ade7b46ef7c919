"""A throwaway MLflow tracking server (the ``mlflow`` package) on loopback.

``run_mlflow()`` starts ``mlflow server`` with a SQLite backend store in a temp dir on a
free port, waits until ``/health`` answers, and kills it on exit. Tests read what the
trainer logged back through the server's REST API (``MlflowServer.search_runs`` and
``metric_history``), not through the client library the trainer itself uses.

Start-up costs ≈ 7 s on 2 cores (the database migrations and the app import); the job
runner (huey) is turned off and one worker is enough.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.network import free_port

HOST = "127.0.0.1"


def find_mlflow() -> str | None:
    """The ``mlflow`` command of this environment (the dev extra installs it)."""
    beside = Path(sys.executable).with_name("mlflow")
    return str(beside) if beside.exists() else shutil.which("mlflow")


@dataclass(frozen=True)
class MlflowServer:
    url: str
    directory: Path

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST call (``path`` after ``/api/2.0/mlflow/``)."""
        url = f"{self.url}/api/2.0/mlflow/{path}"
        data = None
        if method == "GET" and body:
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def experiment_id(self, name: str) -> str:
        found = self.call("GET", "experiments/get-by-name", {"experiment_name": name})
        return str(found["experiment"]["experiment_id"])

    def search_runs(self, experiment: str) -> list[dict[str, Any]]:
        """The runs of an experiment, newest first."""
        found = self.call(
            "POST",
            "runs/search",
            {"experiment_ids": [self.experiment_id(experiment)], "max_results": 100},
        )
        return list(found.get("runs", []))

    def metric_history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        """Every logged value of one metric, by step."""
        found = self.call(
            "GET", "metrics/get-history", {"run_id": run_id, "metric_key": key, "max_results": 1000}
        )
        return sorted(found.get("metrics", []), key=lambda m: (int(m["step"]), m["timestamp"]))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def run_mlflow(mlflow: str, *, timeout: float = 60.0, attempts: int = 3) -> Iterator[MlflowServer]:
    """An MLflow tracking server for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="kubetune-mlflow-") as scratch:
        directory = Path(scratch)
        for _ in range(attempts):
            port = free_port()  # another process may take it first: then try again
            url = f"http://{HOST}:{port}"
            log = (directory / f"server-{port}.log").open("wb")
            command = [
                mlflow,
                "server",
                "--backend-store-uri",
                f"sqlite:///{directory / 'mlflow.db'}",
                "--default-artifact-root",
                str(directory / "artifacts"),
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                "1",
            ]
            env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and process.poll() is None:
                    if _healthy(url):
                        yield MlflowServer(url=url, directory=directory)
                        return
                    time.sleep(0.2)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)  # uvicorn's worker too
                process.wait()
                log.close()
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in directory.glob("*.log"))
        raise RuntimeError(f"mlflow server did not start in {attempts} attempts:\n{logs}")
