"""Real multi-process training on CPU: torchrun, gloo, two ranks of one thread each.

DDP with LoRA matches a single process at the same global batch; only rank 0 writes;
SIGTERM stops every rank at the same step with a checkpoint; a failing rank fails the
attempt with its exit code in the termination message and the next attempt resumes;
FSDP full fine-tuning runs and refuses to resume on another world size.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness.network import free_port
from trainer_helpers import fetch_text, mean_response_loss, read_rows, tiny_config, wait_for

from kubetune_trainer.config import OutputConfig, TrainerConfig
from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import execute, launch_local

pytestmark = pytest.mark.integration

# Loss after 6 optimizer steps, 2 ranks x accumulation 1 vs 1 process x accumulation 2:
# the same packed sequences in each step, the loss normalised by the same global count
# of label tokens. Measured on CPU/gloo: the logged train losses and the final adapters'
# losses were bit-identical (difference 0.0). What could differ is float rounding: DDP's
# all_reduce adds the two ranks' partial gradient sums, one process adds the sequences
# in turn. 1e-4 allows that rounding amplified over a few Adam steps, and still catches a
# real difference (a wrong loss normalisation or data split moves the loss by >1e-2).
# Not compared: eval_loss. The Trainer's distributed evaluation normalises each eval
# step by the label tokens of all ranks (a token-weighted mean), one process by each
# sequence's own tokens: 5.9098 vs 5.8741 here, from identical weights.
LOSS_TOLERANCE = 1e-4


def _torchrun(
    config: TrainerConfig, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Two ranks under torchrun, as the pod's command runs them (``--module``)."""
    config_file = tmp_path / f"config-{time.monotonic_ns()}.json"
    config_file.write_text(config.model_dump_json())
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "KUBETUNE_CONFIG_FILE": str(config_file),
        **(env or {}),
    }
    full_env.pop("KUBETUNE_CONFIG", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "--module", "kubetune_trainer"]
    return subprocess.Popen(
        command,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _progress(port: int) -> dict[str, Any] | None:
    text = fetch_text(f"http://127.0.0.1:{port}/progress")
    return json.loads(text) if text else None


def _complete_steps(output: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in output.glob("checkpoints/*/COMPLETE"))


def _finish(process: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return out


def test_ddp_matches_one_process_at_the_same_global_batch(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    training = {"max_steps": 6, "batch_size": 8, "checkpoint_every_steps": 3}
    single = tiny_config(
        tiny_model,
        tiny_dataset,
        str(tmp_path / "one"),
        training={**training, "gradient_accumulation_steps": 2},
    )
    assert execute(single) == ExitCode.OK
    capfd.readouterr()

    output = tmp_path / "two"
    ddp = tiny_config(tiny_model, tiny_dataset, str(output), training=training)
    os.environ["OMP_NUM_THREADS"] = "1"  # launch_local keeps a caller's setting
    try:
        assert launch_local(ddp, 2) == ExitCode.OK
    finally:
        del os.environ["OMP_NUM_THREADS"]
    out = capfd.readouterr().out
    assert "processes    2 (ddp), global batch 16 (batch size × accumulation × processes)" in out
    assert out.count("✓ fine-tuned") == 1  # rank 0 alone prints the summary

    one = json.loads((tmp_path / "one" / "adapter" / "manifest.json").read_text())
    two = json.loads((output / "adapter" / "manifest.json").read_text())
    assert two["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch_size": 16}
    assert one["distributed"]["global_batch_size"] == 16
    assert two["metrics"]["steps"] == one["metrics"]["steps"] == 6
    for key in ("first_train_loss", "train_loss"):
        assert abs(two["metrics"][key] - one["metrics"][key]) < LOSS_TOLERANCE, key

    # Only rank 0 wrote: one artifact, each checkpoint once (rank 1's own RNG file, which
    # the Trainer writes into rank 1's local directory, never reached the store).
    assert sorted(p.name for p in output.iterdir()) == ["adapter", "checkpoints"]
    assert _complete_steps(output) == [3, 6]
    for checkpoint in output.glob("checkpoints/*"):
        names = {p.name for p in checkpoint.iterdir()}
        assert "rng_state_0.pth" in names and "rng_state_1.pth" not in names
        assert json.loads((checkpoint / "kubetune.json").read_text())["world_size"] == 2

    # A stock PEFT load of the adapter, equal to the one-process adapter.
    tokenizer = AutoTokenizer.from_pretrained(str(output / "adapter"))
    rows = read_rows(tiny_dataset, 16)
    losses = []
    for adapter in (tmp_path / "one" / "adapter", output / "adapter"):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        losses.append(
            mean_response_loss(PeftModel.from_pretrained(base, str(adapter)), tokenizer, rows)
        )
    assert abs(losses[0] - losses[1]) < LOSS_TOLERANCE, losses


def test_sigterm_stops_all_ranks_at_one_step_with_a_checkpoint(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    port = free_port()
    output = tmp_path / "out"
    termination = tmp_path / "termination-log"
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(output),
        training={"max_steps": 400, "gradient_accumulation_steps": 2},
        reporting={"progress_port": port},
    )
    process = _torchrun(
        config,
        tmp_path,
        env={"POD_IP": "127.0.0.1", "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)},
    )
    try:
        progress = wait_for(
            lambda: (p := _progress(port)) and p["step"] >= 3 and p, 120, "three steps"
        )
        assert progress["world_size"] == 2 and progress["strategy"] == "ddp"
        assert progress["global_batch_size"] == 8 * 2 * 2
        os.kill(process.pid, signal.SIGTERM)  # what the kubelet does to the container
        out = _finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0, out
    result = json.loads(termination.read_text())
    assert result["error"]["exitCode"] == ExitCode.PREEMPTED, out
    assert result["error"]["reason"] == "Preempted"
    steps = _complete_steps(output)
    assert steps and steps[-1] >= 3, out
    assert out.count("Preempted: stopped by SIGTERM at step") == 2, out  # both ranks, one step
    assert f"at step {steps[-1]};" in out
    assert not (output / "adapter").exists()


_FAIL_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    from kubetune_trainer import packing
    from kubetune_trainer.errors import StorageUnavailable

    original = packing.CountingCollator.__call__
    calls = [0]

    def failing(self, features):
        calls[0] += 1
        if calls[0] > 5:
            raise StorageUnavailable("injected failure of rank 1")
        return original(self, features)

    packing.CountingCollator.__call__ = failing
"""


def test_failing_rank_fails_all_with_its_exit_code_and_the_rerun_resumes(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    termination = tmp_path / "termination-log"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAIL_RANK_1)
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(output),
        training={"max_steps": 12, "checkpoint_every_steps": 2},
    )
    process = _torchrun(
        config,
        tmp_path,
        env={"PYTHONPATH": str(hook), "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)},
    )
    out = _finish(process)
    assert process.returncode == 1, out  # torchrun's code for "a worker failed"
    error = json.loads(termination.read_text())["error"]
    # Rank 1 failed first and wrote its cause; rank 0 (torn down by torchrun) did not
    # overwrite it.
    assert error["exitCode"] == ExitCode.STORAGE_UNAVAILABLE, out
    assert "injected failure of rank 1" in error["message"]
    assert _complete_steps(output) == [2, 4], out  # rank 1 failed in step 6
    assert not (output / "adapter").exists()
    single = Path(shutil.copytree(output, tmp_path / "single"))  # for one process, below

    # The next attempt (all ranks) resumes from the newest complete checkpoint.
    termination.unlink()
    rerun = _torchrun(config, tmp_path, env={"KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)})
    out = _finish(rerun)
    assert rerun.returncode == 0, out
    manifest = json.loads((output / "adapter" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 4 and manifest["metrics"]["steps"] == 12
    assert json.loads(termination.read_text())["artifact"]["uri"].endswith("/adapter")

    # Replicated (DDP) checkpoints also resume on another world size: one process.
    assert execute(config.model_copy(update={"output": OutputConfig(uri=str(single))})) == 0
    manifest = json.loads((single / "adapter" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 4 and manifest["distributed"]["world_size"] == 1
    assert manifest["metrics"]["steps"] == 12


def test_fsdp_full_fine_tune_resumes_on_the_same_world_size_only(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    output = tmp_path / "out"

    def config(out_dir: Path) -> TrainerConfig:
        return tiny_config(
            tiny_model,
            tiny_dataset,
            str(out_dir),
            method={"type": "full"},
            training={"max_steps": 8, "learning_rate": 1e-3, "checkpoint_every_steps": 2},
            distributed={"fsdp": {"sharding": "hybrid", "activation_checkpointing": True}},
        )

    # The first attempt fails in step 6 (rank 1), after checkpoints at steps 2 and 4.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAIL_RANK_1)
    first = _torchrun(config(output), tmp_path, env={"PYTHONPATH": str(hook)})
    out = _finish(first)
    assert first.returncode == 1, out
    assert _complete_steps(output) == [2, 4], out
    assert json.loads((output / "checkpoints/step-00000004/kubetune.json").read_text()) == {
        "world_size": 2,
        "strategy": "fsdp",
        "global_batch_size": 16,
    }
    single = Path(shutil.copytree(output, tmp_path / "single"))  # for one process, below

    second = _torchrun(config(output), tmp_path)
    out = _finish(second)
    assert second.returncode == 0, out
    assert "processes    2 (fsdp)" in out
    manifest = json.loads((output / "model" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 4 and manifest["metrics"]["steps"] == 8
    tuned = AutoModelForCausalLM.from_pretrained(str(output / "model"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(tuned.state_dict().values(), base.state_dict().values(), strict=True)
    )

    # One process cannot resume a 2-rank FSDP checkpoint: refused, not retried.
    assert execute(config(single)) == ExitCode.UNSUPPORTED
    err = capsys.readouterr().err
    assert "spec.resources.nodes" in err and "world size of 2" in err


def test_kubetune_train_runs_qlora_under_ddp_with_processes_per_node(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubetune train` launches torchrun for a world size above 1; QLoRA under DDP: each
    rank loads its own 4-bit copy (bitsandbytes NF4 runs on CPU)."""
    import yaml

    from kubetune_operator.cli import main

    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "qlora-ddp"},
        "spec": {
            "model": {"source": str(tiny_model)},
            "dataset": {"sources": [str(tiny_dataset)], "maxSeqLength": 128},
            "method": {"type": "qlora", "quantization": {"computeDtype": "float32"}},
            "training": {"maxSteps": 3, "batchSize": 4, "gradientAccumulationSteps": 1},
            "resources": {"gpus": 0},
            "distributed": {"processesPerNode": 2},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["train", "-f", str(path), "-o", str(tmp_path / "out")]) == 0
    manifest_json = json.loads((tmp_path / "out" / "adapter" / "manifest.json").read_text())
    assert manifest_json["distributed"]["world_size"] == 2
    assert manifest_json["distributed"]["strategy"] == "ddp"
