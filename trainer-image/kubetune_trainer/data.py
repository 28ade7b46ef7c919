"""The data stage: read local files, normalize rows to chats, dedupe, split, tokenize.

``prepare`` turns the user's files (already downloaded by the caller) into
:class:`Example` objects (a chat, or plain text) split into train and validation with
no example in both. ``tokenize_examples`` renders each chat with the tokenizer's chat
template and labels only the assistant tokens (-100 elsewhere) so the loss is taken on
responses alone; plain text is trained on every token.

Every problem a user can fix is raised as :class:`DatasetInvalid` with a hint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import DatasetConfig, FieldMapping
from .errors import DatasetInvalid

log = logging.getLogger("kubetune.trainer")

IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
DETECTION_ROWS = 10
MAX_ROWS_SHOWN = 5  # row numbers listed per problem (then "...")
MAX_PROBLEM_CHARS = 400  # one problem's message (a cell's value may be megabytes)
MESSAGE_BUDGET = 1800  # problems listed in one error message; the rest are counted
MAX_PROBLEMS_LOGGED = 50
MAX_HINTS = 3
MAX_KEYS_SHOWN = 6

# The keys each format needs (before field mapping), in auto-detection order.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "text": ("text",),
}
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "alpaca": ("input", "system"),
    "dolly": ("context", "system"),
}

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}

# Used when the tokenizer has no chat template: ChatML, plus the tokenizer's own EOS
# after each assistant turn (when it has one that is not <|im_end|>) so that a base
# model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- if message['role'] == 'assistant' and eos_token is defined and eos_token"
    " and eos_token != '<|im_end|>' -%}{{- eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Example:
    """One normalized training example: a chat (role, content pairs) or plain text.

    ``origin`` (file and line or row) only names the example in messages: two examples
    with the same content are equal (and duplicates) wherever they came from."""

    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None
    origin: str = field(default="", compare=False)

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def chat(self) -> list[dict[str, str]]:
        """The messages as chat-template input."""
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class PreparedData:
    """Train and validation examples plus what happened on the way (JSON-able stats) and
    the warnings a user should see (data dropped or changed on the way)."""

    train: list[Example]
    validation: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _RowError(Exception):
    """One row's problem: ``field`` (the format's key) and what is wrong with it."""

    def __init__(self, field: str, problem: str = "missing or empty") -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


class Problems:
    """Every problem found in one pass over the dataset, raised together as one
    :class:`DatasetInvalid`, so that a user fixes them all after one run, not one a run.

    The message lists as many problems as fit :data:`MESSAGE_BUDGET` characters (the
    termination message holds 4 KiB) and counts the rest; the log lists the first
    :data:`MAX_PROBLEMS_LOGGED`."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []  # (message, hint)

    def add(self, message: str, hint: str) -> None:
        self.found.append((_clip(message, MAX_PROBLEM_CHARS), hint))

    def __len__(self) -> int:
        return len(self.found)

    def raise_if_any(self) -> None:
        if not self.found:
            return
        if len(self.found) == 1:
            raise DatasetInvalid(*self.found[0])
        total = len(self.found)
        for number, (message, _) in enumerate(self.found[:MAX_PROBLEMS_LOGGED], start=1):
            log.error("dataset problem %d of %d: %s", number, total, message)
        shown: list[str] = []
        for message, _ in self.found:
            if shown and sum(map(len, shown)) + len(message) > MESSAGE_BUDGET:
                break
            shown.append(message)
        listed = "; ".join(f"({number}) {message}" for number, message in enumerate(shown, 1))
        rest = (
            f"; and {total - len(shown)} more (the pod log lists them)"
            if total > len(shown)
            else ""
        )
        hints = list(dict.fromkeys(hint for _, hint in self.found))
        raise DatasetInvalid(
            f"{total} problems in the dataset: {listed}{rest}",
            hint=_clip("; ".join(hints[:MAX_HINTS]), MAX_PROBLEM_CHARS),
        )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- reading


def expand_paths(paths: Iterable[Path], problems: Problems | None = None) -> list[Path]:
    """Files to read: each file as is, each directory's supported files (sorted)."""
    own = Problems() if problems is None else problems
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
            )
            if not found:
                own.add(
                    f"dataset directory {path.name} has no {'/'.join(SUPPORTED_EXTENSIONS)} files",
                    hint="point dataset.sources at the data files or a prefix that holds them",
                )
            files.extend(found)
        else:
            files.append(path)
    if problems is None:
        own.raise_if_any()
    return files


