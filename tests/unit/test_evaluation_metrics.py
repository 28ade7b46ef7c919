"""Evaluation's pure half: task metrics, base vs tuned comparison, the gate, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.config import GateConfig
from kubetune_trainer.evaluation import (
    compare,
    evaluate_gate,
    exact_match,
    headline,
    summary,
    task_scores,
    token_f1,
    write_files,
)
from kubetune_trainer.progress import MetricsExporter, ProgressState


def test_exact_match_and_token_f1_follow_squad_normalisation() -> None:
    assert exact_match("The Blue.", "blue") == 1.0
    assert exact_match("blue sky", "blue") == 0.0
    assert token_f1("blue sky", "blue") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("", "") == 1.0
    assert token_f1("red", "") == 0.0
    assert token_f1("green apple", "red stone") == 0.0


def test_task_scores_use_the_reference_libraries() -> None:
    predictions = ["the cat sat on the mat", "hello world", "nothing alike"]
    references = ["the cat sat on the mat", "hello there world", "completely different"]
    scores = task_scores(predictions, references, ["exactMatch", "tokenF1", "rougeL", "bleu"])
    assert scores["exactMatch"] == pytest.approx(1 / 3)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    )
    assert scores["rougeL"] == pytest.approx(expected / 3)
    import sacrebleu

    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert 0 < scores["tokenF1"] < 1
    # Only the metrics asked for are computed.
    assert set(task_scores(predictions, references, ["tokenF1"])) == {"tokenF1"}
    assert task_scores([], [], ["exactMatch"]) == {}


def test_compare_gives_deltas_in_report_order() -> None:
    results = compare(
        {"evalLoss": 2.0, "exactMatch": 0.0, "retentionLoss": 1.0},
        {"evalLoss": 1.5, "exactMatch": 0.75, "retentionLoss": 1.25, "rougeL": 0.5},
    )
    assert list(results) == ["evalLoss", "retentionLoss", "exactMatch", "rougeL"]
    assert results["evalLoss"] == {"base": 2.0, "tuned": 1.5, "delta": -0.5}
    assert results["rougeL"] == {"base": None, "tuned": 0.5, "delta": None}


RESULTS = compare(
    {"evalLoss": 2.0, "exactMatch": 0.1, "retentionLoss": 1.0},
    {"evalLoss": 1.9, "exactMatch": 0.6, "retentionLoss": 1.3},
)


@pytest.mark.parametrize(
    ("gate", "passed", "in_message"),
    [
        (GateConfig(metric="exactMatch", threshold=0.5), True, "exactMatch 0.6 >= 0.5"),
        (GateConfig(metric="exactMatch", threshold=0.7), False, "FAILED: exactMatch 0.6 >= 0.7"),
        (GateConfig(metric="exactMatch", min_improvement=0.4), True, "rise 0.5 >= 0.4"),
        (GateConfig(metric="evalLoss", min_improvement=0.05), True, "drop 0.1 >= 0.05"),
        (GateConfig(metric="evalLoss", min_improvement=0.2), False, "FAILED: evalLoss 2 -> 1.9"),
        (GateConfig(metric="evalLoss", threshold=1.95), True, "evalLoss 1.9 <= 1.95"),
        (GateConfig(metric="evalLoss", threshold=1.5), False, "FAILED: evalLoss 1.9 <= 1.5"),
        (
            GateConfig(metric="exactMatch", threshold=0.5, max_retention_loss_increase=0.2),
            False,
            "FAILED: retentionLoss 1 -> 1.3: increase 0.3 <= 0.2",
        ),
        (
            GateConfig(metric="exactMatch", threshold=0.5, max_retention_loss_increase=0.5),
            True,
            "ok: retentionLoss",
        ),
        # Not measured: never passes silently.
        (GateConfig(metric="rougeL", threshold=0.1), False, "rougeL was not measured"),
        (GateConfig(metric="testLoss", min_improvement=0.1), False, "not measured"),
        (GateConfig(metric="exactMatch"), False, "sets no condition"),
    ],
)
def test_gate(gate: GateConfig, passed: bool, in_message: str) -> None:
    outcome = evaluate_gate(gate, RESULTS)
    assert outcome.passed is passed
    assert in_message in outcome.message
    assert outcome.message.startswith("gate passed" if passed else "gate failed")


def test_retention_limit_without_retention_data_fails() -> None:
    gate = GateConfig(metric="evalLoss", threshold=5.0, max_retention_loss_increase=0.1)
    outcome = evaluate_gate(gate, compare({"evalLoss": 2.0}, {"evalLoss": 1.0}))
    assert not outcome.passed
    assert "retentionLoss not measured" in outcome.message


def test_headline_prefers_the_gate_metric_then_task_metrics() -> None:
    gate = GateConfig(metric="evalLoss", threshold=3.0)
    assert headline(RESULTS, gate) == "evalLoss 2->1.9 (-0.1)"
    assert headline(RESULTS, None) == "exactMatch 0.1->0.6 (+0.5)"
    assert headline(compare({}, {"evalLoss": 1.25}), None) == "evalLoss 1.25"
    assert headline({}, None) == ""


def test_summary_and_files(tmp_path: Path) -> None:
    gate = GateConfig(metric="exactMatch", threshold=0.7)
    outcome = evaluate_gate(gate, RESULTS)
    report = summary(RESULTS, outcome, gate, samples=16)
    assert report["gate"]["passed"] is False and report["gate"]["metric"] == "exactMatch"
    assert report["samples"] == 16
    assert len(json.dumps(report)) < 1500  # it travels in the 4 KiB termination message
    names = write_files(tmp_path, report, [{"prompt": "p", "reference": "r", "tuned": "r"}])
    assert names == ["eval.json", "samples.jsonl"]
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == RESULTS
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["reference"] for line in lines] == ["r"]


def test_trainer_metrics_carry_the_evaluation() -> None:
    state = ProgressState()
    exporter = MetricsExporter(state)
    assert b"kubetune_trainer_evaluation{" not in exporter.render()  # nothing before it ran
    gate = GateConfig(metric="exactMatch", threshold=0.5)
    state.evaluation = summary(RESULTS, evaluate_gate(gate, RESULTS), gate, samples=4)
    text = exporter.render().decode()
    assert 'kubetune_trainer_evaluation{metric="exactMatch",model="tuned"} 0.6' in text
    assert 'kubetune_trainer_evaluation{metric="evalLoss",model="base"} 2.0' in text
    assert 'kubetune_trainer_evaluation_gate_passed{metric="exactMatch"} 1.0' in text


def _rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(json.dumps({"instruction": i, "input": "", "output": o}) + "\n" for i, o in rows)
    )
    return path


def test_test_split_is_leak_free(tmp_path: Path) -> None:
    from kubetune_trainer.config import DatasetConfig, EvaluationConfig
    from kubetune_trainer.data import prepare
    from kubetune_trainer.evaluation import load_retention, load_test, split_test

    train_file = _rows(tmp_path / "train.jsonl", [(f"q{i}", f"a{i}") for i in range(40)])
    dataset = DatasetConfig(sources=[str(train_file)], format="alpaca", validation_ratio=0.1)
    prepared = prepare([train_file], dataset, seed=1)
    # A percentage comes out of the training examples: disjoint, deterministic.
    train, test = split_test(prepared.train, 0.1, seed=1)
    assert len(test) == 4 and len(train) == len(prepared.train) - 4
    assert not set(test) & set(train) and not set(test) & set(prepared.validation)
    assert split_test(prepared.train, 0.1, seed=1) == (train, test)
    assert split_test(prepared.train, 0.0, seed=1) == (prepared.train, [])
    # Test files lose what training or validation already hold (and their duplicates).
    test_file = _rows(tmp_path / "test.jsonl", [("q0", "a0"), ("new", "x"), ("new", "x")])
    test, records, leaked = load_test([test_file], dataset, prepared.train, prepared.validation)
    assert [example.messages[-1][1] for example in test] == ["x"]
    assert leaked == 1 and records[0]["split"] == "test"
    # Retention data: any format, detected per file.
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"text": "plain text the base model knows"}) + "\n")
    retention, records = load_retention([general], dataset)
    assert [example.text for example in retention] == ["plain text the base model knows"]
    assert records[0]["format"] == "text"
    assert EvaluationConfig().metrics == []  # losses only unless asked
