"""Silence library noise a user cannot act on; keep every other warning.

Called once at the start of the trainer (every process, torchrun ranks included) and by
``kubetune tiny-model``. Each entry names the library, the category or logger, and the
message, so a new or real warning from the same library still shows:

- transformers' own FutureWarnings about deprecated names it (or peft) calls itself,
  ``is_gradient_checkpointing`` (peft calls it) and ``gradient_checkpointing_enable``
  (peft's k-bit preparation calls it, and so, for now, does our modeling.py): nothing
  in a job spec changes them;
- transformers' "mtime may not be reliable on this filesystem" (logged when two
  checkpoints are less than a second apart, as a tiny job's are; it then sorts them by
  step number, which is what we want);
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (an
  optional faster CPU kernel fetched from the Hugging Face Hub; CPU runs are for trying
  things, and pods cannot download it);
- transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model
  shards"): they flash by for every load and save; the trainer draws its own bar.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex, module regex) passed to warnings.filterwarnings.
IGNORED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers(\.|$)"),
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated", r"transformers(\.|$)"),
)

# logger name → message regexes dropped from that logger (other records pass).
IGNORED_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    "transformers.trainer_utils": (r"mtime may not be reliable",),
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward from kernels",),
}


class _DropMessages(logging.Filter):
    """Drops records whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_library_noise() -> None:
    """Install the filters above (idempotent) and turn off the libraries' progress bars."""
    for category, message, module in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in IGNORED_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the operator's image has no transformers: nothing to silence
        return
    transformers_logging.disable_progress_bar()  # also huggingface_hub's bars
