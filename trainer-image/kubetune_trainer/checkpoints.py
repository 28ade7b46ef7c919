"""Checkpoints in the output store, each marked complete only after all its files are written.

Layout under the job's output: ``checkpoints/step-00000120/<files>`` plus a
``checkpoints/step-00000120/COMPLETE`` marker uploaded last. A checkpoint without its
marker (the pod died mid-upload) is ignored on resume and cleaned up later. The files
are the Hugging Face Trainer's own checkpoint (adapter or model weights, optimizer,
scheduler, RNG states and trainer_state.json with the data position), so resuming is
``Trainer.train(resume_from_checkpoint=...)``.

The marker also records the run that wrote the checkpoint (fingerprint.RunIdentity's
record): a run resumes only a checkpoint that belongs to it (``find_resumable``), and
removes the others before it writes its own, so that checkpoints of two runs never mix.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import Store

PREFIX = "checkpoints"
MARKER = "COMPLETE"
KEEP = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    key_prefix: str
    uri: str


@dataclass(frozen=True)
class Resumable:
    """What a run finds under ``checkpoints/``: the newest complete checkpoint that
    belongs to it (if any), and the complete ones of other runs, each with its marker's
    ``run`` record (None for a checkpoint written before markers recorded it)."""

    checkpoint: RemoteCheckpoint | None
    run: dict[str, Any] | None = None  # the checkpoint's run record
    foreign: list[tuple[RemoteCheckpoint, dict[str, Any] | None]] = field(default_factory=list)


def _key(step: int) -> str:
    return f"{PREFIX}/step-{step:08d}"


def upload_checkpoint(
    local_dir: Path, store: Store, step: int, run: dict[str, Any] | None = None
) -> RemoteCheckpoint:
    """Upload a Trainer checkpoint directory, then mark it complete (recording ``run``,
    the writer's fingerprint.RunIdentity record), then prune old ones."""
    key = _key(step)
    store.delete_prefix(key + "/")  # leftovers of an earlier, interrupted upload
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            store.upload_file(path, f"{key}/{path.relative_to(local_dir).as_posix()}")
    marker: dict[str, Any] = {
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
    }
    store.put_bytes(f"{key}/{MARKER}", json.dumps(marker).encode())
    _prune(store, keep_newest=KEEP)
    return RemoteCheckpoint(step=step, key_prefix=key, uri=store.uri_for(key))


def _steps(store: Store) -> tuple[set[int], set[int]]:
    """(all steps with any file, steps whose checkpoint is complete)."""
    present: set[int] = set()
    complete: set[int] = set()
    for key in store.list(PREFIX + "/"):
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != PREFIX:
            continue
        match = _STEP_DIR.match(parts[1])
        if match:
            step = int(match.group(1))
            present.add(step)
            if parts[2] == MARKER and len(parts) == 3:
                complete.add(step)
    return present, complete


def _remote(store: Store, step: int) -> RemoteCheckpoint:
    return RemoteCheckpoint(step=step, key_prefix=_key(step), uri=store.uri_for(_key(step)))


def marker_run(store: Store, checkpoint: RemoteCheckpoint) -> dict[str, Any] | None:
    """The ``run`` record in a checkpoint's marker (None if it has none)."""
    try:
        marker = json.loads(store.get_bytes(f"{checkpoint.key_prefix}/{MARKER}"))
    except ValueError:
        return None
    run = marker.get("run") if isinstance(marker, dict) else None
    return run if isinstance(run, dict) else None


def find_resumable(store: Store, belongs: Callable[[dict[str, Any] | None], bool]) -> Resumable:
    """The newest complete checkpoint whose marker's run record ``belongs`` to this run,
    and the complete checkpoints that do not (newest first)."""
    _, complete = _steps(store)
    ours: tuple[RemoteCheckpoint, dict[str, Any] | None] | None = None
    foreign: list[tuple[RemoteCheckpoint, dict[str, Any] | None]] = []
    for step in sorted(complete, reverse=True):
        checkpoint = _remote(store, step)
        run = marker_run(store, checkpoint)
        if belongs(run):
            ours = ours or (checkpoint, run)
        else:
            foreign.append((checkpoint, run))
    if ours is None:
        return Resumable(checkpoint=None, foreign=foreign)
    return Resumable(checkpoint=ours[0], run=ours[1], foreign=foreign)


def delete_checkpoint(store: Store, checkpoint: RemoteCheckpoint) -> None:
    """Remove a checkpoint, marker first (so that it never looks complete but partial)."""
    store.delete_prefix(f"{checkpoint.key_prefix}/{MARKER}")
    store.delete_prefix(checkpoint.key_prefix + "/")


def download_checkpoint(store: Store, checkpoint: RemoteCheckpoint, local_dir: Path) -> Path:
    """Fetch a complete checkpoint into ``local_dir/checkpoint-<step>`` for the Trainer."""
    target = local_dir / f"checkpoint-{checkpoint.step}"
    store.download_prefix(checkpoint.key_prefix + "/", target)
    (target / MARKER).unlink(missing_ok=True)
    return target


def _prune(store: Store, keep_newest: int) -> None:
    """Delete all but the newest complete checkpoints, and incomplete ones older than them."""
    present, complete = _steps(store)
    keep = set(sorted(complete)[-keep_newest:])
    newest = max(complete, default=-1)
    for step in present - keep:
        if step in complete or step < newest:
            store.delete_prefix(_key(step) + "/")
