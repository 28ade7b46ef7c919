"""``kubetune plan -f``: the data report (with the trainer's own data preparation and
the tiny model's tokenizer) and the memory estimate with its verdict and exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune_operator.cli import main
from kubetune_operator.memory import ARCHITECTURE_ANNOTATION, Architecture

pytestmark = pytest.mark.unit


def _row(i: int, output: str | None = None) -> str:
    return json.dumps(
        {"instruction": f"Repeat the words number {i}", "output": output or f"words {i}"}
    )


def _manifest(tmp_path: Path, model: Path | str, *, resources: str, extra: str = "") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: planned}}
spec:
  model: {{source: {model}}}
  dataset:
    sources: [./train.jsonl]
    maxSeqLength: 64
{extra}
  training: {{batchSize: 2, gradientAccumulationSteps: 2}}
  resources: {resources}
"""
    )
    return job


def test_plan_lists_every_data_problem_with_its_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [_row(1), "{not json", _row(2), json.dumps({"instruction": "no output"}), _row(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    job = _manifest(tmp_path, tiny_model, resources="{gpus: 1}")
    assert main(["plan", "-f", str(job)]) == 1
    out = capsys.readouterr().out
    assert "train.jsonl (train): 4 rows" in out  # the unreadable line is not a row
    assert "2 problem(s)" in out
    assert "line 2 of train.jsonl is not valid JSON" in out
    assert re.search(r"field 'output' missing or empty \(lines? 4\b", out)


def test_plan_reports_duplicates_overlap_truncation_packing_and_steps(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [_row(i) for i in range(40)] + [_row(0), _row(1)]  # two duplicates
    rows.append(_row(99, output=" ".join(["long"] * 200)))  # longer than maxSeqLength 64
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join([_row(5), _row(200)]) + "\n")
    extra = "    validation: {sources: [./validation.jsonl]}"
    job = _manifest(tmp_path, tiny_model, resources="{gpus: 1, gpuMemory: 80Gi}", extra=extra)
    assert main(["plan", "-f", str(job), "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    stats = report["data"]["stats"]
    assert stats["duplicates_removed"] == 2
    assert stats["leakage_removed"] == 1  # validation's row 5 is also a training row
    assert stats["train_examples"] == 41 and stats["validation_examples"] == 1
    assert stats["truncated_examples"] == 1
    assert stats["max_tokens"] > 64 >= stats["p95_tokens"]
    assert 0 < stats["packing_efficiency"] <= 1
    # 41 examples, 2 × 2 per optimizer step (packed: about as many) → about 10 steps
    assert 8 <= stats["steps_per_epoch"] <= 12
    assert any("fewer than 20" in w for w in report["data"]["warnings"])
    assert report["verdict"]["result"] == "fits"
    assert report["architecture"]["hiddenSize"] == 128


def test_plan_exit_code_when_the_job_does_not_fit_and_annotate(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "train.jsonl").write_text(_row(1) + "\n")
    job = _manifest(tmp_path, tiny_model, resources="{gpus: 1, gpuMemory: 512Mi}")
    # the CUDA context alone (1 GiB) does not fit 512 MiB
    assert main(["plan", "-f", str(job), "--no-data"]) == 1
    out = capsys.readouterr().out
    assert "base weights" in out and "activations" in out and "logits + loss" in out
    assert "✗ does not fit" in out and "try: training.gradientCheckpointing: true" in out
    assert "train.jsonl" not in out  # --no-data
    assert main(["plan", "-f", str(job), "--no-data", "--gpu-memory", "8Gi", "--annotate"]) == 0
    captured = capsys.readouterr()
    annotated = yaml.safe_load(captured.out)
    text = annotated["metadata"]["annotations"][ARCHITECTURE_ANNOTATION]
    assert Architecture.from_json(text).numLayers == 2
    assert "✓ fits" in captured.err


def test_plan_names_a_model_without_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text(_row(1) + "\n")
    job = _manifest(tmp_path, tmp_path / "model", resources="{gpus: 1}")
    assert main(["plan", "-f", str(job)]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_plan_reads_only_config_and_tokenizer_from_the_hub(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    asked: list[tuple[str, str, str | None]] = []

    def download(
        repo_id: str, filename: str, *, revision: str | None, token: object, local_dir: Path
    ) -> str:
        asked.append((repo_id, filename, revision))
        if not (tiny_model / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return shutil.copy(tiny_model / filename, Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    (tmp_path / "train.jsonl").write_text("\n".join(_row(i) for i in range(30)) + "\n")
    job = _manifest(tmp_path, "hf://org/tiny", resources="{gpus: 1, gpuMemory: 80Gi}")
    job.write_text(
        job.read_text().replace("source: hf://org/tiny}", "source: hf://org/tiny, revision: abc}")
    )
    assert main(["plan", "-f", str(job), "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"]["numLayers"] == 2
    assert report["data"]["stats"]["p50_tokens"] > 0  # the hub's tokenizer was used
    files = {name for _, name, _ in asked}
    assert "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith(".safetensors") for name in files)  # never the weights
    assert {(repo, revision) for repo, _, revision in asked} == {("org/tiny", "abc")}


def test_validate_refuses_what_the_operator_would_refuse_for_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arch = Architecture(
        hiddenSize=4096,
        numLayers=32,
        numHeads=32,
        numKvHeads=8,
        intermediateSize=14336,
        vocabSize=128256,
    )

    def manifest(annotation: str, gpu_memory: str) -> Path:
        body = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "big", "annotations": {ARCHITECTURE_ANNOTATION: annotation}},
            "spec": {
                "model": {"source": "hf://org/model"},
                "dataset": {"sources": ["s3://d/train.jsonl"], "maxSeqLength": 2048},
                "output": {"uri": "s3://o/big"},
                "resources": {"gpus": 1, "gpuMemory": gpu_memory},
            },
        }
        path = tmp_path / "big.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    assert main(["validate", "-f", str(manifest(arch.to_json(), "24Gi"))]) == 1
    err = capsys.readouterr().err
    assert "spec.resources.gpuMemory: the job needs about" in err
    assert "InsufficientGpuMemory" in err
    assert main(["validate", "-f", str(manifest(arch.to_json(), "141Gi"))]) == 0
    assert main(["validate", "-f", str(manifest('{"hiddenSize": "x"}', "141Gi"))]) == 1
    assert f"metadata.annotations[{ARCHITECTURE_ANNOTATION}]" in capsys.readouterr().err
