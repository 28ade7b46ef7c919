"""Speed choices made without a GPU: GPU fast-path selection (with fakes), packed rows per
device step, and the time-to-first-step clock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kubetune_trainer.fastpaths import FastPaths, choose
from kubetune_trainer.progress import ProgressState, process_start_time
from kubetune_trainer.train import StartupClock, rows_per_device_step

pytestmark = pytest.mark.unit


def installed(*modules: str):  # type: ignore[no-untyped-def]
    """A fake importer that sees only ``modules``."""
    return lambda name: name in modules


def test_cpu_gets_no_fast_path_even_when_everything_is_installed() -> None:
    fast = choose(cuda=False, precision="fp32", can_import=installed("flash_attn", "liger_kernel"))
    assert fast == FastPaths()
    assert fast.model_kwargs() == {} and fast.training_arguments() == {}  # CPU path unchanged


def test_cuda_with_everything_installed_uses_every_fast_path() -> None:
    fast = choose(
        cuda=True, precision="bf16", can_import=installed("flash_attn", "liger_kernel"), disabled=""
    )
    assert fast.names() == ["flash_attention", "liger", "fused_adamw"]
    assert fast.model_kwargs() == {"attn_implementation": "flash_attention_2"}
    assert fast.training_arguments() == {"use_liger_kernel": True, "optim": "adamw_torch_fused"}


def test_cuda_falls_back_to_what_is_installed() -> None:
    bare = choose(cuda=True, precision="bf16", can_import=installed(), disabled="")
    assert bare.names() == ["fused_adamw"]
    assert bare.model_kwargs() == {}  # transformers' default attention (sdpa)
    liger_only = choose(cuda=True, precision="fp16", can_import=installed("liger_kernel"))
    assert liger_only.names() == ["liger", "fused_adamw"]


def test_flash_attention_needs_half_precision_activations() -> None:
    everything = installed("flash_attn", "liger_kernel")
    assert not choose(cuda=True, precision="fp32", can_import=everything).flash_attention
    assert choose(cuda=True, precision="fp16", can_import=everything, disabled="").flash_attention
    # qlora: attention runs in the compute dtype, whatever the precision setting says
    assert choose(
        cuda=True, precision="fp32", quantized_compute_dtype="bfloat16", can_import=everything
    ).flash_attention
    assert not choose(
        cuda=True, precision="bf16", quantized_compute_dtype="float32", can_import=everything
    ).flash_attention


def test_fast_paths_can_be_turned_off_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    everything = installed("flash_attn", "liger_kernel")
    monkeypatch.setenv("KUBETUNE_DISABLE_FAST_PATHS", "liger, flash_attention")
    assert choose(cuda=True, precision="bf16", can_import=everything).names() == ["fused_adamw"]
    assert choose(cuda=True, precision="bf16", can_import=everything, disabled="").liger


def test_a_broken_install_counts_as_not_installed() -> None:
    from kubetune_trainer.fastpaths import importable

    assert importable("json")
    assert not importable("kubetune_no_such_module")


def test_rows_per_device_step_keeps_rows_per_optimizer_step_within_the_memory_budget() -> None:
    # the defaults on the benchmark data: 443-token rows, budget 4 × 2048 → all 4 rows
    assert rows_per_device_step(443, batch_size=4, max_seq_length=2048, accumulation=4) == 4
    # only divisors of the accumulation: rows per optimizer step stay the same
    assert rows_per_device_step(443, batch_size=4, max_seq_length=2048, accumulation=6) == 6
    assert rows_per_device_step(443, batch_size=4, max_seq_length=2048, accumulation=7) == 7
    assert rows_per_device_step(2000, batch_size=4, max_seq_length=2048, accumulation=7) == 1
    # rows that fill max_seq_length: the budget allows batch_size of them
    assert rows_per_device_step(2048, batch_size=4, max_seq_length=2048, accumulation=8) == 4
    assert rows_per_device_step(2048, batch_size=1, max_seq_length=2048, accumulation=8) == 1
    assert rows_per_device_step(2048, batch_size=2, max_seq_length=2048, accumulation=1) == 1
    # several rows hold one batch (short maxSeqLength): they are the step's base
    tiny = {"batch_size": 8, "max_seq_length": 128, "rows_per_batch": 3}
    assert rows_per_device_step(94, accumulation=1, **tiny) == 3
    assert rows_per_device_step(94, accumulation=4, **tiny) == 6  # 2 micro-batches merged
    # base rows over the budget (long examples) stay whole: no merging
    assert rows_per_device_step(128, accumulation=2, **{**tiny, "batch_size": 2}) == 3


def test_training_arguments_shrink_accumulation_by_the_rows_per_step() -> None:
    pytest.importorskip("transformers")
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.train import _training_arguments

    config = TrainerConfig.model_validate(
        {"model": {"source": "/m"}, "dataset": {"sources": ["/d"]}, "output": {"uri": "/o"}}
    )
    args = _training_arguments(config, Path("/tmp/unused"), "fp32", False, rows_per_step=2)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    unpacked = config.model_copy(
        update={"dataset": config.dataset.model_copy(update={"packing": False})}
    )
    args = _training_arguments(unpacked, Path("/tmp/unused"), "fp32", False, rows_per_step=2)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    # 3 rows hold a batch, 2 micro-batches merged: accumulation 4 → 2 steps of 6 rows
    args = _training_arguments(
        config, Path("/tmp/unused"), "fp32", False, rows_per_step=6, rows_per_batch=3
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (6, 2)


def test_the_startup_clock_splits_the_time_to_the_first_step() -> None:
    state = ProgressState()
    clock = StartupClock(state, started=time.time() - 2.0)
    clock.lap("model_fetch")
    clock.lap("model_build")
    clock.first_step()
    clock.first_step()  # later steps change nothing
    first = state.time_to_first_step
    assert list(first) == ["model_fetch", "model_build", "first_step", "total"]
    assert first["model_fetch"] >= 2.0
    assert first["total"] == pytest.approx(
        sum(v for k, v in first.items() if k != "total"), abs=0.01
    )
    assert state.as_json()["time_to_first_step"] == first


def test_process_start_time_is_in_the_past() -> None:
    assert time.time() - 24 * 3600 < process_start_time() <= time.time()
