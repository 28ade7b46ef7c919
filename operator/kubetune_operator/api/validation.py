"""Check a manifest (FineTuneJob, FineTuneSweep) as strictly as the CRD, with messages
people can act on. The operator, ``kubetune validate``, ``train`` and ``sweep`` all parse
with :func:`parse_document`.

Parsing is pydantic's strict mode over the values as kubectl sends them (see kubeyaml):
``"16"`` is not 16 and ``"true"`` not true, as for the API server. Every problem names the
field path the way ``kubectl explain`` does (``spec.method.lora.r``), says what is wrong
and what was given, and adds a hint: how to write the value (quote a decimal, unquote a
number), our name for a field another tool names differently (api.renames), where a
misplaced field goes, the closest field name for a typo, or the field's documentation.
A broken cross-field rule is reported at the field to change (its ``field_path``), in
the same round as the type errors.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .renames import rename_hint
from .rules import Rule
from .types import API_VERSION, KIND, FineTuneJob, FineTuneJobSpec

M = TypeVar("M", bound=BaseModel)


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
    """A value as YAML spells it (null, true), strings quoted."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# pydantic's labels of a union's members in an error's location (``cpu.int``), not fields.
_UNION_MEMBER = re.compile(
    r"^(int|str|bool|float|none|list\[.*|dict\[.*|function-.*|constrained-.*)$"
)


def _quoted(value: Any) -> str:
    return json.dumps(value if isinstance(value, str) else str(value))


def _type_fix(kind: str, name: str, got: Any) -> str | None:
    """How to fix a value of the wrong type that YAML's typing explains."""
    field = name or "the value"
    if kind == "string_type" and isinstance(got, bool):
        return (
            f"YAML reads unquoted true/false/yes/no/on/off/y/n as a boolean: quote the "
            f'string, e.g. {field}: "{str(got).lower()}"'
        )
    if kind == "string_type" and isinstance(got, int | float):
        return f"quote the number: {field}: {_quoted(got)}"
    if kind == "int_type" and isinstance(got, str) and got.strip().lstrip("+-").isdigit():
        return f"write the number without quotes: {field}: {int(got)}"
    if kind == "int_type" and isinstance(got, float):
        if got.is_integer():
            return "write a whole number between -2^63 and 2^63-1 (kubectl sends this as a float)"
        return "write a whole number"
    if kind == "bool_type" and isinstance(got, str) and got.lower() in ("true", "false"):
        return f"write true or false without quotes: {field}: {got.lower()}"
    return None


_EXPECTED = {
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "str": "a string",
    "float": "a number",
    "model": "an object",
    "dict": "an object",
    "list": "a list",
}


def _problems_of_error(
    error: Any, root: type[BaseModel] = FineTuneJob, prefix: str = ""
) -> list[Problem]:
    loc: tuple[int | str, ...] = tuple(
        part for part in error["loc"] if not (isinstance(part, str) and _UNION_MEMBER.match(part))
    )
    path = _format_path(((prefix,) if prefix else ()) + loc)
    kind = error["type"]
    ctx = error.get("ctx", {})
    got = error.get("input")
    field_names = [p for p in loc if isinstance(p, str)]
    model = _model_at(loc, root) if field_names else None
    name = str(loc[-1]) if loc else ""
    hint = _describe(model, name)

    if kind == "missing":
        return [Problem(path, "required field is missing", hint)]
    if kind == "extra_forbidden":
        return [Problem(path, "unknown field", _unknown_field_hint(model, name, got, path))]
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": "≥",
            "greater_than": ">",
            "less_than_equal": "≤",
            "less_than": "<",
        }[kind]
        bound = next(iter(ctx.values()))
        return [Problem(path, f"must be {op} {bound} (got {_show(got)})", hint)]
    if kind == "literal_error":
        return [Problem(path, f"must be one of {ctx.get('expected')} (got {_show(got)})", hint)]
    if kind in ("too_short", "string_too_short"):
        return [Problem(path, f"must not be empty (got {_show(got)})", hint)]
    if kind in ("too_long", "string_too_long"):
        return [Problem(path, f"is too long (got {_show(got)})", hint)]
    if kind == "string_pattern_mismatch":
        return [Problem(path, f"has the wrong form (got {_show(got)})", hint)]
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = _EXPECTED.get(kind.split("_")[0], f"a {kind.split('_')[0]}")
        return [
            Problem(
                path, f"must be {expected} (got {_show(got)})", _type_fix(kind, name, got) or hint
            )
        ]
    if kind == "cross_field_rule":
        # A broken cross-field rule names the field to change, as the API server does.
        rules: tuple[Rule, ...] = getattr(_model_at((*loc, ""), root), "rules", ())
        return [
            Problem(path + (rules[i].field_path or ""), rules[i].message) for i in ctx["broken"]
        ]
    message = str(error["msg"]).removeprefix("Value error, ")
    return [Problem(path, message, hint)]


