"""Forks ``kubetune operator`` processes from one that imported the operator once.

Started by :class:`harness.operator_process.OperatorProcess` with ``preload=True``. Reads
one JSON request a line on stdin (``{"argv": [...], "log": path}``), forks, and answers
the child's pid on stdout. The child sends its output to the log and runs
``kubetune_operator.cli.main(argv)``, the console script's own entry point. Children are
reaped by the kernel (SIGCHLD ignored here), so a SIGKILLed one is gone at once. No
thread runs here before a fork: the children start clean.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

# What a restart would otherwise import again (≈ 1.3 s): the CLI, the operator's modules
# (the CLI imports them lazily), kopf and the kubernetes client's API classes.
import kubernetes.client  # noqa: F401

from kubetune_operator import cli, handlers, runner  # noqa: F401


def _child(argv: list[str], log: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 1
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(list(request["argv"]), str(request["log"]))
        print(pid, flush=True)


if __name__ == "__main__":
    main()
