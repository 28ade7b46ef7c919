"""Checkpoints in the output store, each marked complete only after all its files are written.

Layout under the job's output: ``checkpoints/step-00000120/<files>`` plus a
``checkpoints/step-00000120/COMPLETE`` marker uploaded last. A checkpoint without its
marker (the pod died mid-upload) is ignored on resume and cleaned up later. The files
are the Hugging Face Trainer's own checkpoint (adapter or model weights, optimizer,
scheduler, RNG states and trainer_state.json with the data position), so resuming is
``Trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

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


def _key(step: int) -> str:
    return f"{PREFIX}/step-{step:08d}"


def upload_checkpoint(local_dir: Path, store: Store, step: int) -> RemoteCheckpoint:
    """Upload a Trainer checkpoint directory, then mark it complete, then prune old ones."""
    key = _key(step)
    store.delete_prefix(key + "/")  # leftovers of an earlier, interrupted upload
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            store.upload_file(path, f"{key}/{path.relative_to(local_dir).as_posix()}")
    marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
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


def newest_complete(store: Store) -> RemoteCheckpoint | None:
    """The newest checkpoint whose marker exists, or None."""
    _, complete = _steps(store)
    if not complete:
        return None
    step = max(complete)
    return RemoteCheckpoint(step=step, key_prefix=_key(step), uri=store.uri_for(_key(step)))


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