def read_rows(path: Path, problems: Problems | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Rows of one file as ``(number, row)``: the line number for JSONL and CSV (blank
    JSONL lines are skipped), the 1-based row for JSON lists and Parquet.

    Every problem (unreadable lines, rows that are not objects, ...) goes into
    ``problems``, and the rows that could be read are returned; without ``problems`` the
    first call that finds any raises them as one DatasetInvalid."""
    own = Problems() if problems is None else problems
    rows: list[tuple[int, Any]] = []
    reader = _READERS.get(path.suffix.lower())
    unit = _unit(path)
    if reader is None:
        own.add(
            f"dataset file {path.name} has an unsupported extension {path.suffix!r}",
            hint=f"convert it to one of {', '.join(SUPPORTED_EXTENSIONS)}",
        )
    elif not path.is_file():
        own.add(f"dataset file {path} does not exist", hint="check dataset.sources")
    elif (kind := _binary_kind(path)) is not None:
        own.add(f"dataset file {path.name} is not UTF-8 text: it looks {kind[0]}", hint=kind[1])
    else:
        rows = list(reader(path, own))
    bad = [number for number, row in rows if not isinstance(row, dict)]
    if bad:
        own.add(
            f"{_where(unit, bad)} of {path.name} {_be(bad)} not "
            + ("an object" if len(bad) == 1 else "objects"),
            hint="each row must be an object with named fields",
        )
    if problems is None:
        own.raise_if_any()
    return [(number, row) for number, row in rows if isinstance(row, dict)]


NOT_UTF8_HINT = (
    "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8 in.jsonl > out.jsonl), "
    "or fix or drop those lines"
)
# File starts that mean "not a text file", what the file looks like, and the fix.
_MAGIC: dict[bytes, tuple[str, str]] = {
    b"\x1f\x8b": ("gzip-compressed", "decompress it (gunzip) before uploading"),
    b"PK\x03\x04": ("like a zip archive", "unzip it and point dataset.sources at the files"),
    b"BZh": ("bzip2-compressed", "decompress it (bunzip2) before uploading"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed", "decompress it (unzstd) before uploading"),
    b"PAR1": ("like Parquet", "give it the .parquet extension"),
    b"\xff\xfe": ("UTF-16 encoded", "save it as UTF-8 (iconv -f utf-16 -t utf-8)"),
    b"\xfe\xff": ("UTF-16 encoded", "save it as UTF-8 (iconv -f utf-16 -t utf-8)"),
}


def _binary_kind(path: Path) -> tuple[str, str] | None:
    """What a text-format file looks like when it is not text, and the fix; else None."""
    if path.suffix.lower() == ".parquet":
        return None
    with path.open("rb") as handle:
        head = handle.read(4096)
    for magic, (kind, hint) in _MAGIC.items():
        if head.startswith(magic):
            return f"{kind} (it starts with bytes {head[:4].hex(' ')})", hint
    if b"\x00" in head:
        return "binary (it has NUL bytes)", "upload the data as UTF-8 JSONL, JSON, CSV or Parquet"
    return None


def _unit(path: Path) -> str:
    """What a row number counts in this file: lines (JSONL, CSV) or rows (JSON, Parquet)."""
    return "line" if path.suffix.lower() in (".jsonl", ".csv") else "row"


def _where(unit: str, numbers: Sequence[int]) -> str:
    """``line 3``, ``lines 3, 7`` or ``12 lines (3, 7, 9, 10, 11, ...)``."""
    if len(numbers) == 1:
        return f"{unit} {numbers[0]}"
    if len(numbers) <= MAX_ROWS_SHOWN:
        return f"{unit}s {_numbers(numbers)}"
    return f"{len(numbers)} {unit}s ({_numbers(numbers)})"


def _undecodable(error: UnicodeDecodeError) -> str:
    return f"byte 0x{error.object[error.start]:02x} at byte offset {error.start}"


def _json_problem(error: ValueError | RecursionError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return _clip(str(error), 120)  # e.g. an integer with more digits than Python converts


def _read_jsonl(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    not_text: list[int] = []
    not_json: list[int] = []
    first_text = first_json = ""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                not_text.append(number)
                first_text = first_text or _undecodable(error)
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
                not_json.append(number)
                first_json = first_json or _json_problem(error)
                continue
            yield number, value
    if not_text:
        problems.add(_bad_lines(not_text, path.name, "not UTF-8 text", first_text), NOT_UTF8_HINT)
    if not_json:
        problems.add(
            _bad_lines(not_json, path.name, "not valid JSON", first_json),
            hint="JSONL files need one JSON object per line",
        )


def _bad_lines(numbers: Sequence[int], name: str, what: str, detail: str) -> str:
    """``line 3 of a.jsonl is WHAT: DETAIL``, or for several lines
    ``lines 3, 7 of a.jsonl are WHAT (line 3: DETAIL)`` (the first line's detail)."""
    if len(numbers) == 1:
        return f"line {numbers[0]} of {name} is {what}: {detail}"
    return f"{_where('line', numbers)} of {name} are {what} (line {numbers[0]}: {detail})"


def _be(numbers: Sequence[int]) -> str:
    return "is" if len(numbers) == 1 else "are"


def _read_json(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        problems.add(
            f"line {line} of {path.name} is not UTF-8 text ({_undecodable(error)})",
            hint=NOT_UTF8_HINT,
        )
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # really JSON Lines with a .json name
            yield from _read_jsonl(path, problems)
            return
        problems.add(
            f"line {error.lineno} of {path.name} is not valid JSON: {_json_problem(error)}",
            hint="fix the file, or use .jsonl with one object per line",
        )
        return
    except (ValueError, RecursionError) as error:
        problems.add(
            f"{path.name} is not valid JSON: {_json_problem(error)}",
            hint="fix the file, or use .jsonl with one object per line",
        )
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        problems.add(
            f"{path.name} holds a JSON {type(data).__name__}, not a list of rows",
            hint='use a JSON list of objects, {"data": [...]}, or JSONL',
        )
        return
    yield from enumerate(data, start=1)


# Python's csv refuses cells over 128 KiB by default; a long document is a valid cell.
CSV_FIELD_LIMIT = 2**31 - 1


def _read_csv(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    not_text: list[int] = []
    first_text = ""

    def lines() -> Iterator[str]:
        nonlocal first_text
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield raw.decode("utf-8-sig")
                except UnicodeDecodeError as error:
                    not_text.append(number)
                    first_text = first_text or _undecodable(error)
                    yield raw.decode("utf-8", errors="replace")

    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.DictReader(lines())
    extra: list[int] = []
    try:
        for row in reader:
            if None in row:  # more cells than the header has columns
                extra.append(reader.line_num)
            yield reader.line_num, {key: value for key, value in row.items() if key is not None}
    except csv.Error as error:
        problems.add(
            f"line {reader.line_num} of {path.name} is not valid CSV: {error}",
            hint="re-export the file as CSV with a header row (quote cells with commas, quotes "
            "or line breaks)",
        )
    if extra:
        problems.add(
            f"{_where('line', extra)} of {path.name} {'has' if len(extra) == 1 else 'have'} "
            f"more cells than the header's {len(reader.fieldnames or [])} columns",
            hint="quote cells that contain commas, or add the missing column names to the header",
        )
    if not_text:
        problems.add(_bad_lines(not_text, path.name, "not UTF-8 text", first_text), NOT_UTF8_HINT)


def _read_parquet(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as error:  # ArrowInvalid, ArrowIOError...
        problems.add(
            f"{path.name} could not be read as Parquet: {_clip(str(error), 200)}",
            hint="re-export the file (for example with pandas' to_parquet); a truncated "
            "upload looks like this too",
        )
        return
    yield from enumerate(table.to_pylist(), start=1)


_READERS: dict[str, Callable[[Path, Problems], Iterator[tuple[int, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --------------------------------------------------------------------------- formats


def _column(fields: FieldMapping, key: str) -> str:
    """The user's column name for a format key."""
    return getattr(fields, key) or key


def detect_format(rows: Sequence[Mapping[str, Any]], fields: FieldMapping, name: str) -> str:
    """The format whose keys the first rows have; DatasetInvalid listing keys if none."""
    seen: set[str] = set()
    for row in rows[:DETECTION_ROWS]:
        seen.update(row)
    for fmt, keys in FORMAT_KEYS.items():
        if all(_column(fields, key) in seen for key in keys):
            return fmt
    expected = "; ".join(
        f"{fmt}: {', '.join(_column(fields, key) for key in keys)}"
        for fmt, keys in FORMAT_KEYS.items()
    )
    found = sorted(map(str, seen))
    shown = ", ".join(_clip(key, 30) for key in found[:MAX_KEYS_SHOWN])
    more = ", ..." if len(found) > MAX_KEYS_SHOWN else ""
    raise DatasetInvalid(
        f"could not detect the format of {name}: each format expects keys ({expected}), "
        f"but its rows have {len(found)} keys [{shown}{more}]",
        hint="set spec.dataset.format, and spec.dataset.fieldMapping to name your columns "
        "(e.g. fieldMapping.output: answer)",
    )


def _text(row: Mapping[str, Any], fields: FieldMapping, key: str, *, required: bool) -> str:
    value = row.get(_column(fields, key))
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _RowError(key)
        return ""
    if not isinstance(value, str | int | float):
        raise _RowError(key, f"not text (a {type(value).__name__})")
    return str(value)


def _with_system(
    row: Mapping[str, Any], fields: FieldMapping, turns: list[tuple[str, str]]
) -> Example:
    system = _text(row, fields, "system", required=False)
    prefix = [("system", system)] if system else []
    return Example(messages=tuple(prefix + turns))


def _instruction_example(
    row: Mapping[str, Any], fields: FieldMapping, extra_key: str, answer_key: str
) -> Example:
    instruction = _text(row, fields, "instruction", required=True)
    answer = _text(row, fields, answer_key, required=True)
    extra = _text(row, fields, extra_key, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return _with_system(row, fields, [("user", prompt), ("assistant", answer)])


def _alpaca(row: Mapping[str, Any], fields: FieldMapping) -> Example:
    return _instruction_example(row, fields, "input", "output")


def _dolly(row: Mapping[str, Any], fields: FieldMapping) -> Example:
    return _instruction_example(row, fields, "context", "response")


def _text_example(row: Mapping[str, Any], fields: FieldMapping) -> Example:
    return Example(text=_text(row, fields, "text", required=True))


def _turns(row: Mapping[str, Any], fields: FieldMapping, key: str) -> Example:
    """A sharegpt (from/value) or messages (role/content) list as an Example."""
    value = row.get(_column(fields, key))
    if isinstance(value, str) and value.lstrip().startswith("["):  # JSON in a CSV cell
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, or too deep
            raise _RowError(key, "not a valid JSON list") from error
    if not isinstance(value, list) or not value:
        raise _RowError(key)
    turns = [_turn(turn, key) for turn in value]
    if "assistant" not in {role for role, _ in turns}:
        raise _RowError(key, "without an assistant turn")
    return Example(messages=tuple(turns))


def _turn(turn: Any, key: str) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise _RowError(key, "with a turn that is not an object")
    raw_role = turn.get("role", turn.get("from"))
    role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
    if role is None:
        raise _RowError(key, f"with an unknown role {_clip(repr(raw_role), 40)}")
    content = turn.get("content", turn.get("value"))
    if isinstance(content, list):  # OpenAI content parts
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise _RowError(key, "with non-text content parts")
        content = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str):
        raise _RowError(key, "with a turn that has no text content")
    return role, content


NORMALIZERS: dict[str, Callable[[Mapping[str, Any], FieldMapping], Example]] = {
    "alpaca": _alpaca,
    "dolly": _dolly,
    "sharegpt": lambda row, fields: _turns(row, fields, "conversations"),
    "messages": lambda row, fields: _turns(row, fields, "messages"),
    "text": _text_example,
}


def normalize_rows(
    rows: Sequence[tuple[int, dict[str, Any]]],
    fmt: str,
    fields: FieldMapping,
    name: str,
    problems: Problems | None = None,
    *,
    unit: str = "row",
) -> list[Example]:
    """Every row as an Example (its origin: ``name`` and the row's ``unit`` and number).

    Each distinct problem (field, what is wrong) goes into ``problems`` with the rows
    that have it; without ``problems`` they are raised as one DatasetInvalid."""
    own = Problems() if problems is None else problems
    normalize = NORMALIZERS[fmt]
    examples: list[Example] = []
    found: dict[tuple[str, str], list[int]] = {}
    for number, row in rows:
        try:
            example = normalize(row, fields)
        except _RowError as error:
            found.setdefault((error.field, error.problem), []).append(number)
        else:
            examples.append(replace(example, origin=f"{name} {unit} {number}"))
    for (key, problem), numbers in found.items():
        column = _column(fields, key)
        named = f"field {key!r}" + (f" (column {column!r})" if column != key else "")
        own.add(
            f"{len(numbers)} of {len(rows)} rows in {name} have {named} {problem} "
            f"({unit}s {_numbers(numbers)}; format {fmt})",
            hint=_fix_hint(fmt, key),
        )
    if problems is None:
        own.raise_if_any()
    return examples


def _fix_hint(fmt: str, key: str) -> str:
    needs = ", ".join(FORMAT_KEYS[fmt])
    return (
        f"every {fmt} row needs {needs}; fix or drop those rows, or if the data is in another "
        f"column set spec.dataset.fieldMapping.{key} (or spec.dataset.format if it is not {fmt})"
    )


def _numbers(numbers: Sequence[int]) -> str:
    shown = ", ".join(map(str, numbers[:MAX_ROWS_SHOWN]))
    return shown + (", ..." if len(numbers) > MAX_ROWS_SHOWN else "")


# --------------------------------------------------------------------------- preparing


def load_files(
    paths: Sequence[Path], config: DatasetConfig, split: str, problems: Problems | None = None
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Examples of all files, and one provenance record (sha256, rows, format) per file.

    Problems of every file go into ``problems``; without it they are raised together."""
    own = Problems() if problems is None else problems
    examples: list[Example] = []
    records: list[dict[str, Any]] = []
    for path in expand_paths(paths, own):
        rows = read_rows(path, own)
        if not path.is_file():
            continue
        fmt: str = config.format
        if fmt == "auto" and rows:
            try:
                fmt = detect_format([row for _, row in rows], config.fields, path.name)
            except DatasetInvalid as error:
                own.add(error.message, error.hint or "")
                continue
        if rows:
            examples += normalize_rows(rows, fmt, config.fields, path.name, own, unit=_unit(path))
        records.append(
            {
                "path": str(path),
                "name": path.name,
                "split": split,
                "sha256": _sha256(path),
                "rows": len(rows),
                "format": fmt,
            }
        )
    if problems is None:
        own.raise_if_any()
    return examples, records


def dedupe(examples: Iterable[Example]) -> tuple[list[Example], int]:
    """Examples without exact duplicates (first kept, order kept) and how many went."""
    examples = list(examples)
    unique = list(dict.fromkeys(examples))
    return unique, len(examples) - len(unique)


def split_examples(
    examples: Sequence[Example], ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random ``ratio`` of the examples for validation (at least one when
    ``ratio > 0`` and there are two or more); both parts keep the input order."""
    if ratio <= 0 or len(examples) < 2:
        return list(examples), []
    n_validation = min(max(1, round(len(examples) * ratio)), len(examples) - 1)
    chosen = set(random.Random(seed).sample(range(len(examples)), n_validation))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    validation = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, validation


def prepare(
    paths: Sequence[Path],
    config: DatasetConfig,
    *,
    validation_paths: Sequence[Path] = (),
    seed: int = 42,
) -> PreparedData:
    """Read, normalize, dedupe and split the dataset; no example ends up in both splits.

    With ``validation_paths`` those files are the validation set (minus anything also
    in train); otherwise ``config.validation_ratio`` of the train rows is held out.
    Every problem in any file is raised at once (one DatasetInvalid); what is dropped on
    the way (empty files, duplicates, validation examples also in train) is a warning."""
    problems = Problems()
    train, sources = load_files(paths, config, "train", problems)
    if not train and not problems:
        problems.add(
            "the dataset is empty: no rows in " + ", ".join(r["name"] for r in sources),
            hint="check spec.dataset.sources points at files with data",
        )
    validation: list[Example] = []
    if validation_paths:
        validation, records = load_files(validation_paths, config, "validation", problems)
        sources += records
    problems.raise_if_any()
    warnings = [f"{r['name']} ({r['split']}) has no rows" for r in sources if not r["rows"]]
    read = len(train)
    train, duplicates = dedupe(train)
    if duplicates:
        warnings.append(
            f"{duplicates} of {read} training rows repeat an earlier row exactly and were "
            f"dropped; {_examples(len(train), 'distinct')} remain"
        )
    leakage = 0
    if validation_paths:
        validation_read = len(validation)
        validation, validation_duplicates = dedupe(validation)
        duplicates += validation_duplicates
        if validation_duplicates:
            warnings.append(
                f"{validation_duplicates} of {validation_read} validation rows repeat an "
                "earlier row exactly and were dropped"
            )
        in_train = set(train)
        kept = [example for example in validation if example not in in_train]
        leakage = len(validation) - len(kept)
        if leakage:
            warnings.append(_leakage_warning(leakage, len(validation)))
        validation = kept
    else:
        train, validation = split_examples(train, config.validation_ratio, seed)
        if config.validation_ratio > 0 and not validation:
            warnings.append(
                f"only {_examples(len(train), 'distinct')}: none held out for validation, so "
                "the run reports no eval loss"
            )
    stats = {
        "rows_read": sum(record["rows"] for record in sources),
        "duplicates_removed": duplicates,
        "leakage_removed": leakage,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "sources": sources,
    }
    return PreparedData(train=train, validation=validation, stats=stats, warnings=warnings)


def _examples(count: int, kind: str) -> str:
    return f"{count} {kind} example" + ("" if count == 1 else "s")


def _leakage_warning(leaked: int, total: int) -> str:
    if leaked < total:
        return (
            f"{leaked} of {total} validation examples also appear in the training data and "
            "were dropped from validation (so eval loss measures unseen examples)"
        )
    return (
        f"all {total} validation examples also appear in the training data and were "
        "dropped: no validation examples remain, so the run reports no eval loss; give "
        "spec.dataset.validation.sources that differ from the training data, or use "
        "validation.percent"
    )


def tokenize_warnings(stats: Mapping[str, int], split: str, max_seq_length: int) -> list[str]:
    """What :func:`tokenize_examples` cut or dropped, as warnings for the user."""
    warnings = []
    total = stats.get("tokenized_examples", 0) + stats.get("dropped_examples", 0)
    if stats.get("truncated_examples"):
        warnings.append(
            f"{stats['truncated_examples']} of {total} {split} examples are longer than "
            f"maxSeqLength {max_seq_length} tokens and were truncated"
        )
    if stats.get("dropped_examples"):
        warnings.append(
            f"{stats['dropped_examples']} of {total} {split} examples have no response "
            f"tokens within maxSeqLength {max_seq_length} and were dropped "
            "(raise spec.dataset.maxSeqLength or shorten the prompts)"
        )
    return warnings


# --------------------------------------------------------------------------- tokenizing


def chat_template_for(tokenizer: Any) -> str:
    """The tokenizer's (default) chat template, or :data:`DEFAULT_CHAT_TEMPLATE`."""
    if not getattr(tokenizer, "chat_template", None):
        return DEFAULT_CHAT_TEMPLATE
    return str(tokenizer.get_chat_template())  # resolves named templates to "default"


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the default one (so the saved artifact
    formats prompts as in training). True if it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


class _TemplateRejected(Exception):
    """The chat template raised on a conversation (jinja2's error, as text)."""


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    """``tokenizer.apply_chat_template``, with a template's own failure (a jinja2 error,
    ``raise_exception`` in the template, a type error inside it) as _TemplateRejected."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as error:
        roles = ", ".join(message["role"] for message in messages)
        raise _TemplateRejected(f"{_clip(str(error), 200)} (roles: {roles})") from error


def _render(
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    return str(
        _apply_template(
            tokenizer,
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    )


def assistant_char_spans(
    tokenizer: Any, template: str, messages: list[dict[str, str]], text: str
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered chat) that the model should learn.

    Each assistant turn's span runs from the end of the prompt rendered with the
    generation prompt to the end of the chat rendered through that turn (so it includes
    the end-of-turn token), minus trailing whitespace. If the template does not render
    prefixes as prefixes, the turn's content is searched for instead (plus an EOS right
    after it).
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _prefix_span(tokenizer, template, messages, index, text)
        if span is None or span[0] < cursor:
            span = _search_span(tokenizer, message["content"], text, cursor)
        if span is not None:
            spans.append(span)
            cursor = span[1]
    return spans


def _prefix_span(
    tokenizer: Any, template: str, messages: list[dict[str, str]], index: int, text: str
) -> tuple[int, int] | None:
    if index == 0:
        return None
    prompt = _render(tokenizer, template, messages[:index], generation_prompt=True)
    through = _render(tokenizer, template, messages[: index + 1], generation_prompt=False)
    if not (through.startswith(prompt) and text.startswith(through)):
        return None
    end = len(through.rstrip())
    return (len(prompt), end) if end > len(prompt) else None


def _search_span(tokenizer: Any, content: str, text: str, cursor: int) -> tuple[int, int] | None:
    start = text.find(content, cursor) if content else -1
    if start < 0:
        return None
    end = start + len(content)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and text.startswith(eos, end):
        end += len(eos)
    return start, end


def _labels_from_spans(
    offsets: Sequence[tuple[int, int]], input_ids: Sequence[int], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Token ids where a token overlaps a span, IGNORE_INDEX elsewhere."""
    return [
        token
        if end > start
        and any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, offsets, strict=True)
    ]


def encode_chat(tokenizer: Any, template: str, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one chat, labels only on assistant tokens."""
    messages = example.chat()
    if _GENERATION_TAG.search(template):  # the template marks assistant text itself
        encoded = _apply_template(
            tokenizer,
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = list(encoded["input_ids"])
        mask = encoded["assistant_masks"]
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    text = _render(tokenizer, template, messages, generation_prompt=False)
    spans = assistant_char_spans(tokenizer, template, messages, text)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    return ids, _labels_from_spans(encoded["offset_mapping"], ids, spans)


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of plain text: BOS as the tokenizer adds it, EOS appended,
    every token labelled."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)


def char_limit(tokenizer: Any, max_seq_length: int) -> int:
    """Characters that surely hold more than ``max_seq_length`` tokens: no token's text is
    longer than the longest vocabulary entry (byte-level entries are at least as long as
    the text they stand for), so text cut there tokenizes to the same first tokens."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    return (max_seq_length + 2) * max(longest, 1)


def cut_example(example: Example, limit: int) -> Example:
    """``example`` with every text cut to ``limit`` characters: what lies beyond is
    truncated away after tokenizing anyway, and a 10 MB row would take seconds to
    tokenize whole. The first ``max_seq_length`` tokens do not change (see
    :func:`char_limit`): a text or turn cut here already fills them."""
    if example.text is not None:
        return (
            example if len(example.text) <= limit else replace(example, text=example.text[:limit])
        )
    if all(len(content) <= limit for _, content in example.messages):
        return example
    messages = tuple((role, content[:limit]) for role, content in example.messages)
    return replace(example, messages=messages)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_seq_length: int,
    *,
    allow_empty: bool = False,
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenize examples to ``{"input_ids", "labels"}`` rows of at most ``max_seq_length``.

    Returns the rows and stats: ``tokenized_examples``, ``truncated_examples`` (longer
    than max_seq_length, cut), ``dropped_examples`` (nothing left to learn after the cut),
    ``tokens`` and ``label_tokens``. Raises DatasetInvalid when no row is left, unless
    ``allow_empty`` (e.g. for an optional validation set).
    """
    template = chat_template_for(tokenizer)
    limit = char_limit(tokenizer, max_seq_length)
    rows: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    rejected: list[tuple[str, str]] = []  # (origin, the template's error)
    for example in examples:
        example = cut_example(example, limit)
        if example.text is not None:
            ids, labels = encode_text(tokenizer, example.text)
        else:
            try:
                ids, labels = encode_chat(tokenizer, template, example)
            except _TemplateRejected as error:
                rejected.append((example.origin or "a conversation", str(error)))
                continue
        if len(ids) > max_seq_length:
            truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        # labels[0] is never predicted (the model shifts labels by one), so it doesn't count
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if rejected:
        origins = ", ".join(origin for origin, _ in rejected[:MAX_ROWS_SHOWN])
        more = ", ..." if len(rejected) > MAX_ROWS_SHOWN else ""
        raise DatasetInvalid(
            f"the model's chat template rejected {len(rejected)} of {len(examples)} "
            f"conversations ({origins}{more}); the first: {rejected[0][1]}",
            hint="templates of some models reject system prompts or turns that do not "
            "alternate user/assistant; reshape those rows",
        )
    if not rows and not allow_empty:
        raise DatasetInvalid(
            f"no trainable examples: {dropped} of {len(examples)} have no response tokens "
            f"left within maxSeqLength {max_seq_length} ({truncated} were truncated)",
            hint="raise spec.dataset.maxSeqLength or shorten the prompts",
        )
    stats = {
        "tokenized_examples": len(rows),
        "truncated_examples": truncated,
        "dropped_examples": dropped,
        "tokens": sum(len(row["input_ids"]) for row in rows),
        "label_tokens": sum(
            sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows
        ),
    }
    return rows, stats
