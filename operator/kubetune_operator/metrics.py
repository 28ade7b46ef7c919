"""The operator's Prometheus metrics (prometheus-client), in a registry of their own."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .api.types import JobState

STATES: tuple[str, ...] = JobState.__args__  # type: ignore[attr-defined]
SWEEP_TRIAL_STATES = ("Running", "Succeeded", "Failed", "Pruned")


class OperatorMetrics:
    """Jobs by state, transitions, reconcile timings, API errors and per-job gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("kubetune_jobs", "FineTuneJobs by state", ["state"], registry=r)
        self.transitions = Counter(
            "kubetune_job_transitions",
            "FineTuneJob state transitions",
            ["from_state", "to_state"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        # Per namespace only (no per-job label: bounded cardinality). It counts the
        # GPU-seconds this operator process saw added to jobs' status.gpuSeconds: each
        # increase is counted by the process that wrote it (the delta from the status it
        # read), so a restarted operator does not count again what an earlier one counted
        # into status; the counter starts at 0 with each process, which rate()/increase()
        # treat as a counter reset.
        self.gpu_seconds = Counter(
            "kubetune_gpu_seconds",
            "GPU-seconds held by FineTuneJob pods (status.gpuSeconds increases), by namespace",
            ["namespace"],
            registry=r,
        )
        self.api_errors = Counter(
            "kubetune_api_errors", "Failed Kubernetes API calls", ["operation"], registry=r
        )
        labels = ["namespace", "name"]
        self.job_progress = Gauge(
            "kubetune_job_progress_ratio", "Share of optimizer steps done", labels, registry=r
        )
        self.job_train_loss = Gauge(
            "kubetune_job_train_loss", "Latest training loss", labels, registry=r
        )
        self.job_eval_loss = Gauge(
            "kubetune_job_eval_loss", "Latest evaluation loss", labels, registry=r
        )
        self.job_tokens_per_second = Gauge(
            "kubetune_job_tokens_per_second",
            "Non-pad tokens trained per second",
            labels,
            registry=r,
        )
        # Base vs tuned evaluation (status.evaluation): one series per job, metric
        # (at most nine names) and model (base or tuned); the gate's verdict per job.
        self.job_evaluation = Gauge(
            "kubetune_job_evaluation",
            "Evaluation of the base and the tuned model (status.evaluation), by metric",
            ["namespace", "name", "metric", "model"],
            registry=r,
        )
        self.job_gate_passed = Gauge(
            "kubetune_job_evaluation_gate_passed",
            "1 when the job's evaluation gate passed (artifact promoted), 0 when it failed",
            labels,
            registry=r,
        )
        self._per_job = (
            self.job_progress,
            self.job_train_loss,
            self.job_eval_loss,
            self.job_tokens_per_second,
            self.job_gate_passed,
        )
        self._evaluation_series: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.sweep_trials = Gauge(
            "kubetune_sweep_trials",
            "Trials of a FineTuneSweep by state",
            ["namespace", "name", "state"],
            registry=r,
        )
        self.sweep_best = Gauge(
            "kubetune_sweep_best_value",
            "Best objective value of a FineTuneSweep",
            labels,
            registry=r,
        )
        self._states: dict[tuple[str, str], str] = {}
        for state in STATES:
            self.jobs.labels(state=state).set(0)

    def observe_state(self, namespace: str, name: str, state: str | None) -> None:
        key = (namespace, name)
        previous = self._states.get(key)
        if state is None or previous == state:
            return
        self.transitions.labels(from_state=previous or "New", to_state=state).inc()
        self._states[key] = state
        self._refresh_states()

    def observe_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        progress = status.get("progress") or {}
        metrics = status.get("metrics") or {}
        if progress.get("totalSteps"):
            ratio = progress.get("step", 0) / progress["totalSteps"]
            self.job_progress.labels(namespace, name).set(ratio)
        for gauge, key in (
            (self.job_train_loss, "trainLoss"),
            (self.job_eval_loss, "evalLoss"),
            (self.job_tokens_per_second, "tokensPerSecond"),
        ):
            if metrics.get(key) is not None:
                gauge.labels(namespace, name).set(metrics[key])
        evaluation = status.get("evaluation") or {}
        for entry in evaluation.get("metrics") or []:
            for model in ("base", "tuned"):
                if entry.get(model) is not None:
                    self.job_evaluation.labels(namespace, name, entry["name"], model).set(
                        entry[model]
                    )
                    series = self._evaluation_series.setdefault((namespace, name), set())
                    series.add((entry["name"], model))
        gate = evaluation.get("gate")
        if gate is not None:
            self.job_gate_passed.labels(namespace, name).set(1 if gate.get("passed") else 0)

    def observe_gpu_seconds(self, namespace: str, before: Any, after: Any) -> None:
        """Count a job's status.gpuSeconds growing from ``before`` to ``after`` (as read
        and as written); a value that did not grow counts nothing."""
        grown = int(after or 0) - int(before or 0)
        if grown > 0:
            self.gpu_seconds.labels(namespace=namespace).inc(grown)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted job's series."""
        self._states.pop((namespace, name), None)
        self._refresh_states()
        for gauge in self._per_job:
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
        for metric, model in self._evaluation_series.pop((namespace, name), set()):
            with contextlib.suppress(KeyError):
                self.job_evaluation.remove(namespace, name, metric, model)

    def observe_sweep(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Trials by state and the best value (status.counts and status.bestTrial)."""
        counts = status.get("counts") or {}
        for state in SWEEP_TRIAL_STATES:
            value = counts.get(state.lower()) or 0
            self.sweep_trials.labels(namespace, name, state).set(value)
        best = (status.get("bestTrial") or {}).get("value")
        if best is not None:
            self.sweep_best.labels(namespace, name).set(best)

    def forget_sweep(self, namespace: str, name: str) -> None:
        """Drop a deleted sweep's series."""
        for state in SWEEP_TRIAL_STATES:
            with contextlib.suppress(KeyError):
                self.sweep_trials.remove(namespace, name, state)
        with contextlib.suppress(KeyError):
            self.sweep_best.remove(namespace, name)

    def _refresh_states(self) -> None:
        counts = Tally(self._states.values())
        for state in STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))
