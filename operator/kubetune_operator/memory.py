"""GPU memory estimate of a FineTuneJob, per GPU, from the model's architecture alone.

Pure: no torch, no weights, no I/O. ``kubetune plan`` reads the architecture from the
model's ``config.json`` (:meth:`Architecture.from_config`); the operator reads it from
the job's ``kubetune.io/model-architecture`` annotation (written by ``kubetune plan
--annotate``) and refuses a job whose estimate exceeds ``spec.resources.gpuMemory``
before any pod starts (``Accepted=False``, reason ``InsufficientGpuMemory``).

What is counted (bytes per GPU), for a Llama-shaped decoder (attention with
``num_key_value_heads``, gated MLP; how the trainer builds the model, modeling.py):

- **base weights**: bf16/fp16 2 B per parameter, fp32 4 B; qlora 4-bit NF4 0.5 B per
  linear weight plus its quantization constants (fp32 absmax per 64 weights, or with
  double quantization 8-bit absmax plus fp32 per 256 blocks: ≈ 0.516 B per weight in
  all), 8-bit 1 B plus a scale per row; a quantized model's other weights (embeddings,
  output head, norms) are fp32 (peft's ``prepare_model_for_kbit_training`` upcasts them);
- **trainable state**: adapter weights are fp32 (peft upcasts them), so weights,
  gradients and AdamW's two moments take 16 B per adapter parameter; a full fine-tune
  keeps them in the training dtype (bf16: 2 + 2 + 4 B; fp32: 16 B); DDP adds a gradient
  bucket copy of the trainable gradients;
- **activations** of one micro-batch (batchSize × maxSeqLength tokens, the most a device
  step holds: the trainer keeps packed steps within it), per token and layer: the two
  RMSNorms' fp32 copies and outputs, q, k and v (k and v repeated to every head, as the
  sdpa path does with a packing mask), the attention output and its contiguous copy,
  the MLP's gate, up, SiLU and product (4 × intermediate), the adapters' rank-r
  intermediates and, on a GPU, each adapted linear's input in the compute dtype (peft
  casts it to the fp32 adapter's dtype, autocast back); under qlora on a GPU the
  residual stream is fp32 (the upcast embeddings). Memory-efficient attention stores no
  seq² scores; the packing mask (seq² per row) is counted once. Gradient checkpointing
  keeps each layer's input and recomputes one layer at a time;
- **logits and loss**: per token, the vocab-sized fp32 log-probabilities, their gradient
  and the logits' gradient at the start of the backward pass (plus the logits in the
  compute dtype when it is not fp32);
- **runtime overhead** (GPU only): the CUDA context, cuBLAS workspaces and the caching
  allocator's slack, 1 GiB plus 10 % of the above;
- **FSDP** shards weights, gradients and optimizer state over the ranks (full) or the
  GPUs of a node (hybrid) and gathers one layer (plus one prefetched) at a time; CPU
  offload keeps the shards off the GPU.

docs/plan.md explains the figures and docs/benchmarks.md compares them with measured peaks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kubetune_trainer.config import TrainerConfig

from .translate import trainer_config

ARCHITECTURE_ANNOTATION = "kubetune.io/model-architecture"
# The node label NVIDIA's GPU feature discovery sets (e.g. NVIDIA-H100-80GB-HBM3): a job
# whose nodeSelector names a product the operator's --gpu-memory-by-product (the chart's
# gpuProducts) maps to memory is checked against that memory.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
INSUFFICIENT_GPU_MEMORY = "InsufficientGpuMemory"

GIB = 1024**3
CUDA_CONTEXT_BYTES = GIB  # context + cuBLAS/cuDNN workspaces, measured ~0.5-1 GiB on H100s
ALLOCATOR_SLACK = 0.10  # caching allocator: reserved but unused blocks, fragmentation
TIGHT_MARGIN = 0.10  # "fits, but tight" within this share of the GPU's memory
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
# Linear layers by the names peft's target_modules use (Llama, Mistral, Qwen2, Gemma...).
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: int | str) -> int:
    """Bytes in a Kubernetes quantity such as ``80Gi``, ``141G`` or ``85899345920``."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return int(float(match.group(1)) * _SUFFIX[match.group(2) or ""])


