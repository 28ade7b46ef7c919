"""Shared helpers for the trainer's integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.config import TrainerConfig


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first truthy value of ``predicate``, polled every 0.05 s for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def fetch_text(url: str) -> str | None:
    """GET ``url`` (a trainer's /progress or /metrics); None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def tiny_config(
    model_dir: Path, data: Path, output_uri: str, **sections: dict[str, Any]
) -> TrainerConfig:
    """A small, fast trainer configuration; ``sections`` override parts of it."""
    base: dict[str, Any] = {
        "job_name": "test",
        "model": {"source": str(model_dir)},
        "dataset": {"sources": [str(data)], "format": "alpaca", "max_seq_length": 128},
        "method": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "max_steps": 16,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
        },
        "output": {"uri": output_uri},
        "reporting": {"progress_bar": False, "loss_plot": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainerConfig.model_validate(base)


def run_trainer_process(
    config: TrainerConfig, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[str]:
    """Start ``python -m kubetune_trainer`` as a pod would, configured through env."""
    full_env = {**os.environ, **(env or {}), "KUBETUNE_CONFIG": config.model_dump_json()}
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer"],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def mean_response_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean loss of ``model`` on the responses of alpaca ``rows`` (prompt masked)."""
    from kubetune_trainer.data import chat_template_for, encode_chat, normalize_rows

    examples = normalize_rows([(i, r) for i, r in enumerate(rows, 1)], "alpaca", _fields(), "x")
    template = chat_template_for(tokenizer)
    losses = []
    model.eval()
    with torch.no_grad():
        for example in examples:
            ids, labels = encode_chat(tokenizer, template, example)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            losses.append(float(out.loss))
    return sum(losses) / len(losses)


def _fields() -> Any:
    from kubetune_trainer.config import FieldMapping

    return FieldMapping()


def read_rows(path: Path, n: int) -> list[dict[str, str]]:
    with path.open() as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]
