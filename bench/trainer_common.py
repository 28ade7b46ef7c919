"""What both benchmarks share: synthetic Alpaca-like data, the benchmark model, small stats.

Nothing here downloads anything. The tokenizer is kubetune's tiny byte-level BPE
(``kubetune_trainer.tiny``, vocab 512); the model is a randomly initialised Llama built
from a config that is larger than tiny.py's, so that matrix multiplies, not Python
overhead, dominate a training step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer-image"))  # kubetune_trainer, without installing

from kubetune_trainer.tiny import _CORPUS, _WORDS, build_tiny_tokenizer, random_llama  # noqa: E402

# The benchmark model: a small Llama, about 4.2M parameters plus 0.26M embeddings.
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
# bench/gpu_check.sh runs the same scripts on a bigger model: a JSON object of LlamaConfig
# fields (vocab_size included) in $KUBETUNE_BENCH_SHAPE replaces the shape above.
MODEL_SHAPE = json.loads(os.environ.get("KUBETUNE_BENCH_SHAPE") or "null") or MODEL_SHAPE

# Alpaca-like lengths in tokens: lognormal with median 100 and mean 110 (sigma² = 2 ln 1.1),
# clipped to [MIN_TOKENS, MAX_TOKENS].
MEDIAN_TOKENS = int(os.environ.get("KUBETUNE_BENCH_MEDIAN_TOKENS", "100"))
SIGMA = math.sqrt(2 * math.log(1.1))
MIN_TOKENS = 24
MAX_TOKENS = int(os.environ.get("KUBETUNE_BENCH_MAX_TOKENS", "350"))

INSTRUCTIONS = (
    "Reverse the words.",
    "Repeat the text.",
    "Continue the story.",
    "Summarize the text in your own words.",
    "Write the words in reverse order, then add a comment.",
)


def model_description() -> str:
    shape = MODEL_SHAPE
    return (
        f"Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"ffn {shape['intermediate_size']}, {shape['num_attention_heads']} heads "
        f"({shape['num_key_value_heads']} kv), vocab {shape.get('vocab_size', 512)} "
        "(kubetune tiny tokenizer), random weights, fp32 on CPU, sdpa attention"
    )


def build_model(tokenizer: Any, seed: int = 0) -> Any:
    """The benchmark model with random weights (the global RNG is left as it was)."""
    return random_llama(tokenizer, seed=seed, max_position_embeddings=4096, **MODEL_SHAPE)


def save_model(directory: Path, seed: int = 0) -> Any:
    """Write the benchmark model and tokenizer with save_pretrained; returns the tokenizer."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = build_tiny_tokenizer()
    build_model(tokenizer, seed).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


# --------------------------------------------------------------------------- data


def _vocabulary() -> list[str]:
    words = {w.strip(".,;:").lower() for w in _CORPUS.split()} | set(_WORDS)
    return sorted(w for w in words if w.isalpha())


class RecordMaker:
    """Alpaca rows (instruction/input/output) whose rendered chat hits a token length.

    Words are drawn with Zipf-like weights (so a model can learn something from them);
    the output starts with the input reversed and continues with more words. The
    byte-level pre-tokenizer splits on words, so a row's token count is the template's
    overhead plus the words' own counts; the achieved lengths are measured afterwards
    with the real tokenizer anyway.
    """

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = _vocabulary()
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        self.rng.shuffle(self.words)
        self.cost = {
            w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in self.words
        }
        self.tokenizer = tokenizer
        self.overhead = {i: self._tokens(i, "", "x") - 1 for i in INSTRUCTIONS}

    def _tokens(self, instruction: str, text: str, output: str) -> int:
        prompt = f"{instruction}\n\n{text}" if text else instruction
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return len(
            self.tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        )

    def _words(self, budget: int) -> list[str]:
        chosen: list[str] = []
        while budget > 0:
            word = self.rng.choices(self.words, self.weights)[0]
            chosen.append(word)
            budget -= self.cost[word]
        return chosen

    def target_length(self) -> int:
        length = round(math.exp(self.rng.gauss(math.log(MEDIAN_TOKENS), SIGMA)))
        return max(MIN_TOKENS, min(MAX_TOKENS, length))

    def record(self) -> dict[str, str]:
        instruction = self.rng.choice(INSTRUCTIONS)
        target = self.target_length()
        body = max(4, target - self.overhead[instruction])
        given = self._words(int(body * self.rng.uniform(0.3, 0.5)))
        answer = list(reversed(given)) + self._words(body - 2 * sum(self.cost[w] for w in given))
        # Trim or extend the answer until the rendered chat has the target length.
        text = " ".join(given)
        for _ in range(64):  # a few steps; a word of several tokens may overshoot by one
            length = self._tokens(instruction, text, " ".join(answer))
            if length > target and len(answer) > 1:
                answer.pop()
            elif length < target:
                answer.append(self._words(1)[0])
            else:
                break
        return {"instruction": instruction, "input": text, "output": " ".join(answer)}


def make_records(tokenizer: Any, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct synthetic Alpaca rows with Alpaca-like token lengths."""
    maker = RecordMaker(tokenizer, seed)
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(records) < n:
        record = maker.record()
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {
        "n": len(ordered),
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def format_lengths(stats: dict[str, float]) -> str:
    return (
        f"{stats['n']} examples, tokens per example: mean {stats['mean']:.0f}, "
        f"median {stats['median']:.0f}, p95 {stats['p95']:.0f}, max {stats['max']:.0f}"
    )


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def heldout_loss(model: Any, rows: Sequence[dict[str, list[int]]]) -> float:
    """Token-weighted mean loss over the label tokens of ``rows`` (one example at a time,
    no padding, no packing: the same masking for every model)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]], device=device)).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:], device=device)
            total += float(
                F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            )
            count += int((labels != -100).sum())
    return total / count
