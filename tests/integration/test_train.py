"""Real training on a tiny model: LoRA, QLoRA, DoRA and full; artifacts; resume; SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from harness.network import free_port
from trainer_helpers import (
    fetch_text,
    mean_response_loss,
    read_rows,
    run_trainer_process,
    tiny_config,
    wait_for,
)

from kubetune_trainer.artifact import sha256_file
from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import execute
from kubetune_trainer.storage import open_store

pytestmark = pytest.mark.integration


def _load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _assert_adapter_improves(model_dir: Path, adapter_dir: Path, data: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    rows = read_rows(data, 24)
    base_loss = mean_response_loss(_load_base(model_dir), tokenizer, rows)
    tuned = PeftModel.from_pretrained(_load_base(model_dir), str(adapter_dir))
    tuned_loss = mean_response_loss(tuned, tokenizer, rows)
    assert tuned_loss < base_loss - 0.1, (base_loss, tuned_loss)


def _assert_manifest_matches_files(artifact: Path) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["files"], "manifest lists no files"
    for name, entry in manifest["files"].items():
        assert sha256_file(artifact / name) == entry["sha256"], name
    return manifest


def test_lora_adapter_loads_with_stock_peft_and_learns(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    config = tiny_config(tiny_model, tiny_dataset, str(output), reporting={"loss_plot": True})
    assert execute(config) == ExitCode.OK

    adapter = output / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loss.png"):
        assert (adapter / name).is_file(), name
    manifest = _assert_manifest_matches_files(adapter)
    assert manifest["base_model"]["source"] == str(tiny_model)
    assert manifest["datasets"][0]["sha256"] == sha256_file(tiny_dataset)
    assert manifest["method"]["type"] == "lora"
    assert manifest["metrics"]["train_loss"] < manifest["metrics"]["first_train_loss"]
    assert manifest["stats"]["duplicates_removed"] > 0
    _assert_adapter_improves(tiny_model, adapter, tiny_dataset)


def test_qlora_4bit_writes_adapter_to_s3(
    tiny_model: Path, tiny_dataset: Path, seaweedfs, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    bucket = seaweedfs.create_bucket()
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        f"s3://{bucket}/jobs/qlora",
        method={"type": "qlora", "quantization": {"bits": 4, "quant_type": "nf4"}},
        output={"endpoint_url": seaweedfs.endpoint_url},
        training={"max_steps": 20},
    )
    assert execute(config) == ExitCode.OK

    store = open_store(f"s3://{bucket}/jobs/qlora", endpoint_url=seaweedfs.endpoint_url)
    local = tmp_path / "adapter"
    store.download_prefix("adapter/", local)
    manifest = _assert_manifest_matches_files(local)
    assert manifest["method"]["quantization"]["quant_type"] == "nf4"
    _assert_adapter_improves(tiny_model, local, tiny_dataset)


@pytest.mark.parametrize(
    "method",
    [
        {"type": "qlora", "quantization": {"bits": 8}},
        {"type": "qlora", "quantization": {"bits": 4, "quant_type": "fp4", "double_quant": False}},
        {"type": "dora"},
    ],
    ids=["qlora-8bit", "qlora-fp4", "dora"],
)
def test_other_peft_methods_train(
    method: dict, tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_model, tiny_dataset, str(tmp_path), method=method, training={"max_steps": 6}
    )
    assert execute(config) == ExitCode.OK
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is (method["type"] == "dora")
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["train_loss"] < manifest["metrics"]["first_train_loss"]


def test_full_fine_tuning_writes_a_loadable_model(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(tmp_path),
        method={"type": "full"},
        training={"max_steps": 4, "learning_rate": 1e-3},
    )
    assert execute(config) == ExitCode.OK
    # The summary names what it wrote where it wrote it (<uri>/model, as the docs say).
    assert f"  model        {(tmp_path / 'model').as_uri()}" in capsys.readouterr().out
    assert not (tmp_path / "adapter").exists()
    model = _load_base(tmp_path / "model")
    base = _load_base(tiny_model)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert changed


def test_merged_export_loads_as_a_plain_model(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(tmp_path),
        training={"max_steps": 4},
        output={"merge_adapter": True},
    )
    assert execute(config) == ExitCode.OK
    merged = _load_base(tmp_path / "adapter" / "merged")
    assert merged.config.model_type == "llama"
    from transformers import AutoTokenizer  # a complete model: its tokenizer beside it

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "adapter" / "merged"))
    assert tokenizer.chat_template and tokenizer("hello")["input_ids"]


# --------------------------------------------------------------------------- resume, SIGTERM


def test_killed_run_resumes_from_newest_complete_checkpoint(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(output),
        training={"max_steps": 40, "checkpoint_every_steps": 4},
    )
    markers = output / "checkpoints"
    process = run_trainer_process(config)
    try:
        wait_for(lambda: list(markers.glob("step-*/COMPLETE")), 120, "a complete checkpoint")
        process.kill()  # SIGKILL: no chance to clean up
    finally:
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    assert not (output / "adapter" / "manifest.json").exists()
    completed = sorted(int(p.parent.name.split("-")[1]) for p in markers.glob("step-*/COMPLETE"))

    assert execute(config) == ExitCode.OK
    manifest = json.loads((output / "adapter" / "manifest.json").read_text())
    assert manifest["resumed_from_step"] >= completed[-1] >= 4
    assert manifest["metrics"]["steps"] == 40


def test_sigterm_checkpoints_and_exits_preempted(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    port = free_port()
    output = tmp_path / "out"
    termination = tmp_path / "termination-log"
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(output),
        training={"max_steps": 400},
        reporting={"progress_port": port},
    )
    process = run_trainer_process(
        config, env={"POD_IP": "127.0.0.1", "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination)}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        progress = wait_for(
            lambda: (
                (p := fetch_text(f"{base}/progress"))
                and json.loads(p)["step"] >= 3
                and json.loads(p)
            ),
            120,
            "three training steps",
        )
        assert progress["total_steps"] == 400 and progress["phase"] == "training"
        metrics = fetch_text(f"{base}/metrics") or ""
        assert "kubetune_trainer_step " in metrics and "kubetune_trainer_train_loss " in metrics
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == ExitCode.PREEMPTED
    result = json.loads(termination.read_text())
    assert result["error"]["reason"] == "Preempted" and result["error"]["retryable"] is True
    steps = [int(p.parent.name.split("-")[1]) for p in output.glob("checkpoints/step-*/COMPLETE")]
    assert steps and max(steps) >= 3
    assert not (output / "adapter").exists()


def test_model_and_data_from_s3(
    tiny_model: Path, tiny_dataset: Path, seaweedfs, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    bucket = seaweedfs.create_bucket()
    store = open_store(f"s3://{bucket}", endpoint_url=seaweedfs.endpoint_url)
    store.upload_dir(tiny_model, "models/tiny")
    store.upload_file(tiny_dataset, "data/train.jsonl")
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        f"s3://{bucket}/out",
        model={"source": f"s3://{bucket}/models/tiny"},
        dataset={"sources": [f"s3://{bucket}/data/train.jsonl"]},
        output={"endpoint_url": seaweedfs.endpoint_url},
        training={"max_steps": 2},
    )
    assert execute(config) == ExitCode.OK
    manifest = json.loads(store.get_bytes("out/adapter/manifest.json"))
    assert manifest["datasets"][0]["source"] == f"s3://{bucket}/data/train.jsonl"
    assert manifest["datasets"][0]["sha256"] == sha256_file(tiny_dataset)


def test_kubetune_train_runs_a_manifest_locally(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    from kubetune_operator import kubeyaml
    from kubetune_operator.cli import main

    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "cli-job"},
        "spec": {
            "model": {"source": str(tiny_model)},
            "dataset": {"sources": [str(tiny_dataset)], "maxSeqLength": 128},
            "training": {"maxSteps": 4, "learningRate": "3e-3"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(kubeyaml.dump(manifest))
    assert main(["train", "-f", str(path), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"file://{tmp_path / 'out' / 'adapter'}" in out
    assert (tmp_path / "out" / "adapter" / "manifest.json").is_file()


def test_kubetune_train_refuses_several_nodes_with_the_field_and_the_fix(
    tmp_path: Path, capsys
) -> None:
    import yaml

    from kubetune_operator.cli import main

    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "cli-job"},
        "spec": {
            "model": {"source": "/nowhere"},
            "dataset": {"sources": ["/nowhere.jsonl"]},
            "resources": {"nodes": 2, "gpus": 0},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["train", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.resources.nodes is 2" in err and "set spec.resources.nodes to 1" in err


def test_early_stopping_ends_training_before_max_steps(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(tmp_path),
        training={
            "max_steps": 60,
            "eval_every_steps": 2,
            # an improvement of 100 nats is impossible: every evaluation after the first
            # counts as "no improvement", so patience 2 stops at the third evaluation
            "early_stopping": {"patience": 2, "min_delta": 100.0},
        },
    )
    assert execute(config) == ExitCode.OK
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 6


def test_gradient_checkpointing_trains(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        str(tmp_path),
        training={"max_steps": 6, "gradient_checkpointing": True},
    )
    assert execute(config) == ExitCode.OK
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["metrics"]["train_loss"] < manifest["metrics"]["first_train_loss"]
