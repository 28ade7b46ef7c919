"""Golden losses: the tiny model at a fixed seed reproduces a pinned loss sequence.

In the style of torchtune's recipe tests: a change that silently alters training (data
order, packing, prompt masking, the loss, the optimizer, the schedule, LoRA's init)
changes these numbers and fails here. The numbers are the per-step training losses the
run writes to its TensorBoard files (every optimizer step is logged) and the evaluation
losses in manifest.json, for the session's tiny model and dataset (tests/conftest.py)
on CPU in float32. Tolerance: relative 1e-4 (about 7e-4 at a loss of 7), far above
the run-to-run noise measured (none at 6 decimals, with 1 or 2 threads) and far
below what a real change to the recipe moves: a learning rate 10% higher moves the
second step's loss by 0.025 (relative 3.6e-3), the third's by 0.14 and the final eval
loss by 0.083.

An intended change of the recipe updates the pins: run this module with
``KUBETUNE_PRINT_LOSSES=1 pytest -s tests/integration/test_golden_loss.py``, paste the
printed lists, and say in the commit why the losses moved (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from trainer_helpers import tiny_config

from kubetune_trainer.errors import ExitCode, Preempted
from kubetune_trainer.main import execute
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.tracking import TENSORBOARD_DIR
from kubetune_trainer.train import run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="the pins are CPU float32 losses; a GPU trains in bf16"
    ),
]

STEPS = 10
# Per-step training losses of steps 1..10 (TensorBoard's train/loss).
GOLDEN_TRAIN_LOSSES = [
    7.24351,
    6.890059,
    5.739301,
    6.602769,
    5.710176,
    6.023695,
    5.801978,
    5.953804,
    5.510082,
    4.639902,
]
GOLDEN_INITIAL_EVAL_LOSS = 6.973581  # before the first step
GOLDEN_EVAL_LOSS = 5.732821  # after the last
REL = 1e-4


def _golden_config(tiny_model: Path, tiny_dataset: Path, output: Path):
    return tiny_config(
        tiny_model,
        tiny_dataset,
        str(output),
        training={"max_steps": STEPS, "eval_every_steps": 5, "checkpoint_every_steps": 5},
    )


def _train_losses(artifact: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(artifact / TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def _metrics(artifact: Path) -> dict[str, float]:
    metrics: dict[str, float] = json.loads((artifact / "manifest.json").read_text())["metrics"]
    return metrics


def _print(label: str, artifact: Path) -> None:
    if os.environ.get("KUBETUNE_PRINT_LOSSES"):
        losses = [round(value, 6) for _, value in _train_losses(artifact)]
        metrics = _metrics(artifact)
        print(f"\n{label}: train {losses}")
        print(f"{label}: eval {metrics.get('initial_eval_loss')} → {metrics['eval_loss']}")


def test_the_tiny_model_reproduces_its_pinned_losses(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    config = _golden_config(tiny_model, tiny_dataset, tmp_path / "out")
    assert execute(config) == ExitCode.OK
    artifact = tmp_path / "out" / "adapter"
    _print("uninterrupted", artifact)
    losses = _train_losses(artifact)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    assert [value for _, value in losses] == pytest.approx(GOLDEN_TRAIN_LOSSES, rel=REL)
    metrics = _metrics(artifact)
    assert metrics["initial_eval_loss"] == pytest.approx(GOLDEN_INITIAL_EVAL_LOSS, rel=REL)
    assert metrics["eval_loss"] == pytest.approx(GOLDEN_EVAL_LOSS, rel=REL)
    assert metrics["steps"] == STEPS


class _StopAfter(threading.Event):
    """A stop flag that reads as set from ``step`` on: SIGTERM arriving during that
    step, at a point of the run that no timing can make flaky."""

    def __init__(self, state: ProgressState, step: int) -> None:
        super().__init__()
        self.state, self.step = state, step

    def is_set(self) -> bool:
        return self.state.step >= self.step


def test_an_interrupted_and_resumed_run_ends_where_the_uninterrupted_one_does(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    config = _golden_config(tiny_model, tiny_dataset, tmp_path / "out")
    state = ProgressState()
    with pytest.raises(Preempted):  # stopped at step 3: checkpointed there, not published
        run(config, work_dir=tmp_path / "first", state=state, stop=_StopAfter(state, 3))
    assert state.last_checkpoint_step == 3
    assert not (tmp_path / "out" / "adapter").exists()

    assert execute(config) == ExitCode.OK  # resumes from step 3
    artifact = tmp_path / "out" / "adapter"
    _print("resumed", artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 3
    # The TensorBoard files travel in the checkpoint: steps 1-3 are the first attempt's.
    losses = _train_losses(artifact)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    assert [value for _, value in losses] == pytest.approx(GOLDEN_TRAIN_LOSSES, rel=REL)
    metrics = _metrics(artifact)
    assert metrics["steps"] == STEPS
    assert metrics["train_loss"] == pytest.approx(GOLDEN_TRAIN_LOSSES[-1], rel=REL)
    assert metrics["eval_loss"] == pytest.approx(GOLDEN_EVAL_LOSS, rel=REL)
