"""Benchmark: kubetune's trainer against the plain Hugging Face baseline most tutorials use.

Same model (``common.MODEL_SHAPE``, saved with save_pretrained), same JSONL data, same
train/validation split, same tokenization and prompt masking, one epoch each:

- baseline: ``transformers.Trainer`` + peft LoRA, ``DataCollatorForSeq2Seq`` padding to
  the longest in the batch, TrainingArguments defaults except the hyperparameters
  kubetune also sets (read from kubetune's own defaults: batch size, gradient
  accumulation, learning rate, scheduler, warm-up, epochs, LoRA r/alpha/targets), so
  that the losses compare; LoRA dropout stays 0.05 (``--baseline-dropout``), what this
  baseline used before kubetune's default became 0, so that numbers compare over time;
- kubetune: ``kubetune_trainer.train.run`` with a default ``TrainerConfig`` (packing to
  ``max_seq_length`` 2048, ...) plus any ``--set`` overrides.

Each run is a fresh subprocess (so peak RSS is per run); runs alternate and the
speed-up is the median of per-pair ratios. Throughput is non-pad tokens per second from
the start of training to the last optimizer step: kubetune's own figure from the run's
metrics; for the baseline, a counting collator's tokens over the same interval. Loss is
measured afterwards on the held-out examples, one unpadded example at a time, for both
models with the same code (``common.heldout_loss``).

    .venv/bin/python bench/trainer_throughput.py                       # defaults
    .venv/bin/python bench/trainer_throughput.py --set dataset.max_seq_length=512 \\
        --set training.batch_size=1                                   # a what-if
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import trainer_common as common

LOSS_TOLERANCE = 0.01  # nats: "equal" held-out loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--examples", type=int, default=800, help="rows in the JSONL file")
    parser.add_argument("--reps", type=int, default=3, help="pairs of runs")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override kubetune's TrainerConfig (value parsed as JSON), e.g. training.batch_size=1",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: torch's)"
    )
    parser.add_argument(
        "--shared-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="like --set, for both kubetune and the baseline (e.g. training.batch_size=8)",
    )
    parser.add_argument(
        "--baseline-dropout",
        type=float,
        default=0.05,
        help="the baseline's LoRA dropout (0.05: as measured before kubetune defaulted to 0)",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work in this directory and keep it"
    )
    parser.add_argument("--worker", choices=("baseline", "kubetune"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def kubetune_config(workdir: Path, run_dir: Path, overrides: list[str]) -> Any:
    """kubetune's TrainerConfig: defaults, our model and data, and the overrides."""
    from kubetune_trainer.config import TrainerConfig

    raw: dict[str, Any] = {
        "job_name": "bench",
        "model": {"source": str(workdir / "model")},
        "dataset": {"sources": [str(workdir / "train.jsonl")]},
        "output": {"uri": str(run_dir / "output")},
        "reporting": {"progress_bar": False},
    }
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *path, leaf = key.split(".")
        section = raw
        for part in path:
            section = section.setdefault(part, {})
        section[leaf] = value
    return TrainerConfig.model_validate(raw)


