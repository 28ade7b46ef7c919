"""Progress while training: one state, shown three ways.

- a console progress bar (step/total, loss, tokens/s, ETA) for local runs;
- an HTTP endpoint for the operator: ``/progress`` (JSON) and ``/metrics`` (Prometheus),
  served on ``$POD_IP`` (0.0.0.0 when unset) so the operator can poll it without the
  trainer needing any Kubernetes API rights;
- the final result as JSON in the container's termination-message file (< 4 KiB), so it
  survives the pod's exit.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TERMINATION_MESSAGE_LIMIT = 4096
EVALUATIONS_KEPT = 50


@dataclass
class ProgressState:
    """What the trainer knows about its own progress. Written by one thread only."""

    phase: str = "starting"  # starting, preparing, training, saving, done, failed
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    padding_ratio: float | None = None
    trained_tokens: int = 0
    last_checkpoint_step: int | None = None
    last_checkpoint_uri: str | None = None
    started_at: float = field(default_factory=time.time)
    started_step: int = 0  # the step training (re)started at: a resumed run starts late
    message: str = ""
    # Data dropped or cut on the way (duplicates, validation rows also in train, truncated
    # examples...): data.py's warnings, also joined into ``message``.
    warnings: list[str] = field(default_factory=list)
    world_size: int = 1  # processes training together (torchrun's WORLD_SIZE)
    strategy: str = "single"  # single, ddp or fsdp
    global_batch_size: int = 0  # examples per optimizer step across all processes
    # Examples (not packed rows) in one optimizer step across all processes: measured
    # from the packed rows (their mean examples per row), so it shows what packing did.
    examples_per_step: float | None = None
    rows_per_device_step: int = 1  # packed rows (or examples, unpacked) per micro-batch
    # Seconds from process start to the end of the first optimizer step, by stage
    # (startup, model_fetch, data_preparation, tokenization, model_build, first_step) and
    # "total"; filled as the stages finish.
    time_to_first_step: dict[str, float] = field(default_factory=dict)
    fast_paths: list[str] = field(default_factory=list)  # GPU fast paths in use
    # What the shared model cache did (model_cache.CacheResult.report: hit, bytes,
    # downloadSeconds, savedSeconds, ...); empty without a cache.
    model_cache: dict[str, Any] = field(default_factory=dict)
    # Experiment tracking (tracking.Tracker.status): {"mlflow": "ok" | "off" |
    # "unavailable: <reason>", "runId", "runUrl", "tensorboard": "on" | "off", ...}
    tracking: dict[str, str] = field(default_factory=dict)
    # Recent evaluations, step -> eval loss (the latest EVALUATIONS_KEPT), so that a poller
    # sees every evaluation, not only the one that happened to be latest when it asked.
    evaluations: dict[int, float] = field(default_factory=dict)
    # Base vs tuned evaluation and the gate (evaluation.summary), once measured: base
    # numbers before training, the rest after it.
    evaluation: dict[str, Any] = field(default_factory=dict)

    def record_evaluation(self, step: int, loss: float) -> None:
        self.eval_loss = loss
        self.evaluations[step] = loss
        for old in sorted(self.evaluations)[:-EVALUATIONS_KEPT]:
            del self.evaluations[old]

    @property
    def percent(self) -> int:
        return int(100 * self.step / self.total_steps) if self.total_steps else 0

    def eta_seconds(self, now: float | None = None) -> int | None:
        done = self.step - self.started_step
        if done <= 0 or not self.total_steps:
            return None
        elapsed = (now or time.time()) - self.started_at
        return int(elapsed / done * (self.total_steps - self.step))

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["percent"] = self.percent
        data["eta_seconds"] = self.eta_seconds()
        return data


def process_start_time() -> float:
    """When this process started (Unix time), from /proc; now, where /proc is missing."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.time()


class MetricsExporter:
    """Prometheus gauges mirroring a ProgressState, in a registry of their own."""

    def __init__(self, state: ProgressState) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        gauges = {
            "step": ("kubetune_trainer_step", "Optimizer steps done"),
            "total_steps": ("kubetune_trainer_total_steps", "Optimizer steps in the run"),
            "epoch": ("kubetune_trainer_epoch", "Fractional epoch"),
            "train_loss": ("kubetune_trainer_train_loss", "Latest training loss"),
            "eval_loss": ("kubetune_trainer_eval_loss", "Latest evaluation loss"),
            "learning_rate": ("kubetune_trainer_learning_rate", "Current learning rate"),
            "tokens_per_second": (
                "kubetune_trainer_tokens_per_second",
                "Non-pad tokens trained per second",
            ),
            "padding_ratio": ("kubetune_trainer_padding_ratio", "Share of pad tokens in batches"),
            "last_checkpoint_step": (
                "kubetune_trainer_last_checkpoint_step",
                "Step of the newest complete checkpoint",
            ),
            "world_size": ("kubetune_trainer_world_size", "Processes training together"),
            "global_batch_size": (
                "kubetune_trainer_global_batch_size",
                "Examples per optimizer step across all processes",
            ),
        }
        self._gauges = {
            attr: Gauge(name, doc, registry=self.registry) for attr, (name, doc) in gauges.items()
        }
        # Bounded labels: the metric (at most nine names) and the model (base or tuned).
        self._evaluation = Gauge(
            "kubetune_trainer_evaluation",
            "Evaluation of the base and the tuned model, by metric",
            ["metric", "model"],
            registry=self.registry,
        )
        self._gate = Gauge(
            "kubetune_trainer_evaluation_gate_passed",
            "1 when the tuned model passed the evaluation gate, 0 when it failed",
            ["metric"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        for attr, gauge in self._gauges.items():
            value = getattr(self.state, attr)
            gauge.set(float("nan") if value is None else value)
        for metric, numbers in (self.state.evaluation.get("metrics") or {}).items():
            for model in ("base", "tuned"):
                if numbers.get(model) is not None:
                    self._evaluation.labels(metric=metric, model=model).set(numbers[model])
        gate = self.state.evaluation.get("gate")
        if gate is not None:
            metric = str(gate.get("metric", ""))
            self._gate.labels(metric=metric).set(1.0 if gate.get("passed") else 0.0)
        return generate_latest(self.registry)


class _PollServer(ThreadingHTTPServer):
    """A threading HTTP server that stays quiet when a poller gives up: a client that
    timed out and reset the connection (the trainer is busy tokenizing, say) is not the
    trainer's failure, and socketserver would print a traceback into the pod log."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class ProgressServer:
    """Serves /progress and /metrics for the operator to poll."""

    def __init__(self, state: ProgressState, port: int, host: str | None = None) -> None:
        exporter = MetricsExporter(state)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, kind = exporter.render(), CONTENT_TYPE_LATEST
                elif self.path.startswith("/progress"):
                    body, kind = json.dumps(state.as_json()).encode(), "application/json"
                elif self.path.startswith("/healthz"):
                    body, kind = b"ok", "text/plain"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet access log
                return

        bind = host or os.environ.get("POD_IP") or "0.0.0.0"
        self._server = _PollServer((bind, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def __enter__(self) -> ProgressServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def write_termination_message(path: str | Path, result: dict[str, Any]) -> None:
    """Write the final result where Kubernetes keeps it after the container exits.

    The kubelet keeps at most 4 KiB, so optional details are dropped first if needed.
    """
    payload = dict(result)
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    for optional in ("stats", "metrics", "message"):
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
            break
        payload.pop(optional, None)
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    Path(path).write_text(text[:TERMINATION_MESSAGE_LIMIT], encoding="utf-8")
