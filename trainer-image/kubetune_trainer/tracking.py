"""Experiment tracking: MLflow and TensorBoard, written by rank 0, never fatal.

What is logged, under the same names in both:

- parameters (MLflow, once per run): the base model, the resolved method, training and
  dataset settings, and the layout (world size, strategy, global batch);
- each optimizer step: ``train/loss``, ``train/learning_rate``, ``train/grad_norm``,
  ``train/epoch`` and ``train/tokens_per_second`` (non-pad tokens/s, all ranks);
- each evaluation (periodic and final): ``eval/loss`` and the Trainer's other ``eval_*``
  numbers;
- at the end (MLflow): ``final/<name>`` for the run's summary metrics (train_loss,
  eval_loss, perplexity, tokens_per_second, steps), the tags ``kubetune.artifactUri`` and
  ``kubetune.artifactDigest``, and the run's status: FINISHED, or FAILED (KILLED when
  preempted) if the attempt ends otherwise.

TensorBoard event files are written under ``<artifact>/tensorboard/``: they are published
with the adapter (and listed in its manifest.json), and they travel in every checkpoint,
so a resumed attempt continues the same curves. The MLflow run id travels in the
checkpoint too: a resumed attempt logs into the same run.

We use a small client of our own rather than transformers' MLflowCallback: that callback
calls the server synchronously from the training loop with the client's default retries
(minutes against a dead server) and raises when it cannot start a run, so a tracker that
is down would stall or fail the job. Here every call to MLflow runs on one background
thread, in order; training never waits for it, except for a bounded flush at the end.
The first failure is logged once as a warning and recorded in the progress report and
termination message (``tracking.mlflow: "unavailable: <reason>"``); MLflow logging then
stops for this attempt and training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import MlflowConfig, TrainerConfig
from .errors import Preempted, PreemptionSignal
from .progress import ProgressState

log = logging.getLogger("kubetune.trainer")

TENSORBOARD_DIR = "tensorboard"  # inside the artifact directory and each checkpoint
RUN_FILE = "kubetune-tracking.json"  # in each checkpoint: the MLflow run to continue
FINISH_TIMEOUT_SECONDS = 60.0  # the most a finished run waits for MLflow to catch up
ABORT_TIMEOUT_SECONDS = 10.0  # the same for a failed or preempted attempt
# The MLflow client's defaults retry an unreachable server for minutes (7 retries,
# backoff factor 2, 120 s timeout). A tracker that does not answer within seconds is
# reported unavailable instead. Values the user sets in the pod's env win.
CLIENT_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
MAX_PARAM_LENGTH = 500  # MLflow's historical limit; newer servers take more
_PARAMS_PER_BATCH = 100  # log_batch's limit
_METRICS_PER_BATCH = 900  # log_batch's limit is 1000 entries
_QUEUE_LIMIT = 100_000
_THREAD_NAME = "kubetune-mlflow"


class _QuietRetries(logging.Filter):
    """Drop urllib3's per-retry warnings from the MLflow thread: its one failure is
    reported once, by us."""

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.current_thread().name != _THREAD_NAME


_QUIET_RETRIES = _QuietRetries()


# --------------------------------------------------------------------------- what is logged


def run_params(config: TrainerConfig, layout: dict[str, Any]) -> dict[str, str]:
    """The run's parameters: flat, dotted names (``training.learning_rate``)."""
    params: dict[str, Any] = {
        "model.source": config.model.source,
        "model.revision": config.model.revision,
    }
    for section in ("method", "training", "dataset"):
        _flatten(getattr(config, section).model_dump(mode="json"), section, params)
    for key, value in layout.items():
        params[f"distributed.{key}"] = value
    return {key: _param_value(value) for key, value in params.items() if value is not None}


def _flatten(values: dict[str, Any], prefix: str, into: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}.{key}", into)
        else:
            into[f"{prefix}.{key}"] = value


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | bool) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"


def step_metrics(logs: dict[str, Any], tokens_per_second: float | None) -> dict[str, float]:
    """One Trainer log entry as tracker metrics: ``train/...`` for a training step,
    ``eval/...`` for an evaluation (the Trainer's end-of-training summary is skipped:
    the final metrics are logged by ``finish``)."""
    metrics: dict[str, float] = {}
    if "loss" in logs:
        for key in ("loss", "learning_rate", "grad_norm", "epoch"):
            if _number(logs.get(key)):
                metrics[f"train/{key}"] = float(logs[key])
        if tokens_per_second is not None:
            metrics["train/tokens_per_second"] = float(tokens_per_second)
    for key, value in logs.items():
        if key.startswith("eval_") and _number(value):
            metrics[f"eval/{key.removeprefix('eval_')}"] = float(value)
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def unavailable_reason(error: BaseException, uri: str) -> str:
    """A short reason for the status: the OS error when the server cannot be reached
    (the client's message buries it in a long URL and retry report)."""
    text = str(error)
    refused = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if refused:
        return f"cannot reach {uri}: {refused.group(0).strip()}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if len(first) <= 200 else first[:199] + "…"