def gib(value: float) -> str:
    """Bytes as GiB (MiB under 1 GiB)."""
    if abs(value) < GIB:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a decoder-only model (from its config.json)."""

    hiddenSize: int
    numLayers: int
    numHeads: int
    numKvHeads: int
    intermediateSize: int
    vocabSize: int
    tiedEmbeddings: bool = False
    headDim: int | None = None
    modelType: str = "llama"

    def __post_init__(self) -> None:
        for name in ("hiddenSize", "numLayers", "numHeads", "numKvHeads", "vocabSize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if not isinstance(self.intermediateSize, int) or self.intermediateSize < 1:
            raise ValueError("intermediateSize must be a positive integer")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        """From a transformers ``config.json`` (a multimodal one's ``text_config``)."""
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        c = {**config, **(text or {})}
        missing = [
            key
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if key not in c
        ]
        if missing:
            raise ValueError(
                "config.json lacks " + ", ".join(missing) + " (not a decoder-only transformer "
                "the estimate knows)"
            )
        hidden = int(c["hidden_size"])
        return cls(
            hiddenSize=hidden,
            numLayers=int(c["num_hidden_layers"]),
            numHeads=int(c["num_attention_heads"]),
            numKvHeads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
            intermediateSize=int(c.get("intermediate_size") or 4 * hidden),
            vocabSize=int(c["vocab_size"]),
            tiedEmbeddings=bool(c.get("tie_word_embeddings", False)),
            headDim=int(c["head_dim"]) if c.get("head_dim") else None,
            modelType=str(c.get("model_type") or "llama"),
        )

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def head_dim(self) -> int:
        return self.headDim or self.hiddenSize // self.numHeads

    def linears(self) -> dict[str, tuple[int, int]]:
        """One layer's linear layers: name → (in features, out features)."""
        h, d, i = self.hiddenSize, self.head_dim, self.intermediateSize
        return {
            "q_proj": (h, self.numHeads * d),
            "k_proj": (h, self.numKvHeads * d),
            "v_proj": (h, self.numKvHeads * d),
            "o_proj": (self.numHeads * d, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the output head (once when tied)."""
        return self.vocabSize * self.hiddenSize * (1 if self.tiedEmbeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.numLayers + 1) * self.hiddenSize

    @property
    def linear_params(self) -> int:
        return self.numLayers * self.linear_params_per_layer

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


@dataclass
class Estimate:
    """Bytes per GPU by what holds them; ``notes`` say what was assumed."""

    parts: dict[str, float]
    notes: list[str] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0
    tokens_per_micro_batch: int = 0
    gpus_sharing: int = 1

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        width = max(map(len, self.parts))
        lines = [f"  {name.ljust(width)}  {gib(value):>11}" for name, value in self.parts.items()]
        lines.append(f"  {'total'.ljust(width)}  {gib(self.total):>11}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "bytes": {name: round(value) for name, value in self.parts.items()},
            "totalBytes": round(self.total),
            "params": self.params,
            "trainableParams": self.trainable_params,
            "tokensPerMicroBatch": self.tokens_per_micro_batch,
            "notes": self.notes,
        }


def _adapted(arch: Architecture, targets: list[str]) -> dict[str, tuple[int, int]]:
    linears = arch.linears()
    if targets == ["all-linear"]:
        return linears  # every linear layer but the output head (peft's all-linear)
    return {name: shape for name, shape in linears.items() if name in targets}


def _compute_bytes(config: TrainerConfig, gpu: bool) -> int:
    """Bytes per activation element: the training dtype (auto → bf16 on GPU, fp32 on CPU)."""
    quant = config.method.effective_quantization
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    if quant is not None:
        if not gpu:
            return 4  # the trainer computes 4-bit in fp32 on CPU (modeling.py)
        return 4 if quant.compute_dtype == "float32" else 2
    return 4 if precision == "fp32" else 2


def estimate(
    arch: Architecture,
    config: TrainerConfig,
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    gpu: bool = True,
    tokens_per_micro_batch: int | None = None,
    packing_mask: bool | None = None,
) -> Estimate:
    """Peak memory of one training rank of ``config`` on ``arch``.

    ``tokens_per_micro_batch`` defaults to batchSize × maxSeqLength (the most one device
    step holds); ``gpu=False`` estimates a CPU process (no CUDA overhead, fp32 compute)."""
    method = config.method
    quant = method.effective_quantization
    training = config.training
    world = max(1, nodes * gpus_per_node)
    strategy = config.distributed.resolve(method.type, world)
    a = _compute_bytes(config, gpu)
    h, layers, vocab = arch.hiddenSize, arch.numLayers, arch.vocabSize
    notes: list[str] = []
    parts: dict[str, float] = {}

    # --- base weights
    other_params = arch.embedding_params + arch.norm_params
    if quant is not None and quant.bits == 4:
        constants = (
            (1 / NF4_BLOCK) * (1 + 4 / DOUBLE_QUANT_BLOCK) if quant.double_quant else 4 / NF4_BLOCK
        )
        weights = arch.linear_params * (0.5 + constants) + other_params * 4
        notes.append(
            f"base: {quant.quant_type.upper()} 4-bit linear weights"
            f"{' with double quantization' if quant.double_quant else ''}; embeddings, "
            "output head and norms in fp32"
        )
    elif quant is not None:
        rows = layers * sum(out for _, out in arch.linears().values())
        weights = arch.linear_params * 1 + rows * 4 + other_params * 4
        notes.append("base: int8 linear weights; embeddings, output head and norms in fp32")
    else:
        weights = arch.params * a
        notes.append(f"base: {'bf16/fp16' if a == 2 else 'fp32'} weights")

    # --- trainable state
    lora_like = method.type in ("lora", "qlora", "dora")
    adapted = _adapted(arch, list(method.target_modules)) if lora_like else {}
    if method.type not in ("lora", "qlora", "dora", "full"):
        trainable, trainable_weights, state = 0, 0.0, 0.0  # prefix/prompt: a few thousand
        notes.append(f"{method.type} tuning: its few trained weights are not counted")
    elif method.type == "full":
        trainable = arch.params
        per_param = a + a + 8 if a == 2 else 16  # weights and grads in dtype, AdamW 2 × fp32
        trainable_weights = 0.0  # already in the base weights
        state = trainable * (per_param - a)
        notes.append("full fine-tune: gradients and AdamW moments for every weight")
    else:
        if not adapted:
            notes.append(
                f"targetModules {method.target_modules} name no linear layer the estimate "
                f"knows ({', '.join(arch.linears())}): no adapter counted"
            )
        trainable = layers * sum(method.r * (i + o) for i, o in adapted.values())
        if method.type == "dora":
            trainable += layers * sum(o for _, o in adapted.values())  # magnitude vectors
        trainable_weights = trainable * 4.0  # adapters are fp32
        state = trainable * 12.0  # fp32 gradients + AdamW's two moments
    grad_bytes = a if method.type == "full" and a == 2 else 4

    shard = 1
    if strategy == "fsdp":
        shard = world if config.distributed.fsdp.sharding == "full" else gpus_per_node
        shard = max(shard, 1)
    if shard > 1:
        layer_weights = arch.linear_params_per_layer * a
        if config.distributed.fsdp.cpu_offload:
            weights, trainable_weights, state = 0.0, 0.0, 0.0
            notes.append("FSDP CPU offload: sharded weights and optimizer state in host memory")
        else:
            weights /= shard
            trainable_weights /= shard
            state /= shard
        parts["base weights"] = weights
        parts["FSDP gathered layers"] = 2 * layer_weights  # the current one + one prefetched
        notes.append(f"FSDP ({config.distributed.fsdp.sharding}): sharded over {shard} GPUs")
    else:
        parts["base weights"] = weights
    parts["trainable weights"] = trainable_weights
    parts["gradients + AdamW state"] = state
    if strategy == "ddp":
        parts["DDP gradient buckets"] = trainable * grad_bytes
        notes.append(f"DDP over {world} GPUs: each holds the whole model")

    # --- activations
    tokens = tokens_per_micro_batch or training.batch_size * config.dataset.max_seq_length
    seq = config.dataset.max_seq_length
    rows = max(1, math.ceil(tokens / seq))
    d_all = arch.numHeads * arch.head_dim
    stream = 4 if quant is not None and gpu else a  # upcast norms/embeddings: fp32 stream
    norms = 2 * (4 * h + stream * h)
    attention = a * (d_all + 2 * d_all + 2 * d_all)  # q, k, v (repeated), output, copy
    mlp = a * 4 * arch.intermediateSize
    lora = len(adapted) * method.r * 4
    # On a GPU the adapters (fp32) and the compute dtype differ: peft casts each adapted
    # linear's input to fp32, autocast casts it back, and lora_A keeps that copy.
    if gpu and a != 4:
        lora += a * sum(i for i, _ in adapted.values())
    per_layer = norms + attention + mlp + lora
    checkpointing = training.gradient_checkpointing or (
        strategy == "fsdp" and config.distributed.fsdp.activation_checkpointing
    )
    if checkpointing:
        activations = tokens * (layers * stream * h + per_layer)
        notes.append("gradient checkpointing: each layer's input kept, one layer recomputed")
    else:
        activations = tokens * layers * per_layer
    activations += tokens * (4 * h + stream * h)  # final norm
    use_mask = config.dataset.packing if packing_mask is None else packing_mask
    if use_mask:
        activations += rows * seq * seq * a  # the block-diagonal mask, once per micro-batch
    parts["activations"] = activations
    parts["logits + loss"] = tokens * vocab * (12 + (a if a != 4 else 0))

    # --- transient and runtime
    largest = max(i * o for i, o in arch.linears().values())
    if quant is not None:
        parts["dequantized weight (transient)"] = largest * a
    if method.type == "dora":
        parts["DoRA weight norm (transient)"] = largest * 4
        notes.append("DoRA: one merged weight at a time for its norm")
    if gpu:
        parts["CUDA context + allocator"] = CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * sum(
            parts.values()
        )
    return Estimate(
        parts=parts,
        notes=notes,
        params=arch.params,
        trainable_params=trainable,
        tokens_per_micro_batch=tokens,
        gpus_sharing=shard,
    )


def estimate_job(arch: Architecture, spec: Any, config: TrainerConfig) -> Estimate:
    """The estimate for a FineTuneJob's spec (its nodes and GPUs) as translated."""
    gpus = spec.resources.gpus
    return estimate(
        arch,
        config,
        nodes=spec.resources.nodes,
        gpus_per_node=gpus or spec.processes_per_node,
        gpu=gpus > 0,
    )


def advice(arch: Architecture, config: TrainerConfig, spec: Any) -> list[str]:
    """What to change so that the job needs less memory, biggest savings first."""
    tips: list[str] = []
    if config.method.type in ("lora", "dora"):
        tips.append("method.type: qlora (4-bit base weights)")
    if config.method.type == "full":
        tips.append("method.type: lora or qlora (no optimizer state for the base weights)")
    if not config.training.gradient_checkpointing:
        tips.append("training.gradientCheckpointing: true")
    if config.training.batch_size > 1:
        tips.append(
            f"a smaller training.batchSize (now {config.training.batch_size}; raise "
            "gradientAccumulationSteps to keep the examples per step)"
        )
    if config.dataset.max_seq_length > 512:
        tips.append(f"a shorter dataset.maxSeqLength (now {config.dataset.max_seq_length})")
    if config.method.type == "full":
        tips.append("more GPUs (resources.gpus or resources.nodes): FSDP shards the model")
    else:
        tips.append("a GPU with more memory (adapters: more GPUs do not shrink each one's share)")
    return tips


def verdict(estimate_: Estimate, available: int) -> tuple[str, str]:
    """("fits" | "tight" | "does not fit", a sentence)."""
    need = estimate_.total
    if need > available:
        return "does not fit", f"needs about {gib(need)} per GPU, {gib(available)} available"
    if need > available * (1 - TIGHT_MARGIN):
        return "tight", (
            f"needs about {gib(need)} per GPU of {gib(available)}: within "
            f"{TIGHT_MARGIN:.0%} of the limit (the estimate is ±25 %)"
        )
    return "fits", f"needs about {gib(need)} per GPU of {gib(available)}"


def gpu_memory_of(spec: Any, gpu_products: Mapping[str, str] | None = None) -> str | None:
    """The memory of each of the job's GPUs: spec.resources.gpuMemory, else what the
    platform's product table says of the product its nodeSelector names."""
    declared = spec.resources.gpuMemory
    if declared is not None:
        return str(declared)
    product = (spec.resources.nodeSelector or {}).get(GPU_PRODUCT_LABEL)
    return (gpu_products or {}).get(product) if product else None


def memory_refusal(
    job: Any, annotations: Mapping[str, str] | None, gpu_products: Mapping[str, str] | None = None
) -> str | None:
    """The operator's check: why the job cannot fit its GPUs, or None.

    The estimate needs both the GPU memory (spec.resources.gpuMemory) and the model's
    architecture (the kubetune.io/model-architecture annotation that ``kubetune plan
    --annotate`` writes; the operator cannot read the model itself). Without either,
    nothing is checked. A malformed annotation raises ValueError."""
    spec = job.spec
    declared = gpu_memory_of(spec, gpu_products)
    text = (annotations or {}).get(ARCHITECTURE_ANNOTATION)
    if declared is None or text is None or spec.resources.gpus == 0:
        return None
    arch = Architecture.from_json(text)
    config = trainer_config(job, output_uri="/tmp/kubetune-plan")
    result = estimate_job(arch, spec, config)
    available = parse_quantity(declared)
    kind, sentence = verdict(result, available)
    if kind != "does not fit":
        return None
    source = (
        f"spec.resources.gpuMemory {declared}"
        if spec.resources.gpuMemory is not None
        else f"{declared} for nodeSelector {GPU_PRODUCT_LABEL}="
        f"{spec.resources.nodeSelector[GPU_PRODUCT_LABEL]} in the operator's GPU table"
    )
    biggest = sorted(result.parts.items(), key=lambda item: -item[1])[:3]
    parts = ", ".join(f"{name} {gib(value)}" for name, value in biggest)
    return (
        f"the job {sentence} ({source}); largest parts: {parts}. "
        f"To fit, try: {'; '.join(advice(arch, config, spec))}. "
        "`kubetune plan -f` shows the whole estimate"
    )
