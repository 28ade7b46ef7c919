"""The GPU memory estimate (operator/kubetune_operator/memory.py) and the operator's
refusal of a job that cannot fit (Accepted=False/InsufficientGpuMemory). No torch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune_operator.api.validation import parse_manifest
from kubetune_operator.memory import (
    ARCHITECTURE_ANNOTATION,
    GIB,
    Architecture,
    estimate,
    memory_refusal,
    parse_quantity,
    verdict,
)
from kubetune_operator.reconcile import reconcile
from kubetune_operator.translate import trainer_config as trainer_config_for
from kubetune_trainer.config import (
    DatasetConfig,
    DistributedConfig,
    FsdpConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    TrainerConfig,
    TrainingConfig,
)

pytestmark = pytest.mark.unit

# Meta-Llama-3-8B's config.json (the fields the estimate reads).
LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
ARCH = Architecture.from_config(LLAMA_8B)


def _config(
    method: str = "lora", *, distributed: DistributedConfig | None = None, **training: Any
) -> TrainerConfig:
    return TrainerConfig(
        model=ModelConfig(source="hf://meta-llama/Meta-Llama-3-8B"),
        dataset=DatasetConfig(sources=["train.jsonl"], max_seq_length=2048),
        method=MethodConfig(type=method) if method != "full" else MethodConfig(type="full"),
        training=TrainingConfig(**training),
        output=OutputConfig(uri="/tmp/out"),
        distributed=distributed or DistributedConfig(),
    )


def test_llama_8b_parameter_count_and_lora_rank_16_adapter() -> None:
    # 32 layers × (2·4096² + 2·4096·1024 + 3·4096·14336) + 2 × 128256·4096 + norms
    assert ARCH.params == 8_030_261_248
    lora = estimate(ARCH, _config())
    # r·(in+out) over q, k, v, o, gate, up, down: the 41.9M peft reports for all-linear
    assert lora.trainable_params == 32 * 16 * (
        (4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3
    )
    assert lora.trainable_params == 41_943_040


def test_base_weights_by_dtype() -> None:
    bf16 = estimate(ARCH, _config()).parts["base weights"]
    assert bf16 == ARCH.params * 2  # 16.06 GB
    assert 16.0e9 < bf16 < 16.1e9
    nf4 = estimate(ARCH, _config("qlora")).parts["base weights"]
    linear = ARCH.linear_params
    # 0.5 B per linear weight + double-quantized constants; embeddings, head, norms fp32
    constants = (1 / 64) * (1 + 4 / 256)
    assert nf4 == pytest.approx(linear * (0.5 + constants) + (ARCH.params - linear) * 4)
    assert 3.5e9 < linear * (0.5 + constants) < 3.7e9  # the 4-bit part: ≈ 0.52 B/param
    assert 7.5e9 < nf4 < 8.0e9  # plus 4.2 GB of fp32 embeddings and output head
    int8 = TrainerConfig(
        **{
            **_config().model_dump(),
            "method": MethodConfig(type="qlora", quantization={"bits": 8}),
        }
    )
    assert nf4 < estimate(ARCH, int8).parts["base weights"] < bf16


def test_qlora_needs_less_than_lora_and_full_needs_most() -> None:
    lora = estimate(ARCH, _config(gradient_checkpointing=True))
    qlora = estimate(ARCH, _config("qlora", gradient_checkpointing=True))
    full = estimate(ARCH, _config("full", gradient_checkpointing=True))
    assert qlora.total < lora.total < full.total
    # adapters: fp32 weights + gradients + two AdamW moments = 16 B per parameter
    assert lora.parts["trainable weights"] + lora.parts["gradients + AdamW state"] == (
        41_943_040 * 16
    )
    # full bf16: weights 2 B (in base weights), gradients 2 B, AdamW 2 × 4 B
    assert full.parts["gradients + AdamW state"] == ARCH.params * 10


def test_gradient_checkpointing_and_smaller_batches_reduce_activations() -> None:
    plain = estimate(ARCH, _config(batch_size=4))
    checkpointed = estimate(ARCH, _config(batch_size=4, gradient_checkpointing=True))
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 5
    assert checkpointed.parts["logits + loss"] == plain.parts["logits + loss"]
    one = estimate(ARCH, _config(batch_size=1))
    assert one.parts["activations"] < plain.parts["activations"] / 3
    # 8192 tokens × 128256 vocab × (3 fp32 tensors + the bf16 logits)
    assert plain.parts["logits + loss"] == 4 * 2048 * 128256 * 14
    assert plain.tokens_per_micro_batch == 4 * 2048


def test_fsdp_shards_a_full_fine_tune_and_ddp_does_not() -> None:
    fsdp = DistributedConfig(strategy="fsdp", fsdp=FsdpConfig(sharding="full"))
    one = estimate(ARCH, _config("full", gradient_checkpointing=True))
    eight = estimate(
        ARCH, _config("full", gradient_checkpointing=True, distributed=fsdp), gpus_per_node=8
    )
    assert eight.gpus_sharing == 8
    assert eight.parts["base weights"] == pytest.approx(one.parts["base weights"] / 8)
    assert eight.parts["gradients + AdamW state"] == pytest.approx(
        one.parts["gradients + AdamW state"] / 8
    )
    assert eight.parts["activations"] == one.parts["activations"]
    assert eight.total < one.total / 3
    hybrid = DistributedConfig(strategy="fsdp", fsdp=FsdpConfig(sharding="hybrid"))
    two_nodes = estimate(
        ARCH,
        _config("full", gradient_checkpointing=True, distributed=hybrid),
        nodes=2,
        gpus_per_node=4,
    )
    assert two_nodes.gpus_sharing == 4  # within a node only
    ddp = estimate(ARCH, _config(gradient_checkpointing=True), gpus_per_node=8)
    assert ddp.parts["base weights"] == ARCH.params * 2
    assert ddp.parts["DDP gradient buckets"] == 41_943_040 * 4


def test_cpu_estimate_has_no_cuda_overhead_and_fp32() -> None:
    cpu = estimate(ARCH, _config(), gpu=False)
    assert "CUDA context + allocator" not in cpu.parts
    assert cpu.parts["base weights"] == ARCH.params * 4


def test_architecture_from_config_and_annotation() -> None:
    qwen = Architecture.from_config(
        {
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
        }
    )
    assert qwen.embedding_params == 151936 * 896  # tied: one copy
    assert 0.49e9 < qwen.params < 0.50e9  # Qwen2-0.5B: 494M (biases left out)
    assert Architecture.from_json(qwen.to_json()) == qwen
    with pytest.raises(ValueError, match="lacks hidden_size"):
        Architecture.from_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="unknown fields"):
        Architecture.from_json('{"hiddenSize": 8, "layers": 2}')


def test_quantities_and_verdicts() -> None:
    assert parse_quantity("80Gi") == 80 * GIB
    assert parse_quantity("141G") == 141_000_000_000
    assert parse_quantity(1024) == 1024
    with pytest.raises(ValueError):
        parse_quantity("lots")
    lora = estimate(ARCH, _config())
    assert verdict(lora, 24 * GIB)[0] == "does not fit"
    assert verdict(lora, int(lora.total * 1.05))[0] == "tight"
    assert verdict(lora, int(lora.total * 2))[0] == "fits"


# --------------------------------------------------------------------------- the operator

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def _body(gpu_memory: str | None, annotation: str | None, **spec: Any) -> dict[str, Any]:
    resources: dict[str, Any] = {"gpus": 1}
    if gpu_memory:
        resources["gpuMemory"] = gpu_memory
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "big", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"source": "hf://meta-llama/Meta-Llama-3-8B"},
            "dataset": {"sources": ["s3://data/train.jsonl"], "maxSeqLength": 2048},
            "output": {"uri": "s3://out/big"},
            "resources": resources,
            **spec,
        },
        "status": {},
    }
    if annotation is not None:
        body["metadata"]["annotations"] = {ARCHITECTURE_ANNOTATION: annotation}
    return body


def test_operator_refuses_a_job_that_cannot_fit_before_any_pod() -> None:
    body = _body("24Gi", ARCH.to_json())
    decision = reconcile(body, [], [], image="trainer:test", now=NOW)
    assert decision.create_job is None
    status = decision.status
    assert status["state"] == "Invalid"
    accepted = next(x for x in status["conditions"] if x["type"] == "Accepted")
    assert accepted["status"] == "False"
    assert accepted["reason"] == "InsufficientGpuMemory"
    message = accepted["message"]
    assert "GiB per GPU, 24.00 GiB available" in message
    assert "qlora" in message and "gradientCheckpointing" in message
    assert "batchSize" in message
    assert any(e.reason == "InsufficientGpuMemory" for e in decision.events)


def test_operator_starts_a_job_that_fits_or_cannot_be_checked() -> None:
    fits = _body(
        "80Gi",
        ARCH.to_json(),
        method={"type": "qlora"},
        training={"batchSize": 1, "gradientCheckpointing": True},
    )
    assert reconcile(fits, [], [], image="trainer:test", now=NOW).create_job is not None
    # without the architecture or without gpuMemory there is nothing to check against
    for body in (_body("24Gi", None), _body(None, ARCH.to_json())):
        assert reconcile(body, [], [], image="trainer:test", now=NOW).create_job is not None


def test_a_malformed_architecture_annotation_is_an_invalid_spec() -> None:
    decision = reconcile(_body("80Gi", "{not json"), [], [], image="trainer:test", now=NOW)
    assert decision.create_job is None
    accepted = next(x for x in decision.status["conditions"] if x["type"] == "Accepted")
    assert accepted["reason"] == "InvalidSpec"
    assert ARCHITECTURE_ANNOTATION in accepted["message"]


def test_memory_refusal_names_the_fix_for_a_full_fine_tune() -> None:
    job = parse_manifest(_body("80Gi", None, method={"type": "full"}))
    message = memory_refusal(job, {ARCHITECTURE_ANNOTATION: ARCH.to_json()})
    assert message is not None
    assert "more GPUs" in message and "lora or qlora" in message


def test_a_gpu_product_the_platform_maps_to_memory_is_checked_too() -> None:
    products = {"NVIDIA-L4": "24Gi", "NVIDIA-H100-80GB-HBM3": "80Gi"}
    body = _body(None, ARCH.to_json())
    body["spec"]["resources"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-L4"}
    decision = reconcile(body, [], [], image="trainer:test", now=NOW, gpu_products=products)
    assert decision.create_job is None
    accepted = next(x for x in decision.status["conditions"] if x["type"] == "Accepted")
    assert accepted["reason"] == "InsufficientGpuMemory"
    assert "nvidia.com/gpu.product=NVIDIA-L4 in the operator's GPU table" in accepted["message"]
    # an unknown product, or no table: nothing to check against
    body["spec"]["resources"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A10"}
    assert reconcile(body, [], [], image="t", now=NOW, gpu_products=products).create_job
    # the job's own gpuMemory wins over the table
    body["spec"]["resources"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-L4"}
    body["spec"]["resources"]["gpuMemory"] = "400Gi"
    assert reconcile(body, [], [], image="t", now=NOW, gpu_products=products).create_job


def test_the_charts_gpu_products_reach_the_operator() -> None:
    pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    from chart_helpers import render_manifests

    from kubetune_operator.cli import _gpu_products, build_parser

    def operator_args(values: dict[str, Any]) -> list[str]:
        deployment = next(m for m in render_manifests(values) if m["kind"] == "Deployment")
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    assert not any(a.startswith("--gpu-memory-by-product") for a in operator_args({}))
    table = {"NVIDIA-H100-80GB-HBM3": "80Gi", "NVIDIA-L4": "24Gi"}
    args = build_parser().parse_args(["operator", *operator_args({"gpuProducts": table})])
    assert _gpu_products(args.gpu_memory_by_product) == table
    with pytest.raises(ValueError):
        _gpu_products('{"NVIDIA-L4": "lots"}')


def test_the_8b_qlora_example_declares_its_gpu_and_fits_it() -> None:
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "examples" / "llama-8b-qlora.yaml"
    body = yaml.safe_load(path.read_text())
    text = body["metadata"]["annotations"][ARCHITECTURE_ANNOTATION]
    assert Architecture.from_json(text) == ARCH  # Llama-3.1-8B has Llama-3-8B's shape
    job = parse_manifest(body)
    assert job.spec.resources.gpuMemory == "80Gi"
    assert memory_refusal(job, body["metadata"]["annotations"]) is None
    config = trainer_config_for(job)
    need = estimate(ARCH, config).total
    assert 28 * GIB < need < 36 * GIB  # the "≈ 32 GiB" its comment says


def test_prompt_learning_counts_no_adapter() -> None:
    config = _config()
    config = config.model_copy(
        update={
            "method": MethodConfig(type="prompt"),
            "dataset": config.dataset.model_copy(update={"packing": False}),
        }
    )
    prompt = estimate(ARCH, config)
    assert prompt.trainable_params == 0
    assert any("prompt tuning" in note for note in prompt.notes)
    assert prompt.parts["base weights"] == ARCH.params * 2


def test_sweep_trials_carry_the_architecture_so_each_is_checked() -> None:
    from kubetune_operator.sweep import reconcile_sweep

    sweep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {
            "name": "bs",
            "namespace": "ml",
            "uid": "sweep-uid",
            "generation": 1,
            "annotations": {ARCHITECTURE_ANNOTATION: ARCH.to_json(), "other": "not-copied"},
        },
        "spec": {
            "template": {
                "model": {"source": "hf://org/model"},
                "dataset": {"sources": ["s3://data/train.jsonl"], "maxSeqLength": 2048},
                "method": {"type": "qlora"},
                "training": {"maxSteps": 40, "gradientCheckpointing": True},
                "output": {"uri": "s3://artifacts/sweeps/bs/"},
                "resources": {"gpus": 1, "gpuMemory": "24Gi"},
            },
            "parameters": [
                {"path": "training.batchSize", "type": "categorical", "values": [1, 16]}
            ],
            "algorithm": {"type": "grid"},
            "maxTrials": 2,
            "parallelTrials": 2,
        },
    }
    trials = reconcile_sweep(sweep, [], now=NOW).create_trials
    assert len(trials) == 2
    refused = []
    for trial in trials:
        assert trial["metadata"]["annotations"][ARCHITECTURE_ANNOTATION] == ARCH.to_json()
        assert "other" not in trial["metadata"]["annotations"]
        trial["metadata"].update(uid="t", generation=1)
        decision = reconcile(trial, [], [], image="t", now=NOW)
        if decision.create_job is None:
            refused.append(trial["spec"]["training"]["batchSize"])
    assert refused == [16]  # batch 1 fits 24 GiB under qlora, batch 16 does not
