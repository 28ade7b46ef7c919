"""Trainer kills: SIGKILL and SIGTERM at seeded random points, each attempt resuming.

One job, one trainer process per attempt (as each attempt is one pod): ten attempts are
killed at random steps (a seeded draw, so a failure reproduces: the seed is in the
assertion messages, ``KUBETUNE_FAULT_SEED`` replays it), each next attempt resumes,
and an eleventh runs to the end as ``python -m kubetune_trainer``. The killed attempts
are forked from a process that imported torch, transformers and peft once
(trainer_zygote.py), so that ten attempts cost seconds, not minutes, of imports; each
is still its own process. Checked for every kill: the next attempt resumes from the
newest complete checkpoint, and loses at most one checkpoint interval (none after a
SIGTERM, which checkpoints first). At the end the adapter loads with stock peft and its
loss matches an uninterrupted run of the same seed. Figures (kill points, steps lost,
loss difference) are printed for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import pytest
import torch
from harness.network import free_port
from trainer_helpers import (
    fetch_text,
    mean_response_loss,
    read_rows,
    run_trainer_process,
    tiny_config,
)

from kubetune_trainer.artifact import MANIFEST
from kubetune_trainer.checkpoints import MARKER, PREFIX
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import ExitCode

pytestmark = pytest.mark.integration

ZYGOTE = Path(__file__).with_name("trainer_zygote.py")

SEED = int(os.environ.get("KUBETUNE_FAULT_SEED", "15"))  # replays a failed run's kill points
TRIALS = 10
MAX_STEPS = 40
INTERVAL = 4  # checkpoint_every_steps
LOSS_TOLERANCE = 1e-3  # absolute, on losses around 5: resume restores weights, optimizer,
# scheduler, RNG and data position, so only float summation order may differ


@dataclass
class Kill:
    signal: signal.Signals
    at_step: int  # kill once /progress shows this step (or later)
    delay: float  # then wait this long: the kill lands anywhere in a step or a checkpoint
    started_step: int = -1  # where the killed attempt (re)started
    seen_step: int = -1  # the last step /progress showed before the signal
    seen_phase: str = ""
    exit_code: int | None = None
    seconds: float = 0.0  # from the fork to the signal
    newest_complete: int | None = None  # on the store, right after the attempt ended


def _plan(rng: random.Random) -> list[Kill]:
    """TRIALS kills at increasing random steps, half SIGKILL and half SIGTERM, shuffled."""
    steps = sorted(rng.sample(range(1, MAX_STEPS - INTERVAL), TRIALS))
    signals = [signal.SIGKILL, signal.SIGTERM] * (TRIALS // 2)
    rng.shuffle(signals)
    return [Kill(sig, step, rng.uniform(0, 0.05)) for sig, step in zip(signals, steps, strict=True)]


def _newest_complete(output: Path) -> int | None:
    steps = [int(p.parent.name.split("-")[1]) for p in output.glob(f"{PREFIX}/step-*/{MARKER}")]
    return max(steps, default=None)


def _progress(port: int) -> dict | None:
    text = fetch_text(f"http://127.0.0.1:{port}/progress")
    return json.loads(text) if text else None


class Zygote:
    """The client of trainer_zygote.py: starts attempts, reports how they ended."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())

    def _answer(self, prefix: str, timeout: float) -> int:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the trainer zygote did not answer {prefix!r}") from None
        assert line.startswith(prefix + " "), line
        return int(line.split()[1])

    def start(self, config: TrainerConfig, log: Path) -> int:
        """Fork an attempt running ``config``; its pid."""
        env = {"KUBETUNE_CONFIG": config.model_dump_json(), "POD_IP": "127.0.0.1"}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"env": env, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        return self._answer("pid", timeout=120)

    def wait(self, timeout: float) -> int:
        """The attempt's exit code (negative: the signal that ended it)."""
        return self._answer("exit", timeout)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    forks = Zygote()
    yield forks
    forks.close()


