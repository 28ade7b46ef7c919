"""Every bad input ends with a clear message, a documented exit code, and nothing marked done."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from trainer_helpers import tiny_config

from kubetune_trainer.errors import ExitCode
from kubetune_trainer.main import execute

pytestmark = pytest.mark.integration


def _run(config, tmp_path: Path, monkeypatch, capsys) -> tuple[int, dict, str]:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(termination))
    code = execute(config)
    return code, json.loads(termination.read_text()), capsys.readouterr().err


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_nothing_complete(output: Path) -> None:
    assert not list(output.rglob("manifest.json"))


@pytest.fixture
def output(tmp_path: Path) -> Path:
    return tmp_path / "out"


def test_missing_model_files(tiny_dataset, tmp_path, output, monkeypatch, capsys) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    code, result, err = _run(
        tiny_config(empty, tiny_dataset, str(output)), tmp_path, monkeypatch, capsys
    )
    assert code == ExitCode.MODEL_INVALID
    assert result["error"]["reason"] == "ModelInvalid" and result["error"]["retryable"] is False
    assert "no config.json" in err and "spec.model.source" in err
    _assert_nothing_complete(output)


def test_model_without_weights(tiny_model, tiny_dataset, tmp_path, output, monkeypatch, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    for weights in partial.glob("*.safetensors"):
        weights.unlink()
    code, _, err = _run(
        tiny_config(partial, tiny_dataset, str(output)), tmp_path, monkeypatch, capsys
    )
    assert code == ExitCode.MODEL_INVALID
    assert "no weights" in err


def test_missing_model_directory(tiny_dataset, tmp_path, output, monkeypatch, capsys) -> None:
    code, result, err = _run(
        tiny_config(tmp_path / "no-such-model", tiny_dataset, str(output)),
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == ExitCode.MODEL_INVALID == 12  # as docs/exit-codes.md says
    assert result["error"]["reason"] == "ModelInvalid" and result["error"]["retryable"] is False
    assert "spec.model.source" in err and "does not exist" in err
    _assert_nothing_complete(output)


def test_empty_dataset(tiny_model, tmp_path, output, monkeypatch, capsys) -> None:
    data = _write(tmp_path / "empty.jsonl", [""])
    code, result, _ = _run(
        tiny_config(tiny_model, data, str(output)), tmp_path, monkeypatch, capsys
    )
    assert code == ExitCode.DATASET_INVALID
    assert "empty" in result["error"]["message"]
    _assert_nothing_complete(output)


def test_rows_missing_fields_are_counted_with_row_numbers(
    tiny_model, tmp_path, output, monkeypatch, capsys
) -> None:
    rows = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(6)]
    rows[1] = json.dumps({"instruction": "no answer"})
    rows[4] = json.dumps({"instruction": "no answer either"})
    data = _write(tmp_path / "rows.jsonl", rows)
    code, result, _ = _run(
        tiny_config(tiny_model, data, str(output)), tmp_path, monkeypatch, capsys
    )
    assert code == ExitCode.DATASET_INVALID
    message = result["error"]["message"]
    assert "2 of 6 rows" in message and "'output'" in message and "2, 5" in message


def test_unknown_format_lists_expected_keys(tiny_model, tmp_path, output, monkeypatch, capsys):
    data = _write(tmp_path / "odd.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    config = tiny_config(tiny_model, data, str(output), dataset={"format": "auto"})
    code, result, _ = _run(config, tmp_path, monkeypatch, capsys)
    assert code == ExitCode.DATASET_INVALID
    message = result["error"]["message"] + (result["error"]["hint"] or "")
    assert "question" in message and "instruction" in message


def test_all_examples_over_max_length(tiny_model, tmp_path, output, monkeypatch, capsys) -> None:
    long_prompt = " ".join(["word"] * 200)
    rows = [json.dumps({"instruction": f"{long_prompt} {i}", "output": "ok"}) for i in range(8)]
    data = _write(tmp_path / "long.jsonl", rows)
    config = tiny_config(tiny_model, data, str(output), dataset={"max_seq_length": 32})
    code, result, _ = _run(config, tmp_path, monkeypatch, capsys)
    assert code == ExitCode.DATASET_INVALID
    assert "maxSeqLength" in result["error"]["hint"]


def test_wrong_s3_credentials(
    tiny_model, tiny_dataset, seaweedfs, tmp_path, monkeypatch, capsys
) -> None:
    bucket = seaweedfs.create_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key-123")
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        f"s3://{bucket}/job",
        output={"endpoint_url": seaweedfs.endpoint_url},
    )
    code, result, err = _run(config, tmp_path, monkeypatch, capsys)
    assert code == ExitCode.CREDENTIALS_INVALID
    assert result["error"]["retryable"] is False
    assert "not-the-secret-key-123" not in err + json.dumps(result)


def test_unreachable_endpoint_is_retryable(
    tiny_model, tiny_dataset, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    config = tiny_config(
        tiny_model,
        tiny_dataset,
        "s3://bucket/job",
        # the discard port: nothing listens; retried for 2 s (spec.output.retryTimeoutSeconds)
        output={"endpoint_url": "http://127.0.0.1:9", "retry_timeout_seconds": 2},
    )
    code, result, _ = _run(config, tmp_path, monkeypatch, capsys)
    assert code == ExitCode.STORAGE_UNAVAILABLE
    assert result["error"]["retryable"] is True
    assert "127.0.0.1:9" in result["error"]["message"]
    assert "gave up after" in result["error"]["message"]
    assert "retryTimeoutSeconds (2 s)" in result["error"]["hint"]


def test_qlora_without_bitsandbytes(
    tiny_model, tiny_dataset, tmp_path, output, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    config = tiny_config(tiny_model, tiny_dataset, str(output), method={"type": "qlora"})
    code, result, err = _run(config, tmp_path, monkeypatch, capsys)
    assert code == ExitCode.UNSUPPORTED
    assert "bitsandbytes" in err and result["error"]["retryable"] is False
    _assert_nothing_complete(output)


def test_invalid_pod_configuration(monkeypatch, capsys, tmp_path) -> None:
    from kubetune_trainer.main import main

    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_MESSAGE_PATH", str(termination))
    monkeypatch.setenv("KUBETUNE_CONFIG", '{"model": {}}')
    assert main() == ExitCode.CONFIG_INVALID
    assert json.loads(termination.read_text())["error"]["reason"] == "ConfigInvalid"
