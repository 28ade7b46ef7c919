"""GPU fast paths, each chosen automatically when it is installed and fits, else skipped.

- flash-attention 2 (``attn_implementation="flash_attention_2"``): with packed rows,
  transformers derives each example's boundaries from ``position_ids`` and runs the
  varlen kernel, so attention costs Σ lᵢ² instead of a dense L² block-diagonal mask.
  Needs CUDA, the ``flash_attn`` package and fp16/bf16 activations.
- Liger kernels (``use_liger_kernel``: fused linear cross-entropy, RMSNorm, RoPE, SwiGLU)
  for the model families Liger knows; transformers leaves other models as they are.
  Needs CUDA and the ``liger_kernel`` package.
- fused AdamW (``optim="adamw_torch_fused"``) on CUDA.

bf16 where the GPU supports it is chosen by ``modeling.resolve_precision``. On CPU none of
these apply and nothing changes. ``KUBETUNE_DISABLE_FAST_PATHS`` (comma-separated:
``flash_attention``, ``liger``, ``fused_adamw``) turns single ones off, to compare or to
work around a broken kernel. Importable without torch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DISABLE_ENV = "KUBETUNE_DISABLE_FAST_PATHS"
NAMES = ("flash_attention", "liger", "fused_adamw")


@dataclass(frozen=True)
class FastPaths:
    """What the model and the Trainer use; the defaults are the plain (CPU) path."""

    flash_attention: bool = False
    liger: bool = False
    fused_adamw: bool = False

    def model_kwargs(self) -> dict[str, Any]:
        """Extra from_pretrained arguments (none: transformers' default attention)."""
        return {"attn_implementation": "flash_attention_2"} if self.flash_attention else {}

    def training_arguments(self) -> dict[str, Any]:
        """Extra TrainingArguments (none: the Trainer's defaults)."""
        arguments: dict[str, Any] = {}
        if self.liger:
            arguments["use_liger_kernel"] = True
        if self.fused_adamw:
            arguments["optim"] = "adamw_torch_fused"
        return arguments

    def names(self) -> list[str]:
        return [name for name in NAMES if getattr(self, name)]


def importable(module: str) -> bool:
    """Whether ``module`` can be imported (found and its import does not fail)."""
    try:
        if importlib.util.find_spec(module) is None:
            return False
        importlib.import_module(module)
    except Exception:  # a broken native library counts as not installed
        return False
    return True


def choose(
    *,
    cuda: bool,
    precision: str,
    quantized_compute_dtype: str | None = None,
    can_import: Callable[[str], bool] = importable,
    disabled: str | None = None,
) -> FastPaths:
    """The fast paths this process can use.

    ``precision`` is the resolved training precision (bf16, fp16 or fp32);
    ``quantized_compute_dtype`` the qlora compute dtype, which is what attention runs in
    for a quantized base. ``disabled`` defaults to ``$KUBETUNE_DISABLE_FAST_PATHS``."""
    if not cuda:
        return FastPaths()
    off = {
        name.strip()
        for name in (os.environ.get(DISABLE_ENV, "") if disabled is None else disabled).split(",")
    }
    if quantized_compute_dtype is not None:
        half = quantized_compute_dtype in ("bfloat16", "float16")
    else:
        half = precision in ("bf16", "fp16")
    return FastPaths(
        flash_attention="flash_attention" not in off and half and can_import("flash_attn"),
        liger="liger" not in off and can_import("liger_kernel"),
        fused_adamw="fused_adamw" not in off,
    )
