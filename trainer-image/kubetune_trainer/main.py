"""Entry points: ``python -m kubetune_trainer`` in the pod, ``run_local`` for ``kubetune train``.

Both run the same recipe (train.run). The pod reads its configuration from
``$KUBETUNE_CONFIG`` (JSON) or the file named by ``$KUBETUNE_CONFIG_FILE``, serves
progress on ``$POD_IP:$KUBETUNE_PROGRESS_PORT`` and writes its result to the termination
message. Every failure ends with a message, a hint and a documented exit code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from .config import TrainerConfig
from .errors import ConfigInvalid, ExitCode, Preempted, TrainerError
from .progress import ProgressServer, ProgressState, write_termination_message

log = logging.getLogger("kubetune.trainer")

# Where the pod wants the final result (the container's terminationMessagePath).
TERMINATION_MESSAGE_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


def _install_sigterm(stop: threading.Event, state: ProgressState) -> None:
    """SIGTERM: checkpoint at the next step end if training, else stop at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if state.phase != "training":
            raise Preempted("stopped by SIGTERM before training started")

    signal.signal(signal.SIGTERM, handler)


def execute(config: TrainerConfig, work_dir: Path | None = None) -> int:
    """Run one attempt of a job; returns the exit code. Never raises for expected failures."""
    from . import train

    state = ProgressState()
    stop = threading.Event()
    _install_sigterm(stop, state)
    reporting = config.reporting
    server = (
        ProgressServer(state, reporting.progress_port)
        if reporting.progress_port is not None
        else contextlib.nullcontext()
    )
    started = time.time()
    result: dict[str, Any]
    with server, tempfile.TemporaryDirectory(prefix="kubetune-") as scratch:
        try:
            outcome = train.run(
                config,
                work_dir=work_dir or Path(scratch),
                state=state,
                stop=stop,
                progress_bar=reporting.progress_bar,
            )
        except Exception as raised:
            error = raised if isinstance(raised, TrainerError) else _internal(raised)
            state.phase = "failed"
            state.message = str(error)
            code = error.exit_code
            result = {
                "error": {
                    "reason": code.reason,
                    "message": error.message,
                    "hint": error.hint,
                    "retryable": code.retryable,
                    "exitCode": int(code),
                },
                "lastCheckpoint": state.last_checkpoint_uri,
            }
            print(f"✗ {code.reason}: {error}", file=sys.stderr)
        else:
            code = ExitCode.OK
            result = outcome.as_termination_message()
            _print_summary(outcome, time.time() - started)
        termination_path = os.environ.get(TERMINATION_MESSAGE_ENV)
        if termination_path:
            write_termination_message(termination_path, result)
    return int(code)


def _internal(error: BaseException) -> TrainerError:
    """An unexpected failure: keep the traceback in the log, report it as retryable."""
    log.exception("unexpected trainer failure")
    return TrainerError(
        f"unexpected {type(error).__name__}: {error}",
        hint="the pod log has the traceback; a new attempt resumes from the last checkpoint",
    )


def _print_summary(outcome: Any, seconds: float) -> None:
    metrics = outcome.metrics
    lines = [
        f"✓ fine-tuned in {seconds:.0f}s ({int(metrics.get('steps', 0))} steps"
        + (f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else "")
        + ")",
    ]
    stats = outcome.stats
    if "train_examples" in stats:
        lines.append(
            f"  data         {stats['train_examples']} train / "
            f"{stats.get('validation_examples', 0)} validation examples "
            f"({stats.get('duplicates_removed', 0)} duplicates removed, "
            f"{stats.get('truncated_examples', 0)} truncated, "
            f"{stats.get('train_sequences', 0)} sequences)"
        )
    if "first_train_loss" in metrics:
        lines.append(
            f"  train loss   {metrics['first_train_loss']:.4f} → {metrics['train_loss']:.4f}"
        )
    if "eval_loss" in metrics:
        lines.append(
            f"  eval loss    {metrics['eval_loss']:.4f} (perplexity {metrics['perplexity']:.2f})"
        )
    if "tokens_per_second" in metrics:
        lines.append(f"  throughput   {metrics['tokens_per_second']:.0f} non-pad tokens/s")
    lines.append(f"  adapter      {outcome.artifact.uri}")
    lines.append(f"  digest       {outcome.artifact.digest}")
    print("\n".join(lines))


def run_local(config: TrainerConfig) -> int:
    """``kubetune train``: run a job on this machine with a console progress bar."""
    logging.basicConfig(level=logging.WARNING)
    print(f"kubetune: training {config.job_name} ({config.method.type}) → {config.output.uri}")
    return execute(config)


def _load_pod_config() -> TrainerConfig:
    text = os.environ.get("KUBETUNE_CONFIG")
    path = os.environ.get("KUBETUNE_CONFIG_FILE")
    if text is None and path:
        text = Path(path).read_text(encoding="utf-8")
    if not text:
        raise ConfigInvalid(
            "no trainer configuration",
            hint="set KUBETUNE_CONFIG (JSON) or KUBETUNE_CONFIG_FILE; the operator does this",
        )
    try:
        return TrainerConfig.from_json(text)
    except ValidationError as error:
        raise ConfigInvalid(f"invalid trainer configuration: {error}") from None


def main() -> int:
    """The pod's entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = _load_pod_config()
    except ConfigInvalid as error:
        print(f"✗ {error.exit_code.reason}: {error}", file=sys.stderr)
        termination = os.environ.get(TERMINATION_MESSAGE_ENV)
        if termination:
            write_termination_message(
                termination, {"error": {"reason": error.exit_code.reason, "message": str(error)}}
            )
        return int(error.exit_code)
    return execute(config)
