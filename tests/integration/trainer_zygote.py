"""Forks trainer attempts from one process that imported the trainer's stack once.

A trainer process spends seconds importing torch, transformers and peft before it does
anything; a test that kills many attempts would spend most of its time there. Run as a
script, this process imports all that once, then reads one JSON request a line on stdin
(``{"env": {...}, "log": path}``) and forks: the child sets that env, sends its output to
the log and runs ``kubetune_trainer.main.main()``, the same entry point as ``python -m
kubetune_trainer``. The zygote answers ``pid N`` at once and ``exit N`` when the child
ends (N as ``Popen.returncode``: negative for a signal). Each attempt is its own process,
so a signal kills it as it would kill a pod's. No thread runs here before a fork.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback

# What an attempt would otherwise import (transformers imports most of it lazily, on
# first use): the Trainer, the tiny model's Llama classes, the tensorboard writer, datasets.
import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers.integrations.integration_utils
import transformers.models.llama.modeling_llama
import transformers.trainer  # noqa: F401
from torch.utils import tensorboard  # noqa: F401

from kubetune_trainer import main as trainer_main
from kubetune_trainer import train  # noqa: F401


def _child(env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 1
    try:
        code = trainer_main.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        assert threading.active_count() == 1, "a thread runs in the zygote: forks are unsafe"
        pid = os.fork()
        if pid == 0:
            _child(dict(request["env"]), str(request["log"]))
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code}", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    main()
