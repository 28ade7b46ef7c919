"""Entry points: ``python -m kubetune_trainer`` in the pod, ``run_local`` for ``kubetune train``.

Both run the same recipe (train.run). The pod reads its configuration from
``$KUBETUNE_CONFIG`` (JSON) or the file named by ``$KUBETUNE_CONFIG_FILE``, serves
progress on ``$POD_IP:$KUBETUNE_PROGRESS_PORT`` and writes its result to the termination
message. Every failure ends with a message, a hint and a documented exit code.

Several processes (``torchrun --module kubetune_trainer``, or ``launch_local``) each run
this entry point. torchrun reports any failed worker as exit code 1, so the documented
exit code travels in the termination message too (``error.exitCode``), written by the
first process of the pod that fails; rank 0 alone writes a success.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from .config import TrainerConfig
from .distributed import World
from .errors import ConfigInvalid, ExitCode, Preempted, PreemptionSignal, TrainerError
from .progress import ProgressServer, ProgressState, write_termination_message

log = logging.getLogger("kubetune.trainer")

# Where the pod wants the final result (the container's terminationMessagePath).
TERMINATION_MESSAGE_ENV = "KUBETUNE_TERMINATION_MESSAGE_PATH"


# Phases (ProgressState.phase) that SIGTERM ends at once, and how the message names them.
# While training, the loop stops at the next step end with a checkpoint (and a SIGTERM
# during the last step lets the run publish, as training is complete); once training is
# over ("saving") the run publishes its artifact and succeeds: stopping there would throw
# the whole training away, or retrain it, for the few seconds an upload takes. Once the
# run is done or failed, its result is being written and SIGTERM changes nothing.
_STAGES_STOPPED_AT_ONCE = {
    "starting": "starting, before training started",
    "preparing": "preparing the model and data, before training started",
}


def _install_sigterm(stop: threading.Event, state: ProgressState) -> None:
    """SIGTERM: checkpoint at the next step end if training, else stop at once.

    Outside the training loop the handler raises :class:`PreemptionSignal`, a
    BaseException, so that no ``except Exception`` between here and :func:`execute`
    (a file reader's, a chat template's, a library's) can report a preemption as
    anything but Preempted (exit 21, retryable)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if state.phase in _STAGES_STOPPED_AT_ONCE:
            raise PreemptionSignal(state.phase)

    signal.signal(signal.SIGTERM, handler)


def as_trainer_error(raised: BaseException) -> TrainerError:
    """What ``execute`` reports for an exception that ended the run."""
    if isinstance(raised, TrainerError):
        return raised
    if isinstance(raised, PreemptionSignal):
        return Preempted(
            f"stopped by SIGTERM while {_STAGES_STOPPED_AT_ONCE.get(raised.stage, raised.stage)}",
            hint="the pod was preempted or evicted; the next attempt starts this stage again "
            "(training resumes from the newest complete checkpoint, if any)",
        )
    return _internal(raised)


def execute(config: TrainerConfig, work_dir: Path | None = None) -> int:
    """Run one attempt of a job; returns the exit code. Never raises for expected failures."""
    from . import train
    from .quiet import silence_library_noise

    silence_library_noise()  # every process: run_local, the pod, each torchrun rank
    world = World.from_env()
    state = ProgressState(world_size=world.size)
    stop = threading.Event()
    reporting = config.reporting
    server = (
        ProgressServer(state, reporting.progress_port)
        if reporting.progress_port is not None and world.is_main
        else contextlib.nullcontext()
    )
    started = time.time()
    result: dict[str, Any]
    with server, tempfile.TemporaryDirectory(prefix="kubetune-") as scratch:
        try:
            _install_sigterm(stop, state)
            outcome = train.run(
                config,
                work_dir=work_dir or Path(scratch),
                state=state,
                stop=stop,
                progress_bar=reporting.progress_bar,
            )
        except (Exception, PreemptionSignal) as raised:
            state.phase = "failed"  # first: from here on SIGTERM raises nothing
            error = as_trainer_error(raised)
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
            prefix = f"[rank {world.rank}] " if world.distributed else ""
            print(f"{prefix}✗ {code.reason}: {error}", file=sys.stderr)
        else:
            code = ExitCode.OK
            result = outcome.as_termination_message()
            if world.is_main:
                _print_summary(outcome, time.time() - started, state)
        termination_path = os.environ.get(TERMINATION_MESSAGE_ENV)
        if termination_path and (code != ExitCode.OK or world.is_main):
            record_result(termination_path, result)
    return int(code)


def record_result(path: str | Path, result: dict[str, Any]) -> bool:
    """Write this process's result as the pod's termination message, unless another
    process of the pod (a local rank) already wrote an error: the first failure is the
    cause, the others' are its echoes. Returns whether it wrote."""
    target = Path(path)
    target.touch(exist_ok=True)  # the kubelet creates it in a pod; tests may not
    with target.open("r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # local ranks may fail at the same moment
        try:
            existing = json.loads(handle.read() or "{}")
        except ValueError:
            existing = {}
        if isinstance(existing, dict) and "error" in existing:
            return False
        write_termination_message(target, result)
        return True


def _internal(error: BaseException) -> TrainerError:
    """An unexpected failure: keep the traceback in the log, report it as retryable."""
    log.exception("unexpected trainer failure")
    return TrainerError(
        f"unexpected {type(error).__name__}: {error}",
        hint="the pod log has the traceback; a new attempt resumes from the last checkpoint",
    )


def _print_summary(outcome: Any, seconds: float, state: ProgressState | None = None) -> None:
    metrics = outcome.metrics
    lines = [
        f"✓ fine-tuned in {seconds:.0f}s ({int(metrics.get('steps', 0))} steps"
        + (f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else "")
        + ")"
        if not outcome.reused
        else f"✓ already fine-tuned with these settings ({int(metrics.get('steps', 0))} steps): "
        f"the published {outcome.kind} is the result, nothing was trained again",
    ]
    if state is not None:
        lines.append(
            f"  processes    {state.world_size} ({state.strategy}), "
            f"global batch {state.global_batch_size} (batch size × accumulation × processes)"
        )
        if state.examples_per_step is not None:
            lines.append(
                f"  batch        {state.examples_per_step:g} examples per optimizer step, "
                f"{state.rows_per_device_step} rows per device step"
            )
        first = state.time_to_first_step
        if "total" in first:
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in first.items() if k != "total")
            lines.append(f"  first step   {first['total']:.1f}s after start ({parts})")
        if state.fast_paths:
            lines.append(f"  fast paths   {', '.join(state.fast_paths)}")
        if state.model_cache:
            lines.append(f"  model cache  {_cache_line(state.model_cache)}")
    stats = outcome.stats
    if "train_examples" in stats:
        lines.append(
            f"  data         {stats['train_examples']} train / "
            f"{stats.get('validation_examples', 0)} validation examples "
            f"({stats.get('duplicates_removed', 0)} duplicates removed, "
            f"{stats.get('truncated_examples', 0)} truncated, "
            f"{stats.get('train_sequences', 0)} sequences)"
        )
    lines += [f"  warning      {warning}" for warning in (state.warnings if state else [])]
    if "first_train_loss" in metrics:
        first = metrics["first_train_loss"]
        last = metrics.get("train_loss_smoothed", metrics["train_loss"])
        lines.append(
            f"  train loss   {first:.4f} → {last:.4f}{_change(first, last)} "
            f"(first step → {'moving average' if 'train_loss_smoothed' in metrics else 'last'})"
        )
    if "eval_loss" in metrics:
        final = metrics["eval_loss"]
        if "initial_eval_loss" in metrics:
            initial = metrics["initial_eval_loss"]
            lines.append(
                f"  eval loss    {initial:.4f} → {final:.4f}{_change(initial, final)} "
                f"(before training → after; perplexity {math.exp(min(initial, 50.0)):.1f} → "
                f"{metrics['perplexity']:.2f})"
            )
        else:
            lines.append(f"  eval loss    {final:.4f} (perplexity {metrics['perplexity']:.2f})")
    if "tokens_per_second" in metrics:
        lines.append(f"  throughput   {metrics['tokens_per_second']:.0f} non-pad tokens/s")
    evaluation = getattr(outcome, "evaluation", None) or {}
    if evaluation.get("headline"):  # base vs tuned; eval.json in the artifact has it all
        lines.append(
            f"  evaluation   {evaluation['headline']} on {evaluation.get('samples', 0)} samples"
        )
    if evaluation.get("gate"):
        lines.append(f"  gate         {evaluation['gate'].get('message', '')}")
    lines.append(f"  {outcome.kind:<13}{outcome.artifact.uri}")  # adapter, or model (full)
    lines.append(f"  digest       {outcome.artifact.digest}")
    print("\n".join(lines))


def _cache_line(report: dict[str, Any]) -> str:
    """The summary's line about the shared model cache (model_cache.CacheResult.report)."""
    size = f"{int(report.get('bytes') or 0) / 1e6:.1f} MB"
    if report.get("hit"):
        waited = float(report.get("waitedSeconds") or 0.0)
        saved = float(report.get("savedSeconds") or 0.0)
        line = f"hit ({size}): saved a {saved:.1f}s download"
        return line + (f", waited {waited:.1f}s for another download" if waited >= 0.05 else "")
    return f"miss ({size}): downloaded in {float(report.get('downloadSeconds') or 0.0):.1f}s"


def _change(before: float, after: float) -> str:
    """`` (-42%)``: the relative change from ``before`` to ``after`` (empty if undefined)."""
    if before == 0 or not math.isfinite(before) or not math.isfinite(after):
        return ""
    return f" ({(after - before) / abs(before):+.0%})"


def run_local(config: TrainerConfig) -> int:
    """``kubetune train``: run a job on this machine with a console progress bar."""
    logging.basicConfig(level=logging.WARNING)
    print(f"kubetune: training {config.job_name} ({config.method.type}) → {config.output.uri}")
    return execute(config)


def launch_local(config: TrainerConfig, nproc: int) -> int:
    """``kubetune train`` with several processes on this machine: torchrun --standalone.

    Each process gets ``cpu_count // nproc`` threads (unless OMP_NUM_THREADS is set), so
    that processes do not fight over cores. Returns the trainer's documented exit code
    (from the termination message: torchrun itself exits 1 for any failure)."""
    if nproc <= 1:
        return run_local(config)
    print(
        f"kubetune: training {config.job_name} ({config.method.type}) with {nproc} processes "
        f"→ {config.output.uri}"
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-launch-") as scratch:
        config_file = Path(scratch) / "config.json"
        config_file.write_text(config.model_dump_json(), encoding="utf-8")
        termination = Path(scratch) / "termination-log"
        threads = str(max(1, (os.cpu_count() or 1) // nproc))
        env = {
            **os.environ,
            "KUBETUNE_CONFIG_FILE": str(config_file),
            TERMINATION_MESSAGE_ENV: str(termination),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            "KUBETUNE_LOG_LEVEL": os.environ.get("KUBETUNE_LOG_LEVEL", "WARNING"),
        }
        env.pop("KUBETUNE_CONFIG", None)
        command = [sys.executable, "-m", "torch.distributed.run"]
        command += ["--standalone", "--nproc-per-node", str(nproc)]
        command += ["--module", "kubetune_trainer"]
        code = subprocess.run(command, env=env, check=False).returncode
        return exit_code_of(code, termination)


def exit_code_of(launcher_code: int, termination_message: Path) -> int:
    """The documented exit code of a torchrun-launched attempt: the termination
    message's ``error.exitCode`` when there is one, else the launcher's own code."""
    try:
        message = json.loads(termination_message.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return launcher_code
    error = message.get("error") if isinstance(message, dict) else None
    if launcher_code != 0 and isinstance(error, dict) and isinstance(error.get("exitCode"), int):
        return int(error["exitCode"])
    return launcher_code


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


def exit_process(code: int) -> None:
    """End the process with ``code``. A rank of a distributed run skips the
    interpreter's teardown (os._exit, after flushing): freeing the process group's
    objects there can deadlock against gloo's threads (seen with torch 2.13: a rank hung
    forever after a successful run), and its result is already written."""
    if World.from_env().distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


def main() -> int:
    """The pod's entry point."""
    level = os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = _load_pod_config()
    except ConfigInvalid as error:
        print(f"✗ {error.exit_code.reason}: {error}", file=sys.stderr)
        termination = os.environ.get(TERMINATION_MESSAGE_ENV)
        if termination:
            code = error.exit_code
            record_result(
                termination,
                {"error": {"reason": code.reason, "message": str(error), "exitCode": int(code)}},
            )
        return int(error.exit_code)
    return execute(config)