# --------------------------------------------------------------------------- MLflow


class MlflowRun:
    """One MLflow run, fed from a background thread; every failure ends it quietly."""

    def __init__(self, config: MlflowConfig, run_name: str, tracker: Tracker) -> None:
        self.config = config
        self.run_name = config.run_name or run_name
        self.tracker = tracker
        self.run_id: str | None = None
        self.run_url: str | None = None
        self.failure: str | None = None
        self.dropped = 0
        self._client: Any = None
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(_QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._work, name=_THREAD_NAME, daemon=True)

    # Called from the training thread: never blocks (but for the final flush).

    def start(
        self, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None
    ) -> None:
        for name, value in CLIENT_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)  # idempotent
        self._thread.start()
        self._submit("start", params, tags, resume_run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._submit("metrics", metrics, step, int(time.time() * 1000))

    def finish(
        self,
        status: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        step: int,
        timeout: float,
    ) -> None:
        """Log the end of the run and wait (at most ``timeout`` s) for everything to go out."""
        if not self._thread.is_alive():
            return
        self._submit("finish", status, metrics, tags, step, int(time.time() * 1000))
        self._submit("stop")
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._fail(f"still sending after {timeout:.0f} s at the end of the attempt")

    def _submit(self, *item: Any) -> None:
        if self.failure is not None:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    # The background thread.

    def _work(self) -> None:
        pending: tuple[Any, ...] | None = None
        while self.failure is None:
            item = pending or self._queue.get()
            pending = None
            if item[0] == "stop":
                return
            try:
                if item[0] == "metrics":
                    batch = [item]
                    while sum(len(b[1]) for b in batch) < _METRICS_PER_BATCH:
                        try:
                            more = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if more[0] != "metrics":
                            pending = more
                            break
                        batch.append(more)
                    self._log_metrics(batch)
                elif item[0] == "start":
                    self._start(*item[1:])
                elif item[0] == "finish":
                    self._finish(*item[1:])
            except Exception as error:  # a tracker must never fail the job
                self._fail(unavailable_reason(error, self.config.tracking_uri))
                return

    def _start(
        self, params: dict[str, str], tags: dict[str, str], resume_run_id: str | None
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = self._client = MlflowClient(tracking_uri=self.config.tracking_uri)
        experiment_id = self._resume(resume_run_id) if resume_run_id else None
        if experiment_id is None:
            experiment_id = self._experiment_id()
            run = client.create_run(
                experiment_id, run_name=self.run_name, tags={**tags, **self.config.tags}
            )
            self.run_id = run.info.run_id
            entries = [Param(key, value) for key, value in params.items()]
            for first in range(0, len(entries), _PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=entries[first : first + _PARAMS_PER_BATCH])
        base = self.config.tracking_uri.rstrip("/")
        self.run_url = f"{base}/#/experiments/{experiment_id}/runs/{self.run_id}"
        self.tracker.report()
        log.info("MLflow run %s: %s", self.run_id, self.run_url)

    def _resume(self, run_id: str) -> str | None:
        """Continue the run a checkpoint names; None when it no longer exists."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s of the checkpoint is gone; starting a new run", run_id)
            return None
        self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return str(run.info.experiment_id)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(self._client.create_experiment(name))
        except MlflowException as error:  # another job created it meanwhile
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return str(self._client.get_experiment_by_name(name).experiment_id)

    def _log_metrics(self, batch: list[tuple[Any, ...]]) -> None:
        from mlflow.entities import Metric

        entries = [
            Metric(key, value, timestamp, step)
            for _, metrics, step, timestamp in batch
            for key, value in metrics.items()
        ]
        self._client.log_batch(self.run_id, metrics=entries)

    def _finish(
        self, status: str, metrics: dict[str, float], tags: dict[str, str], step: int, ts: int
    ) -> None:
        from mlflow.entities import Metric, RunTag

        self._client.log_batch(
            self.run_id,
            metrics=[Metric(key, value, ts, step) for key, value in metrics.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        self._client.set_terminated(self.run_id, status)

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        log.warning(
            "MLflow tracking at %s is unavailable (%s); training continues without it",
            self.config.tracking_uri,
            reason,
        )
        self.tracker.report()


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """What one attempt logs to MLflow and TensorBoard. A no-op on ranks other than 0.

    Use as a context manager around the attempt: an attempt that raises ends its MLflow
    run as FAILED (KILLED when preempted) and closes the TensorBoard writer."""

    def __init__(
        self, config: TrainerConfig, state: ProgressState, artifact_dir: Path, *, enabled: bool
    ) -> None:
        tracking = config.tracking
        self.state = state
        self.enabled = enabled
        self.tensorboard_dir = (
            artifact_dir / TENSORBOARD_DIR if enabled and tracking.tensorboard else None
        )
        self._writer: Any = None
        self._steps = 0
        self.tags = {"kubetune.job": config.job_name}
        if config.job_namespace:
            self.tags["kubetune.namespace"] = config.job_namespace
        self.mlflow = (
            MlflowRun(tracking.mlflow, config.job_name, self)
            if enabled and tracking.mlflow is not None
            else None
        )
        self.final: dict[str, str] = {}
        self.report()

    def report(self) -> None:
        """Publish the tracking state in the progress report (one assignment: atomic)."""
        if not self.enabled:
            return
        self.state.tracking = self.status()

    def status(self) -> dict[str, str]:
        """``{"mlflow": "off" | "ok" | "unavailable: <reason>", "runId", "runUrl",
        "tensorboard": "on" | "off", "tensorboardUri"}`` (only the keys that apply)."""
        status: dict[str, str] = {"tensorboard": "on" if self.tensorboard_dir else "off"}
        run = self.mlflow
        if run is None:
            status["mlflow"] = "off"
        elif run.failure is not None:
            status["mlflow"] = f"unavailable: {run.failure}"
        else:
            status["mlflow"] = "ok" if run.run_id else "starting"
        if run is not None and run.run_id:
            status["runId"] = run.run_id
            status["runUrl"] = run.run_url or ""
        return {**status, **self.final}

    def start(self, config: TrainerConfig, layout: dict[str, Any], resume_dir: Path | None) -> None:
        """Open the TensorBoard writer and the MLflow run (continuing the checkpoint's)."""
        if not self.enabled:
            return
        resume_run_id: str | None = None
        if resume_dir is not None:
            saved = resume_dir / TENSORBOARD_DIR
            if self.tensorboard_dir is not None and saved.is_dir():
                shutil.copytree(saved, self.tensorboard_dir, dirs_exist_ok=True)
            run_file = resume_dir / RUN_FILE
            if run_file.is_file():
                resume_run_id = json.loads(run_file.read_text(encoding="utf-8")).get("runId")
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
                self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
            except Exception as error:  # e.g. tensorboard not installed
                log.warning("TensorBoard event files are off: %s", error)
                self.tensorboard_dir = None
        if self.mlflow is not None:
            self.mlflow.start(run_params(config, layout), self.tags, resume_run_id)
        self.report()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step)

    def save_to_checkpoint(self, checkpoint_dir: Path) -> None:
        """Put the event files so far and the MLflow run id into a checkpoint."""
        if not self.enabled or not checkpoint_dir.is_dir():
            return
        if self._writer is not None and self.tensorboard_dir is not None:
            self._writer.flush()
            shutil.copytree(
                self.tensorboard_dir, checkpoint_dir / TENSORBOARD_DIR, dirs_exist_ok=True
            )
        if self.mlflow is not None and self.mlflow.run_id:
            (checkpoint_dir / RUN_FILE).write_text(
                json.dumps({"runId": self.mlflow.run_id}), encoding="utf-8"
            )

    def close_tensorboard(self) -> None:
        """Flush and close the event files (before the artifact's manifest hashes them)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, artifact_uri: str, digest: str, metrics: dict[str, float], step: int) -> None:
        """The attempt succeeded: log the final metrics and the artifact, end the run."""
        if not self.enabled:
            return
        self.close_tensorboard()
        if self.tensorboard_dir is not None:
            self.final["tensorboardUri"] = f"{artifact_uri.rstrip('/')}/{TENSORBOARD_DIR}"
        if self.mlflow is not None:
            tags = {"kubetune.artifactUri": artifact_uri, "kubetune.artifactDigest": digest}
            final = {f"final/{key}": value for key, value in metrics.items()}
            finite = {key: value for key, value in final.items() if math.isfinite(value)}
            self.mlflow.finish("FINISHED", finite, tags, step, FINISH_TIMEOUT_SECONDS)
        self.report()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close_tensorboard()
        if kind is None or self.mlflow is None:
            return
        status = "KILLED" if isinstance(error, Preempted | PreemptionSignal) else "FAILED"
        self.mlflow.finish(status, {}, {}, self.state.step, ABORT_TIMEOUT_SECONDS)


def callback(tracker: Tracker) -> Any:
    """The Trainer callback that feeds ``tracker``: place it before the checkpoint upload."""
    from transformers import TrainerCallback

    class Tracking(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            metrics = step_metrics(dict(kwargs.get("logs") or {}), tracker.state.tokens_per_second)
            tracker.log(metrics, state.global_step)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tracker.save_to_checkpoint(local)

    return Tracking()
