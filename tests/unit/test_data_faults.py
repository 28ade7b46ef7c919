"""Malformed datasets: never a crash, every problem in one run, each named by file and line.

Table-driven and fast: ``prepare`` (and ``tokenize_examples`` for chat templates) is
called directly. Each case must raise :class:`DatasetInvalid` (any other exception is a
crash, i.e. exit 22 with a traceback in a pod) whose message names the file and the line
or field, with a hint; its termination message must fit the kubelet's 4 KiB. What the
data stage drops without an error (duplicates, validation rows also in train, cut
examples) must come back as a warning.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

pytest.importorskip("transformers")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

from kubetune_trainer.config import DatasetConfig, FieldMapping  # noqa: E402
from kubetune_trainer.data import (  # noqa: E402
    Example,
    char_limit,
    cut_example,
    prepare,
    tokenize_examples,
    tokenize_warnings,
)
from kubetune_trainer.errors import DatasetInvalid, ExitCode, PreemptionSignal  # noqa: E402
from kubetune_trainer.main import _install_sigterm, as_trainer_error  # noqa: E402
from kubetune_trainer.progress import ProgressState  # noqa: E402
from kubetune_trainer.tiny import build_tiny_tokenizer  # noqa: E402

TERMINATION_LIMIT = 4096


def jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def qa(i: int) -> dict[str, str]:
    return {"instruction": f"question {i}", "output": f"answer {i}"}


GOOD = jsonl(*(qa(i) for i in range(4)))


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return bytes(sink.getvalue().to_pybytes())


def zipped(name: str, data: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


PARQUET = parquet_bytes([qa(i) for i in range(50)])

# id, files {name: bytes} (train), config overrides, substrings the message must hold.
# Names ending in "@val" are validation files.
CASES: list[tuple[str, dict[str, bytes], dict[str, Any], list[str]]] = [
    (
        "invalid-json-line",
        {"a.jsonl": GOOD + b'{"instruction": "q", "output": \n'},
        {},
        ["line 5 of a.jsonl is not valid JSON"],
    ),
    (
        "several-invalid-json-lines",
        {"a.jsonl": b"{bad\n" + GOOD + b"[1, 2\n{'single': 'quotes'}\n"},
        {},
        ["lines 1, 6, 7 of a.jsonl are not valid JSON", "line 1:"],
    ),
    (
        "non-utf8-byte",
        {"latin.jsonl": GOOD + '{"instruction": "café", "output": "x"}\n'.encode("latin-1")},
        {},
        ["line 5 of latin.jsonl is not UTF-8 text", "0xe9"],
    ),
    (
        "utf16-file",
        {"u16.jsonl": GOOD.decode().encode("utf-16")},
        {},
        ["u16.jsonl is not UTF-8 text", "UTF-16"],
    ),
    (
        "gzip-named-jsonl",
        {"data.jsonl": gzip.compress(GOOD)},
        {},
        ["data.jsonl is not UTF-8 text", "gzip"],
    ),
    (
        "zip-named-csv",
        {"data.csv": zipped("data.csv", b"instruction,output\nq,a\n")},
        {},
        ["data.csv is not UTF-8 text", "zip"],
    ),
    (
        "binary-file",
        {"blob.jsonl": bytes(range(256)) * 8},
        {},
        ["blob.jsonl is not UTF-8 text", "NUL"],
    ),
    ("rows-not-objects", {"a.jsonl": GOOD + b"[1, 2]\n42\n"}, {}, ["lines 5, 6 of a.jsonl"]),
    (
        "missing-field",
        {"a.jsonl": GOOD + jsonl({"instruction": "only"})},
        {"format": "alpaca"},
        ["1 of 5 rows in a.jsonl", "field 'output' missing or empty", "lines 5"],
    ),
    (
        "field-is-an-object",
        {"a.jsonl": GOOD + jsonl({"instruction": "q", "output": {"text": "a"}})},
        {},
        ["a.jsonl", "field 'output' not text (a dict)", "lines 5"],
    ),
    (
        "field-is-a-list",
        {"a.jsonl": jsonl({"instruction": ["q"], "output": "a"}) + GOOD},
        {},
        ["field 'instruction' not text (a list)", "lines 1"],
    ),
    (
        "empty-text",
        {"t.jsonl": jsonl({"text": "fine"}, {"text": ""}, {"text": "   "})},
        {},
        ["2 of 3 rows in t.jsonl", "field 'text' missing or empty", "lines 2, 3"],
    ),
    ("empty-file", {"empty.jsonl": b""}, {}, ["dataset is empty", "empty.jsonl"]),
    ("blank-lines-only", {"blank.jsonl": b"\n  \n\n"}, {}, ["dataset is empty", "blank.jsonl"]),
    ("json-object", {"a.json": b'{"rows": []}'}, {}, ["a.json holds a JSON dict"]),
    (
        "json-truncated",
        {"a.json": json.dumps([qa(1), qa(2)], indent=1).encode()[:-9]},
        {},
        ["of a.json is not valid JSON", "line 8"],
    ),
    (
        "json-nested-too-deep",
        {"deep.jsonl": GOOD + b"[" * 100_000 + b"]" * 100_000 + b"\n"},
        {},
        ["line 5 of deep.jsonl is not valid JSON", "nested too deeply"],
    ),
    (
        "json-integer-too-long",
        {"num.jsonl": b'{"instruction": "q", "output": ' + b"9" * 5000 + b"}\n" + GOOD},
        {},
        ["line 1 of num.jsonl is not valid JSON", "digits"],
    ),
    (
        "csv-unknown-columns",
        {"q.csv": b"question,answer\nq,a\n"},
        {},
        ["could not detect the format of q.csv", "question", "fieldMapping"],
    ),
    (
        "csv-extra-cells",
        {"a.csv": b"instruction,output\nq1,a1\nq2,a,b,c\nq3,a3\n"},
        {},
        ["line 3 of a.csv has more cells than the header's 2 columns"],
    ),
    (
        "csv-non-utf8",
        {"a.csv": b"instruction,output\nq1,a1\nq2,caf\xe9\n"},
        {},
        ["line 3 of a.csv is not UTF-8 text"],
    ),
    (
        "csv-missing-cell",
        {"a.csv": b"instruction,output\nq1,a1\nq2\n"},
        {},
        ["rows in a.csv have field 'output' missing or empty (lines 3;"],
    ),
    (
        "parquet-corrupt",
        {"a.parquet": b"PAR1" + bytes(200) + b"PAR1"},
        {},
        ["a.parquet could not be read as Parquet"],
    ),
    (
        "parquet-truncated",
        {"a.parquet": PARQUET[: len(PARQUET) // 2]},
        {},
        ["a.parquet could not be read as Parquet"],
    ),
    (
        "mixed-formats-in-one-file",
        {"mix.jsonl": GOOD * 3 + jsonl({"instruction": "q", "context": "c", "response": "r"})},
        {},
        ["field 'output' missing or empty (lines 13;", "format alpaca"],
    ),
    (
        "unknown-role",
        {"s.jsonl": jsonl({"conversations": [{"from": "narrator", "value": "x" * 5000}]})},
        {},
        ["s.jsonl", "unknown role 'narrator'", "lines 1"],
    ),
    (
        "no-assistant-turn",
        {"m.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}]})},
        {},
        ["m.jsonl", "field 'messages' without an assistant turn"],
    ),
    (
        "turn-not-an-object",
        {"m.jsonl": jsonl({"messages": ["hi", {"role": "assistant", "content": "yo"}]})},
        {},
        ["m.jsonl", "with a turn that is not an object"],
    ),
    (
        "non-text-content-parts",
        {"m.jsonl": jsonl({"messages": [{"role": "assistant", "content": [{"image": 1}]}]})},
        {},
        ["m.jsonl", "non-text content parts"],
    ),
    (
        "bad-json-in-csv-cell",
        {"m.csv": b'messages\n"[{""role"": ""user"", ""content"": "\n'},
        {"format": "messages"},
        ["m.csv", "field 'messages' not a valid JSON list"],
    ),
    ("unsupported-extension", {"data.txt": b"hello"}, {}, ["data.txt", "'.txt'"]),
    (
        "format-set-but-other-data",
        {"d.jsonl": jsonl({"instruction": "q", "context": "c", "response": "r"})},
        {"format": "alpaca"},
        ["d.jsonl", "field 'output' missing or empty"],
    ),
    (
        "field-mapping-to-missing-column",
        {"a.jsonl": GOOD},
        {"format": "alpaca", "fields": FieldMapping(output="answer")},
        ["field 'output' (column 'answer') missing or empty", "lines 1, 2, 3, 4"],
    ),
    (
        "bad-validation-file",
        {"a.jsonl": GOOD, "val.jsonl@val": b"{oops\n"},
        {},
        ["line 1 of val.jsonl is not valid JSON"],
    ),
    (
        "three-problems-in-three-files-in-one-run",
        {
            "a.jsonl": GOOD + b"{broken\n",
            "b.jsonl": GOOD + jsonl({"instruction": "no answer"}),
            "c.csv": b"instruction,output\nq,caf\xe9\n",
        },
        {},
        [
            "3 problems in the dataset",
            "line 5 of a.jsonl is not valid JSON",
            "rows in b.jsonl have field 'output' missing or empty (lines 5;",
            "line 2 of c.csv is not UTF-8 text",
        ],
    ),
    (
        "three-problems-in-one-file-in-one-run",
        {
            "a.jsonl": GOOD
            + b"{broken\n"
            + b'{"instruction": "caf\xe9", "output": "x"}\n'
            + jsonl({"instruction": "q"}, {"instruction": "q", "output": 3.5, "system": []})
        },
        {},
        [
            "4 problems in the dataset",
            "line 5 of a.jsonl is not valid JSON",
            "line 6 of a.jsonl is not UTF-8 text",
            "field 'output' missing or empty (lines 7;",
            "field 'system' not text (a list) (lines 8;",
        ],
    ),
    (
        "many-keys-cannot-detect",
        {"wide.jsonl": jsonl({f"column_{i}_{'x' * 100}": i for i in range(1000)})},
        {},
        ["could not detect the format of wide.jsonl", "its rows have 1000 keys [column_0_"],
    ),
]


def _write(tmp_path: Path, files: dict[str, bytes]) -> tuple[list[Path], list[Path]]:
    train: list[Path] = []
    validation: list[Path] = []
    for name, data in files.items():
        base, _, split = name.partition("@")
        path = tmp_path / base
        path.write_bytes(data)
        (validation if split == "val" else train).append(path)
    return train, validation


def _prepare(tmp_path: Path, files: dict[str, bytes], **overrides: Any) -> Any:
    train, validation = _write(tmp_path, files)
    config = DatasetConfig(**{"sources": ["unused"], "validation_ratio": 0.0, **overrides})
    return prepare(train, config, validation_paths=validation)


def _termination_size(error: DatasetInvalid) -> int:
    message = {"error": {"reason": "DatasetInvalid", "message": error.message, "hint": error.hint}}
    return len(json.dumps(message).encode())


@pytest.mark.parametrize(
    ("files", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_dataset_is_one_clear_dataset_error(
    tmp_path: Path, files: dict[str, bytes], overrides: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(DatasetInvalid) as caught:  # anything else would be a crash
        _prepare(tmp_path, files, **overrides)
    error = caught.value
    assert error.hint, "every dataset error says how to fix it"
    for part in expected:
        assert part in str(error), f"{part!r} not in {str(error)!r}"  # message (hint: ...)
    assert _termination_size(error) < TERMINATION_LIMIT


def test_hundreds_of_problems_fit_one_message_and_are_counted(tmp_path: Path) -> None:
    files = {f"f{i:03}.jsonl": GOOD + b"{nope\n" for i in range(300)}
    with pytest.raises(DatasetInvalid) as caught:
        _prepare(tmp_path, files)
    message = caught.value.message
    assert message.startswith("300 problems in the dataset: (1) line 5 of f000.jsonl")
    assert "more (the pod log lists them)" in message
    assert _termination_size(caught.value) < TERMINATION_LIMIT


def test_missing_file_and_empty_directory_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty-dir" / "_SUCCESS").write_text("")
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD)
    config = DatasetConfig(sources=["unused"], validation_ratio=0.0)
    with pytest.raises(DatasetInvalid) as caught:
        prepare([good, tmp_path / "gone.jsonl", tmp_path / "empty-dir"], config)
    message = caught.value.message
    assert message.startswith("2 problems")
    assert "gone.jsonl does not exist" in message and "empty-dir has no" in message


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bom.jsonl", b"\xef\xbb\xbf" + GOOD),
        ("bom.csv", b"\xef\xbb\xbfinstruction,output\nq0,a0\nq1,a1\nq2,a2\nq3,a3\n"),
        ("crlf.jsonl", GOOD.replace(b"\n", b"\r\n")),
        ("crlf.csv", b"instruction,output\r\nq0,a0\r\nq1,a1\r\nq2,a2\r\nq3,a3\r\n"),
        ("data.json", json.dumps({"data": [qa(i) for i in range(4)]}).encode()),
        ("lines.json", GOOD),  # JSON Lines under a .json name
        ("big.parquet", PARQUET),
    ],
)
def test_common_oddities_are_read(tmp_path: Path, name: str, data: bytes) -> None:
    prepared = _prepare(tmp_path, {name: data})
    assert len(prepared.train) >= 4 and not prepared.warnings


def test_a_ten_megabyte_csv_cell_is_data_not_an_error(tmp_path: Path) -> None:
    big = "word " * 2_000_000
    data = f'instruction,output\nq1,"{big}"\nq2,a2\n'.encode()
    prepared = _prepare(tmp_path, {"big.csv": data})
    assert len(prepared.train) == 2 and len(prepared.train[0].messages[1][1]) == len(big)


# --------------------------------------------------------------------------- warnings


def test_all_rows_identical_warns_that_one_example_remains(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, {"same.jsonl": jsonl(*[qa(1)] * 50)}, validation_ratio=0.1)
    assert len(prepared.train) == 1 and not prepared.validation
    assert "49 of 50 training rows repeat an earlier row" in prepared.warnings[0]
    assert "1 distinct example remain" in prepared.warnings[0]
    assert "none held out for validation" in prepared.warnings[1]


def test_validation_identical_to_train_warns_that_nothing_is_left(tmp_path: Path) -> None:
    files = {"train.jsonl": GOOD, "val.jsonl@val": GOOD}
    prepared = _prepare(tmp_path, files)
    assert prepared.validation == [] and prepared.stats["leakage_removed"] == 4
    [warning] = prepared.warnings
    assert "all 4 validation examples also appear in the training data" in warning
    assert "no eval loss" in warning and "validation.sources" in warning


def test_partial_overlap_and_empty_files_are_warned(tmp_path: Path) -> None:
    files = {
        "train.jsonl": GOOD,
        "more.jsonl": b"",
        "val.jsonl@val": jsonl(qa(0), qa(9), qa(9)),
    }
    prepared = _prepare(tmp_path, files)
    assert prepared.validation == [
        Example(messages=(("user", "question 9"), ("assistant", "answer 9")))
    ]
    assert prepared.warnings == [
        "more.jsonl (train) has no rows",
        "1 of 3 validation rows repeat an earlier row exactly and were dropped",
        "1 of 2 validation examples also appear in the training data and were dropped from "
        "validation (so eval loss measures unseen examples)",
    ]
    assert prepared.validation[0].origin == "val.jsonl line 2"


# --------------------------------------------------------------------------- tokenizing


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def _origin_chats(n: int) -> list[Example]:
    return [
        Example(
            messages=(("system", "be brief"), ("user", f"q{i}"), ("assistant", f"a{i}")),
            origin=f"chat.jsonl line {i + 1}",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (  # a template that refuses system prompts (as some models' do)
            "{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "{{ m['content'] }}{% endfor %}",
            "System role not supported",
        ),
        ("{% for m in messages %}{{ m['content'] }", "rejected 3 of 3"),  # syntax error
        ("{{ messages[0]['content'] + 1 }}", "rejected 3 of 3"),  # a type error inside
    ],
    ids=["raise_exception", "syntax-error", "type-error"],
)
def test_chat_template_problems_name_the_rows(tokenizer: Any, template: str, expected: str) -> None:
    tokenizer.chat_template = template
    try:
        with pytest.raises(DatasetInvalid) as caught:
            tokenize_examples(_origin_chats(3), tokenizer, 64)
    finally:
        tokenizer.chat_template = None
    message = caught.value.message
    assert expected in message
    assert "(chat.jsonl line 1, chat.jsonl line 2, chat.jsonl line 3)" in message
    assert "system" in (caught.value.hint or "")


def test_cutting_long_texts_before_tokenizing_changes_no_token(tokenizer: Any) -> None:
    long = " ".join(f"w{i % 97}" for i in range(20_000))
    examples = [
        Example(text=long),
        Example(messages=(("user", "q"), ("assistant", long))),
        Example(messages=(("user", long), ("assistant", "a"))),
        Example(messages=(("user", "q " * 30), ("assistant", long), ("user", "more"))),
    ]
    limit = char_limit(tokenizer, 128)
    assert all(cut_example(e, limit) != e for e in examples)  # every one is cut
    cut_rows, cut_stats = tokenize_examples(examples, tokenizer, 128, allow_empty=True)
    full_rows, full_stats = _tokenize_uncut(examples, tokenizer, 128)
    assert cut_rows == full_rows and cut_stats == full_stats
    assert full_stats["truncated_examples"] == 4 and full_stats["dropped_examples"] == 1


def _tokenize_uncut(examples: list[Example], tokenizer: Any, length: int) -> Any:
    import kubetune_trainer.data as data

    original = data.cut_example
    data.cut_example = lambda example, limit: example
    try:
        return tokenize_examples(examples, tokenizer, length, allow_empty=True)
    finally:
        data.cut_example = original


def test_tokenize_warnings_say_what_was_cut_and_dropped() -> None:
    stats = {"tokenized_examples": 7, "truncated_examples": 3, "dropped_examples": 1}
    assert tokenize_warnings(stats, "validation", 128) == [
        "3 of 8 validation examples are longer than maxSeqLength 128 tokens and were truncated",
        "1 of 8 validation examples have no response tokens within maxSeqLength 128 and were "
        "dropped (raise spec.dataset.maxSeqLength or shorten the prompts)",
    ]
    assert tokenize_warnings({"tokenized_examples": 5}, "training", 128) == []


# --------------------------------------------------------------------------- SIGTERM


class _TerminatedWhileRendering:
    """A tokenizer whose chat template receives SIGTERM (the pod is evicted) mid-render."""

    chat_template = "{{ messages[0]['content'] }}"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def get_chat_template(self) -> str:
        return self.chat_template

    def get_vocab(self) -> dict[str, int]:
        return dict(self.tokenizer.get_vocab())

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def test_sigterm_while_preparing_passes_every_except_exception(tokenizer: Any) -> None:
    state, stop = ProgressState(phase="preparing"), threading.Event()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        _install_sigterm(stop, state)
        with pytest.raises(PreemptionSignal) as caught:
            try:  # as a library around our code might
                tokenize_examples(_origin_chats(2), _TerminatedWhileRendering(tokenizer), 64)
            except Exception as swallowed:  # pragma: no cover - the defect this guards
                pytest.fail(f"SIGTERM became an ordinary error: {swallowed!r}")
        state.phase = "training"  # in the loop: only ask for a checkpoint at the step end
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.is_set()
    error = as_trainer_error(caught.value)
    assert error.exit_code == ExitCode.PREEMPTED and error.exit_code.retryable
    assert "while preparing the model and data" in error.message
