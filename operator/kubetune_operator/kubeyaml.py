"""YAML as kubectl reads it, and YAML that kubectl reads back as written.

kubectl turns YAML into JSON (go-yaml v2 via sigs.k8s.io/yaml) before the API server
checks it against a CRD. PyYAML follows YAML 1.1 and reads some scalars differently, so
a manifest could pass a check here and fail at ``kubectl apply`` (``learningRate: 2e-4``
is a string to PyYAML, a number to kubectl). :func:`load_all` resolves plain scalars as
kubectl does and then as the JSON round trip leaves them:

- numbers: ``2e-4`` and ``1.`` are floats; ``0x1F``, ``0o17``, ``017`` (octal) and
  ``1_000`` are integers; an integer outside int64 is a float, and a whole float within
  int64 (``3.0``) is the integer 3, as the API server reads the JSON;
- booleans: ``true``/``false``, ``yes``/``no``, ``on``/``off`` and ``y``/``n`` (and their
  capitalized forms), keys included (``y: 1`` has the key ``"true"``); dates stay strings;
- ``.inf`` and ``.nan`` are errors (JSON has no such numbers, kubectl refuses them too),
  and so are recursive aliases and documents that aliases expand beyond
  :data:`MAX_VALUES` values;
- duplicate keys are errors naming the key and both lines. Here kubetune is stricter than
  kubectl, which silently keeps the last (kubernetes/kubernetes#125885);
- mapping keys become strings (``1: a`` has the key ``"1"``).

:func:`dump` writes YAML with the same rules, quoting every string kubectl would read as
something else (the CRD's ``default: '2e-4'``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# Values a document may expand to through aliases (*name): a FineTuneJob has ~100.
MAX_VALUES = 100_000
_INT64 = (-(2**63), 2**63 - 1)

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_REPLACED_TAGS = {_INT_TAG, _FLOAT_TAG, _BOOL_TAG, "tag:yaml.org,2002:timestamp"}
_REPLACED_TAGS.add("tag:yaml.org,2002:value")  # PyYAML's "=", a plain string to kubectl
# Candidates; _number() decides as go-yaml v2 does (strconv.ParseInt with base 0, then its
# float pattern, after removing "_") and keeps anything else as the string written.
_INT = re.compile(r"^[-+]?(?:0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[0-9][0-9_]*)$")
_FLOAT = re.compile(
    r"^[-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9_]+)?$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_GO_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_BOOLS = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"), True),
    **dict.fromkeys(("true", "True", "TRUE"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "off", "Off", "OFF"), False),
    **dict.fromkeys(("false", "False", "FALSE"), False),
}


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64)'s reading, without its range limit."""
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.removeprefix("+"))
    prefixes = {"0x": 16, "0X": 16, "0o": 8, "0O": 8, "0b": 2, "0B": 2}
    base = prefixes.get(digits[:2])
    if base is not None:
        digits = digits[2:]
    else:
        base = 8 if len(digits) > 1 and digits[0] == "0" else 10
    try:
        return sign * int(digits, base) if digits else None
    except ValueError:
        return None


def json_number(value: int | float) -> int | float:
    """What the API server reads after kubectl's JSON: int64 integers stay integers, whole
    floats within int64 become integers, everything else is a float."""
    if isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        return value
    number = float(value)
    if number.is_integer() and _INT64[0] <= number <= _INT64[1]:
        return int(number)
    return number


def _number(loader: yaml.SafeLoader, node: ScalarNode) -> int | float | str:
    text: str = node.value
    if text.lstrip("+-").lower() in (".inf", ".nan"):
        raise ConstructorError(
            None,
            None,
            f"{text} is not a number JSON can carry: write a finite number",
            node.start_mark,
        )
    plain: str = text.replace("_", "")
    integer = _go_int(plain)
    if integer is not None:
        return json_number(integer)
    if _GO_FLOAT.match(plain):
        return json_number(float(plain))
    return text


def _bool(loader: yaml.SafeLoader, node: ScalarNode) -> bool:
    return _BOOLS[node.value]


def _json_key(key: Any, node: Node) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int | float):
        return str(key)
    raise ConstructorError(
        None, None, f"mapping keys must be strings (got {type(key).__name__})", node.start_mark
    )


# The implicit resolvers (plain scalar → type) of kubectl, shared by loader and dumper.
_RESOLVERS: dict[Any, list[tuple[str, re.Pattern[str]]]] = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    (_BOOL_TAG, re.compile("^(?:" + "|".join(_BOOLS) + ")$"), "yYnNtTfFoO"),
    (_INT_TAG, _INT, "-+0123456789"),
    (_FLOAT_TAG, _FLOAT, "-+0123456789."),
):
    for _char in _first:
        _RESOLVERS.setdefault(_char, []).append((_tag, _pattern))


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _RESOLVERS

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = _json_key(self.construct_object(key_node, deep=True), key_node)
            if key in seen:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key]}): keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        self.flatten_mapping(node)  # merge keys (<<: *base) first; the node's own keys win
        return {
            _json_key(self.construct_object(k, deep=deep), k): self.construct_object(v, deep=deep)
            for k, v in node.value
        }


_Loader.add_constructor(_INT_TAG, _number)
_Loader.add_constructor(_FLOAT_TAG, _number)
_Loader.add_constructor(_BOOL_TAG, _bool)


class _Dumper(yaml.SafeDumper):
    yaml_implicit_resolvers = _RESOLVERS


def _expanded_size(node: Node) -> int:
    """How many values ``node`` stands for once its aliases are expanded (capped)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConstructorError(
                None, None, "an alias refers to a value that contains it", n.start_mark
            )
        open_nodes.add(key)
        total = 1
        if isinstance(n, SequenceNode):
            total += sum(size(item) for item in n.value)
        elif isinstance(n, MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        open_nodes.discard(key)
        sizes[key] = min(total, MAX_VALUES + 1)
        return sizes[key]

    return size(node)


def load_all(text: str) -> Iterator[Any]:
    """The documents of ``text`` as kubectl reads them (raises yaml.YAMLError)."""
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if _expanded_size(node) > MAX_VALUES:
                raise ConstructorError(
                    None,
                    None,
                    f"the document expands to more than {MAX_VALUES:,} values through "
                    "aliases (*name); write the values out",
                    node.start_mark,
                )
            yield loader.construct_document(node)
    finally:
        loader.dispose()


def dump(data: Any, *, sort_keys: bool = True, width: int | None = None) -> str:
    """``data`` as YAML that kubectl reads back as the same values."""
    text: str = yaml.dump(
        data,
        Dumper=_Dumper,
        sort_keys=sort_keys,
        width=width,
        allow_unicode=True,
        default_flow_style=False,
    )
    return text
