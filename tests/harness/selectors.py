"""Kubernetes label and field selectors, as the API server reads them from a query string.

Label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``,
``!k``, joined by commas. Field selectors: ``path=v``, ``path==v``, ``path!=v`` on any
dotted path of the object (``metadata.name``, ``metadata.namespace``, ``status.phase``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Requirement = Callable[[Mapping[str, Any]], bool]

_SPLIT = re.compile(r",(?![^()]*\))")  # commas outside of parentheses
_SET_OP = re.compile(r"^([\w./-]+)\s+(in|notin)\s+\(([^()]*)\)$")
_EQ_OP = re.compile(r"^([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)$")
_EXISTS = re.compile(r"^(!?)\s*([\w./-]+)$")


class SelectorError(ValueError):
    """A selector that the API server would answer with 400 Bad Request."""


class Selector:
    """A parsed selector: a conjunction of requirements on one object."""

    def __init__(self, requirements: list[Requirement]) -> None:
        self._requirements = requirements

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        return all(requirement(obj) for requirement in self._requirements)


def _terms(text: str | None) -> list[str]:
    return [term.strip() for term in _SPLIT.split(text or "") if term.strip()]


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def _label_requirement(term: str) -> Requirement:
    if match := _SET_OP.match(term):
        key, op, raw = match.groups()
        values = {value.strip() for value in raw.split(",") if value.strip()}
        if op == "in":
            return lambda obj: _labels(obj).get(key) in values
        return lambda obj: _labels(obj).get(key) not in values
    if match := _EQ_OP.match(term):
        key, op, value = match.groups()
        if op == "!=":
            return lambda obj: _labels(obj).get(key) != value
        return lambda obj: _labels(obj).get(key) == value
    if match := _EXISTS.match(term):
        negated, key = match.groups()
        return lambda obj: (key in _labels(obj)) != bool(negated)
    raise SelectorError(f"unable to parse requirement: {term!r}")


def parse_label_selector(text: str | None) -> Selector:
    """Parse ``?labelSelector=``; an empty or absent selector matches everything."""
    return Selector([_label_requirement(term) for term in _terms(text)])


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The value at a dotted path as the API server compares it: a string, "" if absent."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _field_requirement(term: str) -> Requirement:
    match = _EQ_OP.match(term)
    if match is None:
        raise SelectorError(f"invalid field selector: {term!r}")
    path, op, value = match.groups()
    if op == "!=":
        return lambda obj: field_value(obj, path) != value
    return lambda obj: field_value(obj, path) == value


def parse_field_selector(text: str | None) -> Selector:
    """Parse ``?fieldSelector=``; an empty or absent selector matches everything."""
    return Selector([_field_requirement(term) for term in _terms(text)])
