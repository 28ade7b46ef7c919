"""One process with 2 threads vs 2 processes (torchrun, gloo DDP) with 1 thread each, on CPU.

Both runs train LoRA on the benchmark model (trainer_common.MODEL_SHAPE) through the real
trainer entry point (``python -m kubetune_trainer`` / ``torchrun --module
kubetune_trainer``) at the same global batch, and report the trainer's own throughput
(non-pad tokens trained per second by all ranks, measured from the first optimizer
step) and the wall time of the whole run (start-up, data, model, training, artifact).

    python bench/distributed_cpu.py [--steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer_common import ROOT, machine, make_records, median, save_model, table, write_jsonl

from kubetune_trainer.config import TrainerConfig


def _config(model: Path, data: Path, output: Path, steps: int, accumulation: int) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job_name": "bench",
            "model": {"source": str(model)},
            "dataset": {"sources": [str(data)], "format": "alpaca", "max_seq_length": 512},
            "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            "training": {
                "max_steps": steps,
                "batch_size": 4,
                "gradient_accumulation_steps": accumulation,
                "learning_rate": 2e-4,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
            },
            "output": {"uri": str(output)},
            "reporting": {"progress_bar": False, "loss_plot": False},
        }
    )


def _run(config: TrainerConfig, processes: int, threads: int, scratch: Path) -> dict[str, Any]:
    config_file = scratch / "config.json"
    config_file.write_text(config.model_dump_json())
    termination = scratch / "termination-log"
    termination.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "KUBETUNE_CONFIG_FILE": str(config_file),
        "KUBETUNE_TERMINATION_MESSAGE_PATH": str(termination),
        "KUBETUNE_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT / "trainer-image"),
    }
    env.pop("KUBETUNE_CONFIG", None)
    if processes == 1:
        command = [sys.executable, "-m", "kubetune_trainer"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(processes), "--module", "kubetune_trainer"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(
            f"run failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    metrics = json.loads(termination.read_text())["metrics"]
    return {"tokens_per_second": metrics["tokens_per_second"], "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        scratch = Path(tmp)
        tokenizer = save_model(scratch / "model")
        data = write_jsonl(scratch / "train.jsonl", make_records(tokenizer, 2000))
        layouts = [("1 process x 2 threads", 1, 2, 2), ("2 processes x 1 thread", 2, 1, 1)]
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in layouts}
        for repeat in range(args.repeats):
            for name, processes, threads, accumulation in layouts:
                output = scratch / f"out-{repeat}-{processes}"
                config = _config(scratch / "model", data, output, args.steps, accumulation)
                results[name].append(_run(config, processes, threads, scratch))
                print(f"  {name}: {results[name][-1]}", file=sys.stderr)

    base = median([r["tokens_per_second"] for r in results[layouts[0][0]]])
    rows = []
    for name, *_ in layouts:
        tps = median([r["tokens_per_second"] for r in results[name]])
        wall = median([r["wall_seconds"] for r in results[name]])
        rows.append([name, f"{tps:.0f}", f"{tps / base:.2f}x", f"{wall:.1f}"])
    print(json.dumps(machine()))
    print(
        f"LoRA r16, global batch 8 examples (4 x accumulation x processes), {args.steps} "
        f"steps, median of {args.repeats}"
    )
    print(table(["layout", "tokens/s", "vs 1 process", "wall s"], rows))


if __name__ == "__main__":
    main()