def prepared_rows(config: Any, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """Train and held-out rows exactly as kubetune's recipe splits and tokenizes them."""
    from kubetune_trainer import data

    prepared = data.prepare(
        [Path(s) for s in config.dataset.sources], config.dataset, seed=config.training.seed
    )
    length = config.dataset.max_seq_length
    train, _ = data.tokenize_examples(prepared.train, tokenizer, length)
    held_out, _ = data.tokenize_examples(prepared.validation, tokenizer, length)
    return train, held_out


# --------------------------------------------------------------------------- workers


def run_kubetune(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from kubetune_trainer import train
    from kubetune_trainer.progress import ProgressState

    config = kubetune_config(args.workdir, run_dir, args.shared_set + args.set)
    state = ProgressState()
    result = train.run(config, work_dir=run_dir / "work", state=state, stop=threading.Event())
    peak_train_gpu_mb = _peak_gpu_mb()  # before the held-out evaluation loads an fp32 base
    metrics = result.metrics
    tokenizer = AutoTokenizer.from_pretrained(str(args.workdir / "model"))
    _, held_out = prepared_rows(config, tokenizer)
    return {
        "tokens_per_second": metrics["tokens_per_second"],
        "non_pad_tokens": state.trained_tokens,
        "train_seconds": state.trained_tokens / metrics["tokens_per_second"],
        "padding_ratio": state.padding_ratio,
        "optimizer_steps": int(metrics["steps"]),
        "train_examples": result.stats.get("train_examples"),
        "own_eval_loss": metrics.get("eval_loss"),
        "examples_per_step": state.examples_per_step,
        "rows_per_device_step": state.rows_per_device_step,
        "time_to_first_step": state.time_to_first_step,
        "fast_paths": state.fast_paths,
        "peak_train_gpu_mb": peak_train_gpu_mb,
        "heldout_loss": heldout_loss(args.workdir / "model", result.local_artifact_dir, held_out),
        "heldout_examples": len(held_out),
    }


def _peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def heldout_loss(model_dir: Path, adapter_dir: Path, rows: list[Any]) -> float:
    """Held-out loss of a saved adapter on the fp32 base model: the same code for both."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return common.heldout_loss(model.to("cuda" if torch.cuda.is_available() else "cpu"), rows)


def run_baseline(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from kubetune_trainer.modeling import resolve_precision, train_dtype
    from kubetune_trainer.packing import CountingCollator

    # kubetune's defaults, with only the overrides meant for both
    defaults = kubetune_config(args.workdir, run_dir, args.shared_set)
    t, m = defaults.training, defaults.method
    set_seed(t.seed)  # LoRA init, dropout and data order, as kubetune's run does
    tokenizer = AutoTokenizer.from_pretrained(str(args.workdir / "model"))
    train_rows, held_out = prepared_rows(defaults, tokenizer)
    precision = resolve_precision(t.precision)  # fp32 on CPU, bf16/fp16 on a GPU, as kubetune
    model = AutoModelForCausalLM.from_pretrained(
        str(args.workdir / "model"), dtype=train_dtype(precision)
    )
    lora = LoraConfig(
        r=m.r,
        lora_alpha=m.alpha,
        lora_dropout=args.baseline_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest"))

    class Clock(TrainerCallback):  # the interval kubetune's Progress callback measures
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            self.started, self.tokens_at_start = time.time(), collator.non_pad

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            self.seconds = time.time() - self.started
            self.tokens = collator.non_pad - self.tokens_at_start

    clock = Clock()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(run_dir / "baseline"),
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_ratio,
            num_train_epochs=t.effective_epochs,
            seed=t.seed,
            report_to=[],
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=train_rows,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    peak_train_gpu_mb = _peak_gpu_mb()
    trainer.model.save_pretrained(str(run_dir / "adapter"))
    return {
        "tokens_per_second": clock.tokens / clock.seconds,
        "non_pad_tokens": collator.non_pad,
        "train_seconds": clock.seconds,
        "padding_ratio": collator.padding_ratio,
        "optimizer_steps": trainer.state.global_step,
        "train_examples": len(train_rows),
        "own_eval_loss": None,
        "examples_per_step": t.batch_size * t.gradient_accumulation_steps,
        "rows_per_device_step": t.batch_size,
        "time_to_first_step": {},
        "fast_paths": [],
        "peak_train_gpu_mb": peak_train_gpu_mb,
        "heldout_loss": heldout_loss(args.workdir / "model", run_dir / "adapter", held_out),
        "heldout_examples": len(held_out),
    }


def worker(args: argparse.Namespace) -> None:
    """One run in this (fresh) process; writes result.json next to its files."""
    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.time()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.worker}-", dir=args.workdir))
    result = (run_kubetune if args.worker == "kubetune" else run_baseline)(args, run_dir)
    result["wall_seconds"] = time.time() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    (args.workdir / f"{args.worker}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def spawn(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind, "--workdir", str(workdir)]
    command += [f"--set={item}" for item in args.set]
    command += [f"--threads={args.threads}"] if args.threads else []
    command += [f"--shared-set={item}" for item in args.shared_set]
    command += [f"--baseline-dropout={args.baseline_dropout}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{kind} run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads((workdir / f"{kind}.json").read_text())


def prepare_inputs(args: argparse.Namespace, workdir: Path) -> list[int]:
    """The model and the JSONL file every run reads; the train rows' token lengths."""
    tokenizer = common.save_model(workdir / "model", seed=args.seed)
    records = common.make_records(tokenizer, args.examples, seed=args.seed)
    common.write_jsonl(workdir / "train.jsonl", records)
    train, _ = prepared_rows(kubetune_config(workdir, workdir, args.shared_set), tokenizer)
    return [len(row["input_ids"]) for row in train]


def packing_note(config: Any, lengths: list[int]) -> str:
    """How kubetune's recipe will pack these rows (when it says: train.pack_capacity)."""
    from kubetune_trainer import train

    if not config.dataset.packing or not hasattr(train, "pack_capacity"):
        return ""
    t = config.training
    capacity = train.pack_capacity(lengths, t.batch_size, config.dataset.max_seq_length)
    if not hasattr(train, "rows_per_device_step"):
        return f"; packed rows of ≤{capacity} tokens, one per device step"
    per_batch = (
        train.rows_for_batch(lengths, t.batch_size, config.dataset.max_seq_length)
        if hasattr(train, "rows_for_batch")
        else 1
    )
    rows = train.rows_per_device_step(
        capacity,
        t.batch_size,
        config.dataset.max_seq_length,
        t.gradient_accumulation_steps,
        *([per_batch] if per_batch > 1 else []),
    )
    return (
        f"; packed rows of ≤{capacity} tokens, {rows} per device step, "
        f"accumulation {t.gradient_accumulation_steps // (rows // per_batch)}"
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    warnings.filterwarnings("ignore")
    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="kubetune-bench-")
    workdir = args.keep or Path(scratch.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    train_lengths = prepare_inputs(args, workdir)
    lengths = common.length_stats(train_lengths)
    config = kubetune_config(workdir, workdir, args.shared_set + args.set)
    info = common.machine()
    t = config.training
    print(
        f"machine:  {info['cpus']} CPUs ({info['cpu_model']}), torch {info['torch']}, "
        f"{info['torch_threads']} threads"
    )
    print(f"model:    {common.model_description()}")
    print(
        f"data:     {common.format_lengths(lengths)} (train split; "
        f"{config.dataset.validation_ratio:.0%} held out)"
    )
    print(
        f"kubetune: packing={config.dataset.packing} "
        f"max_seq_length={config.dataset.max_seq_length} "
        f"batch_size={t.batch_size} grad_accum={t.gradient_accumulation_steps} "
        f"lr={t.learning_rate} {t.scheduler}{packing_note(config, train_lengths)}"
        + (f"  overrides: {' '.join(args.set)}" if args.set else "  (defaults)")
    )
    print(f"runs:     {args.reps} pairs, alternating, each in a fresh process\n")

    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = ("kubetune", "baseline") if rep % 2 == 0 else ("baseline", "kubetune")
        for kind in order:
            load_before = os.getloadavg()[0]
            result = {"variant": kind, "rep": rep, **spawn(kind, args, workdir)}
            result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
            runs.append(result)
            first = result["time_to_first_step"]
            print(
                f"  rep {rep} {kind:8}  {result['tokens_per_second']:6.0f} non-pad tok/s  "
                f"train {result['train_seconds']:5.1f}s  wall {result['wall_seconds']:5.1f}s  "
                f"held-out loss {result['heldout_loss']:.4f}  "
                f"{result['examples_per_step']:g} ex/opt step  "
                f"load {load_before:.1f}→{result['load_after']:.1f}"
                + (
                    "  first step " + ", ".join(f"{k} {v:.2f}s" for k, v in first.items())
                    if first
                    else ""
                ),
                flush=True,
            )

    by = {kind: [r for r in runs if r["variant"] == kind] for kind in ("kubetune", "baseline")}
    ratios = [
        k["tokens_per_second"] / b["tokens_per_second"]
        for k, b in zip(by["kubetune"], by["baseline"], strict=True)
    ]
    summary = {
        kind: {
            key: common.median([r[key] for r in group])
            for key in (
                "tokens_per_second",
                "train_seconds",
                "wall_seconds",
                "peak_rss_mb",
                "heldout_loss",
                "padding_ratio",
                "optimizer_steps",
                "examples_per_step",
                "load_before",
                "load_after",
            )
        }
        | {"own_eval_loss": group[0]["own_eval_loss"], "train_examples": group[0]["train_examples"]}
        for kind, group in by.items()
    }
    ratio = common.median(ratios)
    best = max(r["tokens_per_second"] for r in by["kubetune"]) / max(
        r["tokens_per_second"] for r in by["baseline"]
    )
    loss_delta = summary["kubetune"]["heldout_loss"] - summary["baseline"]["heldout_loss"]
    print()
    print(
        common.table(
            [
                "variant",
                "non-pad tok/s",
                "padding",
                "opt steps",
                "train s",
                "wall s",
                "peak RSS MB",
                "held-out loss",
            ],
            [
                [
                    kind,
                    f"{s['tokens_per_second']:.0f}",
                    f"{s['padding_ratio']:.1%}",
                    f"{s['optimizer_steps']:.0f}",
                    f"{s['train_seconds']:.1f}",
                    f"{s['wall_seconds']:.1f}",
                    f"{s['peak_rss_mb']:.0f}",
                    f"{s['heldout_loss']:.4f}",
                ]
                for kind, s in summary.items()
            ],
        )
    )
    speed_ok, loss_ok = ratio >= 1.8, loss_delta <= LOSS_TOLERANCE
    print(
        f"\nkubetune / baseline non-pad tokens/s: {ratio:.2f}× (median of {len(ratios)} pairs: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f"); best run / best run: {best:.2f}×"
    )
    print(
        f"held-out loss, kubetune − baseline: {loss_delta:+.4f} nats after the same "
        f"{summary['kubetune']['train_examples']} examples (kubetune's own eval loss: "
        f"{summary['kubetune']['own_eval_loss']})"
    )
    verdict = "met" if speed_ok and loss_ok else "MISSED"
    verdict += "" if speed_ok else " (speed)"
    verdict += "" if loss_ok else " (loss)"
    print(f"target ≥ 1.8× at equal (±{LOSS_TOLERANCE:.2f}) or lower loss: {verdict}")
    print(
        "non-pad tok/s = real (non-padding) example tokens trained on / seconds from the start "
        "of training to\nthe last optimizer step; it excludes loading, tokenizing, the final "
        "evaluation and saving (in 'wall s')."
    )
    print(
        json.dumps(
            {
                "benchmark": "trainer_throughput",
                "machine": info,
                "model": common.MODEL_SHAPE,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "lengths": lengths,
                "summary": summary,
                "ratio": ratio,
                "ratios": ratios,
                "best_run_ratio": best,
                "heldout_loss_delta": loss_delta,
                "runs": runs,
            }
        )
    )
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
