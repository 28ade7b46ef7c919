"""Packing tokenized examples into full sequences, and the collators that batch them.

A packed row holds several examples back to back. Its ``position_ids`` restart at 0 at
every example, and the first label of every example is -100, so no loss is taken on
predicting one example's first token from the previous example.

How attention stays inside each example (transformers 5): when a batch has
``position_ids`` and **no** ``attention_mask`` and **no** KV cache,
``transformers.masking_utils`` (``_preprocess_mask_arguments`` ->
``find_packed_sequence_indices``) splits each row wherever the positions do not go up
by one and builds a block-diagonal causal mask (sdpa, eager and flex); flash-attention
derives ``cu_seqlens`` from the same ``position_ids``. The cache part is easy to miss:
models default ``use_cache`` to ``config.use_cache`` (True for most checkpoints) even in
training, create a ``DynamicCache``, and then silently fall back to a plain causal mask
that attends across examples. :class:`PackedCollator` therefore puts
``use_cache=False`` in every batch (tests/unit/test_packing.py checks both sides).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100

Feature = Mapping[str, Sequence[int]]
Batch = dict[str, Any]


# --------------------------------------------------------------------------- packing


def pack(
    rows: Sequence[Feature], capacity: int, *, seed: int | None = None
) -> list[dict[str, list[int]]]:
    """Pack ``{"input_ids", "labels"}`` rows into sequences of at most ``capacity`` tokens.

    Best-fit decreasing: longest rows first, each into the fullest sequence it still
    fits in (ties: the earlier sequence), so the result is deterministic. A row longer
    than ``capacity`` (rows are already cut to maxSeqLength; the capacity may be less,
    e.g. validation rows packed at the capacity the training rows chose) is a sequence
    of its own, never cut or dropped. With ``seed`` the packed sequences are shuffled
    (deterministically), otherwise they come out longest-first. Each output has
    ``input_ids``, ``labels`` and ``position_ids``.
    """
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins = _best_fit([len(rows[i]["input_ids"]) for i in order], capacity)
    packed = [_concatenate([rows[order[j]] for j in members]) for members in bins]
    if seed is not None:
        random.Random(seed).shuffle(packed)
    return packed


def _best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) for items in the given order, best fit each; an item
    over ``capacity`` gets a (full) bin of its own."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for item, length in enumerate(lengths):
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, index = free.pop(slot)
            bins[index].append(item)
        else:
            space, index = capacity, len(bins)
            bins.append([item])
        bisect.insort(free, (max(space - length, 0), index))
    return bins


def _concatenate(rows: Sequence[Feature]) -> dict[str, list[int]]:
    """One packed sequence: positions restart and the first label is masked per row."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for row in rows:
        input_ids.extend(row["input_ids"])
        labels.append(IGNORE_INDEX)
        labels.extend(row["labels"][1:])
        position_ids.extend(range(len(row["input_ids"])))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# --------------------------------------------------------------------------- collators


def _pad(sequences: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    """Right-pad ``sequences`` with ``value`` to ``length`` as a long tensor."""
    return torch.tensor([list(seq) + [value] * (length - len(seq)) for seq in sequences])


def _padded_length(features: Sequence[Feature], multiple: int | None) -> int:
    longest = max(len(feature["input_ids"]) for feature in features)
    if multiple:
        longest = -(-longest // multiple) * multiple
    return longest


@dataclass(frozen=True)
class PackedCollator:
    """Batch packed rows: right-pad to the longest, with ``position_ids``, no attention mask.

    Padding gets position 0 at every pad token (so each pad is its own one-token
    "example" and no real token attends to one) and label -100. The batch also carries
    ``use_cache=False``, which the packed mask needs (see the module docstring). Rows
    without ``position_ids`` are treated as one example each.
    """

    pad_token_id: int | None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Feature]) -> Batch:
        length = _padded_length(features, self.pad_to_multiple_of)
        positions = [
            feature.get("position_ids") or range(len(feature["input_ids"])) for feature in features
        ]
        return {
            "input_ids": _pad([f["input_ids"] for f in features], self.pad_token_id or 0, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length),
            "position_ids": _pad(positions, 0, length),
            "use_cache": False,
        }


@dataclass(frozen=True)
class PaddingCollator:
    """Batch unpacked rows: right-pad to the longest with an ``attention_mask``."""

    pad_token_id: int | None
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Feature]) -> Batch:
        length = _padded_length(features, self.pad_to_multiple_of)
        ids = [feature["input_ids"] for feature in features]
        return {
            "input_ids": _pad(ids, self.pad_token_id or 0, length),
            "attention_mask": _pad([[1] * len(seq) for seq in ids], 0, length),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length),
        }


@dataclass(frozen=True)
class PaddingStats:
    """Token counts of a batch: all positions, the real (non-pad) ones, and the ratio."""

    tokens: int
    non_pad_tokens: int

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.non_pad_tokens / self.tokens if self.tokens else 0.0


def batch_padding_stats(batch: Mapping[str, Any]) -> PaddingStats:
    """How much of a collated batch is padding.

    Uses ``attention_mask`` when present (:class:`PaddingCollator`); for packed batches
    the padding is the trailing run of ``position_ids == 0`` that :class:`PackedCollator`
    writes (real examples are at least two tokens long, so they never end at position 0).
    """
    input_ids = batch["input_ids"]
    if "attention_mask" in batch:
        return PaddingStats(input_ids.numel(), int(batch["attention_mask"].sum()))
    positions = batch["position_ids"]
    # A row's real tokens end at its last non-zero position.
    nonzero = positions != 0
    last = torch.where(
        nonzero.any(dim=1),
        positions.shape[1] - nonzero.flip(dims=[1]).int().argmax(dim=1),
        torch.zeros(positions.shape[0], dtype=torch.long),
    )
    return PaddingStats(input_ids.numel(), int(last.sum()))


