"""The finished adapter: files, manifest.json, and publishing them so completeness is visible.

``manifest.json`` records what produced the artifact (base model, data and their
sha256, method, hyperparameters, final metrics, kubetune version) and the sha256 of
every file. It is uploaded last: a reader that finds the manifest finds a complete
artifact, and a failure mid-upload leaves no manifest, so nothing partial looks done.

The manifest also records the run that produced the artifact (``run``: its fingerprint,
see fingerprint.py). Before training, ``check_existing`` decides what to do with an
artifact already at the output: reuse it (same fingerprint: a retry of a run that had
published), publish again (none, or an incomplete one), replace it (other settings and
``spec.output.overwrite``), or refuse (other settings): an artifact is never overwritten
without that explicit choice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .config import GPU_ACCOUNTING_ENV, Method
from .errors import ConfigInvalid
from .fingerprint import RunIdentity
from .storage import Store

MANIFEST = "manifest.json"
MERGED = "merged"  # the folder of the merged export inside an adapter artifact


def artifact_folder(method: Method) -> str:
    """Where under the output URI the artifact lands: ``model`` for a full fine-tune
    (a whole model), ``adapter`` for the PEFT methods."""
    return "model" if method == "full" else "adapter"


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class PublishedArtifact:
    uri: str
    digest: str  # "sha256:<hex>" of manifest.json
    size_bytes: int


@dataclass(frozen=True)
class ExistingArtifact:
    """What to do about the artifact already at the output (check_existing)."""

    action: Literal["publish", "reuse", "replace"]
    manifest: dict[str, Any] | None = None
    note: str | None = None  # what the run says about it (log and progress message)


def read_manifest(store: Store, key_prefix: str) -> dict[str, Any] | None:
    """The artifact's manifest.json under ``key_prefix``, or None if there is none."""
    if not store.exists(f"{key_prefix}/{MANIFEST}"):
        return None
    try:
        manifest = json.loads(store.get_bytes(f"{key_prefix}/{MANIFEST}"))
    except ValueError:
        return {}  # unreadable: not ours to reuse, and not to overwrite silently either
    return manifest if isinstance(manifest, dict) else {}


def check_existing(
    manifest: dict[str, Any] | None,
    present: set[str],
    identity: RunIdentity,
    *,
    uri: str,
    overwrite: bool,
    merge: bool,
) -> ExistingArtifact:
    """Decide about an existing artifact (``manifest`` None: there is none), given the
    files ``present`` under its prefix (relative names) and this run's identity.

    Raises ConfigInvalid when it was produced with other settings and ``overwrite`` is
    off: the user must choose to replace it or to write elsewhere."""
    if manifest is None:
        return ExistingArtifact("publish")
    recorded = manifest.get("run")
    if identity.same_result(recorded):
        missing = sorted(set(manifest.get("files", {})) - present)
        if merge and not any(name.startswith(f"{MERGED}/") for name in present):
            missing.append(f"{MERGED}/ (spec.output.mergeAdapter is now true)")
        if not missing:
            return ExistingArtifact(
                "reuse",
                manifest,
                f"{uri} already holds the artifact of a run with these settings "
                f"({identity.fingerprint[:19]}…); reporting it without training again",
            )
        return ExistingArtifact(
            "publish",
            manifest,
            f"{uri} holds an incomplete artifact of a run with these settings "
            f"(missing {', '.join(missing[:3])}); training and publishing it again",
        )
    changed = ", ".join(identity.differences(recorded if isinstance(recorded, dict) else None))
    if overwrite:
        return ExistingArtifact(
            "replace",
            manifest,
            f"{uri} holds an artifact trained with other settings ({changed}); it will be "
            "replaced, as spec.output.overwrite is true",
        )
    raise ConfigInvalid(
        f"spec.output.uri: {uri} already holds an artifact trained with other settings "
        f"({changed}); refusing to overwrite it",
        hint="choose a new spec.output.uri, or set spec.output.overwrite: true to replace "
        "that artifact",
    )


def existing_artifact(store: Store, key_prefix: str, manifest: dict[str, Any]) -> PublishedArtifact:
    """The PublishedArtifact of an artifact already in the store (for reuse)."""
    data = store.get_bytes(f"{key_prefix}/{MANIFEST}")
    files = manifest.get("files", {})
    size = sum(int(entry.get("size", 0)) for entry in files.values()) + len(data)
    return PublishedArtifact(
        uri=store.uri_for(key_prefix),
        digest=f"sha256:{hashlib.sha256(data).hexdigest()}",
        size_bytes=size,
    )


def present_files(store: Store, key_prefix: str) -> set[str]:
    """The names of the files under ``key_prefix``, relative to it."""
    start = len(key_prefix) + 1
    return {key[start:] for key in store.list(f"{key_prefix}/")}


def gpu_time_at_publish(
    env: Mapping[str, str], started: float, now: float
) -> dict[str, Any] | None:
    """The GPU time the trainer can know of when it writes the manifest: the earlier
    attempts' GPU-seconds as the operator counted them when it created this attempt
    (``$KUBETUNE_GPU_ACCOUNTING``), plus GPUs × pods × the seconds since this trainer
    process ``started``. A lower bound of the final figure (image pull, the upload after
    the manifest and earlier preemptions of this attempt are not in it); the FineTuneJob's
    ``status.gpuSeconds`` is the account. None where the operator did not set it."""
    try:
        told = json.loads(env.get(GPU_ACCOUNTING_ENV) or "null")
        earlier = int(told["earlierAttemptsGpuSeconds"])
        gpus, pods = int(told["gpusPerPod"]), int(told["pods"])
    except (ValueError, TypeError, KeyError):
        return None
    this_attempt = gpus * pods * max(0, int(now - started))
    return {
        "gpu_seconds": earlier + this_attempt,
        "earlier_attempts_gpu_seconds": earlier,
        "this_attempt_gpu_seconds_so_far": this_attempt,
        "gpus_per_pod": gpus,
        "pods": pods,
        "note": "at publish, a lower bound; the FineTuneJob's status.gpuSeconds is the account",
    }


def write_manifest(directory: Path, details: dict[str, Any]) -> Path:
    """Write manifest.json into ``directory``, listing every other file with its sha256."""
    files = {
        str(path.relative_to(directory)): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {
        "kubetune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **details,
        "files": files,
    }
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def publish(directory: Path, store: Store, key_prefix: str) -> PublishedArtifact:
    """Upload ``directory`` under ``key_prefix``, manifest.json strictly last.

    Any earlier manifest is removed first, then every earlier file that the new artifact
    does not have, so a re-published artifact is never complete with a mix of old and
    new files.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} has no {MANIFEST}; write it before publishing")
    store.delete_prefix(f"{key_prefix}/{MANIFEST}")
    new = {path.relative_to(directory).as_posix() for path in directory.rglob("*")}
    for name in sorted(present_files(store, key_prefix) - new):
        store.delete_prefix(f"{key_prefix}/{name}")
    size = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path != manifest:
            store.upload_file(path, f"{key_prefix}/{path.relative_to(directory).as_posix()}")
            size += path.stat().st_size
    store.upload_file(manifest, f"{key_prefix}/{MANIFEST}")
    size += manifest.stat().st_size
    return PublishedArtifact(
        uri=store.uri_for(key_prefix),
        digest=f"sha256:{sha256_file(manifest)}",
        size_bytes=size,
    )