def _attempt(zygote: Zygote, config: TrainerConfig, port: int, log: Path, kill: Kill) -> str:
    """Run one attempt and kill it as planned; fills in what was seen. '' or a failure."""
    forked = time.monotonic()
    pid = zygote.start(config, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            progress = _progress(port)
            if progress and progress["phase"] == "training" and progress["step"] >= kill.at_step:
                break
            if time.monotonic() > deadline or not _alive(pid):
                return f"step {kill.at_step} never came:\n{log.read_text()[-3000:]}"
            time.sleep(0.01)
        kill.started_step = progress["started_step"]
        time.sleep(kill.delay)
        last = _progress(port) or progress
        kill.seen_step, kill.seen_phase = last["step"], last["phase"]
        os.kill(pid, kill.signal)
        kill.seconds = time.monotonic() - forked
    finally:
        if kill.seen_step < 0 and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        kill.exit_code = zygote.wait(timeout=120)
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_attempts_resume_and_end_like_an_uninterrupted_run(
    zygote: Zygote, tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    plan = _plan(rng)
    output = tmp_path / "killed"
    training = {"max_steps": MAX_STEPS, "checkpoint_every_steps": INTERVAL, "seed": SEED}
    started = time.monotonic()

    for number, kill in enumerate(plan, 1):
        why = f"seed {SEED}, trial {number} ({kill.signal.name} at step {kill.at_step})"
        port = free_port()
        config = tiny_config(
            tiny_model,
            tiny_dataset,
            str(output),
            training=training,
            reporting={"progress_port": port},
        )
        failure = _attempt(zygote, config, port, tmp_path / f"attempt-{number}.log", kill)
        assert not failure, f"{why}: {failure}"
        expected = -signal.SIGKILL if kill.signal == signal.SIGKILL else ExitCode.PREEMPTED
        assert kill.exit_code == expected, why
        assert not (output / "adapter" / MANIFEST).exists(), why
        kill.newest_complete = _newest_complete(output)
        if kill.signal == signal.SIGTERM:  # it checkpointed where it stopped
            assert kill.newest_complete is not None and kill.newest_complete >= kill.seen_step, why

    # The last attempt runs to the end.
    final = tiny_config(tiny_model, tiny_dataset, str(output), training=training)
    process = run_trainer_process(final)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == ExitCode.OK, out[-3000:]
    killed_seconds = time.monotonic() - started
    manifest = json.loads((output / "adapter" / MANIFEST).read_text())
    assert manifest["metrics"]["steps"] == MAX_STEPS

    # Each attempt resumed from the newest complete checkpoint the previous one left.
    resumed = [kill.started_step for kill in plan[1:]] + [manifest["resumed_from_step"]]
    lost = []
    for number, (kill, step) in enumerate(zip(plan, resumed, strict=True), 1):
        why = f"seed {SEED}, trial {number}: {kill}, next attempt resumed at {step}"
        assert step == (kill.newest_complete or 0), why
        assert kill.seen_step - step <= INTERVAL, why
        if kill.signal == signal.SIGTERM:
            assert kill.seen_step <= step, why
        # Below zero only when the trainer stepped on between the last look and the signal.
        lost.append(max(0, kill.seen_step - step))

    # The same job, never interrupted, ends at the same loss.
    reference_output = tmp_path / "uninterrupted"
    reference = tiny_config(tiny_model, tiny_dataset, str(reference_output), training=training)
    zygote.start(reference, tmp_path / "uninterrupted.log")
    assert zygote.wait(timeout=300) == ExitCode.OK, (tmp_path / "uninterrupted.log").read_text()
    reference_manifest = json.loads((reference_output / "adapter" / MANIFEST).read_text())
    eval_difference = abs(
        manifest["metrics"]["eval_loss"] - reference_manifest["metrics"]["eval_loss"]
    )
    killed_loss, reference_loss = (
        _adapter_loss(tiny_model, directory / "adapter", tiny_dataset)
        for directory in (output, reference_output)
    )
    by_kill = [n for k, n in zip(plan, lost, strict=True) if k.signal == signal.SIGKILL]
    by_term = [n for k, n in zip(plan, lost, strict=True) if k.signal == signal.SIGTERM]
    print(
        f"\nkill figures (seed {SEED}): {TRIALS} kills + 1 final attempt "
        f"in {killed_seconds:.0f} s; "
        + "; ".join(
            f"{k.signal.name} at step {k.seen_step} ({k.seen_phase}) → resumed {s}, lost {n}"
            for k, s, n in zip(plan, resumed, lost, strict=True)
        )
        + f"; steps lost after SIGKILL max {max(by_kill)} mean {mean(by_kill):.1f}, "
        f"after SIGTERM max {max(by_term)} (interval {INTERVAL}); "
        f"fork to signal {mean(k.seconds for k in plan):.1f} s on average; "
        f"eval loss {manifest['metrics']['eval_loss']:.6f} vs uninterrupted "
        f"{reference_manifest['metrics']['eval_loss']:.6f} (difference {eval_difference:.2e}); "
        f"adapter loss {killed_loss:.6f} vs {reference_loss:.6f}"
    )
    assert eval_difference <= LOSS_TOLERANCE
    assert abs(killed_loss - reference_loss) <= LOSS_TOLERANCE


def _adapter_loss(model_dir: Path, adapter_dir: Path, data: Path) -> float:
    """The loss of the adapter as stock peft loads it, on the first rows of the data."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    return mean_response_loss(tuned, tokenizer, read_rows(data, 16))
