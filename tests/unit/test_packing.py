"""Packing, the collators, and proof that packed attention stays inside each example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kubetune_trainer.data import Example, tokenize_examples  # noqa: E402
from kubetune_trainer.packing import (  # noqa: E402
    IGNORE_INDEX,
    PACKED_SDPA,
    CountingCollator,
    PackedCollator,
    PaddingCollator,
    batch_padding_stats,
    pack,
    packed_segments,
    use_packed_sdpa,
)

PAD = 0


def row(length: int, start: int = 10) -> dict[str, list[int]]:
    """A row whose ids are start, start+1, ...; its labels are the ids negated."""
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [-i for i in ids]}


# --------------------------------------------------------------------------- packing


def test_best_fit_decreasing_fills_few_sequences() -> None:
    rows = [row(n, start=100 * n) for n in (2, 6, 3, 5, 4)]
    packed = pack(rows, 10)
    assert [len(p["input_ids"]) for p in packed] == [10, 10]
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]  # 6 + 4
    assert packed[1]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]  # 5 + 3 + 2
    assert pack(rows, 10) == packed


def test_packed_rows_keep_every_token_and_mask_boundaries() -> None:
    rows = [row(n, start=1000 * i) for i, n in enumerate([7, 3, 9, 1, 4, 4, 12, 2], start=1)]
    packed = pack(rows, 16)
    assert all(len(p["input_ids"]) <= 16 for p in packed)
    found: list[list[int]] = []
    for sequence in packed:
        assert len(sequence["input_ids"]) == len(sequence["labels"])
        starts = [i for i, pos in enumerate(sequence["position_ids"]) if pos == 0]
        for begin, end in zip(starts, [*starts[1:], len(sequence["input_ids"])], strict=True):
            ids = sequence["input_ids"][begin:end]
            assert sequence["position_ids"][begin:end] == list(range(len(ids)))
            assert sequence["labels"][begin] == IGNORE_INDEX
            assert sequence["labels"][begin + 1 : end] == [-i for i in ids[1:]]
            found.append(ids)
    assert sorted(found) == sorted(r["input_ids"] for r in rows)


def test_seed_shuffles_deterministically() -> None:
    rows = [row(n, start=100 * n) for n in range(1, 30)]
    plain = pack(rows, 32)
    shuffled = pack(rows, 32, seed=1)
    assert shuffled == pack(rows, 32, seed=1)
    assert shuffled != plain
    assert sorted(map(str, shuffled)) == sorted(map(str, plain))


def test_rows_longer_than_the_capacity_get_a_sequence_of_their_own() -> None:
    # Validation rows are packed at the capacity the training rows chose; a longer one
    # (up to maxSeqLength) must be kept whole, not refused, cut or dropped.
    packed = pack([row(9, 100), row(3, 10), row(12, 200), row(4, 20)], 8)
    assert sorted(s["input_ids"] for s in packed) == sorted(
        [list(range(100, 109)), list(range(200, 212)), list(range(20, 24)) + list(range(10, 13))]
    )
    assert all(max(s["position_ids"]) < 12 for s in packed)


# --------------------------------------------------------------------------- collators


def test_packed_collator_pads_without_attention_mask() -> None:
    packed = pack([row(3, 10), row(2, 20), row(4, 30)], 5)  # [4], [3, 2]
    batch = PackedCollator(pad_token_id=PAD)(packed)
    assert "attention_mask" not in batch
    assert batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[30, 31, 32, 33, PAD], [10, 11, 12, 20, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, -31, -32, -33, IGNORE_INDEX],
        [IGNORE_INDEX, -11, -12, IGNORE_INDEX, -21],
    ]
    stats = batch_padding_stats(batch)
    assert (stats.tokens, stats.non_pad_tokens) == (10, 9)
    assert stats.padding_ratio == pytest.approx(0.1)


def test_packed_collator_pad_to_multiple_and_unpacked_rows() -> None:
    batch = PackedCollator(pad_token_id=PAD, pad_to_multiple_of=8)([row(3), row(5)])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 0, 0, 0, 0, 0]
    assert batch_padding_stats(batch).non_pad_tokens == 8


def test_padding_collator() -> None:
    batch = PaddingCollator(pad_token_id=PAD)([row(2, 10), row(4, 20)])
    assert batch["input_ids"].tolist() == [[10, 11, PAD, PAD], [20, 21, 22, 23]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-10, -11, IGNORE_INDEX, IGNORE_INDEX],
        [-20, -21, -22, -23],
    ]
    assert "position_ids" not in batch
    assert batch_padding_stats(batch).padding_ratio == pytest.approx(0.25)


def test_counting_collator_accumulates() -> None:
    counting = CountingCollator(PaddingCollator(pad_token_id=PAD))
    counting([row(2), row(4)])
    counting([row(3)])
    assert (counting.tokens, counting.non_pad) == (11, 9)
    assert counting.padding_ratio == pytest.approx(2 / 11)


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> tuple[Path, Any]:
    """The shared tiny model (tests/conftest.py) and its tokenizer."""
    return tiny_model, transformers.AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def examples(tiny: tuple[Path, Any]) -> list[dict[str, list[int]]]:
    chats = [
        Example(messages=(("user", "Reverse the words: apple river stone"), ("assistant", s)))
        for s in ("stone river apple", "a much longer answer about the green garden in summer")
    ]
    rows, _ = tokenize_examples([*chats, Example(text="The quick brown fox.")], tiny[1], 128)
    return rows


def _model(directory: Path, attn: str) -> Any:
    """The tiny model with ``attn``; PACKED_SDPA: sdpa, switched as the trainer does on CPU."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="sdpa" if attn == PACKED_SDPA else attn
    ).eval()
    if attn == PACKED_SDPA:
        assert use_packed_sdpa(model)
    return model


