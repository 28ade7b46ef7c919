"""The trainer configuration: what the operator (or ``kubetune train``) hands the trainer.

It is the resolved, defaulted form of a FineTuneJob's spec, in plain Python types
(floats already parsed, defaults already applied). It travels to the pod as JSON in
the ``KUBETUNE_CONFIG`` environment variable (or a file named by
``KUBETUNE_CONFIG_FILE``) and is validated again here. Importable without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DatasetFormat = Literal["auto", "alpaca", "dolly", "sharegpt", "messages", "text"]
Method = Literal["lora", "qlora", "dora", "full", "prefix", "prompt"]
# Methods that train virtual tokens instead of changing weights (peft's prompt learning):
# nothing to merge, one virtual-token block per row (so no packing).
PROMPT_LEARNING: tuple[Method, ...] = ("prefix", "prompt")
PromptInit = Literal["random", "text"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
DistributedStrategy = Literal["auto", "ddp", "fsdp"]
FsdpSharding = Literal["full", "hybrid"]
ResolvedStrategy = Literal["single", "ddp", "fsdp"]
# Task metrics scored on greedy generations (evaluation.py), and what a gate can test:
# those, or a loss (lower is better; the scores are higher-is-better).
TaskMetric = Literal["exactMatch", "tokenF1", "rougeL", "bleu"]
GateMetric = Literal["evalLoss", "testLoss", "exactMatch", "tokenF1", "rougeL", "bleu"]

# JSON the operator sets on a cluster's trainer pods: {"earlierAttemptsGpuSeconds",
# "gpusPerPod", "pods"}; the artifact's manifest records GPU time from it (artifact.py).
GPU_ACCOUNTING_ENV = "KUBETUNE_GPU_ACCOUNTING"
# A directory shared by attempts and jobs (the operator mounts the chart's modelCache
# PVC there) where base models from s3:// and hf:// are cached (model_cache.py); unset:
# every attempt downloads its base model into its own scratch space.
MODEL_CACHE_ENV = "KUBETUNE_MODEL_CACHE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(description="hf://org/name, s3://bucket/prefix, file:///dir or a path")
    revision: str | None = None
    token_env: str | None = Field(
        default=None, description="Name of the env var holding a hub token, if any"
    )


class FieldMapping(_Strict):
    """Which column of the user's rows holds each key a format expects."""

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    context: str | None = None
    response: str | None = None
    conversations: str | None = None
    messages: str | None = None
    text: str | None = None
    system: str | None = None


class DatasetConfig(_Strict):
    sources: list[str] = Field(min_length=1)
    format: DatasetFormat = "auto"
    fields: FieldMapping = FieldMapping()
    validation_sources: list[str] = []
    validation_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    max_seq_length: int = Field(default=2048, ge=16)
    packing: bool = True


class QuantizationConfig(_Strict):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bfloat16"


class PrefixTuningConfig(_Strict):
    """peft's PrefixTuningConfig: trained key/value vectors prepended in every layer."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    projection: bool = Field(
        default=False, description="Reparametrize the prefix through a two-layer MLP"
    )
    projection_hidden_size: int | None = Field(
        default=None, ge=1, description="The MLP's hidden size (None: the model's)"
    )

    @model_validator(mode="after")
    def _hidden_size_needs_projection(self) -> PrefixTuningConfig:
        if self.projection_hidden_size is not None and not self.projection:
            raise ValueError("projection_hidden_size is only used with projection")
        return self


class PromptTuningConfig(_Strict):
    """peft's PromptTuningConfig: trained input embeddings prepended to every row."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    init: PromptInit = "random"
    init_text: str | None = Field(
        default=None, min_length=1, description="With init text: the words to start from"
    )

    @model_validator(mode="after")
    def _text_for_text_init(self) -> PromptTuningConfig:
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init text needs init_text, and init_text needs init text")
        return self


class MethodConfig(_Strict):
    type: Method = "lora"
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # as the API: no dropout
    target_modules: list[str] = ["all-linear"]
    quantization: QuantizationConfig | None = None
    # Settings of prefix and prompt tuning (None: not that method, or its defaults).
    prefix: PrefixTuningConfig | None = None
    prompt: PromptTuningConfig | None = None

    @model_validator(mode="after")
    def _quantization_only_for_qlora(self) -> MethodConfig:
        if self.type != "qlora" and self.quantization is not None:
            raise ValueError("quantization is only used by method qlora")
        if self.type != "prefix" and self.prefix is not None:
            raise ValueError("prefix settings are only used by method prefix")
        if self.type != "prompt" and self.prompt is not None:
            raise ValueError("prompt settings are only used by method prompt")
        return self

    @property
    def prompt_learning(self) -> bool:
        """Prefix or prompt tuning: virtual tokens, no weights changed."""
        return self.type in PROMPT_LEARNING

    @property
    def effective_prefix(self) -> PrefixTuningConfig | None:
        """Prefix tuning's settings (its defaults if unset); None for other methods."""
        return (self.prefix or PrefixTuningConfig()) if self.type == "prefix" else None

    @property
    def effective_prompt(self) -> PromptTuningConfig | None:
        """Prompt tuning's settings (its defaults if unset); None for other methods."""
        return (self.prompt or PromptTuningConfig()) if self.type == "prompt" else None

    @property
    def effective_quantization(self) -> QuantizationConfig | None:
        """The quantization to load the base model with (qlora's defaults if unset)."""
        if self.type != "qlora":
            return None
        return self.quantization or QuantizationConfig()


class EarlyStoppingConfig(_Strict):
    patience: int = Field(ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)


