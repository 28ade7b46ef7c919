"""Fetch the base model and build the model to train: quantize (qlora), attach PEFT."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import MethodConfig, ModelConfig, QuantizationConfig
from .errors import ConfigInvalid, ModelInvalid, Unsupported
from .model_cache import HUB_PATTERNS, CacheResult, HubSource, ModelCache, S3Source
from .storage import S3Settings, fetch_to_local

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_dir(
    model: ModelConfig,
    cache_dir: Path,
    *,
    endpoint_url: str | None = None,
    settings: S3Settings | None = None,
) -> Path:
    """A local directory holding the model's config, weights and tokenizer."""
    return resolve_model(model, cache_dir, endpoint_url=endpoint_url, settings=settings)[0]


def resolve_model(
    model: ModelConfig,
    cache_dir: Path,
    *,
    endpoint_url: str | None = None,
    settings: S3Settings | None = None,
    model_cache: ModelCache | None = None,
) -> tuple[Path, CacheResult | None]:
    """The model's local directory, and what the shared model cache did (None without
    one, and for local paths, which are not copied)."""
    source = model.source
    cached: CacheResult | None = None
    try:
        if model_cache is not None and source.startswith(("hf://", "s3://")):
            cached = _from_cache(model, model_cache, endpoint_url, settings)
            local = cached.path
        elif source.startswith("hf://"):
            return _from_hub(model, cache_dir), None
        else:
            local = fetch_to_local(
                source, cache_dir / "model", endpoint_url=endpoint_url, settings=settings
            )
    except ConfigInvalid as missing:  # nothing at that path or prefix: the model is missing
        if "does not exist" not in missing.message or "bucket" in missing.message:
            raise  # a malformed URI or a missing bucket: the configuration's fault
        raise ModelInvalid(
            f"spec.model.source: {missing.message}",
            hint="point spec.model.source at a directory written by save_pretrained "
            "(in a pod, on a mounted volume), or at s3://bucket/prefix holding one",
        ) from None
    if not (local / "config.json").is_file():
        raise ModelInvalid(
            f"model source {source} has no config.json",
            hint="point spec.model.source at a directory written by save_pretrained",
        )
    if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        raise ModelInvalid(
            f"model source {source} has no weights (*.safetensors or *.bin)",
            hint="save the model with save_pretrained, or check the path",
        )
    return local, cached


def _from_cache(
    model: ModelConfig,
    model_cache: ModelCache,
    endpoint_url: str | None,
    settings: S3Settings | None,
) -> CacheResult:
    if not model.source.startswith("hf://"):
        return model_cache.fetch(
            S3Source(model.source, endpoint_url=endpoint_url, settings=settings)
        )
    token = os.environ.get(model.token_env) if model.token_env else None
    repo_id = model.source.removeprefix("hf://")
    with _hub_errors(repo_id):
        return model_cache.fetch(HubSource(repo_id, model.revision, token))