def _alone(model: Any, feature: dict[str, list[int]]) -> Any:
    return model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_attention_does_not_cross_examples(
    tiny: tuple[Path, Any], examples: list[dict[str, list[int]]], attn: str
) -> None:
    model = _model(tiny[0], attn)
    a, b, c = examples
    # Row 1 packs a, b, c; row 2 packs c, a and is padded. No attention_mask anywhere.
    packed = [_concat(a, b, c), _concat(c, a)]
    batch = PackedCollator(pad_token_id=tiny[1].pad_token_id)(packed)
    assert batch["input_ids"].shape[1] > len(packed[1]["input_ids"])  # row 2 is padded
    with torch.no_grad():
        logits = model(**batch).logits
        segments = [(0, 0, a), (0, len(a["input_ids"]), b)]
        segments += [(0, len(a["input_ids"]) + len(b["input_ids"]), c), (1, 0, c)]
        segments += [(1, len(c["input_ids"]), a)]
        for index, begin, feature in segments:
            end = begin + len(feature["input_ids"])
            torch.testing.assert_close(
                logits[index, begin:end], _alone(model, feature), atol=1e-4, rtol=1e-4
            )


def _concat(*rows: dict[str, list[int]]) -> dict[str, list[int]]:
    """Rows packed in the given order (pack() sorts by length)."""
    packed = [pack([r], 1024)[0] for r in rows]
    return {key: [v for p in packed for v in p[key]] for key in packed[0]}


def test_packed_loss_equals_the_sum_of_separate_losses(
    tiny: tuple[Path, Any], examples: list[dict[str, list[int]]]
) -> None:
    model = _model(tiny[0], "sdpa")
    batch = PackedCollator(pad_token_id=tiny[1].pad_token_id)([_concat(*examples)])
    with torch.no_grad():
        packed_loss = model(**batch).loss
        total, count = torch.tensor(0.0), 0
        for feature in examples:
            labels = torch.tensor([feature["labels"]])
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=torch.tensor([feature["input_ids"]]), labels=labels).loss
            total, count = total + loss * n, count + n
    assert int((batch["labels"][0, 1:] != IGNORE_INDEX).sum()) == count
    torch.testing.assert_close(packed_loss, total / count, atol=1e-5, rtol=1e-5)


def test_attention_leaks_across_examples_if_the_cache_is_on(
    tiny: tuple[Path, Any], examples: list[dict[str, list[int]]]
) -> None:
    """Why PackedCollator sends use_cache=False: with a DynamicCache (the default from
    config.use_cache, in train mode too) transformers skips packed-sequence detection."""
    model = _model(tiny[0], "sdpa").train()
    a, b, _ = examples
    batch = PackedCollator(pad_token_id=tiny[1].pad_token_id)([_concat(a, b)])
    del batch["use_cache"]
    assert model.config.use_cache is True
    with torch.no_grad():
        leaked = model(**batch).logits[0, len(a["input_ids"]) :]
        alone = _alone(model, b)
    assert (leaked - alone).abs().max() > 1e-2


def test_padding_collator_matches_unpadded_logits(
    tiny: tuple[Path, Any], examples: list[dict[str, list[int]]]
) -> None:
    model = _model(tiny[0], "sdpa")
    batch = PaddingCollator(pad_token_id=tiny[1].pad_token_id)(examples)
    with torch.no_grad():
        logits = model(**batch).logits
        for index, feature in enumerate(examples):
            length = len(feature["input_ids"])
            torch.testing.assert_close(
                logits[index, :length], _alone(model, feature), atol=1e-4, rtol=1e-4
            )


def test_per_example_attention_equals_masked_sdpa_with_gradients(
    tiny: tuple[Path, Any], examples: list[dict[str, list[int]]]
) -> None:
    """The trainer's CPU attention for packed rows (one sdpa per example) gives the loss,
    the logits and the gradients of sdpa over the whole row under the block mask."""
    a, b, c = examples
    batch = PackedCollator(pad_token_id=tiny[1].pad_token_id)([_concat(a, b, c), _concat(c, a)])
    results = []
    for attn in ("sdpa", PACKED_SDPA):
        model = _model(tiny[0], attn)
        out = model(**batch)
        out.loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        results.append((out.loss.detach(), out.logits.detach(), grad))
    (loss, logits, grad), (loss_p, logits_p, grad_p) = results
    torch.testing.assert_close(loss_p, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits_p, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_p, grad, atol=1e-6, rtol=1e-4)


def test_only_the_block_diagonal_causal_mask_of_the_positions_is_split() -> None:
    causal = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    assert packed_segments(causal, torch.arange(4)[None]) == [[(0, 4, False)]]
    two = causal.clone()
    two[0, 0, 2:, :2] = False  # examples [0, 2) and [2, 4)
    assert packed_segments(two, torch.tensor([[0, 1, 0, 1]])) == [[(0, 2, False), (2, 4, False)]]
    padded = causal.clone()
    padded[0, 0, :, 3] = False  # a padding mask: not what the positions imply
    assert packed_segments(padded, torch.arange(4)[None]) is None
    assert packed_segments(causal.float(), torch.arange(4)[None]) is None