def _normal(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _field_paths(model: type[BaseModel], prefix: str) -> Iterator[str]:
    """Every field path of ``model`` (``training.learningRate``), nested models included."""
    for field_name, info in model.model_fields.items():
        path = f"{prefix}.{field_name}" if prefix else field_name
        yield path
        nested = _first_model(info.annotation)
        if nested is not None:
            yield from _field_paths(nested, path)


def _unknown_field_hint(
    model: type[BaseModel] | None, name: str, value: Any, path: str
) -> str | None:
    """Our name for a field spelled another way, another tool's name or a typo."""
    known = sorted(model.model_fields) if model is not None else []
    same = [field for field in known if _normal(field) == _normal(name)]
    if same:
        return f"did you mean {same[0]!r}?"
    spec_path = "spec.template" if path.startswith("spec.template.") else "spec"
    elsewhere = [
        f"{spec_path}.{p}"
        for p in _field_paths(FineTuneJobSpec, "")
        if _normal(p.rsplit(".", 1)[-1]) == _normal(name)
    ]
    if path.startswith("spec") and 1 <= len(elsewhere) <= 3:
        return f"{name} is not a field here: it goes at {' or '.join(elsewhere)}"
    renamed = rename_hint(name, value, spec_path)
    if renamed:
        return renamed
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known fields here: {', '.join(known)}" if known else None


def problems_of(
    error: ValidationError, root: type[BaseModel] = FineTuneJob, prefix: str = ""
) -> list[Problem]:
    """The problems of a failed validation of ``root`` (a model of this API), each path
    prefixed with ``prefix`` (e.g. "spec" when ``root`` is a spec model)."""
    problems: list[Problem] = []
    union_at: dict[str, int] = {}  # a union's members fail one by one: one problem
    for e in error.errors():
        found = _problems_of_error(e, root, prefix)
        in_union = any(isinstance(part, str) and _UNION_MEMBER.match(part) for part in e["loc"])
        if not (in_union and len(found) == 1 and found[0].message.startswith("must be ")):
            problems += found
            continue
        problem = found[0]
        if problem.path not in union_at:
            union_at[problem.path] = len(problems)
            problems.append(problem)
            continue
        first = problems[union_at[problem.path]]
        expected, got = first.message.removeprefix("must be ").rsplit(" (got ", 1)
        more = problem.message.removeprefix("must be ").rsplit(" (got ", 1)[0]
        hints = "; ".join(dict.fromkeys(h for h in (first.hint, problem.hint) if h))
        problems[union_at[problem.path]] = Problem(
            problem.path, f"must be {expected} or {more} (got {got}", hints or None
        )
    return problems


def parse_document(document: Any, model: type[M], kind: str) -> M:
    """Parse a manifest of ``kind`` (a dict, as kubectl reads YAML) into ``model`` with
    defaults applied, exactly as strictly as the CRD (no "16" for 16, no "true" for true),
    or raise InvalidManifest listing every problem at once."""
    if not isinstance(document, dict):
        got = "a list" if isinstance(document, list) else f"{_show(document)}"
        raise InvalidManifest(
            [
                Problem(
                    "(document)",
                    f"must be a mapping with apiVersion, kind, metadata and spec (got {got})",
                )
            ]
        )
    problems: list[Problem] = []
    if document.get("apiVersion") != API_VERSION:
        problems.append(
            Problem(
                "apiVersion", f"must be {API_VERSION} (got {_show(document.get('apiVersion'))})"
            )
        )
    if document.get("kind") != kind:
        problems.append(Problem("kind", f"must be {kind} (got {_show(document.get('kind'))})"))
    # The API server drops a status written into a manifest (it is the operator's, set
    # through the status subresource), so it is not checked here either.
    body = {k: v for k, v in document.items() if k != "status"}
    try:
        parsed = model.model_validate(
            {**body, "apiVersion": API_VERSION, "kind": kind}, strict=True
        )
    except ValidationError as error:
        problems += problems_of(error, root=model)
        # pydantic checks an object's cross-field rules only once its fields are valid;
        # report the rules the values as written already break, so one round is enough.
        seen = {(p.path, p.message) for p in problems}
        problems += [
            p for p in _rules_broken_as_written(model, body) if (p.path, p.message) not in seen
        ]
    if problems:
        raise InvalidManifest(problems)
    return parsed


def _rules_broken_as_written(model: type[BaseModel], raw: Any, path: str = "") -> list[Problem]:
    """The cross-field rules of ``model`` and its nested models that the raw values break,
    as far as they can be evaluated on them (a rule that fails on a wrongly typed value is
    left to the second round)."""
    if not isinstance(raw, dict):
        return []
    problems: list[Problem] = []
    known = {k: v for k, v in raw.items() if k in model.model_fields}
    rules: tuple[Rule, ...] = getattr(model, "rules", ())
    if rules:
        try:
            constructed = model.model_construct(**known)
        except Exception:  # defaults that cannot be built from these values
            constructed = None
        for rule in rules if constructed is not None else ():
            try:
                holds = bool(rule.holds(constructed))
            except Exception:  # a wrongly typed value: reported as such already
                continue
            if not holds:
                problems.append(Problem(path + (rule.field_path or ""), rule.message))
    for name, value in known.items():
        nested = _first_model(model.model_fields[name].annotation)
        if nested is None:
            continue
        at = f"{path}.{name}" if path else name
        if isinstance(value, list):
            for i, item in enumerate(value):
                problems += _rules_broken_as_written(nested, item, f"{at}[{i}]")
        else:
            problems += _rules_broken_as_written(nested, value, at)
    return problems


def parse_manifest(document: Any) -> FineTuneJob:
    """Parse a FineTuneJob manifest (a dict) with defaults applied, or raise InvalidManifest."""
    return parse_document(document, FineTuneJob, KIND)


def validate_manifest(document: Any) -> list[Problem]:
    """The problems of a manifest; empty when it is a valid FineTuneJob."""
    try:
        parse_manifest(document)
    except InvalidManifest as invalid:
        return invalid.problems
    return []
