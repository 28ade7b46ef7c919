"""The finished adapter: files, manifest.json, and publishing them so completeness is visible.

``manifest.json`` records what produced the artifact (base model, data and their
sha256, method, hyperparameters, final metrics, kubetune version) and the sha256 of
every file. It is uploaded last: a reader that finds the manifest finds a complete
artifact, and a failure mid-upload leaves no manifest, so nothing partial looks done.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .storage import Store

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class PublishedArtifact:
    uri: str
    digest: str  # "sha256:<hex>" of manifest.json
    size_bytes: int


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

    Any earlier manifest is removed first, so a re-published artifact is never complete
    with a mix of old and new files.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{directory} has no {MANIFEST}; write it before publishing")
    store.delete_prefix(f"{key_prefix}/{MANIFEST}")
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
