"""The data stage: reading, formats, errors, dedupe, split, tokenization with masking."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

from kubetune_trainer.config import DatasetConfig, FieldMapping  # noqa: E402
from kubetune_trainer.data import (  # noqa: E402
    IGNORE_INDEX,
    Example,
    prepare,
    tokenize_examples,
)
from kubetune_trainer.errors import DatasetInvalid  # noqa: E402
from kubetune_trainer.tiny import build_tiny_tokenizer, generate_instruction_dataset  # noqa: E402

# --------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def config(**overrides: Any) -> DatasetConfig:
    return DatasetConfig(**{"sources": ["file:///unused"], "validation_ratio": 0.0, **overrides})


def load(paths: list[Path], **overrides: Any) -> list[Example]:
    return prepare(paths, config(**overrides)).train


def chat(*turns: tuple[str, str]) -> Example:
    return Example(messages=tuple(turns))


ALPACA = [
    {"instruction": "Add 3 and 4", "input": "", "output": "7"},
    {"instruction": "Uppercase the text.", "input": "foo bar", "output": "FOO BAR"},
]
ALPACA_EXAMPLES = [
    chat(("user", "Add 3 and 4"), ("assistant", "7")),
    chat(("user", "Uppercase the text.\n\nfoo bar"), ("assistant", "FOO BAR")),
]
DOLLY = [
    {"instruction": "Summarize.", "context": "A long text.", "response": "Short."},
    {"instruction": "Say hi.", "context": "", "response": "hi"},
]
DOLLY_EXAMPLES = [
    chat(("user", "Summarize.\n\nA long text."), ("assistant", "Short.")),
    chat(("user", "Say hi."), ("assistant", "hi")),
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Add 1 and 1"},
            {"from": "gpt", "value": "2"},
        ]
    },
    {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]},
]
SHAREGPT_EXAMPLES = [
    chat(
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Add 1 and 1"),
        ("assistant", "2"),
    ),
    chat(("user", "Q"), ("assistant", "A")),
]
MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "You add."},
            {"role": "user", "content": "2 2"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "part one"}]},
            {"role": "assistant", "content": "ok"},
        ]
    },
]
MESSAGES_EXAMPLES = [
    chat(("system", "You add."), ("user", "2 2"), ("assistant", "4")),
    chat(("user", "part one"), ("assistant", "ok")),
]
TEXT = [{"text": "The quick brown fox."}, {"text": "A lazy dog."}]
TEXT_EXAMPLES = [Example(text="The quick brown fox."), Example(text="A lazy dog.")]


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["auto", "alpaca"])
def test_alpaca_jsonl(tmp_path: Path, fmt: str) -> None:
    assert load([write_jsonl(tmp_path / "a.jsonl", ALPACA)], format=fmt) == ALPACA_EXAMPLES


def test_dolly_json_list_and_data_object(tmp_path: Path) -> None:
    as_list = write_json(tmp_path / "list.json", DOLLY)
    as_object = write_json(tmp_path / "object.json", {"data": DOLLY})
    assert load([as_list]) == DOLLY_EXAMPLES
    assert load([as_object], format="dolly") == DOLLY_EXAMPLES


def test_json_file_that_is_really_jsonl(tmp_path: Path) -> None:
    assert load([write_jsonl(tmp_path / "lines.json", DOLLY)]) == DOLLY_EXAMPLES


def test_sharegpt_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "s.parquet", SHAREGPT)
    assert load([path]) == SHAREGPT_EXAMPLES
    assert load([path], format="sharegpt") == SHAREGPT_EXAMPLES


def test_messages_jsonl_and_csv_cells(tmp_path: Path) -> None:
    assert load([write_jsonl(tmp_path / "m.jsonl", MESSAGES)]) == MESSAGES_EXAMPLES
    cells = [{"messages": json.dumps(row["messages"])} for row in MESSAGES]
    assert load([write_csv(tmp_path / "m.csv", cells)], format="messages") == MESSAGES_EXAMPLES


def test_text_csv(tmp_path: Path) -> None:
    examples = load([write_csv(tmp_path / "t.csv", TEXT)])
    assert examples == TEXT_EXAMPLES
    assert all(example.is_text for example in examples)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (ALPACA, "alpaca"),
        (DOLLY, "dolly"),
        (SHAREGPT, "sharegpt"),
        (MESSAGES, "messages"),
        (TEXT, "text"),
    ],
)
def test_auto_detection_records_the_format(
    tmp_path: Path, rows: list[dict[str, Any]], expected: str
) -> None:
    prepared = prepare([write_jsonl(tmp_path / "d.jsonl", rows)], config())
    assert [source["format"] for source in prepared.stats["sources"]] == [expected]


def test_auto_detection_failure_lists_seen_and_expected_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetInvalid) as caught:
        load([path])
    message = caught.value.message
    assert "[answer, question]" in message
    for expected in ("alpaca: instruction, output", "dolly: instruction, response"):
        assert expected in message
    assert "sharegpt: conversations" in message and "messages: messages" in message
    assert "fieldMapping" in (caught.value.hint or "")


def test_field_mapping_with_auto_detection(tmp_path: Path) -> None:
    rows = [{"question": "Add 3 and 4", "answer": "7", "persona": "Be terse."}]
    fields = FieldMapping(instruction="question", output="answer", system="persona")
    examples = load([write_csv(tmp_path / "q.csv", rows)], fields=fields)
    assert examples == [chat(("system", "Be terse."), ("user", "Add 3 and 4"), ("assistant", "7"))]


def test_field_mapping_for_conversations(tmp_path: Path) -> None:
    rows = [{"dialog": SHAREGPT[1]["conversations"]}]
    fields = FieldMapping(conversations="dialog")
    assert load([write_jsonl(tmp_path / "c.jsonl", rows)], fields=fields) == [SHAREGPT_EXAMPLES[1]]


# --------------------------------------------------------------------------- errors


def test_missing_field_names_the_field_and_rows(tmp_path: Path) -> None:
    rows = [dict(row) for row in ALPACA * 4]
    for index in (1, 4, 5):  # rows 2, 5, 6 (1-based)
        del rows[index]["output"]
    rows[6]["output"] = "  "  # row 7: empty counts as missing
    with pytest.raises(DatasetInvalid) as caught:
        load([write_jsonl(tmp_path / "a.jsonl", rows)], format="alpaca")
    assert "4 of 8 rows in a.jsonl" in caught.value.message
    assert "field 'output'" in caught.value.message
    assert "(lines 2, 5, 6, 7;" in caught.value.message
    assert "fieldMapping.output" in (caught.value.hint or "")


def test_missing_mapped_column_names_the_column_and_truncates_rows(tmp_path: Path) -> None:
    rows = [{"q": f"question {i}", "a": "" if i % 2 else "yes"} for i in range(1, 15)]
    fields = FieldMapping(instruction="q", output="a")
    with pytest.raises(DatasetInvalid) as caught:
        load([write_csv(tmp_path / "q.csv", rows)], format="alpaca", fields=fields)
    message = caught.value.message
    assert "7 of 14 rows" in message and "field 'output' (column 'a')" in message
    assert "lines 2, 4, 6, 8, 10, ...;" in message  # CSV: line 1 is the header


def test_bad_turns_are_reported(tmp_path: Path) -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "narrator", "value": "once"}, {"from": "gpt", "value": "x"}]},
    ]
    with pytest.raises(DatasetInvalid, match=r"unknown role 'narrator' \(lines 2;"):
        load([write_jsonl(tmp_path / "s.jsonl", rows)])
    only_user = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DatasetInvalid, match="without an assistant turn"):
        load([write_jsonl(tmp_path / "m.jsonl", only_user)])


def test_invalid_json_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n{not json\n")
    with pytest.raises(DatasetInvalid, match=r"line 3 of bad\.jsonl is not valid JSON"):
        load([path])


def test_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DatasetInvalid, match="dataset is empty") as caught:
        load([path])
    assert caught.value.hint


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DatasetInvalid, match=r"unsupported extension '\.txt'") as caught:
        load([path])
    assert ".jsonl" in (caught.value.hint or "")


# --------------------------------------------------------------------------- dedupe, split


def test_dedupe_split_and_provenance(tmp_path: Path) -> None:
    path = generate_instruction_dataset(tmp_path / "gen.jsonl", n=400, seed=0)
    prepared = prepare([path], config(validation_ratio=0.1), seed=5)
    stats = prepared.stats
    assert stats["rows_read"] == 400
    assert stats["duplicates_removed"] == 8
    assert stats["leakage_removed"] == 0
    assert (stats["train_examples"], stats["validation_examples"]) == (353, 39)
    assert len(prepared.train) == 353 and len(prepared.validation) == 39
    assert not set(prepared.train) & set(prepared.validation)
    assert len(set(prepared.train)) == len(prepared.train)
    [source] = stats["sources"]
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (source["rows"], source["format"], source["split"]) == (400, "alpaca", "train")

    same = prepare([path], config(validation_ratio=0.1), seed=5)
    other = prepare([path], config(validation_ratio=0.1), seed=6)
    assert same.validation == prepared.validation
    assert other.validation != prepared.validation


def test_separate_validation_files_drop_leaked_examples(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA + DOLLY)  # alpaca + dolly files
    validation_rows = [ALPACA[1], {"instruction": "New", "input": "", "output": "row"}]
    validation = write_jsonl(tmp_path / "val.jsonl", [*validation_rows, validation_rows[1]])
    with pytest.raises(DatasetInvalid):  # one file, one format: dolly rows lack 'output'
        prepare([train], config(format="alpaca"))
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    prepared = prepare([train], config(validation_ratio=0.5), validation_paths=[validation])
    assert prepared.train == ALPACA_EXAMPLES  # the ratio is ignored with validation files
    assert prepared.validation == [chat(("user", "New"), ("assistant", "row"))]
    assert prepared.stats["leakage_removed"] == 1
    assert prepared.stats["duplicates_removed"] == 1
    assert prepared.stats["rows_read"] == 5
    assert [s["split"] for s in prepared.stats["sources"]] == ["train", "validation"]


def test_directory_sources_mix_formats_per_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    write_parquet(tmp_path / "b.parquet", DOLLY)
    (tmp_path / "_SUCCESS").write_text("")
    assert load([tmp_path]) == ALPACA_EXAMPLES + DOLLY_EXAMPLES


# --------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def labelled(tokenizer: Any, row: dict[str, list[int]]) -> str:
    ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    return tokenizer.decode(ids)


def test_prompt_is_masked_and_response_is_learned(tokenizer: Any) -> None:
    rows, stats = tokenize_examples(ALPACA_EXAMPLES, tokenizer, 256)
    assert [labelled(tokenizer, row) for row in rows] == ["7<|im_end|>", "FOO BAR<|im_end|>"]
    first = rows[0]
    assert tokenizer.decode(first["input_ids"]) == (
        "<|im_start|>user\nAdd 3 and 4<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n"
    )
    assert first["labels"][-1] == IGNORE_INDEX  # the newline after <|im_end|>
    assert stats["tokenized_examples"] == 2
    assert stats["label_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in row["labels"]) for row in rows
    )


def test_every_assistant_turn_is_learned(tokenizer: Any) -> None:
    rows, _ = tokenize_examples(SHAREGPT_EXAMPLES[:1], tokenizer, 256)
    assert labelled(tokenizer, rows[0]) == "Hello<|im_end|>2<|im_end|>"


def test_default_template_when_tokenizer_has_none(tokenizer: Any) -> None:
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    rows, _ = tokenize_examples(ALPACA_EXAMPLES[:1], bare, 256)
    assert tokenizer.decode(rows[0]["input_ids"]).startswith("<s><|im_start|>user\n")
    assert labelled(tokenizer, rows[0]) == "7<|im_end|>"


def test_template_generation_markers_are_used(tokenizer: Any) -> None:
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    rows, _ = tokenize_examples(SHAREGPT_EXAMPLES[:1], marked, 256)
    assert labelled(tokenizer, rows[0]) == "Hello<|im_end|>2<|im_end|>"


def test_template_without_stable_prefixes_falls_back_to_search(tokenizer: Any) -> None:
    counting = copy.deepcopy(tokenizer)
    counting.chat_template = "turns={{ messages|length }};" + tokenizer.chat_template
    rows, _ = tokenize_examples(SHAREGPT_EXAMPLES[:1], counting, 256)
    assert tokenizer.decode(rows[0]["input_ids"]).startswith("turns=5;<|im_start|>")
    assert labelled(tokenizer, rows[0]) == "Hello<|im_end|>2<|im_end|>"


def test_text_is_learned_on_every_token(tokenizer: Any) -> None:
    rows, _ = tokenize_examples(TEXT_EXAMPLES, tokenizer, 256)
    for row, example in zip(rows, TEXT_EXAMPLES, strict=True):
        assert row["labels"] == row["input_ids"]
        assert tokenizer.decode(row["input_ids"]) == f"{example.text}<|im_end|>"


def test_truncation_and_dropping_are_counted(tokenizer: Any) -> None:
    short_prompt = chat(("user", "Hi"), ("assistant", "apple river " * 30))
    long_prompt = chat(("user", "apple river " * 30), ("assistant", "ok"))
    fits = ALPACA_EXAMPLES[0]
    rows, stats = tokenize_examples([short_prompt, long_prompt, fits], tokenizer, 32)
    assert stats["truncated_examples"] == 2
    assert stats["dropped_examples"] == 1
    assert stats["tokenized_examples"] == 2
    assert len(rows[0]["input_ids"]) == 32
    assert labelled(tokenizer, rows[0]).startswith("apple river")
    assert labelled(tokenizer, rows[1]) == "7<|im_end|>"


def test_all_too_long_is_an_error(tokenizer: Any) -> None:
    long_prompt = chat(("user", "apple river " * 30), ("assistant", "ok"))
    with pytest.raises(DatasetInvalid, match="no trainable examples: 2 of 2") as caught:
        tokenize_examples([long_prompt, long_prompt], tokenizer, 16)
    assert "maxSeqLength" in (caught.value.hint or "")
    rows, stats = tokenize_examples([long_prompt], tokenizer, 16, allow_empty=True)
    assert rows == [] and stats["dropped_examples"] == 1
    assert tokenize_examples([], tokenizer, 16, allow_empty=True)[0] == []
