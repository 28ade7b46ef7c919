"""Prefix tuning and prompt tuning (method types prefix and prompt) on the tiny model:
each trains, publishes an adapter that stock ``PeftModel.from_pretrained`` loads and that
changes the base model's logits (for the better on the task), and resumes from a
checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from trainer_helpers import mean_response_loss, tiny_config

from kubetune_trainer.errors import ExitCode, Preempted
from kubetune_trainer.main import execute
from kubetune_trainer.progress import ProgressState
from kubetune_trainer.train import run

pytestmark = pytest.mark.integration

METHODS = {
    "prefix": ({"type": "prefix", "prefix": {"num_virtual_tokens": 8}}, "PREFIX_TUNING"),
    "prompt-text-init": (
        {
            "type": "prompt",
            "prompt": {"num_virtual_tokens": 8, "init": "text", "init_text": "Answer the task"},
        },
        "PROMPT_TUNING",
    ),
}


def _config(model: Path, data: Path, output: Path, method: dict, **training: object):
    return tiny_config(
        model,
        data,
        str(output),
        method=method,
        dataset={"packing": False},  # the API requires it for these methods
        training={"max_steps": 8, "learning_rate": 1e-2, **training},
    )


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


@pytest.mark.parametrize("name", list(METHODS))
def test_trains_and_publishes_an_adapter_stock_peft_loads(
    name: str, tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    method, peft_type = METHODS[name]
    assert execute(_config(tiny_model, tiny_dataset, tmp_path, method)) == ExitCode.OK

    adapter = tmp_path / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == peft_type
    settings = method[method["type"]]
    assert adapter_config["num_virtual_tokens"] == settings["num_virtual_tokens"]
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert (
        manifest["method"][method["type"]]["num_virtual_tokens"] == settings["num_virtual_tokens"]
    )
    assert manifest["metrics"]["train_loss"] < manifest["metrics"]["first_train_loss"]

    base = _base(tiny_model)
    tuned = PeftModel.from_pretrained(_base(tiny_model), str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    ids = torch.tensor([tokenizer("reverse the words: red blue green")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        # prompt tuning's output has a position for each virtual token in front
        tuned_logits = tuned(input_ids=ids).logits[:, -ids.shape[1] :]
    assert tuned_logits.shape == base_logits.shape
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)
    rows = [json.loads(line) for line in tiny_dataset.read_text().splitlines()[:24]]
    assert mean_response_loss(tuned, tokenizer, rows) < mean_response_loss(base, tokenizer, rows)


class _StopFrom(threading.Event):
    """A stop flag that reads as set from ``step`` on: a SIGTERM during that step."""

    def __init__(self, state: ProgressState, step: int) -> None:
        super().__init__()
        self.state, self.step = state, step

    def is_set(self) -> bool:
        return self.state.step >= self.step


def test_prompt_tuning_resumes_from_its_checkpoint(
    tiny_model: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    method, _ = METHODS["prompt-text-init"]
    # with gradient checkpointing, which prompt tuning allows (prefix tuning does not)
    config = _config(
        tiny_model, tiny_dataset, tmp_path / "out", method, max_steps=6, gradient_checkpointing=True
    )
    state = ProgressState()
    with pytest.raises(Preempted):  # SIGTERM at step 3: checkpoint, then exit
        run(config, work_dir=tmp_path / "first", state=state, stop=_StopFrom(state, 3))
    assert list((tmp_path / "out" / "checkpoints").glob("step-*/COMPLETE"))

    result = run(
        config, work_dir=tmp_path / "second", state=ProgressState(), stop=threading.Event()
    )
    assert result.resumed_from_step == 3
    assert result.metrics["steps"] == 6
    adapter_config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "PROMPT_TUNING"
