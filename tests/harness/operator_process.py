"""The real operator as a process of its own: ``kubetune operator`` against the emulator,
to be measured alone (benchmarks) or SIGKILLed at any point and restarted (fault tests).

:class:`OperatorProcess` runs the operator's command line as the chart's Deployment does
(``kubetune operator --kubeconfig … --health-port …``, as the operator's service account
when the kubeconfig says so). Each start logs to a file of its own.

With ``preload=True`` each start is forked from a small process (``operator_zygote.py``)
that has imported the operator once, then runs the same ``kubetune_operator.cli.main``
that the ``kubetune`` console script runs. A restart then costs the operator's own start
(login, watches, indexes), not the ≈ 1.3 s of importing kopf, the kubernetes client and
pydantic again, which is what makes dozens of kill-and-restart trials affordable::

    with OperatorProcess(kubeconfig, tmp_path, args=["--image", "x"], preload=True) as op:
        op.start()
        op.kill()   # SIGKILL, waits until the process is gone
        op.start()
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from .network import free_port

ROOT = Path(__file__).resolve().parents[2]
ZYGOTE = Path(__file__).with_name("operator_zygote.py")
KUBETUNE = Path(sys.executable).parent / "kubetune"


class OperatorProcess:
    """``kubetune operator`` with ``args`` after ``--kubeconfig`` and the ports, restartable."""

    def __init__(
        self,
        kubeconfig: str | Path,
        log_dir: str | Path,
        *,
        args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        preload: bool = False,
        metrics_port: int | None = None,
    ) -> None:
        if preload and command is not None:
            raise ValueError("preload forks this checkout's operator; command runs another")
        self.kubeconfig = Path(kubeconfig)
        self.log_dir = Path(log_dir)
        self.args = list(args)
        self.command = list(command) if command is not None else [str(KUBETUNE)]
        self.preload = preload
        self.health_port = free_port()
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.starts = 0
        self.pid: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._zygote: subprocess.Popen[str] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def argv(self) -> list[str]:
        """The operator's arguments after ``kubetune``."""
        return [
            "operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            *self.args,
        ]

    @property
    def log_path(self) -> Path:
        """The log of the latest start."""
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self) -> int:
        """Start the operator (again); returns its pid."""
        if self.alive:
            raise RuntimeError(f"the operator (pid {self.pid}) is still running")
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.preload:
            zygote = self._ensure_zygote()
            assert zygote.stdin is not None and zygote.stdout is not None
            request = {"argv": self.argv(), "log": str(self.log_path)}
            zygote.stdin.write(json.dumps(request) + "\n")
            zygote.stdin.flush()
            answer = zygote.stdout.readline()
            if not answer.strip().isdigit():
                raise RuntimeError(f"the operator zygote did not fork: {answer!r}")
            self.pid = int(answer)
        else:
            with self.log_path.open("wb") as log:
                self._popen = subprocess.Popen(
                    [*self.command, *self.argv()], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            self.pid = self._popen.pid
        return self.pid

    def _ensure_zygote(self) -> subprocess.Popen[str]:
        if self._zygote is None or self._zygote.poll() is not None:
            self._zygote = subprocess.Popen(
                [sys.executable, "-P", str(ZYGOTE)],  # -P: not harness/ first on sys.path
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=(self.log_dir / "zygote.log").open("w"),
                text=True,
                cwd=ROOT,
            )
        return self._zygote

    @property
    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        try:
            os.kill(self.pid, 0)  # the zygote's children are reaped as they exit
        except ProcessLookupError:
            return False
        return True

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the operator and wait until it is gone."""
        self._signal(signal.SIGKILL, timeout)

    def terminate(self, timeout: float = 20.0) -> None:
        """SIGTERM (kopf stops cleanly); SIGKILL if it does not stop within ``timeout``."""
        try:
            self._signal(signal.SIGTERM, timeout)
        except TimeoutError:
            self.kill()

    def _signal(self, signum: int, timeout: float) -> None:
        if not self.alive or self.pid is None:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator (pid {self.pid}) did not exit")
            time.sleep(0.01)

    def close(self) -> None:
        """Stop the operator and the zygote."""
        self.terminate()
        if self._zygote is not None:
            _close(self._zygote.stdin)
            try:
                self._zygote.wait(10)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait(10)
            _close(self._zygote.stdout)
            self._zygote = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- probes ---------------------------------------------------------------------------

    def healthy(self) -> bool:
        """kopf's liveness endpoint answers 200."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=1)
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _close(stream: IO[str] | None) -> None:
    if stream is not None:
        stream.close()
