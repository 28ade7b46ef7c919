"""A tiny, offline, deterministic model + tokenizer + dataset for tests and smoke runs.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on a small
built-in corpus with the ``tokenizers`` library, the model is a randomly initialised
Llama-style causal LM, and the datasets are synthetic: ``generate_instruction_dataset``
mixes easy and hard tasks (reversing words, adding numbers, upper-casing, fixed facts;
the tests and benchmarks use it), ``generate_quickstart_dataset`` holds only tasks the
tiny model learns within a minute on a laptop CPU (the README's first job).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<pad>"
IM_START_TOKEN = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, IM_START_TOKEN, EOS_TOKEN]
VOCAB_SIZE = 512

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = [
    *("apple", "river", "stone", "cloud", "green", "quick", "brown", "fox", "lazy", "dog"),
    *("house", "tree", "light", "music", "paper", "window", "garden", "summer", "winter"),
    *("bread", "water", "happy", "small", "large", "bright"),
]

_COLOURS = {
    "the sky on a clear day": "blue",
    "fresh grass": "green",
    "a ripe banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a lemon": "yellow",
    "a plum": "purple",
    "milk": "white",
    "a frog": "green",
    "the night sky": "black",
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small house stood by the river, and a
green garden grew behind it. In summer the light was bright and the water was warm; in
winter the snow was white and the nights were long. People read paper books by the
window, baked bread, played music and were happy. Reverse the words of a sentence, add
two numbers, count the words, convert text to uppercase, or answer what colour a thing
is. The answer is blue, green, yellow, white, black, red, orange or purple.
Instruction: input: output: response: context: system user assistant.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus and the sum is
"""


def _corpus_lines() -> list[str]:
    """The built-in training corpus for the tokenizer, plus the task vocabulary."""
    lines = _CORPUS.splitlines()
    lines.append(" ".join(_WORDS))
    lines.append(" ".join(word.upper() for word in _WORDS))
    lines.extend(f"What colour is {thing}? {colour}" for thing, colour in _COLOURS.items())
    return lines


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab 512) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


TINY_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


# The tiny model's output layer is drawn at this std rather than the config's 0.02: with
# random, frozen norms and lm_head at 0.02 a logit can move at most about
# |hidden| * |row| = sqrt(128) * 0.02 * sqrt(128) ≈ 2.6 from the others, so no adapter
# could take the response loss below ≈ 3.7 (measured: the README's job sat at 5.6). A
# trained model's logits span far more; at 0.1 LoRA has the headroom a real one gives it.
TINY_OUTPUT_STD = 0.1


def random_llama(
    tokenizer: Any, *, seed: int = 0, output_std: float | None = None, **shape: int
) -> Any:
    """A Llama-style causal LM with random weights sized for ``tokenizer`` (the global
    torch RNG state is left untouched); ``output_std`` redraws lm_head at that std."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if output_std is not None:
            with torch.no_grad():
                model.lm_head.weight.normal_(mean=0.0, std=output_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny Llama-style causal LM and its tokenizer to ``directory``.

    Deterministic for a given ``seed`` and fast on CPU (a few seconds at most).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = random_llama(
        tokenizer, seed=seed, output_std=TINY_OUTPUT_STD, vocab_size=VOCAB_SIZE, **TINY_SHAPE
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _reverse_task(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 7))
    answer = " ".join(reversed(words))
    if rng.random() < 0.5:
        return f"Reverse the words: {' '.join(words)}", "", answer
    return "Reverse the order of the words.", " ".join(words), answer


def _add_task(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"Add {a} and {b}", "", str(a + b)
    return "Add the two numbers.", f"{a} {b}", str(a + b)


def _upper_task(rng: random.Random) -> tuple[str, str, str]:
    text = " ".join(rng.sample(_WORDS, rng.randint(1, 4)))
    if rng.random() < 0.5:
        return f"Uppercase: {text}", "", text.upper()
    return "Convert the text to uppercase.", text, text.upper()


def _count_task(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 9))]
    if rng.random() < 0.5:
        return f"Count the words: {' '.join(words)}", "", str(len(words))
    return "How many words are in the text?", " ".join(words), str(len(words))


def _colour_task(rng: random.Random) -> tuple[str, str, str]:
    thing = rng.choice(sorted(_COLOURS))
    if rng.random() < 0.5:
        return f"What colour is {thing}?", "", _COLOURS[thing]
    return "What colour is this?", thing, _COLOURS[thing]


_TASKS = (_reverse_task, _add_task, _upper_task, _count_task, _colour_task)


def generate_instruction_dataset(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Write ``n`` Alpaca-style rows (instruction/input/output) as JSONL to ``path``.

    The tasks are small and learnable; about half the rows have an empty ``input``.
    ``max(1, n // 50)`` of the rows are exact duplicates of earlier rows, so
    deduplication has something to count; all other rows are distinct.
    """
    rng = random.Random(seed)
    n_duplicates = min(max(1, n // 50), n - 1) if n > 1 else 0
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    while len(rows) < n - n_duplicates:
        task = rng.choice(_TASKS)(rng)
        if task not in seen:
            seen.add(task)
            rows.append(dict(zip(("instruction", "input", "output"), task, strict=True)))
    for _ in range(n_duplicates):
        position = rng.randint(1, len(rows))
        rows.insert(position, dict(rows[rng.randrange(position)]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------- quickstart

_COLOUR_QUESTIONS = (
    "What colour is {}?",
    "Name the colour of {}.",
    "Tell me the colour of {}.",
    "Which colour is {}?",
)
_NEXT_QUESTIONS = (
    "What number comes after {}?",
    "Add 1 to {}.",
    "Count one more than {}.",
    "Which number follows {}?",
)


def _colour_lookup(rng: random.Random) -> tuple[str, str, str]:
    thing = rng.choice(sorted(_COLOURS))
    if rng.random() < 0.2:
        return "What colour is this?", thing, _COLOURS[thing]
    return rng.choice(_COLOUR_QUESTIONS).format(thing), "", _COLOURS[thing]


def _next_number(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 19)
    return rng.choice(_NEXT_QUESTIONS).format(n), "", str(n + 1)


def _first_word(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    return "What is the first word?", " ".join(words), words[0]


def _last_word(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    return "What is the last word?", " ".join(words), words[-1]


QUICKSTART_TASKS = (_colour_lookup, _next_number, _first_word, _last_word)


def generate_quickstart_dataset(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Write ``n`` distinct Alpaca-style rows of tasks the tiny model learns in a minute.

    Each answer is a deterministic function of the prompt that a 2-layer model can fit
    and that carries over to rows it has not seen, so a held-out split shows learning:
    a colour looked up from a fixed table (asked in several phrasings), the number after
    one up to 19, and the first or the last word of a short list (measured with
    examples/tiny-local.yaml: eval loss 7.14 before training, 1.26 after 480 steps).
    ``generate_instruction_dataset`` also asks for sums, counts and reversals, which
    the tiny model learns little of in a minute.
    """
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    while len(rows) < n:
        task = rng.choice(QUICKSTART_TASKS)(rng)
        if task not in seen:
            seen.add(task)
            rows.append(dict(zip(("instruction", "input", "output"), task, strict=True)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path
