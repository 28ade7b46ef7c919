"""Translate a FineTuneJob's spec into the trainer's configuration.

Pure functions, no I/O: the operator uses them to build the pod, ``kubetune train``
to run the same job locally. Decimal strings become floats here, percentages become
ratios, and the API's defaults are made explicit.
"""

from __future__ import annotations

from pathlib import Path

from kubetune_trainer.config import (
    DatasetConfig,
    DistributedConfig,
    EarlyStoppingConfig,
    EvaluationConfig,
    FieldMapping,
    FsdpConfig,
    GateConfig,
    MethodConfig,
    MlflowConfig,
    ModelConfig,
    OutputConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QuantizationConfig,
    ReportingConfig,
    TrackingConfig,
    TrainerConfig,
    TrainingConfig,
)

from .api.types import FineTuneJob, FineTuneJobSpec, LoraSettings, PrefixSettings, PromptSettings

HUB_TOKEN_ENV = "HF_TOKEN"
# The MLflow client reads its credentials from these (set from Secrets in the pod).
MLFLOW_TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
MLFLOW_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
DEFAULT_EXPERIMENT = "kubetune"  # for a job without a namespace (local runs)
DEFAULT_VALIDATION_PERCENT = 5


def local_output_uri(job_name: str, base: Path | None = None) -> str:
    """Where ``kubetune train`` writes when the job names no output."""
    return str(((base or Path.cwd()) / "kubetune-output" / job_name).resolve())


def _model(spec: FineTuneJobSpec) -> ModelConfig:
    return ModelConfig(
        source=spec.model.source,
        revision=spec.model.revision,
        token_env=HUB_TOKEN_ENV if spec.model.tokenSecretRef else None,
    )


def _dataset(spec: FineTuneJobSpec) -> DatasetConfig:
    data = spec.dataset
    split = data.validation
    mapping = data.fieldMapping.model_dump(exclude_none=True) if data.fieldMapping else {}
    if split is not None and split.sources:
        ratio, validation_sources = 0.0, list(split.sources)
    else:
        percent = split.percent if split and split.percent is not None else None
        ratio = (DEFAULT_VALIDATION_PERCENT if percent is None else percent) / 100
        validation_sources = []
    return DatasetConfig(
        sources=list(data.sources),
        format=data.format,
        fields=FieldMapping(**mapping),
        validation_sources=validation_sources,
        validation_ratio=ratio,
        max_seq_length=data.maxSeqLength,
        packing=data.packing,
    )


def _method(spec: FineTuneJobSpec) -> MethodConfig:
    method = spec.method
    lora = method.lora or LoraSettings()
    quant = method.quantization
    prefix = method.prefix or PrefixSettings()
    prompt = method.prompt or PromptSettings()
    return MethodConfig(
        type=method.type,
        r=lora.r,
        alpha=lora.alpha,
        dropout=float(lora.dropout),
        target_modules=list(lora.targetModules),
        quantization=QuantizationConfig(
            bits=quant.bits,
            quant_type=quant.type,
            double_quant=quant.doubleQuant,
            compute_dtype=quant.computeDtype,
        )
        if quant is not None
        else None,
        prefix=PrefixTuningConfig(
            num_virtual_tokens=prefix.numVirtualTokens,
            projection=prefix.projection,
            projection_hidden_size=prefix.projectionHiddenSize,
        )
        if method.type == "prefix"
        else None,
        prompt=PromptTuningConfig(
            num_virtual_tokens=prompt.numVirtualTokens,
            init=prompt.init,
            init_text=prompt.initText,
        )
        if method.type == "prompt"
        else None,
    )


