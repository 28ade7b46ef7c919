"""The tiny offline model, tokenizer and synthetic dataset used by the other tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kubetune_trainer.tiny import (  # noqa: E402
    VOCAB_SIZE,
    build_tiny_model,
    generate_instruction_dataset,
)


def _digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def test_model_is_deterministic_and_seeded(tiny_model: Path, tmp_path: Path) -> None:
    again = _digests(build_tiny_model(tmp_path / "again"))
    other = _digests(build_tiny_model(tmp_path / "other", seed=1))
    assert again == _digests(tiny_model)
    assert other["model.safetensors"] != again["model.safetensors"]
    assert other["tokenizer.json"] == again["tokenizer.json"]


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_model_loads_with_the_requested_shape(tiny_model: Path) -> None:
    assert (tiny_model / "model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.intermediate_size, config.vocab_size) == (256, VOCAB_SIZE)
    assert config.max_position_embeddings == 2048
    logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, VOCAB_SIZE)


def test_tokenizer_round_trips_and_has_special_tokens(tiny_model: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<pad>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    text = "Reverse the words: apple river stone. Ünïcode ok!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # BPE merges learned something
    assert tokenizer.decode(ids) == text


def test_chat_template_renders_chatml(tiny_model: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "Add 3 and 4"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nAdd 3 and 4<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == 1


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_has_requested_rows_and_a_few_duplicates(tmp_path: Path) -> None:
    rows = _rows(generate_instruction_dataset(tmp_path / "d.jsonl", n=400, seed=0))
    assert len(rows) == 400
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)
    distinct = {json.dumps(row, sort_keys=True) for row in rows}
    assert len(rows) - len(distinct) == 8
    empty_input = sum(not row["input"] for row in rows)
    assert 140 <= empty_input <= 260
    lengths = {len(row["instruction"]) + len(row["input"]) for row in rows}
    assert max(lengths) > 2 * min(lengths)


def test_dataset_tasks_are_correct(tmp_path: Path) -> None:
    rows = _rows(generate_instruction_dataset(tmp_path / "d.jsonl", n=200, seed=3))
    checked = 0
    for row in rows:
        instruction, text, output = row["instruction"], row["input"], row["output"]
        if instruction.startswith("Reverse the words: "):
            assert output == " ".join(reversed(instruction.split(": ", 1)[1].split()))
        elif instruction == "Add the two numbers.":
            assert int(output) == sum(int(n) for n in text.split())
        elif instruction.startswith("Uppercase: "):
            assert output == instruction.split(": ", 1)[1].upper()
        elif instruction == "How many words are in the text?":
            assert int(output) == len(text.split())
        else:
            continue
        checked += 1
    assert checked > 40


def test_dataset_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = generate_instruction_dataset(tmp_path / "a.jsonl", n=50, seed=7).read_bytes()
    b = generate_instruction_dataset(tmp_path / "b.jsonl", n=50, seed=7).read_bytes()
    c = generate_instruction_dataset(tmp_path / "c.jsonl", n=50, seed=8).read_bytes()
    assert a == b
    assert a != c


def test_quickstart_dataset_answers_follow_from_the_prompts(tmp_path: Path) -> None:
    from kubetune_trainer.tiny import _COLOURS, generate_quickstart_dataset

    rows = _rows(generate_quickstart_dataset(tmp_path / "q.jsonl", n=400, seed=0))
    assert len(rows) == 400
    assert len({json.dumps(row, sort_keys=True) for row in rows}) == 400  # all distinct
    kinds: dict[str, int] = {}
    for row in rows:
        instruction, text, output = row["instruction"], row["input"], row["output"]
        if instruction == "What is the first word?":
            kind, expected = "first", text.split()[0]
        elif instruction == "What is the last word?":
            kind, expected = "last", text.split()[-1]
        elif "colour" in instruction:
            thing = text or instruction.split(" of ")[-1].split(" is ")[-1].rstrip("?.")
            kind, expected = "colour", _COLOURS[thing]
        else:
            kind, expected = "next", str(int(instruction.rstrip("?.").split()[-1]) + 1)
        assert output == expected, row
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"first", "last", "colour", "next"}
    assert min(kinds.values()) >= 40, kinds
    again = generate_quickstart_dataset(tmp_path / "again.jsonl", n=400, seed=0)
    assert again.read_bytes() == (tmp_path / "q.jsonl").read_bytes()


def test_tiny_output_layer_leaves_room_to_learn(tiny_model: Path) -> None:
    """lm_head drawn at TINY_OUTPUT_STD: at the config's 0.02 a frozen random head caps
    how far any logit can move (the README's job could not get below loss ≈ 5.6)."""
    from kubetune_trainer.tiny import TINY_OUTPUT_STD

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    assert float(model.lm_head.weight.detach().std()) == pytest.approx(TINY_OUTPUT_STD, rel=0.05)
    assert float(model.model.embed_tokens.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
