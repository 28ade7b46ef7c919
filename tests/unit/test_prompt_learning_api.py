"""Prefix and prompt tuning in the API and the trainer's configuration: translation,
defaults, the combinations both refuse (naming the field), the fingerprint and the peft
configs they build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_operator.api.validation import parse_manifest, validate_manifest
from kubetune_operator.translate import trainer_config
from kubetune_trainer.config import MethodConfig, TrainerConfig
from kubetune_trainer.fingerprint import RunIdentity

pytestmark = pytest.mark.unit

UNPACKED = {"sources": ["s3://bucket/data.jsonl"], "packing": False}


def _job(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job"},
        "spec": {"model": {"source": "hf://org/model"}, "dataset": UNPACKED, **spec},
    }


def test_prefix_translates_with_defaults_and_settings() -> None:
    config = trainer_config(parse_manifest(_job(method={"type": "prefix"})))
    assert config.method.type == "prefix" and config.method.prompt is None
    assert config.method.prefix is not None
    assert config.method.prefix.num_virtual_tokens == 20  # the API's default, made explicit
    assert not config.method.prefix.projection and not config.dataset.packing

    settings = {"numVirtualTokens": 12, "projection": True, "projectionHiddenSize": 256}
    config = trainer_config(parse_manifest(_job(method={"type": "prefix", "prefix": settings})))
    assert config.method.prefix is not None
    assert (config.method.prefix.num_virtual_tokens, config.method.prefix.projection) == (12, True)
    assert config.method.prefix.projection_hidden_size == 256


def test_prompt_translates_with_text_init() -> None:
    method = {"type": "prompt", "prompt": {"init": "text", "initText": "Classify the review"}}
    config = trainer_config(parse_manifest(_job(method=method)))
    assert config.method.prefix is None and config.method.prompt is not None
    assert config.method.prompt.init == "text"
    assert config.method.prompt.init_text == "Classify the review"
    assert config.method.prompt.num_virtual_tokens == 20
    assert config.distributed.resolve(config.method.type, 4) == "ddp"  # auto: small adapters


def test_other_methods_carry_no_prompt_learning_settings() -> None:
    config = trainer_config(parse_manifest(_job()))
    assert config.method.prefix is None and config.method.prompt is None
    assert not config.method.prompt_learning


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"method": {"type": "prompt"}, "dataset": {"sources": ["d.jsonl"]}}, "dataset.packing"),
        (
            {"method": {"type": "prefix"}, "output": {"uri": "/out", "mergeAdapter": True}},
            "output.mergeAdapter",
        ),
        (
            {"method": {"type": "prefix"}, "training": {"gradientCheckpointing": True}},
            "training.gradientCheckpointing",
        ),
        ({"method": {"type": "prompt", "prompt": {"init": "text"}}}, "method.prompt.initText"),
        ({"method": {"type": "prompt", "prompt": {"initText": "x"}}}, "method.prompt.init"),
        ({"method": {"type": "lora", "prefix": {}}}, "method.prefix"),
        ({"method": {"type": "prefix", "lora": {"r": 4}}}, "method.lora"),
        ({"method": {"type": "prompt", "quantization": {"bits": 4}}}, "method.quantization"),
    ],
)
def test_validate_names_the_field_to_change(spec: dict[str, Any], field: str) -> None:
    problems = validate_manifest(_job(**spec))
    assert [p.path for p in problems] == [f"spec.{field}"], problems


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"method": {"type": "prompt"}}, "dataset.packing"),
        (
            {
                "method": {"type": "prefix"},
                "dataset": {"packing": False},
                "output": {"merge_adapter": True},
            },
            "output.merge_adapter",
        ),
        (
            {
                "method": {"type": "prefix"},
                "dataset": {"packing": False},
                "training": {"gradient_checkpointing": True},
            },
            "training.gradient_checkpointing",
        ),
        ({"method": {"type": "prompt", "prompt": {"init": "text"}}}, "init_text"),
        ({"method": {"type": "lora", "prompt": {}}}, "prompt settings"),
    ],
)
def test_the_trainer_refuses_the_same_combinations(sections: dict[str, Any], named: str) -> None:
    """The trainer validates its configuration again (kubetune train, a hand-written one)."""
    base: dict[str, Any] = {
        "model": {"source": "/m"},
        "dataset": {"sources": ["/d.jsonl"]},
        "output": {"uri": "/out"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    with pytest.raises(ValidationError, match=named):
        TrainerConfig.model_validate(base)


def test_prompt_tuning_may_checkpoint_gradients() -> None:
    """peft's prompt tuning trains under gradient checkpointing (prefix tuning does not)."""
    config = TrainerConfig.model_validate(
        {
            "model": {"source": "/m"},
            "dataset": {"sources": ["/d.jsonl"], "packing": False},
            "output": {"uri": "/out"},
            "method": {"type": "prompt"},
            "training": {"gradient_checkpointing": True},
        }
    )
    assert config.training.gradient_checkpointing


def _identity(method: dict[str, Any]) -> RunIdentity:
    config = TrainerConfig.model_validate(
        {
            "model": {"source": "/m"},
            "dataset": {"sources": ["/d.jsonl"], "packing": False},
            "output": {"uri": "/out"},
            "method": method,
        }
    )
    return RunIdentity.of(config, [{"split": "train", "sha256": "a" * 64}])


def test_the_fingerprint_holds_the_settings_and_leaves_other_methods_alone() -> None:
    lora = _identity({"type": "lora"})
    # the same keys as before prefix and prompt existed: published artifacts still match
    assert {k for k in lora.settings if k.startswith("method.")} == {
        f"method.{name}" for name in ("type", "r", "alpha", "dropout", "target_modules")
    } | {"method.quantization"}
    few = _identity({"type": "prompt", "prompt": {"num_virtual_tokens": 8}})
    many = _identity({"type": "prompt", "prompt": {"num_virtual_tokens": 16}})
    assert few.fingerprint != many.fingerprint
    assert many.differences(few.record()) == ["method.prompt"]


def test_the_peft_configs(tmp_path: Path) -> None:
    from peft import PeftType

    from kubetune_trainer.modeling import prompt_learning_config

    prefix = prompt_learning_config(
        MethodConfig(type="prefix", prefix={"num_virtual_tokens": 7, "projection": True}), tmp_path
    )
    assert prefix.peft_type == PeftType.PREFIX_TUNING and prefix.task_type == "CAUSAL_LM"
    assert (prefix.num_virtual_tokens, prefix.prefix_projection) == (7, True)
    assert prefix.encoder_hidden_size is None  # peft then takes the model's hidden size
    settings = {"projection": True, "projection_hidden_size": 32}
    sized = prompt_learning_config(MethodConfig(type="prefix", prefix=settings), tmp_path)
    assert sized.encoder_hidden_size == 32
    prompt = prompt_learning_config(
        MethodConfig(type="prompt", prompt={"init": "text", "init_text": "Summarize"}), tmp_path
    )
    assert prompt.peft_type == PeftType.PROMPT_TUNING and prompt.num_virtual_tokens == 20
    assert prompt.prompt_tuning_init == "TEXT" and prompt.prompt_tuning_init_text == "Summarize"
    assert prompt.tokenizer_name_or_path == str(tmp_path)  # the base model's tokenizer
    random = prompt_learning_config(MethodConfig(type="prompt"), tmp_path)
    assert random.prompt_tuning_init == "RANDOM"
