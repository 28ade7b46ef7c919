"""Base vs tuned evaluation, and the promotion gate.

Before training (the base model: a fresh LoRA adapter is the identity, a full fine-tune
has not changed a weight yet) and after it (the tuned model), the same measurements:

- loss (and perplexity) on the validation set, the test set and the retention set (general
  text the base model handles; its loss going up is forgetting), token-weighted over the
  tokens the model is trained to predict, as the Trainer's eval loss;
- task metrics on greedy generations of the first ``max_samples`` prompts of the test set
  (the validation set without one): exact match and token F1 as SQuAD defines them,
  ROUGE-L (``rouge-score``) and BLEU (``sacrebleu``).

The gate (:func:`evaluate_gate`, a pure function) decides from those numbers whether the
tuned model is promoted. Nothing here draws random numbers (greedy decoding, eval mode),
so evaluating before training leaves training exactly as it was; a resumed attempt
measures the base model again and gets the same numbers.

The pure half (metrics, comparison, gate, summary) imports no torch.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DatasetConfig, EvaluationConfig, FieldMapping, GateConfig

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
# Metrics where lower is better; every other metric is a score (higher is better).
LOWER_IS_BETTER = frozenset(
    {"evalLoss", "evalPerplexity", "testLoss", "testPerplexity", "retentionLoss"}
)
# The order metrics are reported in.
ORDER = (
    "evalLoss",
    "evalPerplexity",
    "testLoss",
    "testPerplexity",
    "retentionLoss",
    "exactMatch",
    "tokenF1",
    "rougeL",
    "bleu",
)
DIGITS = 6


# --------------------------------------------------------------------------- task metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal (SQuAD's exact match)."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: overlap of the normalised tokens (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def task_scores(
    predictions: list[str], references: list[str], metrics: list[str]
) -> dict[str, float]:
    """The chosen task metrics over paired predictions and references.

    exactMatch, tokenF1 and rougeL (ROUGE-L F-measure, ``rouge-score`` with stemming) are
    means over the samples in [0, 1]; bleu is ``sacrebleu``'s corpus BLEU in [0, 100]."""
    if not predictions:
        return {}
    scores: dict[str, float] = {}
    pairs = list(zip(predictions, references, strict=True))
    if "exactMatch" in metrics:
        scores["exactMatch"] = sum(exact_match(p, r) for p, r in pairs) / len(pairs)
    if "tokenF1" in metrics:
        scores["tokenF1"] = sum(token_f1(p, r) for p, r in pairs) / len(pairs)
    if "rougeL" in metrics:
        from rouge_score import rouge_scorer  # type: ignore[import-untyped]

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs)
        scores["rougeL"] = total / len(pairs)
    if "bleu" in metrics:
        import sacrebleu

        scores["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    return scores


# --------------------------------------------------------------------------- comparison


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(value, DIGITS)


def compare(base: dict[str, float], tuned: dict[str, float]) -> dict[str, dict[str, Any]]:
    """``{metric: {"base", "tuned", "delta"}}`` (delta = tuned - base), in report order;
    a metric measured on one side only has None on the other."""
    names = [m for m in ORDER if m in base or m in tuned]
    result: dict[str, dict[str, Any]] = {}
    for name in names:
        before, after = base.get(name), tuned.get(name)
        delta = after - before if before is not None and after is not None else None
        result[name] = {"base": _round(before), "tuned": _round(after), "delta": _round(delta)}
    return result


def improvement(metric: str, numbers: dict[str, Any]) -> float | None:
    """How much better tuned is than base (positive: better), for either direction."""
    delta = numbers.get("delta")
    if delta is None:
        return None
    return float(-delta if metric in LOWER_IS_BETTER else delta)


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    message: str
    checks: list[str] = field(default_factory=list)  # one line per condition, with numbers


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def evaluate_gate(gate: GateConfig, results: dict[str, dict[str, Any]]) -> GateOutcome:
    """Whether the tuned model passes ``gate``: every condition set must hold, and a
    metric that was not measured fails its condition (so a misconfigured gate never
    promotes silently)."""
    checks: list[str] = []
    failed = False
    numbers = results.get(gate.metric) or {}
    tuned = numbers.get("tuned")
    lower = gate.metric in LOWER_IS_BETTER
    if gate.threshold is not None:
        sign = "<=" if lower else ">="
        if tuned is None:
            ok, line = False, f"{gate.metric} was not measured (needs {sign} {gate.threshold:g})"
        else:
            ok = tuned <= gate.threshold if lower else tuned >= gate.threshold
            line = f"{gate.metric} {_fmt(tuned)} {sign} {gate.threshold:g}"
        failed |= not ok
        checks.append(("ok: " if ok else "FAILED: ") + line)
    if gate.min_improvement is not None:
        better = improvement(gate.metric, numbers)
        way = "drop" if lower else "rise"
        if better is None:
            ok = False
            needs = f"needs a {way} of {gate.min_improvement:g}"
            line = f"{gate.metric} base vs tuned not measured ({needs})"
        else:
            ok = better >= gate.min_improvement
            line = (
                f"{gate.metric} {_fmt(float(numbers['base']))} -> {_fmt(float(numbers['tuned']))}: "
                f"{way} {_fmt(better)} >= {gate.min_improvement:g}"
            )
        failed |= not ok
        checks.append(("ok: " if ok else "FAILED: ") + line)
    if gate.max_retention_loss_increase is not None:
        retention = results.get("retentionLoss") or {}
        grew = retention.get("delta")
        limit = gate.max_retention_loss_increase
        if grew is None:
            ok, line = False, f"retentionLoss not measured (needs an increase <= {limit:g})"
        else:
            ok = grew <= limit
            line = (
                f"retentionLoss {_fmt(retention['base'])} -> {_fmt(retention['tuned'])}: "
                f"increase {_fmt(grew)} <= {limit:g}"
            )
        failed |= not ok
        checks.append(("ok: " if ok else "FAILED: ") + line)
    if not checks:
        failed = True
        checks.append("FAILED: the gate sets no condition")
    verdict = "gate failed" if failed else "gate passed"
    return GateOutcome(passed=not failed, message=f"{verdict}: " + "; ".join(checks), checks=checks)


def headline(results: dict[str, dict[str, Any]], gate: GateConfig | None) -> str:
    """One short line for ``kubectl get -o wide``: the gate's metric (else the first task
    metric, else the first loss) base → tuned (delta)."""
    preferred: list[str] = [gate.metric] if gate is not None else []
    preferred += [m for m in ORDER if m not in LOWER_IS_BETTER] + list(ORDER)
    for name in preferred:
        numbers = results.get(name)
        if numbers and numbers.get("tuned") is not None:
            if numbers.get("base") is None:
                return f"{name} {_fmt(numbers['tuned'])}"
            return (
                f"{name} {_fmt(numbers['base'])}->{_fmt(numbers['tuned'])} "
                f"({numbers['delta']:+.4g})"
            )
    return ""


def summary(
    results: dict[str, dict[str, Any]],
    outcome: GateOutcome | None,
    gate: GateConfig | None,
    samples: int,
) -> dict[str, Any]:
    """What the termination message, the progress report and the manifest carry (small:
    the termination message holds 4 KiB)."""
    report: dict[str, Any] = {
        "metrics": results,
        "samples": samples,
        "headline": headline(results, gate),
    }
    if outcome is not None:
        report["gate"] = {
            "metric": gate.metric if gate is not None else "",
            "passed": outcome.passed,
            "message": outcome.message[:600],
        }
    return report


def write_files(
    directory: Path,
    report: dict[str, Any],
    samples: list[dict[str, Any]],
) -> list[str]:
    """Write eval.json and samples.jsonl into the artifact directory; their names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / EVAL_FILE).write_text(
        json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    with (directory / SAMPLES_FILE).open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return [EVAL_FILE, SAMPLES_FILE]


# --------------------------------------------------------------------------- data


@dataclass
class EvalSets:
    """Tokenized rows to measure loss on, and the prompts to generate from."""

    validation: list[dict[str, list[int]]]
    test: list[dict[str, list[int]]]
    retention: list[dict[str, list[int]]]
    prompts: list[dict[str, str]]  # {"prompt", "reference"}
    prompt_split: str  # "test" or "validation"
    counts: dict[str, int] = field(default_factory=dict)


def split_test(train: list[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """``(train, test)`` for a test *percentage*: held out of the training examples left
    after the validation split (deduplicated already, so nothing leaks), with a seed of
    its own."""
    from .data import split_examples

    if ratio <= 0:
        return list(train), []
    return split_examples(train, ratio, seed + 1)


def load_test(
    paths: list[Path], dataset: DatasetConfig, train: list[Any], validation: list[Any]
) -> tuple[list[Any], list[dict[str, Any]], int]:
    """Test examples from their own files, deduplicated and without any example also in
    the training or validation data; ``(test, provenance records, leaked)``."""
    from .data import dedupe, load_files

    examples, records = load_files(paths, dataset, "test")
    examples, _ = dedupe(examples)
    seen = set(train) | set(validation)
    kept = [example for example in examples if example not in seen]
    return kept, records, len(examples) - len(kept)


def load_retention(
    paths: list[Path], dataset: DatasetConfig
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Retention examples: any supported row format, detected per file."""
    from .data import dedupe, load_files

    general = dataset.model_copy(update={"format": "auto", "fields": FieldMapping()})
    examples, records = load_files(paths, general, "retention")
    return dedupe(examples)[0], records


def prompts_of(examples: list[Any], tokenizer: Any, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` chat examples ending in an assistant turn, as the prompt the
    model sees (the chat template with the generation prompt, as training formats it)
    and the reference answer."""
    from .data import _render, chat_template_for

    template = chat_template_for(tokenizer)
    prompts: list[dict[str, str]] = []
    for example in examples:
        if len(prompts) >= limit:
            break
        if example.is_text or not example.messages or example.messages[-1][0] != "assistant":
            continue
        messages = example.chat()
        prompt = _render(tokenizer, template, messages[:-1], generation_prompt=True)
        prompts.append({"prompt": prompt, "reference": messages[-1]["content"]})
    return prompts


# --------------------------------------------------------------------------- measuring


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def mean_loss(
    model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch: int
) -> float | None:
    """Token-weighted cross-entropy over the labelled tokens of ``rows`` (None if none)."""
    import torch

    if not rows:
        return None
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(rows), max(batch, 1)):
        chunk = rows[start : start + batch]
        width = max(len(row["input_ids"]) for row in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # Prompt tuning's model returns logits for its virtual tokens first: drop them.
        logits = logits[:, -width:, :]
        shifted = logits[:, :-1, :].float()
        target = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.size(-1)),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((target != -100).sum())
    return total / count if count else None


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


def generate(
    model: Any, tokenizer: Any, prompts: list[dict[str, str]], max_new_tokens: int
) -> list[str]:
    """Greedy completions of each prompt (one at a time: no padding to get wrong)."""
    import torch

    device = _device(model)
    stop = _stop_ids(tokenizer)
    outputs: list[str] = []
    for item in prompts:
        ids = tokenizer(item["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop or None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = generated[0, ids.shape[1] :]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return outputs


def measure(
    model: Any,
    tokenizer: Any,
    sets: EvalSets,
    config: EvaluationConfig,
    batch: int,
) -> tuple[dict[str, float], list[str]]:
    """Losses, perplexities and task metrics of ``model`` on ``sets``; and its outputs.

    The model is put in eval mode (no dropout) and back; no gradients, no random draws."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores: dict[str, float] = {}
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            for name, rows in (
                ("eval", sets.validation),
                ("test", sets.test),
                ("retention", sets.retention),
            ):
                loss = mean_loss(model, rows, pad, batch)
                if loss is not None:
                    scores[f"{name}Loss"] = loss
                    if name != "retention":
                        scores[f"{name}Perplexity"] = math.exp(min(loss, 50.0))
            outputs: list[str] = []
            if config.metrics and sets.prompts:
                outputs = generate(model, tokenizer, sets.prompts, config.max_new_tokens)
                references = [p["reference"] for p in sets.prompts]
                scores |= task_scores(outputs, references, list(config.metrics))
    finally:
        model.train(was_training)
    return scores, outputs


def sample_records(
    sets: EvalSets, base: list[str], tuned: list[str], metrics: list[str]
) -> list[dict[str, Any]]:
    """samples.jsonl: prompt, reference, base and tuned output, and their scores."""
    records: list[dict[str, Any]] = []
    for i, item in enumerate(sets.prompts):
        record: dict[str, Any] = {"prompt": item["prompt"], "reference": item["reference"]}
        for side, outputs in (("base", base), ("tuned", tuned)):
            if i < len(outputs):
                record[side] = outputs[i]
                if "exactMatch" in metrics:
                    record[f"{side}ExactMatch"] = exact_match(outputs[i], item["reference"])
        records.append(record)
    return records