def _training(spec: FineTuneJobSpec) -> TrainingConfig:
    t = spec.training
    early = t.earlyStopping
    return TrainingConfig(
        epochs=t.epochs,
        max_steps=t.maxSteps,
        batch_size=t.batchSize,
        gradient_accumulation_steps=t.gradientAccumulationSteps,
        learning_rate=float(t.learningRate),
        scheduler=t.scheduler,
        warmup_ratio=t.warmupPercent / 100,
        weight_decay=float(t.weightDecay),
        max_grad_norm=float(t.maxGradNorm),
        precision=t.precision,
        gradient_checkpointing=t.gradientCheckpointing,
        seed=t.seed,
        eval_every_steps=t.evalEverySteps,
        checkpoint_every_steps=t.checkpointEverySteps,
        early_stopping=EarlyStoppingConfig(patience=early.patience, min_delta=float(early.minDelta))
        if early is not None
        else None,
    )


def _distributed(spec: FineTuneJobSpec) -> DistributedConfig:
    fsdp = spec.distributed.fsdp
    return DistributedConfig(
        strategy=spec.distributed.strategy,
        fsdp=FsdpConfig(
            sharding=fsdp.sharding,
            cpu_offload=fsdp.cpuOffload,
            activation_checkpointing=fsdp.activationCheckpointing,
        )
        if fsdp is not None
        else FsdpConfig(),
    )


def _evaluation(spec: FineTuneJobSpec) -> EvaluationConfig | None:
    evaluation = spec.evaluation
    if evaluation is None:
        return None
    test, gate = evaluation.test, evaluation.gate

    def number(value: str | None) -> float | None:
        return float(value) if value is not None else None

    return EvaluationConfig(
        test_sources=list(test.sources or []) if test is not None else [],
        test_ratio=(test.percent or 0) / 100 if test is not None else 0.0,
        retention_sources=list(evaluation.retention.sources) if evaluation.retention else [],
        metrics=list(evaluation.metrics or []),
        max_samples=evaluation.maxSamples,
        max_new_tokens=evaluation.maxNewTokens,
        baseline=evaluation.baseline,
        gate=GateConfig(
            metric=gate.metric,
            threshold=number(gate.threshold),
            min_improvement=number(gate.minImprovement),
            max_retention_loss_increase=number(gate.maxRetentionLossIncrease),
        )
        if gate is not None
        else None,
    )


def _tracking(job: FineTuneJob) -> TrackingConfig:
    tracking = job.spec.tracking
    mlflow = tracking.mlflow
    return TrackingConfig(
        tensorboard=tracking.tensorboard,
        mlflow=MlflowConfig(
            tracking_uri=mlflow.trackingUri,
            experiment=mlflow.experiment or job.metadata.namespace or DEFAULT_EXPERIMENT,
            run_name=mlflow.runName or job.metadata.name,
            tags=dict(mlflow.tags or {}),
        )
        if mlflow is not None
        else None,
    )


def trainer_config(
    job: FineTuneJob,
    *,
    output_uri: str | None = None,
    reporting: ReportingConfig | None = None,
    job_uid: str | None = None,
) -> TrainerConfig:
    """The trainer configuration for ``job``.

    ``output_uri`` is used when the spec names no output (local runs); the spec's own
    output always wins. ``job_uid`` is the FineTuneJob's metadata.uid on a cluster: the
    trainer resumes the checkpoints of the same job object after a spec edit.
    """
    spec = job.spec
    output = spec.output
    if output is not None:
        out = OutputConfig(
            uri=output.uri,
            endpoint_url=output.endpoint,
            region=output.region,
            retry_timeout_seconds=output.retryTimeoutSeconds,
            merge_adapter=output.mergeAdapter,
            overwrite=output.overwrite,
        )
    else:
        out = OutputConfig(uri=output_uri or local_output_uri(job.metadata.name))
    return TrainerConfig(
        job_name=job.metadata.name,
        job_namespace=job.metadata.namespace,
        job_uid=job_uid,
        model=_model(spec),
        dataset=_dataset(spec),
        method=_method(spec),
        training=_training(spec),
        output=out,
        reporting=reporting or ReportingConfig(),
        distributed=_distributed(spec),
        tracking=_tracking(job),
        evaluation=_evaluation(spec),
    )
