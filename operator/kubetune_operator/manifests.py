"""Read FineTuneJob manifests from YAML files, with errors that point at the file."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ManifestFileError(ValueError):
    """A manifest file that cannot be read or is not YAML."""


@dataclass(frozen=True)
class Document:
    source: str  # "job.yaml" or "job.yaml#2" for the second document of a file
    body: Any


def read_documents(path: str) -> list[Document]:
    """Every non-empty YAML document in ``path`` ("-" reads standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestFileError(f"{path}: cannot read ({error.strerror})") from None
    try:
        bodies = [b for b in yaml.safe_load_all(text) if b is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestFileError(f"{path}: not valid YAML{where}: {problem}") from None
    if not bodies:
        raise ManifestFileError(f"{path}: no YAML documents in the file")
    if len(bodies) == 1:
        return [Document(path, bodies[0])]
    return [Document(f"{path}#{i}", body) for i, body in enumerate(bodies, start=1)]
