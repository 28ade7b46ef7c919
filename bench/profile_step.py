"""Profile one LoRA training step (forward + backward) of the benchmark model on CPU.

Where does a step's time go for a packed batch (``PackedCollator``, block-diagonal
mask) and a padded one (``PaddingCollator``)? The torch profiler's self CPU time is
grouped into matmul, attention, LoRA dropout, other element-wise ops and the rest; the
step time (forward + backward, best of 3, without the profiler) is also given per real
(non-pad) token, so that shapes compare.

    .venv/bin/python bench/profile_step.py                    # packed 4x2048 vs padded 4 examples
    .venv/bin/python bench/profile_step.py --shape packed:1x448 --shape padded:4 --top 15
"""

from __future__ import annotations

import argparse
import random
import time
import warnings
from typing import Any

import trainer_common as common

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "dropout": ("aten::bernoulli", "aten::native_dropout", "aten::dropout"),
    "element-wise": ("aten::mul", "aten::add", "aten::div", "aten::silu", "aten::pow"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=None,
        help="packed:ROWSxLEN or padded:EXAMPLES (repeatable; default packed:4x2048, padded:4)",
    )
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--top", type=int, default=0, help="also print the top N ops")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "other"


def batch_for(shape: str, rows: list[Any], pad_id: int, seed: int) -> tuple[Any, int]:
    from kubetune_trainer.packing import PackedCollator, PaddingCollator, pack

    kind, _, size = shape.partition(":")
    if kind == "packed":
        count, length = (int(x) for x in size.split("x"))
        features = pack(rows, length, seed=seed)[:count]
        batch = PackedCollator(pad_id)(features)
    else:
        features = random.Random(seed).sample(rows, int(size))
        batch = PaddingCollator(pad_id)(features)
    return batch, sum(len(f["input_ids"]) for f in features)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from kubetune_trainer.config import FieldMapping
    from kubetune_trainer.data import normalize_rows, tokenize_examples

    tokenizer = common.build_tiny_tokenizer()
    records = common.make_records(tokenizer, 600, seed=args.seed)
    examples = normalize_rows(list(enumerate(records, 1)), "alpaca", FieldMapping(), "synthetic")
    rows, _ = tokenize_examples(examples, tokenizer, 4096)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(common.build_model(tokenizer, seed=args.seed), lora)
    model.train()
    print(f"model: {common.model_description()}, LoRA r16 dropout {args.lora_dropout}\n")
    results = []
    for shape in args.shape or ["packed:4x2048", "padded:4"]:
        batch, non_pad = batch_for(shape, rows, tokenizer.pad_token_id, args.seed)
        model(**batch).loss.backward()  # warm-up
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            model(**batch).loss.backward()
            seconds.append(time.perf_counter() - started)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(**batch).loss.backward()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        groups = dict.fromkeys([*GROUPS, "other"], 0.0)
        for event in events:
            groups[group_of(event.key)] += event.self_cpu_time_total / 1e6
        shape_text = "x".join(str(d) for d in batch["input_ids"].shape)
        results.append((shape, shape_text, non_pad, min(seconds), total, groups))
        if args.top:
            print(f"{shape}:")
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(
        common.table(
            ["batch", "tensor", "non-pad", "step s", "µs/token", *[f"{g} %" for g in groups]],
            [
                [
                    shape,
                    shape_text,
                    non_pad,
                    f"{step:.2f}",
                    f"{1e6 * step / non_pad:.0f}",
                    *[f"{100 * v / total:.0f}" for v in groups.values()],
                ]
                for shape, shape_text, non_pad, step, total, groups in results
            ],
        )
    )


if __name__ == "__main__":
    main()
