"""Check a FineTuneJob manifest exactly as the operator will, with messages people can act on.

Every problem names the field path the way ``kubectl explain`` does
(``spec.method.lora.r``), says what is wrong and what was given, and adds a hint: the
field's own documentation, or the closest known field name for a typo.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .types import API_VERSION, KIND, FineTuneJob


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest."""

    path: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class InvalidManifest(ValueError):
    """A manifest that does not describe a valid FineTuneJob."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _format_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "constrained-str")):
            continue  # pydantic's validator wrappers, not fields
        else:
            path += f".{part}" if path else part
    return path


def _model_at(
    loc: tuple[int | str, ...], root: type[BaseModel] = FineTuneJob
) -> type[BaseModel] | None:
    """The API model that owns the last field of ``loc`` (None when it is not a model)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _first_model(field.annotation) if field is not None else None
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _describe(model: type[BaseModel] | None, name: str) -> str | None:
    if model is None or name not in model.model_fields:
        return None
    return model.model_fields[name].description


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(error: Any, root: type[BaseModel] = FineTuneJob, prefix: str = "") -> Problem:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    path = _format_path(((prefix,) if prefix else ()) + loc)
    kind = error["type"]
    ctx = error.get("ctx", {})
    got = error.get("input")
    field_names = [p for p in loc if isinstance(p, str)]
    model = _model_at(loc, root) if field_names else None
    name = str(loc[-1]) if loc else ""
    hint = _describe(model, name)

    if kind == "missing":
        return Problem(path, "required field is missing", hint)
    if kind == "extra_forbidden":
        known = sorted(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(name, known, n=1)
        suggestion = f"did you mean {close[0]!r}?" if close else None
        fields = ", ".join(known)
        return Problem(
            path,
            "unknown field",
            suggestion or (f"known fields here: {fields}" if fields else None),
        )
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": "≥",
            "greater_than": ">",
            "less_than_equal": "≤",
            "less_than": "<",
        }[kind]
        bound = next(iter(ctx.values()))
        return Problem(path, f"must be {op} {bound} (got {_show(got)})", hint)
    if kind == "literal_error":
        return Problem(path, f"must be one of {ctx.get('expected')} (got {_show(got)})", hint)
    if kind in ("too_short", "string_too_short"):
        return Problem(path, f"must not be empty (got {_show(got)})", hint)
    if kind == "string_pattern_mismatch":
        return Problem(path, f"has the wrong form (got {_show(got)})", hint)
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.split("_")[0]
        if kind == "model_type" or kind == "dict_type":
            expected = "an object"
        elif kind == "list_type":
            expected = "a list"
        return Problem(path, f"must be {_article(expected)} (got {_show(got)})", hint)
    message = str(error["msg"]).removeprefix("Value error, ")
    # A broken cross-field rule names the field it is about, as the API server does.
    rules = getattr(_model_at((*loc, ""), root), "rules", ()) if field_names else ()
    broken = [r for r in rules if r.message == message and r.field_path]
    if len(broken) == 1:
        path += broken[0].field_path
    return Problem(path, message, hint)


def _article(word: str) -> str:
    if word.startswith(("an ", "a ")):
        return word
    names = {
        "int": "an integer",
        "bool": "true or false",
        "string": "a string",
        "float": "a number",
        "str": "a string",
    }
    return names.get(word, f"a {word}")


def problems_of(
    error: ValidationError, root: type[BaseModel] = FineTuneJob, prefix: str = ""
) -> list[Problem]:
    """The problems of a failed validation of ``root`` (a model of this API), each path
    prefixed with ``prefix`` (e.g. "spec" when ``root`` is a spec model)."""
    return [_problem(e, root, prefix) for e in error.errors()]


def parse_manifest(document: Any) -> FineTuneJob:
    """Parse a FineTuneJob manifest (a dict) with defaults applied, or raise InvalidManifest."""
    if not isinstance(document, dict):
        raise InvalidManifest([Problem("", "a manifest must be a YAML mapping")])
    problems: list[Problem] = []
    if document.get("apiVersion") != API_VERSION:
        problems.append(
            Problem(
                "apiVersion", f"must be {API_VERSION} (got {_show(document.get('apiVersion'))})"
            )
        )
    if document.get("kind") != KIND:
        problems.append(Problem("kind", f"must be {KIND} (got {_show(document.get('kind'))})"))
    if problems:
        raise InvalidManifest(problems)
    try:
        return FineTuneJob.model_validate(document)
    except ValidationError as error:
        raise InvalidManifest([_problem(e) for e in error.errors()]) from None


def validate_manifest(document: Any) -> list[Problem]:
    """The problems of a manifest; empty when it is a valid FineTuneJob."""
    try:
        parse_manifest(document)
    except InvalidManifest as invalid:
        return invalid.problems
    return []