def _from_hub(model: ModelConfig, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    repo_id = model.source.removeprefix("hf://")
    token = os.environ.get(model.token_env) if model.token_env else None
    with _hub_errors(repo_id):
        path = snapshot_download(
            repo_id,
            revision=model.revision,
            token=token,
            cache_dir=str(cache_dir / "hub"),
            allow_patterns=list(HUB_PATTERNS),
        )
    return Path(path)


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """The hub's refusals as ModelInvalid, naming the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RevisionNotFoundError:
        raise ModelInvalid(
            f"hf://{repo_id} has no revision named by spec.model.revision",
            hint="set spec.model.revision to a branch, tag or commit of the model",
        ) from None
    except GatedRepoError:
        raise ModelInvalid(
            f"hf://{repo_id} is gated and the token cannot access it",
            hint="accept the model's licence on the hub and set spec.model.tokenSecretRef",
        ) from None
    except RepositoryNotFoundError:
        raise ModelInvalid(
            f"hf://{repo_id} was not found (or is private)",
            hint="check the id, or set spec.model.tokenSecretRef for a private model",
        ) from None


def _quantization(quant: QuantizationConfig) -> Any:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:  # missing, or a broken native library
        raise Unsupported(
            f"qlora needs bitsandbytes, which cannot be loaded here: {error}",
            hint="use the kubetune trainer image, or method.type lora",
        ) from None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[quant.compute_dtype],
    )


def train_dtype(precision: str) -> torch.dtype:
    """The dtype of the trainable weights' forward pass for a precision setting."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.float32


def resolve_precision(precision: str) -> str:
    """auto → bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        if precision in ("bf16", "fp16") and not torch.cuda.is_available():
            raise Unsupported(
                f"precision {precision} needs a GPU; this trainer runs on CPU",
                hint="set spec.training.precision to auto or fp32",
            )
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_model(
    model_dir: Path,
    method: MethodConfig,
    *,
    gradient_checkpointing: bool,
    precision: str,
    on_device: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Load the base model and make it trainable per ``method``.

    On CUDA the model is loaded onto this process's own GPU (under torchrun, the one its
    LOCAL_RANK names: distributed.init made it the current device), so each DDP rank
    holds its own (for qlora: 4-bit) copy. ``on_device=False`` loads on the CPU instead
    (FSDP shards first, then moves each rank's shard to its device)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    quant = method.effective_quantization
    kwargs: dict[str, Any] = {"dtype": train_dtype(precision)}
    if quant is not None:
        kwargs["quantization_config"] = _quantization(quant)
        kwargs["dtype"] = _DTYPES[quant.compute_dtype]
        if not torch.cuda.is_available() and quant.compute_dtype != "float32":
            # CPU kernels of bitsandbytes run float32 compute; bf16 works but is slow.
            kwargs["quantization_config"].bnb_4bit_compute_dtype = torch.float32
            kwargs["dtype"] = torch.float32
    kwargs.update(model_kwargs or {})  # e.g. attn_implementation (fastpaths.py)
    if torch.cuda.is_available() and on_device:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as error:
        raise ModelInvalid(
            f"cannot load the model in {model_dir}: {error}",
            hint="check that spec.model.source is a causal language model",
        ) from None
    if not torch.cuda.is_available():
        from .packing import use_packed_sdpa

        use_packed_sdpa(model)  # per-example attention for packed rows (packing.py)
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.type == "full":
        return model
    if method.prompt_learning:
        return _attach_prompt_learning(model, method, model_dir)
    targets: str | list[str] = (
        "all-linear" if method.target_modules == ["all-linear"] else list(method.target_modules)
    )
    lora = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        use_dora=method.type == "dora",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as error:
        raise ModelInvalid(
            f"cannot attach the adapter: {error}",
            hint='check spec.method.lora.targetModules (or use ["all-linear"])',
        ) from None
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def prompt_learning_config(method: MethodConfig, model_dir: Path) -> Any:
    """peft's PrefixTuningConfig or PromptTuningConfig for method prefix or prompt.

    Prompt tuning's text init reads the base model's tokenizer (in ``model_dir``) to turn
    the text into the virtual tokens' starting embeddings."""
    from peft import PrefixTuningConfig, PromptTuningConfig

    prefix = method.effective_prefix
    if prefix is not None:
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix.num_virtual_tokens,
            prefix_projection=prefix.projection,
        )
        if prefix.projection_hidden_size is not None:  # unset: the model's hidden size
            config.encoder_hidden_size = prefix.projection_hidden_size
        return config
    prompt = method.effective_prompt
    if prompt is None:
        raise ValueError(f"method {method.type} is not prefix or prompt tuning")
    if prompt.init == "text":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prompt.num_virtual_tokens,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=prompt.init_text,
            tokenizer_name_or_path=str(model_dir),
        )
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=prompt.num_virtual_tokens,
        prompt_tuning_init="RANDOM",
    )


def _attach_prompt_learning(model: Any, method: MethodConfig, model_dir: Path) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(model, prompt_learning_config(method, model_dir))
    except (ValueError, TypeError, AttributeError) as error:
        raise ModelInvalid(
            f"cannot attach {method.type} tuning to the model: {error}",
            hint="use method.type lora (works with every causal language model)",
        ) from None
