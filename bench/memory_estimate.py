"""The memory estimate (operator/kubetune_operator/memory.py) against measured peaks.

    .venv/bin/python bench/memory_estimate.py                 # CPU: tiny and benchmark models
    .venv/bin/python bench/memory_estimate.py --device cuda   # GPU: ~0.5B bf16, LoRA and QLoRA

Each case runs in a fresh process: it builds the model as the trainer does
(``kubetune_trainer.modeling.build_model``: LoRA/QLoRA/full, gradient checkpointing),
then runs three optimizer steps (AdamW over the trainable parameters) on a batch of
``batch`` random rows of ``seq`` tokens (no padding, no mask: the estimate is asked for
the same, ``packing_mask=False``).

What is measured:
- CPU: the process's peak resident set (``ru_maxrss``) minus its resident set after the
  imports, i.e. everything the run allocated at its worst moment: model, adapters,
  optimizer state, activations, logits, plus whatever the C allocator and oneDNN keep
  (about 25 MiB for a 16-token step). glibc runs with ``MALLOC_MMAP_THRESHOLD_=65536``
  so that freed tensors leave the resident set (``--glibc-default`` to measure without).
  The estimate is taken with ``gpu=False`` (fp32, no CUDA context).
- GPU: ``torch.cuda.max_memory_reserved()`` (what the caching allocator took from the
  GPU) and ``max_memory_allocated()`` (live tensors), plus the CUDA context measured as
  the memory in use (``torch.cuda.mem_get_info()``) before any tensor; the estimate
  (``gpu=True``) includes 1 GiB context and 10 % allocator slack.

Prints a Markdown table (docs/benchmarks.md has the results) and writes JSON to --json.
Not a test: numbers depend on the allocator and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "trainer-image"))

TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
BENCH = {  # bench/trainer_common.py's benchmark model
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
# A ~0.6B Llama shape for the GPU check (bench/gpu_check.sh's), vocab 32000.
GPU_SHAPE = {
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 20,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}

CPU_CASES = [
    # name, shape, method, gradient checkpointing, batch, seq
    ("tiny", TINY, "lora", False, 8, 512),
    ("tiny", TINY, "lora", True, 8, 512),
    ("bench", BENCH, "lora", False, 8, 512),
    ("bench", BENCH, "lora", True, 8, 512),
    ("bench", BENCH, "qlora", False, 8, 512),
    ("bench", BENCH, "full", False, 8, 512),
    ("bench-vocab32k", {**BENCH, "vocab_size": 32000}, "lora", False, 4, 512),
]
# The GPU formula (bf16 activations, adapter-input copies) on CPU: a bf16 model under CPU
# autocast, LoRA (the trainer's qlora runs fp32 on CPU, so it is left out).
CPU_BF16_CASES = [
    ("bench", BENCH, "lora", False, 8, 512),
    ("bench", BENCH, "lora", True, 8, 512),
    ("bench-vocab32k", {**BENCH, "vocab_size": 32000}, "lora", False, 4, 512),
]
GPU_CASES = [
    ("0.6B", GPU_SHAPE, "lora", False, 4, 1024),
    ("0.6B", GPU_SHAPE, "lora", True, 4, 1024),
    ("0.6B", GPU_SHAPE, "qlora", False, 4, 1024),
    ("0.6B", GPU_SHAPE, "qlora", True, 4, 1024),
]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _config(method: str, checkpointing: bool, batch: int, seq: int) -> Any:
    from kubetune_trainer.config import (
        DatasetConfig,
        MethodConfig,
        ModelConfig,
        OutputConfig,
        TrainerConfig,
        TrainingConfig,
    )

    return TrainerConfig(
        model=ModelConfig(source="/dev/null"),
        dataset=DatasetConfig(sources=["x"], max_seq_length=seq, packing=False),
        method=MethodConfig(type=method),  # type: ignore[arg-type]
        training=TrainingConfig(batch_size=batch, gradient_checkpointing=checkpointing),
        output=OutputConfig(uri="/tmp/x"),
    )


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """One measured run, in this (fresh) process."""
    import gc

    import torch

    from kubetune_trainer.modeling import build_model

    cuda = case["device"] == "cuda"
    bf16 = case["device"] in ("cuda", "cpu-bf16")
    config = _config(case["method"], case["checkpointing"], case["batch"], case["seq"])
    # What build_model imports lazily, imported before the baseline: code, not the run.
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if case["method"] == "qlora":
        import bitsandbytes  # noqa: F401
    gc.collect()
    if cuda:
        torch.zeros(1, device="cuda")  # creates the context
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        # what the device has in use before any tensor of the run: the CUDA context
        # (and cuBLAS/cuDNN handles as they come), on an otherwise idle GPU
        context = total - free - torch.cuda.memory_reserved()
    baseline = _rss()
    model = build_model(
        Path(case["model_dir"]),
        config.method,
        gradient_checkpointing=case["checkpointing"],
        precision="bf16" if bf16 else "fp32",
    )
    model.train()
    device = "cuda" if cuda else "cpu"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 512
    ids = torch.randint(0, min(vocab, 512), (case["batch"], case["seq"]), generator=generator)
    ids = ids.to(device)
    for _ in range(3):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {"loss": float(loss)}
    if cuda:
        result.update(
            context=context,
            max_allocated=torch.cuda.max_memory_allocated(),
            max_reserved=torch.cuda.max_memory_reserved(),
            gpu_total=total,
            measured=torch.cuda.max_memory_reserved() + context,
        )
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(baseline_rss=baseline, peak_rss=peak, measured=peak - baseline)
    return result


def _save_model(shape: dict[str, int], directory: Path) -> None:
    from transformers.utils import logging

    from kubetune_trainer.tiny import build_tiny_tokenizer, random_llama

    logging.disable_progress_bar()
    tokenizer = build_tiny_tokenizer()
    random_llama(tokenizer, seed=0, max_position_embeddings=4096, **shape).save_pretrained(
        directory, safe_serialization=True
    )
    tokenizer.save_pretrained(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=["cpu", "cpu-bf16", "cuda"],
        default="cpu",
        help="cpu-bf16: a bf16 model under CPU autocast, as on a GPU (checks the GPU "
        "activation formula without one; no CUDA context counted)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="CPU: keep glibc's default malloc thresholds (the resident set then also "
        "holds freed heap)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from kubetune_operator.memory import Architecture, estimate

    cases = {"cuda": GPU_CASES, "cpu": CPU_CASES, "cpu-bf16": CPU_BF16_CASES}[args.device]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubetune-memory-") as scratch:
        built: dict[str, Path] = {}
        for name, shape, method, checkpointing, batch, seq in cases:
            if name not in built:
                built[name] = Path(scratch) / name
                _save_model(shape, built[name])
            model_dir = built[name]
            case = {
                "model_dir": str(model_dir),
                "method": method,
                "checkpointing": checkpointing,
                "batch": batch,
                "seq": seq,
                "device": args.device,
            }
            env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'trainer-image'}"}
            if args.device != "cuda" and not args.glibc_default:
                # glibc then returns every freed block of 64 KiB or more to the OS at once,
                # so the resident set follows the live tensors instead of keeping freed
                # heap (by default freed tensors under 32 MiB stay in the process: about
                # twice the live peak here, see docs/benchmarks.md).
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            run = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(case)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            measured = json.loads(run.stdout.strip().splitlines()[-1])
            arch = Architecture.from_config(json.loads((model_dir / "config.json").read_text()))
            config = _config(method, checkpointing, batch, seq)
            predicted = estimate(arch, config, gpu=args.device != "cpu", packing_mask=False)
            if args.device == "cpu-bf16":  # no CUDA: the GPU formula without its runtime part
                predicted.parts.pop("CUDA context + allocator")
            row = {
                "model": name,
                "params": arch.params,
                "method": method,
                "gradient_checkpointing": checkpointing,
                "batch": batch,
                "seq": seq,
                "estimate": predicted.total,
                "estimate_parts": predicted.parts,
                **measured,
            }
            row["ratio"] = row["estimate"] / row["measured"]
            rows.append(row)
            print(
                f"| {name} ({arch.params / 1e6:.2f}M) | {method} | "
                f"{'on' if checkpointing else 'off'} | {batch}×{seq} | "
                f"{row['estimate'] / 2**20:.0f} MiB | {row['measured'] / 2**20:.0f} MiB | "
                f"{(row['ratio'] - 1) * 100:+.0f} % |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
