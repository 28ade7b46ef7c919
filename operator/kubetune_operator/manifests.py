"""Read manifest files as kubectl does, with errors that name the file and the line.

The YAML is read by :mod:`kubeyaml` (kubectl's scalar types; duplicate keys rejected,
which kubectl does not do).
The file must be UTF-8 (or UTF-16 with a byte-order mark, as kubectl accepts); binary
files, undecodable bytes, exploding aliases, absurd nesting and sizes are reported as
errors naming the file and the line, never as a traceback.

For local runs (``kubetune train``/``sweep``), :func:`resolve_local_paths` makes the
relative paths of a manifest relative to the manifest's directory, not the current one.
"""

from __future__ import annotations

import codecs
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .api.validation import Problem
from .kubeyaml import load_all

# The API server refuses request bodies above 3 MiB; no manifest of ours comes close.
MAX_BYTES = 3 * 1024 * 1024


class ManifestFileError(ValueError):
    """A manifest file that cannot be read or is not YAML."""


@dataclass(frozen=True)
class Document:
    source: str  # "job.yaml" or "job.yaml#2" for the second document of a file
    body: Any
    directory: Path  # the file's directory: relative paths in the manifest start here


# --------------------------------------------------------------------------- files


def _decode(path: str, data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ManifestFileError(
                f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 text; "
                "save it as UTF-8"
            ) from None
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise ManifestFileError(
            f"{path}: a binary file, not a YAML manifest (byte 0x00 at offset {offset}); "
            "pass the manifest's .yaml file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        before = data[: error.start]
        line = before.count(b"\n") + 1
        column = len(before.rsplit(b"\n", 1)[-1]) + 1
        raise ManifestFileError(
            f"{path}: not UTF-8 text: byte 0x{data[error.start]:02X} at line {line}, "
            f"column {column}; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _yaml_error(path: str, text: str, error: yaml.YAMLError) -> ManifestFileError:
    mark = getattr(error, "problem_mark", None)
    if isinstance(error, yaml.reader.ReaderError):
        before = text[: error.position]
        line, column = before.count("\n") + 1, len(before.rsplit("\n", 1)[-1]) + 1
        return ManifestFileError(
            f"{path}: not valid YAML at line {line}, column {column}: character "
            f"{error.character!r} is not allowed in YAML; remove it"
        )
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(error, "problem", None) or str(error)
    if isinstance(error, yaml.scanner.ScannerError | yaml.parser.ParserError):
        # PyYAML's words for a syntax slip; say what usually causes it.
        problem += " (check the indentation, quotes and brackets on and above that line)"
    return ManifestFileError(f"{path}: not valid YAML{where}: {problem}")


def _read_bytes(path: str) -> bytes:
    try:
        if path == "-":
            stream = getattr(sys.stdin, "buffer", None)  # a text stream in some tests
            if stream is None:
                return sys.stdin.read(MAX_BYTES + 1).encode("utf-8", "surrogateescape")
            data: bytes = stream.read(MAX_BYTES + 1)
            return data
        with open(path, "rb") as file:
            return file.read(MAX_BYTES + 1)
    except OSError as error:
        raise ManifestFileError(f"{path}: cannot read ({error.strerror})") from None


def read_documents(path: str) -> list[Document]:
    """Every non-empty YAML document in ``path`` ("-" reads standard input)."""
    data = _read_bytes(path)
    if len(data) > MAX_BYTES:
        raise ManifestFileError(
            f"{path}: larger than {MAX_BYTES // 2**20} MiB, the most the API server accepts; "
            "pass the manifest's .yaml file"
        )
    text = _decode(path, data)
    try:
        bodies = [b for b in load_all(text) if b is not None]
    except yaml.YAMLError as error:
        raise _yaml_error(path, text, error) from None
    except RecursionError:
        raise ManifestFileError(
            f"{path}: not valid YAML: nested too deeply for a manifest; check the brackets"
        ) from None
    if not bodies:
        raise ManifestFileError(f"{path}: no YAML documents in the file (it is empty)")
    directory = Path.cwd() if path == "-" else Path(path).resolve().parent
    if len(bodies) == 1:
        return [Document(path, bodies[0], directory)]
    return [Document(f"{path}#{i}", body, directory) for i, body in enumerate(bodies, start=1)]


# --------------------------------------------------------------------------- local paths

_REMOTE = ("hf://", "s3://", "file://")


def _local(value: str, directory: Path) -> Path:
    return directory / value if not Path(value).is_absolute() else Path(value)


def resolve_local_paths(
    spec: dict[str, Any], directory: Path, at: str = "spec"
) -> tuple[dict[str, Any], list[Problem]]:
    """A copy of a (valid) FineTuneJob ``spec`` dict whose relative local paths
    (model.source, dataset.sources, dataset.validation.sources) are made absolute against
    ``directory`` (the manifest's), and a problem for each local path that does not
    exist there. For local runs only: in a pod, paths are the pod's."""
    out = {**spec}
    problems: list[Problem] = []

    def resolve(value: str, field: str) -> str:
        if value.startswith(_REMOTE):
            return value
        local = _local(value, directory)
        if not local.exists():
            if Path(value).is_absolute():
                message, hint = f"{value} does not exist", "check the path"
            else:
                message = (
                    f"{value} not found in {directory} (a relative path in a manifest "
                    "starts at the manifest's directory)"
                )
                hint = f"write the path relative to {directory}, or an absolute path"
            problems.append(Problem(f"{at}.{field}", message, hint))
        return str(local)

    model = spec.get("model")
    if isinstance(model, dict) and isinstance(model.get("source"), str):
        out["model"] = {**model, "source": resolve(model["source"], "model.source")}
    dataset = spec.get("dataset")
    if isinstance(dataset, dict):
        dataset = {**dataset}
        if isinstance(dataset.get("sources"), list):
            dataset["sources"] = [
                resolve(s, f"dataset.sources[{i}]") for i, s in enumerate(dataset["sources"])
            ]
        validation = dataset.get("validation")
        if isinstance(validation, dict) and isinstance(validation.get("sources"), list):
            dataset["validation"] = {
                **validation,
                "sources": [
                    resolve(s, f"dataset.validation.sources[{i}]")
                    for i, s in enumerate(validation["sources"])
                ],
            }
        out["dataset"] = dataset
    return out, problems
