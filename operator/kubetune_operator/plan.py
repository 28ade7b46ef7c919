"""``kubetune plan -f job.yaml``: what a job will do with its data and its GPUs, before a
GPU is spent.

- the **data report**: rows read per file and their format, every problem (with line
  or row numbers), duplicates, validation examples also in training, the token-length
  histogram (p50/p95/max) with the model's tokenizer, the share truncated at
  maxSeqLength, packing efficiency, examples per optimizer step and optimizer steps per
  epoch (warned under :data:`FEW_STEPS`), computed by the trainer's own functions
  (data.py, packing.py, train.py's packing recipe), so the report is what training does;
- the **GPU memory estimate** per GPU (memory.py) from the model's config.json alone
  (no weights): a local directory, s3:// (the trainer's storage) or hf:// (only
  config.json and the tokenizer's files are fetched), with a verdict against
  spec.resources.gpuMemory (or --gpu-memory).

The trainer (and so torch) is imported inside these functions only: the operator never
imports this module (pyproject.toml's import-linter contracts exempt it, as the CLI's
train command).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainerConfig

from .memory import advice, estimate_job, parse_quantity, verdict

FEW_STEPS = 20  # fewer optimizer steps per epoch than this: the schedule barely moves
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class PlanError(Exception):
    """Something the plan cannot read (the model's config, the data)."""


def model_files(config: TrainerConfig, scratch: Path, *, tokenizer: bool = True) -> Path:
    """A local directory with the model's config.json (and, if ``tokenizer``, whatever of
    its tokenizer files exist): the model's own directory when it is local, otherwise
    ``scratch`` with just those files downloaded (never the weights)."""
    source = config.model.source
    wanted = ("config.json", *(TOKENIZER_FILES if tokenizer else ()))
    if source.startswith("hf://"):
        return _from_hub(config, source.removeprefix("hf://"), wanted, scratch)
    if source.startswith("s3://"):
        from kubetune_trainer.storage import open_store

        store = open_store(source, endpoint_url=config.output.endpoint_url)
        for name in wanted:
            if store.exists(name):
                (scratch / name).write_bytes(store.get_bytes(name))
        if not (scratch / "config.json").is_file():
            raise PlanError(f"{source}/config.json does not exist")
        return scratch
    local = Path(source.removeprefix("file://"))
    if not (local / "config.json").is_file():
        raise PlanError(f"{local}/config.json does not exist (spec.model.source)")
    return local


def _from_hub(config: TrainerConfig, repo_id: str, wanted: tuple[str, ...], scratch: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    token = os.environ.get(config.model.token_env) if config.model.token_env else None
    token = token or os.environ.get("HF_TOKEN")
    for name in wanted:
        try:
            path = hf_hub_download(
                repo_id, name, revision=config.model.revision, token=token, local_dir=scratch
            )
        except EntryNotFoundError:
            if name == "config.json":
                raise PlanError(f"hf://{repo_id} has no config.json") from None
            continue
        except Exception as error:  # offline, gated, unknown repository
            if name == "config.json":
                raise PlanError(f"cannot read hf://{repo_id}/config.json: {error}") from None
            continue
        del path
    return scratch


def read_architecture(directory: Path) -> Any:
    from .memory import Architecture

    config = json.loads((directory / "config.json").read_text())
    try:
        return Architecture.from_config(config)
    except ValueError as error:
        raise PlanError(f"{directory}/config.json: {error}") from None


# --------------------------------------------------------------------------- data report


@dataclass
class DataReport:
    files: list[dict[str, Any]] = field(default_factory=list)  # name, split, rows, format
    problems: list[str] = field(default_factory=list)  # every one, with line numbers
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = ["data"]
        for record in self.files:
            out.append(
                f"  {record['name']} ({record['split']}): {record['rows']} rows, "
                f"format {record['format']}"
            )
        if self.problems:
            out.append(f"  ✗ {len(self.problems)} problem(s): training would stop at once")
            out += [f"    - {problem}" for problem in self.problems]
            return out
        s = self.stats
        out.append(
            f"  examples: {s['train_examples']} training, {s['validation_examples']} "
            f"validation; {s['duplicates_removed']} duplicates dropped, "
            f"{s['leakage_removed']} validation examples also in training dropped"
        )
        if "p50_tokens" in s:
            out.append(
                f"  tokens per example: p50 {s['p50_tokens']}, p95 {s['p95_tokens']}, max "
                f"{s['max_tokens']}; {s['truncated_examples']} "
                f"({s['truncated_share']:.1%}) longer than maxSeqLength "
                f"{s['max_seq_length']} are truncated, {s['dropped_examples']} dropped "
                "(no response tokens left)"
            )
            out.append("  histogram (tokens: examples)")
            width = max(count for _, count in s["histogram"]) or 1
            for label, count in s["histogram"]:
                out.append(f"    {label:>13}  {'█' * math.ceil(30 * count / width):<30} {count}")
            if s.get("packing_efficiency") is not None:
                out.append(
                    f"  packing: {s['packed_rows']} rows of up to {s['pack_capacity']} tokens, "
                    f"{s['packing_efficiency']:.1%} of their positions hold tokens"
                )
            elif s.get("padding_efficiency") is not None:
                out.append(
                    f"  no packing: {s['padding_efficiency']:.1%} of the padded positions "
                    "hold tokens"
                )
            out.append(
                f"  per optimizer step: {s['examples_per_step']:g} examples; "
                f"{s['steps_per_epoch']} optimizer steps per epoch"
            )
        out += [f"  ! {warning}" for warning in self.warnings]
        return out


def _histogram(lengths: list[int]) -> list[tuple[str, int]]:
    """Counts in power-of-two buckets (1-16, 17-32, ...), up to the longest."""
    top = max(lengths)
    edges = [16]
    while edges[-1] < top:
        edges.append(edges[-1] * 2)
    counts, low = [], 1
    for edge in edges:
        counts.append((f"{low}-{edge}", sum(low <= n <= edge for n in lengths)))
        low = edge + 1
    return counts


def _percentile(sorted_values: list[int], share: float) -> int:
    index = min(len(sorted_values) - 1, max(0, math.ceil(share * len(sorted_values)) - 1))
    return sorted_values[index]


def data_report(
    config: TrainerConfig, tokenizer_dir: Path | None, world_size: int, scratch: Path
) -> DataReport:
    """The data report for ``config``'s dataset (s3:// files are downloaded into
    ``scratch``, with the output's endpoint, as the trainer does); token figures need a
    tokenizer."""
    from kubetune_trainer import data as data_stage
    from kubetune_trainer.errors import DatasetInvalid
    from kubetune_trainer.storage import fetch_to_local

    def local(sources: list[str]) -> list[Path]:
        return [
            fetch_to_local(s, scratch / "data", endpoint_url=config.output.endpoint_url)
            if s.startswith("s3://")
            else Path(s.removeprefix("file://"))
            for s in sources
        ]

    report = DataReport()
    dataset = config.dataset
    train_paths = local(dataset.sources)
    validation_paths = local(dataset.validation_sources)
    problems = data_stage.Problems()
    _, records = data_stage.load_files(train_paths, dataset, "train", problems)
    if validation_paths:
        _, more = data_stage.load_files(validation_paths, dataset, "validation", problems)
        records += more
    report.files = records
    report.problems = [message for message, _ in problems.found]
    if report.problems:
        return report
    try:
        prepared = data_stage.prepare(
            train_paths,
            dataset,
            validation_paths=validation_paths,
            seed=config.training.seed,
        )
    except DatasetInvalid as error:
        report.problems = [error.message]
        return report
    report.warnings = list(prepared.warnings)
    stats: dict[str, Any] = {k: v for k, v in prepared.stats.items() if k != "sources"}
    stats["max_seq_length"] = dataset.max_seq_length
    report.stats = stats
    if tokenizer_dir is None:
        report.warnings.append("no tokenizer found with the model: token figures left out")
        return report
    _token_figures(report, prepared, config, tokenizer_dir, world_size)
    return report


def _token_figures(
    report: DataReport, prepared: Any, config: TrainerConfig, tokenizer_dir: Path, world: int
) -> None:
    from transformers import AutoTokenizer

    from kubetune_trainer import data as data_stage
    from kubetune_trainer import packing
    from kubetune_trainer.train import pack_capacity, rows_for_batch

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    length = config.dataset.max_seq_length
    t = config.training
    stats = report.stats
    # Lengths before truncation (for the histogram), then as training tokenizes them.
    whole, _ = data_stage.tokenize_examples(prepared.train, tokenizer, 10**7, allow_empty=True)
    lengths = sorted(len(row["input_ids"]) for row in whole)
    rows, tokenized = data_stage.tokenize_examples(
        prepared.train, tokenizer, length, allow_empty=True
    )
    report.warnings += data_stage.tokenize_warnings(tokenized, "training", length)
    if not lengths or not rows:
        report.warnings.append("no trainable examples")
        return
    total = len(whole)
    stats.update(
        p50_tokens=_percentile(lengths, 0.50),
        p95_tokens=_percentile(lengths, 0.95),
        max_tokens=lengths[-1],
        truncated_examples=tokenized["truncated_examples"],
        truncated_share=tokenized["truncated_examples"] / total,
        dropped_examples=tokenized["dropped_examples"],
        histogram=_histogram(lengths),
    )
    examples = len(rows)
    if config.dataset.packing:
        cut = [len(row["input_ids"]) for row in rows]
        capacity = pack_capacity(cut, t.batch_size, length)
        per_batch = rows_for_batch(cut, t.batch_size, length)
        packed = packing.pack(rows, capacity, seed=t.seed)
        rows_per_step = per_batch * t.gradient_accumulation_steps * world
        stats.update(
            pack_capacity=capacity,
            packed_rows=len(packed),
            packing_efficiency=sum(cut) / (len(packed) * capacity),
            examples_per_step=round(rows_per_step * examples / len(packed), 1),
            steps_per_epoch=math.ceil(len(packed) / rows_per_step),
        )
    else:
        import random

        order = list(range(examples))
        random.Random(t.seed).shuffle(order)
        cut = [len(rows[i]["input_ids"]) for i in order]
        batches = [cut[i : i + t.batch_size] for i in range(0, len(cut), t.batch_size)]
        padded = sum(len(batch) * max(batch) for batch in batches)
        per_step = t.batch_size * t.gradient_accumulation_steps * world
        stats.update(
            padding_efficiency=sum(cut) / padded,
            examples_per_step=per_step,
            steps_per_epoch=math.ceil(examples / per_step),
        )
    if stats["steps_per_epoch"] < FEW_STEPS:
        report.warnings.append(
            f"only {stats['steps_per_epoch']} optimizer steps per epoch (fewer than "
            f"{FEW_STEPS}): warmup and the learning-rate schedule barely move; lower "
            "batchSize or gradientAccumulationSteps, or train more epochs"
        )


# --------------------------------------------------------------------------- the command


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:.2f}M"


def run_plan(
    job: Any,
    config: TrainerConfig,
    *,
    gpu_memory: str | int | None,
    with_data: bool,
    scratch: Path | None = None,
) -> tuple[int, dict[str, Any], list[str]]:
    """(exit code, JSON report, printable lines) for ``job``: 0 fits (or nothing to judge
    against), 1 does not fit or the data has problems, 2 the plan could not be made."""
    owned = scratch is None
    folder = Path(tempfile.mkdtemp(prefix="kubetune-plan-")) if scratch is None else scratch
    lines: list[str] = []
    out: dict[str, Any] = {}
    code = 0
    try:
        model_dir = model_files(config, folder, tokenizer=with_data)
        arch = read_architecture(model_dir)
        out["architecture"] = json.loads(arch.to_json())
        if with_data:
            has_tokenizer = any((model_dir / name).is_file() for name in TOKENIZER_FILES)
            report = data_report(
                config, model_dir if has_tokenizer else None, job.spec.world_size, folder
            )
            out["data"] = {
                "files": report.files,
                "problems": report.problems,
                "warnings": report.warnings,
                "stats": report.stats,
            }
            lines += report.lines()
            code = 1 if report.problems else 0
        result = estimate_job(arch, job.spec, config)
        gpus = job.spec.resources.gpus
        where = f"per GPU ({gpus} per node × {job.spec.resources.nodes} nodes)" if gpus else ""
        lines.append(
            f"memory {where or 'of the CPU process (resources.gpus: 0)'}: "
            f"{_count(arch.params)} parameters, {_count(result.trainable_params)} trained, "
            f"{result.tokens_per_micro_batch} tokens per micro-batch"
        )
        lines.append(result.table())
        lines += [f"  · {note}" for note in result.notes]
        out["estimate"] = result.as_json()
        declared = gpu_memory if gpu_memory is not None else job.spec.resources.gpuMemory
        if declared is not None and gpus:
            kind, sentence = verdict(result, parse_quantity(declared))
            out["verdict"] = {"result": kind, "message": sentence, "gpuMemory": str(declared)}
            mark = {"fits": "✓", "tight": "!", "does not fit": "✗"}[kind]
            lines.append(f"{mark} {kind}: {sentence}")
            if kind == "does not fit":
                lines += [f"  try: {tip}" for tip in advice(arch, config, job.spec)]
                code = 1
        elif gpus:
            lines.append(
                "no verdict: set spec.resources.gpuMemory (e.g. 80Gi) or pass --gpu-memory"
            )
    finally:
        if owned:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    return code, out, lines