class CountingCollator:
    """Wraps a collator and counts the tokens of every batch it makes.

    ``tokens`` counts all positions, ``non_pad`` the real ones (from the features, so it
    is exact), ``padding_ratio`` the share of padding so far. Counts only make sense
    with ``dataloader_num_workers=0`` (workers would count in their own copies).
    """

    def __init__(self, collator: Callable[[Sequence[Feature]], Batch]) -> None:
        self.collator = collator
        self.tokens = 0
        self.non_pad = 0

    def __call__(self, features: Sequence[Feature]) -> Batch:
        batch = self.collator(features)
        self.tokens += batch["input_ids"].numel()
        self.non_pad += sum(len(feature["input_ids"]) for feature in features)
        return batch

    @property
    def padding_ratio(self) -> float:
        return PaddingStats(self.tokens, self.non_pad).padding_ratio


# --------------------------------------------------------------------------- attention

PACKED_SDPA = "kubetune_packed_sdpa"


def packed_segments(
    attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> list[list[tuple[int, int, bool]]] | None:
    """Each row's examples as ``(start, end)`` spans, or None unless ``attention_mask`` is
    exactly the block-diagonal causal mask those spans make.

    The spans come from ``position_ids`` as transformers finds them (a new example
    wherever a position is not the previous one plus one); checking them against the
    mask transformers built keeps whatever else a mask may hold (padding, sliding
    windows, ...) on the plain sdpa path. The trailing run of one-token examples (the
    padding :class:`PackedCollator` writes: position 0 each) is one ``(start, end,
    True)`` span: each of its tokens attends to itself only; other spans are ``(start,
    end, False)``."""
    batch, length = position_ids.shape
    if (
        attention_mask.dtype != torch.bool
        or attention_mask.shape != (batch, 1, length, length)
        or attention_mask.device.type != "cpu"
    ):
        return None
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    starts[:, 0] = True
    example = starts.cumsum(-1)
    causal = torch.ones(length, length, dtype=torch.bool).tril_()
    expected = (example[:, :, None] == example[:, None, :]) & causal
    if not torch.equal(attention_mask[:, 0], expected):
        return None
    nonzero = position_ids != 0
    real = torch.where(
        nonzero.any(dim=1), length - nonzero.flip(dims=[1]).int().argmax(dim=1), 0
    ).tolist()
    spans: list[list[tuple[int, int, bool]]] = []
    for row, end in zip(starts.tolist(), real, strict=True):
        edges = [i for i in range(end) if row[i]] + [end]
        spans.append([(start, stop, False) for start, stop in itertools.pairwise(edges)])
        if end < length:
            spans[-1].append((end, length, True))
    return spans


class _SegmentCache:
    """The spans of the last (mask, positions) pair: every layer gets the same tensors."""

    def __init__(self) -> None:
        self.key: tuple[torch.Tensor, torch.Tensor] | None = None
        self.spans: list[list[tuple[int, int, bool]]] | None = None

    def get(
        self, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> list[list[tuple[int, int, bool]]] | None:
        if self.key is None or self.key[0] is not attention_mask or self.key[1] is not position_ids:
            self.key = (attention_mask, position_ids)
            positions = position_ids.expand(attention_mask.shape[0], -1)
            self.spans = packed_segments(attention_mask, positions)
        return self.spans


_segments = _SegmentCache()


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, but for packed rows on CPU: one causal sdpa call per
    example instead of one over the whole row under a block-diagonal mask.

    The same result (what the mask drops contributes exactly zero), at Σ lᵢ² instead of
    L² scores, and with no mask for torch's CPU flash kernel to read: the attention of
    4 packed rows of 443 tokens took half the time (forward + backward). Anything else
    (no packing, a cache, dropout, a GPU, a mask that is not the packed one) goes to
    transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    spans = None
    if (
        attention_mask is not None
        and position_ids is not None
        and not dropout
        and kwargs.get("position_bias") is None
        and query.device.type == "cpu"
        and query.shape[2] == key.shape[2]
    ):
        spans = _segments.get(attention_mask, position_ids)
    if spans is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,
        )
    groups = query.shape[1] // key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attend(b: int, start: int, end: int, single: bool) -> torch.Tensor:
        if single:  # one-token examples: softmax over one score is 1, the output its value
            return value[b : b + 1, :, start:end].repeat_interleave(groups, dim=1)
        return sdpa(
            query[b : b + 1, :, start:end],
            key[b : b + 1, :, start:end],
            value[b : b + 1, :, start:end],
            is_causal=True,
            scale=scaling,
            enable_gqa=groups > 1,
        )

    rows = [torch.cat([attend(b, *span) for span in row], dim=2) for b, row in enumerate(spans)]
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_packed_sdpa(model: Any) -> bool:
    """Switch a model that uses transformers' sdpa attention to :func:`packed_sdpa_attention`
    (registered once, with sdpa's masks); whether it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(PACKED_SDPA)
    except (ValueError, ImportError, AttributeError):
        return False
    return bool(model.config._attn_implementation == PACKED_SDPA)