class TrainingConfig(_Strict):
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=4, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0.0)
    scheduler: Scheduler = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_every_steps: int = Field(default=0, ge=0, description="0: evaluate at the end only")
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0: no periodic checkpoints")
    early_stopping: EarlyStoppingConfig | None = None

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> TrainingConfig:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set epochs or max_steps, not both")
        return self

    @property
    def effective_epochs(self) -> int:
        """Epochs to run when max_steps is unset (one by default)."""
        return self.epochs or 1


class OutputConfig(_Strict):
    uri: str = Field(description="s3://bucket/prefix, file:///dir or a local path")
    endpoint_url: str | None = None
    region: str | None = None
    retry_timeout_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="Keep retrying transiently failing storage calls this long (then exit 20)",
    )
    merge_adapter: bool = False
    overwrite: bool = Field(
        default=False, description="Replace an artifact at uri that other settings produced"
    )


class ReportingConfig(_Strict):
    """How the trainer reports while it runs."""

    progress_port: int | None = Field(
        default=None, description="Serve /progress and /metrics on this port (None: off)"
    )
    progress_bar: bool = True
    loss_plot: bool = True


class MlflowConfig(_Strict):
    """Where the run is logged in MLflow. Credentials come from the standard env vars
    (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""

    tracking_uri: str = Field(description="http(s):// URL of the MLflow tracking server")
    experiment: str = Field(default="kubetune", min_length=1)
    run_name: str | None = Field(default=None, description="None: the job's name")
    tags: dict[str, str] = {}


class TrackingConfig(_Strict):
    """Experiment tracking (rank 0 only; a tracker that is down never fails the job)."""

    mlflow: MlflowConfig | None = None
    tensorboard: bool = Field(
        default=True, description="Write TensorBoard event files into the artifact"
    )


class FsdpConfig(_Strict):
    """How FSDP shards a full fine-tune (ignored unless the strategy resolves to fsdp)."""

    sharding: FsdpSharding = Field(
        default="full",
        description="full: shard across every rank; hybrid: shard within a node, "
        "replicate across nodes",
    )
    cpu_offload: bool = False
    activation_checkpointing: bool = False


class DistributedConfig(_Strict):
    """How the ranks of a multi-process run share the work."""

    strategy: DistributedStrategy = "auto"
    fsdp: FsdpConfig = FsdpConfig()

    def resolve(self, method: Method, world_size: int) -> ResolvedStrategy:
        """The strategy a run of ``world_size`` processes uses.

        One process is always "single"; "auto" shards full fine-tunes (FSDP: the whole
        model and its optimizer state do not fit one device) and replicates adapters
        (DDP: the frozen base plus small adapters fit, and DDP is simpler and faster).
        """
        if world_size <= 1:
            return "single"
        if self.strategy == "auto":
            return "fsdp" if method == "full" else "ddp"
        return self.strategy


class GateConfig(_Strict):
    """When a tuned model is promoted: every condition set must hold."""

    metric: GateMetric
    threshold: float | None = Field(
        default=None, description="Losses: at most this; scores: at least this"
    )
    min_improvement: float | None = Field(
        default=None, ge=0.0, description="Improvement over the base model (loss drop, score rise)"
    )
    max_retention_loss_increase: float | None = Field(
        default=None, ge=0.0, description="Tuned minus base loss on the retention data, at most"
    )


class EvaluationConfig(_Strict):
    """Base vs tuned evaluation (evaluation.py): losses on validation, test and retention
    data, task metrics on greedy generations of a bounded sample, and a gate."""

    test_sources: list[str] = []
    test_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    retention_sources: list[str] = []
    metrics: list[TaskMetric] = []
    max_samples: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    baseline: bool = Field(default=True, description="Evaluate the base model too")
    gate: GateConfig | None = None


def global_batch_size(training: TrainingConfig, world_size: int) -> int:
    """Examples per optimizer step across all ranks."""
    return training.batch_size * training.gradient_accumulation_steps * max(world_size, 1)


class TrainerConfig(_Strict):
    job_name: str = "local"
    job_namespace: str | None = None
    job_uid: str | None = Field(
        default=None, description="The FineTuneJob's metadata.uid (None: a local run)"
    )
    model: ModelConfig
    dataset: DatasetConfig
    method: MethodConfig = MethodConfig()
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig
    reporting: ReportingConfig = ReportingConfig()
    distributed: DistributedConfig = DistributedConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluation: EvaluationConfig | None = None

    @model_validator(mode="after")
    def _no_qlora_under_fsdp(self) -> TrainerConfig:
        if self.method.type == "qlora" and self.distributed.strategy == "fsdp":
            raise ValueError(
                "distributed.strategy fsdp cannot shard a 4-bit (qlora) base model; "
                "use strategy ddp or auto (each rank holds its own 4-bit copy), or method lora"
            )
        return self

    @model_validator(mode="after")
    def _prompt_learning_combinations(self) -> TrainerConfig:
        """What prefix and prompt tuning cannot do (the API's rules say the same)."""
        method = self.method.type
        if method not in PROMPT_LEARNING:
            return self
        if self.dataset.packing:
            raise ValueError(
                f"dataset.packing must be false for method {method}: the virtual tokens "
                "are prepended once per row, and peft drops the position ids that keep "
                "packed examples apart"
            )
        if self.output.merge_adapter:
            raise ValueError(
                f"output.merge_adapter must be false for method {method}: virtual tokens "
                "cannot be merged into the base model's weights"
            )
        if method == "prefix" and self.training.gradient_checkpointing:
            raise ValueError(
                "training.gradient_checkpointing must be false for method prefix: "
                "checkpointed layers drop the key/value prefix"
            )
        return self

    @classmethod
    def from_json(cls, text: str) -> TrainerConfig:
        return cls.model_validate_json(text)
