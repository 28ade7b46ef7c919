"""The distributed part of the trainer config: strategy resolution and the global batch."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubetune_trainer.config import (
    DistributedConfig,
    FsdpConfig,
    TrainerConfig,
    TrainingConfig,
    global_batch_size,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("strategy", "method", "world_size", "expected"),
    [
        ("auto", "lora", 1, "single"),
        ("auto", "full", 1, "single"),
        ("ddp", "lora", 1, "single"),
        ("fsdp", "full", 1, "single"),
        ("auto", "lora", 2, "ddp"),
        ("auto", "qlora", 8, "ddp"),
        ("auto", "dora", 2, "ddp"),
        ("auto", "full", 2, "fsdp"),
        ("ddp", "full", 4, "ddp"),
        ("fsdp", "lora", 2, "fsdp"),
    ],
)
def test_resolve(strategy: str, method: str, world_size: int, expected: str) -> None:
    config = DistributedConfig.model_validate({"strategy": strategy})
    assert config.resolve(method, world_size) == expected  # type: ignore[arg-type]


def test_global_batch_size_counts_accumulation_and_ranks() -> None:
    training = TrainingConfig(batch_size=4, gradient_accumulation_steps=2)
    assert global_batch_size(training, 1) == 8
    assert global_batch_size(training, 3) == 24
    assert global_batch_size(training, 0) == 8  # never below one process


def test_defaults_and_json_round_trip() -> None:
    base = {"model": {"source": "m"}, "dataset": {"sources": ["d"]}, "output": {"uri": "o"}}
    config = TrainerConfig.model_validate(base)
    assert config.distributed == DistributedConfig(strategy="auto", fsdp=FsdpConfig())
    assert config.distributed.fsdp.sharding == "full"
    tuned = TrainerConfig.model_validate(
        {**base, "distributed": {"strategy": "fsdp", "fsdp": {"sharding": "hybrid"}}}
    )
    assert TrainerConfig.from_json(tuned.model_dump_json()) == tuned
    with pytest.raises(ValidationError, match="extra"):
        TrainerConfig.model_validate({**base, "distributed": {"stratgy": "ddp"}})


def test_qlora_under_fsdp_is_refused() -> None:
    base = {"model": {"source": "m"}, "dataset": {"sources": ["d"]}, "output": {"uri": "o"}}
    with pytest.raises(ValidationError, match="fsdp cannot shard a 4-bit"):
        TrainerConfig.model_validate(
            {**base, "method": {"type": "qlora"}, "distributed": {"strategy": "fsdp"}}
        )
    qlora_auto = TrainerConfig.model_validate({**base, "method": {"type": "qlora"}})
    assert qlora_auto.distributed.resolve(qlora_auto.method.type, 2) == "ddp"
