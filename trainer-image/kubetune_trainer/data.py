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
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DatasetConfig, FieldMapping
from .errors import DatasetInvalid

IGNORE_INDEX = -100
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
DETECTION_ROWS = 10
MAX_ROWS_SHOWN = 5

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
    """One normalized training example: a chat (role, content pairs) or plain text."""

    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def chat(self) -> list[dict[str, str]]:
        """The messages as chat-template input."""
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class PreparedData:
    """Train and validation examples plus what happened on the way (JSON-able stats)."""

    train: list[Example]
    validation: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)


class _RowError(Exception):
    """One row's problem: ``field`` (the format's key) and what is wrong with it."""

    def __init__(self, field: str, problem: str = "missing or empty") -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


# --------------------------------------------------------------------------- reading


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files to read: each file as is, each directory's supported files (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
            )
            if not found:
                raise DatasetInvalid(
                    f"dataset directory {path.name} has no {'/'.join(SUPPORTED_EXTENSIONS)} files",
                    hint="point dataset.sources at the data files or a prefix that holds them",
                )
            files.extend(found)
        else:
            files.append(path)
    return files


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of one file as ``(row number, row)``; row numbers are 1-based per file.

    For JSONL the row number is the line number (blank lines are skipped).
    """
    readers: dict[str, Callable[[Path], Iterator[tuple[int, Any]]]] = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DatasetInvalid(
            f"dataset file {path.name} has an unsupported extension {path.suffix!r}",
            hint=f"convert it to one of {', '.join(SUPPORTED_EXTENSIONS)}",
        )
    if not path.is_file():
        raise DatasetInvalid(f"dataset file {path} does not exist", hint="check dataset.sources")
    rows = list(reader(path))
    bad = [number for number, row in rows if not isinstance(row, dict)]
    if bad:
        raise DatasetInvalid(
            f"{len(bad)} rows in {path.name} are not objects (rows {_numbers(bad)})",
            hint="each row must be an object with named fields",
        )
    return rows


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetInvalid(
                    f"line {number} of {path.name} is not valid JSON: {error.msg}",
                    hint="JSONL files need one JSON object per line",
                ) from error


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # really JSON Lines with a .json name
            yield from _read_jsonl(path)
            return
        raise DatasetInvalid(
            f"{path.name} is not valid JSON: {error.msg} (line {error.lineno})",
            hint="fix the file, or use .jsonl with one object per line",
        ) from error
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetInvalid(
            f"{path.name} holds a JSON {type(data).__name__}, not a list of rows",
            hint='use a JSON list of objects, {"data": [...]}, or JSONL',
        )
    yield from enumerate(data, start=1)


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=1):
            yield number, {key: value for key, value in row.items() if key is not None}


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DatasetInvalid(
            f"{path.name} could not be read as Parquet: {error}", hint="re-export the file"
        ) from error
    yield from enumerate(table.to_pylist(), start=1)


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
    raise DatasetInvalid(
        f"could not detect the format of {name}: its rows have keys "
        f"[{', '.join(sorted(seen))}], but each format expects keys ({expected})",
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
        except json.JSONDecodeError as error:
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
        raise _RowError(key, f"with an unknown role {raw_role!r}")
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
    rows: Sequence[tuple[int, dict[str, Any]]], fmt: str, fields: FieldMapping, name: str
) -> list[Example]:
    """Every row as an Example; DatasetInvalid naming the field and rows on any problem."""
    normalize = NORMALIZERS[fmt]
    examples: list[Example] = []
    problems: dict[tuple[str, str], list[int]] = {}
    for number, row in rows:
        try:
            examples.append(normalize(row, fields))
        except _RowError as error:
            problems.setdefault((error.field, error.problem), []).append(number)
    if problems:
        (key, problem), numbers = max(problems.items(), key=lambda item: len(item[1]))
        column = _column(fields, key)
        named = f"field {key!r}" + (f" (column {column!r})" if column != key else "")
        raise DatasetInvalid(
            f"{len(numbers)} of {len(rows)} rows in {name} have {named} {problem} "
            f"(rows {_numbers(numbers)}; format {fmt})",
            hint=_fix_hint(fmt, key),
        )
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
    paths: Sequence[Path], config: DatasetConfig, split: str
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Examples of all files, and one provenance record (sha256, rows, format) per file."""
    examples: list[Example] = []
    records: list[dict[str, Any]] = []
    for path in expand_paths(paths):
        rows = read_rows(path)
        fmt: str = config.format
        if fmt == "auto" and rows:
            fmt = detect_format([row for _, row in rows], config.fields, path.name)
        examples.extend(normalize_rows(rows, fmt, config.fields, path.name) if rows else [])
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
    """
    train, sources = load_files(paths, config, "train")
    rows_read = sum(record["rows"] for record in sources)
    if not train:
        raise DatasetInvalid(
            "the dataset is empty: no rows in " + ", ".join(r["name"] for r in sources),
            hint="check spec.dataset.sources points at files with data",
        )
    train, duplicates = dedupe(train)
    leakage = 0
    if validation_paths:
        validation, records = load_files(validation_paths, config, "validation")
        sources += records
        rows_read += sum(record["rows"] for record in records)
        validation, validation_duplicates = dedupe(validation)
        duplicates += validation_duplicates
        in_train = set(train)
        kept = [example for example in validation if example not in in_train]
        leakage = len(validation) - len(kept)
        validation = kept
    else:
        train, validation = split_examples(train, config.validation_ratio, seed)
    stats = {
        "rows_read": rows_read,
        "duplicates_removed": duplicates,
        "leakage_removed": leakage,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "sources": sources,
    }
    return PreparedData(train=train, validation=validation, stats=stats)


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


def _render(
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    try:
        return str(
            tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        )
    except Exception as error:  # jinja2 raises TemplateError/TypeError/... from templates
        roles = ", ".join(message["role"] for message in messages)
        raise DatasetInvalid(
            f"the model's chat template rejected a conversation (roles: {roles}): {error}",
            hint="templates of some models reject system prompts or turns that do not "
            "alternate user/assistant; reshape those rows",
        ) from error


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
        encoded = tokenizer.apply_chat_template(
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
    rows: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    for example in examples:
        if example.text is not None:
            ids, labels = encode_text(tokenizer, example.text)
        else:
            ids, labels = encode_chat(tokenizer, template, example)
        if len(ids) > max_seq_length:
            truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        # labels[0] is never predicted (the model shifts labels by one), so it doesn't count
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
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
