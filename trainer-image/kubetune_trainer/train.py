"""The training recipe, top to bottom.

resolve config → fetch model and data → format and tokenize → split, dedupe, check for
leakage → pack → build model (quantize, attach PEFT) → train with eval, early stopping
and periodic checkpoints (resuming from the newest complete one) → write the artifact,
manifest last → report.

The loop itself is the Hugging Face Trainer: it already does gradient accumulation with
token-count loss normalisation, schedulers, clipping, mixed precision, gradient
checkpointing, checkpoint save/resume (optimizer, scheduler, RNG, data position) and
evaluation. What is ours lives in the callbacks below: progress, checkpoint upload,
early stopping and graceful preemption.

Under torchrun the same recipe runs in every rank (see distributed.py). Every rank
prepares the same data (same seeds) and packs it *before* the Trainer's sampler shards
the packed sequences across ranks: the set of sequences, and so the number of optimizer
steps at a given global batch, does not depend on the world size, and each sequence is
trained on once per epoch by one rank. Rank 0 alone writes to the output store
(checkpoints, artifact, manifest), serves progress and prints the summary; the others
wait for it at the points where the run could otherwise end without it (after each
checkpoint upload, before exiting).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed, fastpaths, tracking
from .artifact import (
    MERGED,
    ExistingArtifact,
    PublishedArtifact,
    artifact_folder,
    check_existing,
    existing_artifact,
    gpu_time_at_publish,
    present_files,
    publish,
    read_manifest,
    write_manifest,
)
from .checkpoints import (
    RemoteCheckpoint,
    Resumable,
    delete_checkpoint,
    download_checkpoint,
    find_resumable,
    upload_checkpoint,
)
from .config import ResolvedStrategy, TrainerConfig, global_batch_size
from .distributed import World
from .errors import ConfigInvalid, Preempted, Unsupported
from .fastpaths import FastPaths
from .fingerprint import RunIdentity
from .lossplot import ema, write_loss_plot
from .progress import ProgressState, process_start_time
from .storage import S3Settings, Store, fetch_to_local, open_store

log = logging.getLogger("kubetune.trainer")

# Written into every checkpoint: how the run that wrote it was laid out.
LAYOUT_FILE = "kubetune.json"


@dataclass
class RunResult:
    artifact: PublishedArtifact
    metrics: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int | None = None
    local_artifact_dir: Path | None = None
    tracking: dict[str, str] = field(default_factory=dict)  # tracking.Tracker.status()
    kind: str = "adapter"  # artifact.artifact_folder: "adapter", or "model" for method full
    reused: bool = False  # the artifact was already published by a run with these settings
    evaluation: dict[str, Any] = field(default_factory=dict)  # evaluation.summary (or {})

    def as_termination_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "artifact": {
                "uri": self.artifact.uri,
                "digest": self.artifact.digest,
                "sizeBytes": self.artifact.size_bytes,
            },
            "metrics": self.metrics,
            "stats": self.stats,
        }
        if self.tracking:
            message["tracking"] = self.tracking
        if self.evaluation:
            message["evaluation"] = self.evaluation
        return message


# --------------------------------------------------------------------------- callbacks


class StartupClock:
    """Time from process start to the end of the first optimizer step, by stage, into
    ``state.time_to_first_step`` (so users see where the minutes before training go)."""

    def __init__(self, state: ProgressState, started: float | None = None) -> None:
        self.state = state
        self.started = process_start_time() if started is None else started
        self.last = self.started

    def lap(self, stage: str) -> None:
        now = time.time()
        self.state.time_to_first_step[stage] = round(max(now - self.last, 0.0), 3)
        self.last = now

    def first_step(self) -> None:
        if "total" in self.state.time_to_first_step:
            return
        self.lap("first_step")
        self.state.time_to_first_step["total"] = round(max(self.last - self.started, 0.0), 3)


def _callbacks(
    config: TrainerConfig,
    state: ProgressState,
    store: Store,
    stop: threading.Event,
    stopped: threading.Event,
    token_counter: Any,
    progress_bar: bool,
    world: World,
    layout: dict[str, Any],
    clock: StartupClock | None = None,
    run_record: dict[str, Any] | None = None,
) -> list[Any]:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):  # type: ignore[misc]
        """Mirror the Trainer's state into ProgressState (and a console bar)."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.started = time.time()
            self.tokens_at_start = 0

        def on_train_begin(self, args: Any, tstate: Any, control: Any, **kw: Any) -> None:
            state.phase = "training"
            state.total_steps = tstate.max_steps
            state.step = tstate.global_step
            self.started = time.time()
            state.started_at = self.started  # the ETA counts this run's steps only
            state.started_step = tstate.global_step
            self.tokens_at_start = token_counter.non_pad * world.size  # 0, or an estimate
            if progress_bar and world.is_main:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=tstate.max_steps, initial=tstate.global_step, unit="step")

        def world_tokens(self) -> tuple[bool, int]:
            """(whether any rank was asked to stop, non-pad tokens trained by all ranks):
            one small all_reduce a step, so that all ranks stop at the same step."""
            flag, tokens = distributed.sum_across(
                [float(stop.is_set()), float(token_counter.non_pad)]
            )
            return flag > 0, int(tokens)

        def on_step_end(self, args: Any, tstate: Any, control: Any, **kw: Any) -> None:
            if clock is not None:
                clock.first_step()
            state.step = tstate.global_step
            state.epoch = float(tstate.epoch or 0.0)
            elapsed = max(time.time() - self.started, 1e-6)
            stopping, tokens = self.world_tokens()
            state.trained_tokens = tokens
            state.tokens_per_second = (tokens - self.tokens_at_start) / elapsed
            state.padding_ratio = token_counter.padding_ratio
            if self.bar is not None:
                self.bar.update(tstate.global_step - self.bar.n)
                postfix = {"tok/s": f"{state.tokens_per_second:.0f}"}
                if state.train_loss is not None:
                    postfix["loss"] = f"{state.train_loss:.4f}"
                if state.eval_loss is not None:
                    postfix["eval"] = f"{state.eval_loss:.4f}"
                self.bar.set_postfix(postfix, refresh=False)
            if stopping:  # the same decision on every rank
                stopped.set()
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args: Any, tstate: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                state.train_loss = float(logs["loss"])
            if "learning_rate" in logs:
                state.learning_rate = float(logs["learning_rate"])
            if "eval_loss" in logs:
                state.record_evaluation(int(tstate.global_step), float(logs["eval_loss"]))

        def on_train_end(self, args: Any, tstate: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    class UploadCheckpoints(TrainerCallback):  # type: ignore[misc]
        """Copy each checkpoint the Trainer saves to the output store, marker last.

        Rank 0 uploads (the Trainer gathered the model and optimizer state into its
        checkpoint directory); the other ranks wait, so that no rank can exit (for
        instance on preemption, which makes torchrun kill the rest) before the
        checkpoint is complete."""

        def on_save(self, args: Any, tstate: Any, control: Any, **kw: Any) -> None:
            remote: RemoteCheckpoint | None = None
            if world.is_main:
                local = Path(args.output_dir) / f"checkpoint-{tstate.global_step}"
                (local / LAYOUT_FILE).write_text(json.dumps(layout), encoding="utf-8")
                remote = upload_checkpoint(local, store, tstate.global_step, run_record)
            remote = distributed.broadcast_from_main(remote)
            if remote is not None:
                state.last_checkpoint_step = remote.step
                state.last_checkpoint_uri = remote.uri

    class EarlyStopping(TrainerCallback):  # type: ignore[misc]
        """Stop when eval loss has not improved by min_delta for `patience` evaluations."""

        def __init__(self, patience: int, min_delta: float) -> None:
            self.patience, self.min_delta = patience, min_delta
            self.best = math.inf
            self.bad_evals = 0

        def on_evaluate(
            self, args: Any, tstate: Any, control: Any, metrics: Any = None, **kw: Any
        ) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is None or tstate.global_step == 0:
                return  # step 0: the baseline before training (eval_on_start) counts for nothing
            if loss < self.best - self.min_delta:
                self.best, self.bad_evals = loss, 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= self.patience:
                    state.message = f"early stopping: no eval improvement in {self.patience} evals"
                    control.should_training_stop = True

    callbacks: list[Any] = [Progress(), UploadCheckpoints()]
    early = config.training.early_stopping
    if early is not None:
        callbacks.append(EarlyStopping(early.patience, early.min_delta))
    return callbacks


# --------------------------------------------------------------------------- the recipe


def _batch_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens that ``batch_size`` examples of these lengths hold on average."""
    return math.ceil(batch_size * sum(lengths) / len(lengths))


def rows_for_batch(lengths: list[int], batch_size: int, max_seq_length: int) -> int:
    """Packed rows that together hold about ``batch_size`` examples: one, unless
    ``max_seq_length`` is too short for them (then as many as their tokens need), so that
    a packed device step holds batchSize examples, as the field says."""
    if not lengths:
        return 1
    return max(1, math.ceil(_batch_tokens(lengths, batch_size) / max_seq_length))


def pack_capacity(lengths: list[int], batch_size: int, max_seq_length: int) -> int:
    """Tokens per packed sequence, so that :func:`rows_for_batch` sequences hold about
    ``batch_size`` examples: a packed step then sees as many examples, and the run as many
    optimizer steps, as an unpacked one. Filling whole ``max_seq_length`` rows instead
    would put far more examples in each step (fewer, larger steps: worse loss after one
    epoch) and make attention cost grow with max_seq_length² for no gain."""
    if not lengths:
        return max_seq_length
    rows = rows_for_batch(lengths, batch_size, max_seq_length)
    share = math.ceil(_batch_tokens(lengths, batch_size) / rows)
    return min(max_seq_length, max(max(lengths), share))


def rows_per_device_step(
    capacity: int, batch_size: int, max_seq_length: int, accumulation: int, rows_per_batch: int = 1
) -> int:
    """Packed rows per device step: the ``rows_per_batch`` that hold batchSize examples,
    times as many micro-batches as fit the memory budget the user's batch already
    implies, among the divisors of ``accumulation`` (which shrinks by as much), so that
    rows, and so examples, per optimizer step stay the same.

    The budget is ``batch_size`` × ``max_seq_length`` positions: what one unpacked step
    of the same config may hold at worst, so the user sized memory for it already. Both
    what grows with positions (activations) and what grows with the square of a row's
    length (sdpa's mask and scores: k·capacity² ≤ batch_size·max_seq_length²) stay
    within what an unpacked step could need. Several rows per step make larger matrix
    multiplies and fewer per-micro-batch overheads (docs/benchmarks.md)."""
    budget = max(1, (batch_size * max_seq_length) // max(capacity, 1))
    merged = [k for k in range(1, accumulation + 1) if accumulation % k == 0]
    return rows_per_batch * max([k for k in merged if rows_per_batch * k <= budget], default=1)


def _training_arguments(
    config: TrainerConfig,
    output_dir: Path,
    precision: str,
    has_eval: bool,
    world: World | None = None,
    strategy: ResolvedStrategy = "single",
    fresh_start: bool = False,
    rows_per_step: int = 1,
    fast: FastPaths | None = None,
    rows_per_batch: int = 1,
) -> Any:
    from transformers import TrainingArguments

    world = world or World()
    t = config.training
    eval_steps = t.eval_every_steps if has_eval and t.eval_every_steps else None
    # A run that evaluates periodically and starts from scratch also evaluates once before
    # its first step (one more eval pass, like each periodic one), so the plot and the
    # summary show where it started. A resumed run has that point in its restored history.
    eval_on_start = fresh_start and eval_steps is not None
    # Packed: rows_per_batch sequences hold about batch_size examples; rows_per_step of
    # them per device step, over gradient_accumulation_steps / (rows_per_step /
    # rows_per_batch) micro-batches.
    per_device = rows_per_step if config.dataset.packing else t.batch_size
    accumulation = t.gradient_accumulation_steps
    if config.dataset.packing:
        accumulation //= rows_per_step // rows_per_batch
    fast = fast or FastPaths()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else 1e9,
        num_train_epochs=t.effective_epochs,
        max_steps=t.max_steps or -1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        eval_on_start=eval_on_start,
        save_strategy="steps" if t.checkpoint_every_steps else "no",
        save_steps=t.checkpoint_every_steps or 500,
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not _cuda(),
        ddp_backend=distributed.ddp_backend() if world.distributed else None,
        ddp_timeout=distributed.COLLECTIVE_TIMEOUT_SECONDS,
        # LoRA's frozen base has no gradients by design; a search for unused parameters
        # would cost a graph traversal each step (and breaks gradient checkpointing).
        ddp_find_unused_parameters=False,
        **fast.training_arguments(),
        **_fsdp_arguments(config, world) if strategy == "fsdp" else {},
    )
    if not world.distributed and args.n_gpu > 1:
        # One process seeing several GPUs would make the Trainer use nn.DataParallel;
        # several GPUs are used through torchrun (one process each) or not at all.
        args._n_gpu = 1
    return args


def _fsdp_arguments(config: TrainerConfig, world: World) -> dict[str, Any]:
    """TrainingArguments for FSDP2 (torch's fully_shard, through accelerate)."""
    fsdp = config.distributed.fsdp
    fsdp_config: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules
        "state_dict_type": "FULL_STATE_DICT",  # checkpoints and artifact gathered on rank 0
        "cpu_offload": fsdp.cpu_offload,
        "activation_checkpointing": fsdp.activation_checkpointing,
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": False,
    }
    arguments: dict[str, Any] = {"fsdp": True, "fsdp_config": fsdp_config}
    if fsdp.sharding == "hybrid" and world.nodes > 1:
        # Shard within a node, replicate across nodes: a 2-D mesh.
        from accelerate.parallelism_config import ParallelismConfig

        arguments["parallelism_config"] = ParallelismConfig(
            dp_replicate_size=world.nodes, dp_shard_size=world.local_size
        )
    # On one node, hybrid sharding is full sharding.
    return arguments


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def run(
    config: TrainerConfig,
    *,
    work_dir: Path,
    state: ProgressState,
    stop: threading.Event,
    progress_bar: bool = False,
) -> RunResult:
    """Run the whole recipe. Raises TrainerError (with an exit code) on failure.

    Rank 0 tracks the attempt (MLflow, TensorBoard; see tracking.py); an attempt that
    fails ends its MLflow run as failed."""
    enabled = World.from_env().is_main
    with tracking.Tracker(config, state, work_dir / "artifact", enabled=enabled) as tracker:
        return _run(
            config,
            work_dir=work_dir,
            state=state,
            stop=stop,
            progress_bar=progress_bar,
            tracker=tracker,
        )


def _run(
    config: TrainerConfig,
    *,
    work_dir: Path,
    state: ProgressState,
    stop: threading.Event,
    progress_bar: bool,
    tracker: tracking.Tracker,
) -> RunResult:
    from transformers import AutoTokenizer, PrinterCallback, set_seed

    from . import data as data_stage
    from . import packing
    from .model_cache import ModelCache
    from .modeling import build_model, resolve_model, resolve_precision

    clock = StartupClock(state)
    world = World.from_env()
    distributed.init(world)
    strategy = config.distributed.resolve(config.method.type, world.size)
    if strategy == "fsdp" and config.method.type == "qlora":
        raise Unsupported(
            "FSDP cannot shard a 4-bit (qlora) base model",
            hint="set spec.distributed.strategy to ddp or auto, or use method lora",
        )
    state.world_size = world.size
    state.strategy = strategy
    state.global_batch_size = global_batch_size(config.training, world.size)
    layout: dict[str, Any] = {
        "world_size": world.size,
        "strategy": strategy,
        "global_batch_size": state.global_batch_size,
    }

    set_seed(config.training.seed)
    endpoint = config.output.endpoint_url
    s3 = S3Settings(retry_seconds=config.output.retry_timeout_seconds)
    store = open_store(
        config.output.uri, endpoint_url=endpoint, region=config.output.region, settings=s3
    )
    cache = work_dir / "cache"

    # Fetch the data, then decide about an existing artifact (before the model is
    # fetched or loaded: a refused or already-published run costs no GPU time), then
    # fetch the model.
    state.phase = "preparing"
    precision = resolve_precision(config.training.precision)
    quant = config.method.effective_quantization
    fast = fastpaths.choose(
        cuda=_cuda(),
        precision=precision,
        quantized_compute_dtype=quant.compute_dtype if quant else None,
    )
    state.fast_paths = fast.names()
    clock.lap("startup")  # process start → here: imports, config, tracking

    fetched: dict[str, str] = {}  # local path → the source URI the user wrote

    def local(sources: list[str]) -> list[Path]:
        paths = [
            fetch_to_local(s, cache / "data", endpoint_url=endpoint, settings=s3) for s in sources
        ]
        fetched.update({str(p): s for p, s in zip(paths, sources, strict=True)})
        return paths

    # Format, dedupe, split (no leakage), tokenize with prompt masking, pack.
    prepared = data_stage.prepare(
        local(config.dataset.sources),
        config.dataset,
        validation_paths=local(config.dataset.validation_sources),
        seed=config.training.seed,
    )
    held_out = _evaluation_data(config, prepared, local)  # test and retention examples
    clock.lap("data_preparation")
    identity = RunIdentity.of(config, prepared.stats["sources"], config.job_uid)
    artifact_key = artifact_folder(config.method.type)
    existing = distributed.broadcast_from_main(
        _existing_artifact(store, artifact_key, identity, config) if world.is_main else None
    )
    if isinstance(existing, ConfigInvalid):
        raise existing
    if existing.note:
        log.warning("%s", existing.note)
        state.message = existing.note
    if existing.action == "reuse" and existing.manifest is not None:
        return _reused_result(store, artifact_key, existing.manifest, state)

    model_dir, cached = resolve_model(
        config.model,
        cache,
        endpoint_url=endpoint,
        settings=s3,
        model_cache=ModelCache.from_env(os.environ),  # $KUBETUNE_MODEL_CACHE, if set
    )
    if cached is not None:  # the log, /progress, the summary and the artifact's manifest
        state.model_cache = cached.report()
        log.info("model cache %s", cached.summary())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    clock.lap("model_fetch")
    train_rows, train_stats = data_stage.tokenize_examples(
        prepared.train, tokenizer, config.dataset.max_seq_length
    )
    eval_rows, eval_stats = data_stage.tokenize_examples(
        prepared.validation, tokenizer, config.dataset.max_seq_length, allow_empty=True
    )
    length = config.dataset.max_seq_length
    state.warnings = [  # what was dropped or cut on the way: the log, /progress, the summary
        *prepared.warnings,
        *data_stage.tokenize_warnings(train_stats, "training", length),
        *data_stage.tokenize_warnings(eval_stats, "validation", length),
    ]
    eval_sets = _evaluation_sets(config, prepared, held_out, eval_rows, tokenizer, state)
    for warning in state.warnings:
        log.warning("data: %s", warning)
    state.message = "; ".join(state.warnings)
    t = config.training
    examples = len(train_rows)
    rows_per_step = rows_per_batch = 1
    if config.dataset.packing:
        lengths = [len(row["input_ids"]) for row in train_rows]
        capacity = pack_capacity(lengths, t.batch_size, length)
        rows_per_batch = rows_for_batch(lengths, t.batch_size, length)
        train_rows = packing.pack(train_rows, capacity, seed=t.seed)
        eval_rows = packing.pack(eval_rows, capacity, seed=t.seed)
        eval_collator: Any = packing.PackedCollator(tokenizer.pad_token_id)
        rows_per_step = rows_per_device_step(
            capacity, t.batch_size, length, t.gradient_accumulation_steps, rows_per_batch
        )
        # rows per optimizer step (unchanged by rows_per_step) × examples per row
        state.examples_per_step = round(
            rows_per_batch
            * t.gradient_accumulation_steps
            * world.size
            * examples
            / max(len(train_rows), 1),
            1,
        )
    else:
        eval_collator = packing.PaddingCollator(tokenizer.pad_token_id)
        state.examples_per_step = float(state.global_batch_size)
    state.rows_per_device_step = rows_per_step if config.dataset.packing else t.batch_size
    collator = packing.CountingCollator(eval_collator)  # counts training tokens only
    stats = {
        **prepared.stats,
        **train_stats,
        "train_sequences": len(train_rows),
        "warnings": list(state.warnings),  # the manifest keeps them
    }
    clock.lap("tokenization")  # tokenize, mask prompts, pack

    # Build the model.
    model = build_model(
        model_dir,
        config.method,
        gradient_checkpointing=config.training.gradient_checkpointing,
        precision=precision,
        on_device=strategy != "fsdp",  # FSDP moves each rank's shard to its device
        model_kwargs=fast.model_kwargs(),
    )
    clock.lap("model_build")
    if fast.names():
        log.info("GPU fast paths: %s", ", ".join(fast.names()))
    # The base model's numbers, before any step (a resumed attempt has not loaded its
    # checkpoint yet, so it measures the same base model again: same numbers).
    base_eval = _evaluate(config, model, tokenizer, eval_sets, world, state, "base")

    # Train, resuming from the newest complete checkpoint of this run in the output store
    # (the one rank 0 sees, so that all ranks resume from the same step). Checkpoints of
    # other runs are removed first, so that ours never mix with them.
    output_dir = work_dir / "trainer"
    stopped = threading.Event()  # set when all ranks agreed to stop on a SIGTERM
    found = distributed.broadcast_from_main(
        _resumable(store, identity, state) if world.is_main else None
    )
    resume = found.checkpoint
    # Settings edited since the checkpoint was written (same FineTuneJob): the manifest says so.
    edited = (
        identity.differences(found.run) if resume and not identity.same_result(found.run) else []
    )
    resume_path = download_checkpoint(store, resume, output_dir) if resume else None
    if resume is not None and resume_path is not None:
        check_resume_layout(resume, _read_layout(resume_path), layout)
        state.last_checkpoint_step, state.last_checkpoint_uri = resume.step, resume.uri
    finished = resume_path is not None and _training_finished(resume_path)
    tracker.start(config, layout, resume_path)
    trainer = _trainer_class()(
        eval_collator=eval_collator,
        model=model,
        args=_training_arguments(
            config,
            output_dir,
            precision,
            bool(eval_rows),
            world=world,
            strategy=strategy,
            fresh_start=resume is None,
            rows_per_step=rows_per_step,
            fast=fast,
            rows_per_batch=rows_per_batch,
        ),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[
            tracking.callback(tracker),  # first: it adds to each checkpoint before upload
            *_callbacks(
                config,
                state,
                store,
                stop,
                stopped,
                collator,
                progress_bar and world.is_main,
                world,
                layout,
                clock,
                identity.record(),
            ),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar and summary replace it
    if finished and resume is not None and resume_path is not None and strategy != "fsdp":
        # The checkpoint is the end of training (killed or stopped after the last step,
        # before publishing): load it and publish. Trainer.train would run one more step.
        trainer.restore_finished(resume_path)
        log.warning("checkpoint %s is at the last step: publishing it", resume.uri)
    else:
        trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    if stopped.is_set() and trainer.state.global_step < trainer.state.max_steps:
        raise Preempted(
            f"stopped by SIGTERM at step {trainer.state.global_step}; "
            f"checkpoint {state.last_checkpoint_uri} saved",
            hint="the next attempt resumes from it",
        )

    # Final evaluation and metrics.
    metrics = _final_metrics(trainer, bool(eval_rows), state)

    # Write the artifact, manifest last (rank 0; FSDP first gathers the full weights
    # there, which takes every rank).
    state.phase = "saving"
    artifact_dir = work_dir / "artifact"
    if strategy == "fsdp":
        trainer.save_model(str(artifact_dir))
    published: PublishedArtifact | None = None
    evaluation: dict[str, Any] = {}
    if world.is_main:
        _save_artifact(trainer, tokenizer, artifact_dir, config, model_dir, strategy)
        evaluation = _evaluate_tuned(
            config,
            trainer,
            tokenizer,
            eval_sets,
            base_eval,
            artifact_dir,
            model_dir,
            strategy,
            state,
        )
        tracker.close_tensorboard()  # complete event files before the manifest hashes them
        published = _publish(
            trainer,
            artifact_dir,
            store,
            config,
            fetched,
            prepared.stats,
            metrics,
            stats,
            resume,
            layout,
            state,
            identity,
            edited,
            evaluation,
        )
    # The others wait for rank 0: a rank's early exit would not fail the attempt, but an
    # attempt whose rank 0 fails to publish must not look half successful.
    published = distributed.broadcast_from_main(published)
    distributed.barrier()  # every rank has everything it needs: all may exit now
    tracker.finish(published.uri, published.digest, metrics, trainer.state.global_step)
    state.phase = "done"
    return RunResult(
        artifact=published,
        metrics=metrics,
        stats={k: v for k, v in stats.items() if isinstance(v, int | float)},
        resumed_from_step=resume.step if resume else None,
        local_artifact_dir=artifact_dir if world.is_main else None,
        tracking=dict(state.tracking),
        kind=artifact_key,
        evaluation=evaluation,
    )


def _existing_artifact(
    store: Store, key: str, identity: RunIdentity, config: TrainerConfig
) -> ExistingArtifact | ConfigInvalid:
    """check_existing on what the store holds (rank 0); a refusal is returned, not
    raised, so that it reaches every rank."""
    manifest = read_manifest(store, key)
    present = present_files(store, key) if manifest is not None else set()
    try:
        return check_existing(
            manifest,
            present,
            identity,
            uri=store.uri_for(key),
            overwrite=config.output.overwrite,
            merge=config.output.merge_adapter and config.method.type != "full",
        )
    except ConfigInvalid as refused:
        return refused


def _reused_result(
    store: Store, key: str, manifest: dict[str, Any], state: ProgressState
) -> RunResult:
    """The result of a run whose artifact is already published (same fingerprint)."""
    metrics = {k: float(v) for k, v in manifest.get("metrics", {}).items()}
    stats = manifest.get("stats", {})
    state.phase = "done"
    state.step = state.total_steps = int(metrics.get("steps", 0))
    return RunResult(
        artifact=existing_artifact(store, key, manifest),
        metrics=metrics,
        stats={k: v for k, v in stats.items() if isinstance(v, int | float)},
        resumed_from_step=manifest.get("resumed_from_step"),
        kind=key,
        reused=True,
        evaluation=dict(manifest.get("evaluation") or {}),
    )


def _resumable(store: Store, identity: RunIdentity, state: ProgressState) -> Resumable:
    """This run's newest complete checkpoint; other runs' complete checkpoints are
    reported (log and progress message) and removed."""
    found = find_resumable(store, identity.belongs_to)
    notes: list[str] = []
    if found.checkpoint is not None and not identity.same_result(found.run):
        changed = ", ".join(identity.differences(found.run))
        notes.append(
            f"resuming checkpoint step-{found.checkpoint.step} at {found.checkpoint.uri}, "
            f"written by this FineTuneJob before its spec was edited ({changed})"
        )
    if found.foreign:
        newest, run = found.foreign[0]
        changed = ", ".join(identity.differences(run))
        then = f"resuming step-{found.checkpoint.step}" if found.checkpoint else "starting fresh"
        notes.append(
            f"checkpoint step-{newest.step} at {newest.uri} belongs to a run with other "
            f"settings ({changed}); {then} and removing {len(found.foreign)} such checkpoint"
            + ("s" if len(found.foreign) > 1 else "")
        )
        for checkpoint, _ in found.foreign:
            delete_checkpoint(store, checkpoint)
    for note in notes:
        log.warning("%s", note)
    state.message = "; ".join(filter(None, [state.message, *notes]))
    return found


def _training_finished(checkpoint_dir: Path) -> bool:
    """Whether a Trainer checkpoint was saved at the last step of its run."""
    path = checkpoint_dir / "trainer_state.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    return int(saved.get("max_steps") or 0) > 0 and saved["global_step"] >= saved["max_steps"]


def _publish(
    trainer: Any,
    artifact_dir: Path,
    store: Store,
    config: TrainerConfig,
    fetched: dict[str, str],
    source_stats: dict[str, Any],
    metrics: dict[str, float],
    stats: dict[str, Any],
    resume: RemoteCheckpoint | None,
    layout: dict[str, Any],
    state: ProgressState | None = None,
    identity: RunIdentity | None = None,
    edited: list[str] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> PublishedArtifact:
    _write_loss_plot(trainer.state.log_history, artifact_dir / "loss.png", config)
    details: dict[str, Any] = {
        "base_model": {"source": config.model.source, "revision": config.model.revision},
        "datasets": [_with_uri(record, fetched) for record in source_stats.get("sources", [])],
        "method": config.method.model_dump(mode="json"),
        "training": config.training.model_dump(mode="json"),
        "dataset": config.dataset.model_dump(mode="json", exclude={"sources"}),
        "metrics": metrics,
        "stats": stats,
        "resumed_from_step": resume.step if resume else None,
        "distributed": layout,
        "run": identity.record() if identity is not None else None,
        # Settings that differed when the run resumed (the job's spec was edited): the
        # steps up to resumed_from_step were trained with the earlier values.
        "resumed_with_other_settings": edited or [],
    }
    if evaluation:  # base vs tuned and the gate (eval.json has every number)
        details["evaluation"] = evaluation
    if state is not None:
        details["examples_per_optimizer_step"] = state.examples_per_step
        details["rows_per_device_step"] = state.rows_per_device_step
        details["time_to_first_step"] = dict(state.time_to_first_step)
        details["fast_paths"] = list(state.fast_paths)
        if state.model_cache:  # hit or miss, bytes, the download time saved
            details["model_cache"] = dict(state.model_cache)
    gpu_time = gpu_time_at_publish(os.environ, process_start_time(), time.time())
    if gpu_time is not None:  # set by the operator on a cluster
        details["gpu_time_at_publish"] = gpu_time
    write_manifest(artifact_dir, details)
    return publish(artifact_dir, store, artifact_folder(config.method.type))


def _read_layout(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_dir / LAYOUT_FILE
    if not path.is_file():
        return None  # written before the layout was recorded: a single process
    layout: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return layout


def check_resume_layout(
    checkpoint: RemoteCheckpoint, written: dict[str, Any] | None, current: dict[str, Any]
) -> None:
    """Refuse to resume what cannot be resumed on this layout; warn about what changes.

    Replicated training (single, ddp) keeps whole copies of the trainable weights and
    optimizer state in its checkpoints, so any world size can resume them. FSDP's
    checkpoints are resumed only by the same world size and strategy."""
    old = written or {"world_size": 1, "strategy": "single"}
    old_size, old_strategy = int(old.get("world_size", 1)), str(old.get("strategy", "single"))
    new_size, new_strategy = int(current["world_size"]), str(current["strategy"])
    if (old_size, old_strategy) == (new_size, new_strategy):
        return
    if "fsdp" in (old_strategy, new_strategy):
        raise Unsupported(
            f"checkpoint {checkpoint.uri} was written by {old_size} processes with strategy "
            f"{old_strategy}; this attempt runs {new_size} with strategy {new_strategy}, and an "
            "FSDP checkpoint resumes only on the world size and strategy that wrote it",
            hint=f"set spec.resources.nodes and spec.resources.gpus (or "
            f"spec.distributed.processesPerNode) back to a world size of {old_size} and the "
            f"strategy to {old_strategy}, or delete the checkpoints under "
            f"{checkpoint.uri.rsplit('/', 1)[0]}/ to start over",
        )
    log.warning(
        "resuming a %s checkpoint of %d processes with %s on %d: the global batch changes "
        "and this epoch's remaining data is re-dealt by position",
        old_strategy,
        old_size,
        new_strategy,
        new_size,
    )


def _trainer_class() -> Any:
    from transformers import Trainer

    class KubetuneTrainer(Trainer):  # type: ignore[misc]
        """The stock Trainer, with an evaluation collator that does not count tokens."""

        def __init__(self, *args: Any, eval_collator: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.eval_collator = eval_collator

        def restore_finished(self, checkpoint: Path) -> None:
            """Load a checkpoint saved at the last step (weights and state with its log
            history) without training: what train(resume_from_checkpoint=...) restores,
            minus the extra step it would take. Not for FSDP (its weights load only into
            the wrapped model, which train() builds)."""
            from transformers.trainer_callback import TrainerState

            self.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
            self._load_from_checkpoint(str(checkpoint))

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            counting, self.data_collator = self.data_collator, self.eval_collator
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = counting

    return KubetuneTrainer


def _final_metrics(trainer: Any, has_eval: bool, state: ProgressState) -> dict[str, float]:
    metrics: dict[str, float] = {"steps": float(trainer.state.global_step)}
    history = trainer.state.log_history
    losses = [float(e["loss"]) for e in history if "loss" in e]
    if losses:
        metrics["train_loss"] = losses[-1]
        metrics["first_train_loss"] = losses[0]
        metrics["train_loss_smoothed"] = ema(losses)[-1]  # as loss.png draws it
    initial = [e["eval_loss"] for e in history if "eval_loss" in e and e.get("step") == 0]
    if initial:  # evaluated before the first step (eval_on_start)
        metrics["initial_eval_loss"] = float(initial[0])
    if has_eval:
        eval_loss = float(trainer.evaluate()["eval_loss"])
        metrics["eval_loss"] = eval_loss
        metrics["perplexity"] = float(math.exp(min(eval_loss, 50.0)))
        state.eval_loss = eval_loss
    if state.tokens_per_second is not None:
        metrics["tokens_per_second"] = float(state.tokens_per_second)
    return metrics


def _with_uri(record: dict[str, Any], fetched: dict[str, str]) -> dict[str, Any]:
    """A dataset file's manifest entry, naming the URI the user gave, not our cache path."""
    path = str(record.get("path", ""))
    for local, uri in fetched.items():
        if path == local or path.startswith(local.rstrip("/") + "/"):
            suffix = path[len(local) :].lstrip("/")
            source = f"{uri.rstrip('/')}/{suffix}" if suffix else uri
            return {**{k: v for k, v in record.items() if k != "path"}, "source": source}
    return record


def _save_artifact(
    trainer: Any,
    tokenizer: Any,
    directory: Path,
    config: TrainerConfig,
    model_dir: Path,
    strategy: ResolvedStrategy = "single",
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    base_name = config.model.source.removeprefix("hf://")
    model = trainer.model
    if strategy == "fsdp":
        pass  # trainer.save_model gathered and wrote the weights (and config) already
    elif config.method.type == "full":
        model.save_pretrained(str(directory))
    else:
        model.peft_config["default"].base_model_name_or_path = base_name
        if getattr(model.peft_config["default"], "tokenizer_name_or_path", None):
            # Prompt tuning's text init read the tokenizer from our local copy of the
            # base: name the base instead (peft reads it again for is_trainable loads).
            model.peft_config["default"].tokenizer_name_or_path = base_name
        if config.model.revision:
            model.peft_config["default"].revision = config.model.revision
        model.save_pretrained(str(directory))
    from .data import ensure_chat_template

    ensure_chat_template(tokenizer)  # inference formats prompts as training did
    tokenizer.save_pretrained(str(directory))
    if config.output.merge_adapter and config.method.type != "full":
        _save_merged(directory, model_dir, directory / MERGED)


def _save_merged(adapter_dir: Path, model_dir: Path, target: Path) -> None:
    """Merge the adapter into an unquantized copy of the base (works for qlora too)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if _cuda() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(target))
    # A complete model: its tokenizer (with the chat template training used) beside it.
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(target))


def _write_loss_plot(history: list[dict[str, Any]], path: Path, config: TrainerConfig) -> None:
    if config.reporting.loss_plot:
        write_loss_plot(history, path, f"{config.job_name}: {config.method.type}")


# --------------------------------------------------------------------------- evaluation


def _evaluation_data(config: TrainerConfig, prepared: Any, local: Any) -> dict[str, list[Any]]:
    """Test and retention examples (spec.evaluation), leak-free: a test percentage comes
    out of the training examples, test files lose any example also in training or
    validation. Their files join the run's provenance (and so its identity)."""
    ev = config.evaluation
    if ev is None:
        return {}
    from . import evaluation as evaluation_stage

    test: list[Any] = []
    if ev.test_sources:
        test, records, leaked = evaluation_stage.load_test(
            local(ev.test_sources), config.dataset, prepared.train, prepared.validation
        )
        prepared.stats["sources"] += records
        if leaked:
            prepared.warnings.append(
                f"{leaked} test examples also in the training or validation data were "
                "dropped from the test set"
            )
    elif ev.test_ratio > 0 and prepared.train:
        # A share of all (deduplicated) rows, as validation's percentage.
        total = len(prepared.train) + len(prepared.validation)
        ratio = min(ev.test_ratio * total / len(prepared.train), 0.9)
        prepared.train, test = evaluation_stage.split_test(
            prepared.train, ratio, config.training.seed
        )
        prepared.stats["train_examples"] = len(prepared.train)
    retention: list[Any] = []
    if ev.retention_sources:
        retention, records = evaluation_stage.load_retention(
            local(ev.retention_sources), config.dataset
        )
        prepared.stats["sources"] += records
    prepared.stats["test_examples"] = len(test)
    prepared.stats["retention_examples"] = len(retention)
    return {"test": test, "retention": retention}


def _evaluation_sets(
    config: TrainerConfig,
    prepared: Any,
    held_out: dict[str, list[Any]],
    eval_rows: list[dict[str, list[int]]],
    tokenizer: Any,
    state: ProgressState,
) -> Any:
    """evaluation.EvalSets for spec.evaluation (None without it): unpacked rows of the
    validation, test and retention sets, and the prompts for generation."""
    ev = config.evaluation
    if ev is None:
        return None
    from . import data as data_stage
    from . import evaluation as evaluation_stage

    length = config.dataset.max_seq_length
    test_rows, _ = data_stage.tokenize_examples(
        held_out["test"], tokenizer, length, allow_empty=True
    )
    retention_rows, _ = data_stage.tokenize_examples(
        held_out["retention"], tokenizer, length, allow_empty=True
    )
    split = "test" if held_out["test"] else "validation"
    source = held_out["test"] or prepared.validation
    prompts = evaluation_stage.prompts_of(source, tokenizer, ev.max_samples) if ev.metrics else []
    if ev.metrics and not prompts:
        state.warnings.append(
            f"evaluation: no prompt/response examples in the {split} set, so no task "
            "metrics (they need chat or instruction rows)"
        )
    return evaluation_stage.EvalSets(
        validation=list(eval_rows),
        test=test_rows,
        retention=retention_rows,
        prompts=prompts,
        prompt_split=split,
        counts={
            "validation": len(eval_rows),
            "test": len(test_rows),
            "retention": len(retention_rows),
            "generated": len(prompts),
        },
    )


def _evaluate(
    config: TrainerConfig,
    model: Any,
    tokenizer: Any,
    sets: Any,
    world: World,
    state: ProgressState,
    side: str,
) -> tuple[dict[str, float], list[str]] | None:
    """Rank 0 measures ``model`` (the others wait); None when not asked to."""
    if sets is None or config.evaluation is None or not config.evaluation.baseline:
        return None
    from .evaluation import measure

    result = None
    if world.is_main:
        phase, state.phase = state.phase, "evaluating"
        result = measure(model, tokenizer, sets, config.evaluation, config.training.batch_size)
        state.evaluation = {"metrics": {k: {side: v} for k, v in result[0].items()}}
        log.info("evaluation (%s): %s", side, json.dumps(result[0], sort_keys=True))
        state.phase = phase
    distributed.barrier()
    return result


def _evaluate_tuned(
    config: TrainerConfig,
    trainer: Any,
    tokenizer: Any,
    sets: Any,
    base_eval: tuple[dict[str, float], list[str]] | None,
    artifact_dir: Path,
    model_dir: Path,
    strategy: ResolvedStrategy,
    state: ProgressState,
) -> dict[str, Any]:
    """Measure the tuned model, compare with the base, apply the gate, write eval.json and
    samples.jsonl into the artifact; the summary for status (rank 0; {} without
    spec.evaluation)."""
    ev = config.evaluation
    if sets is None or ev is None:
        return {}
    from . import evaluation as evaluation_stage

    model = trainer.model
    if strategy == "fsdp":  # the sharded model cannot generate alone: load what was saved
        model = _load_saved(artifact_dir, model_dir, config)
    state.phase = "evaluating"
    tuned, outputs = evaluation_stage.measure(
        model, tokenizer, sets, ev, config.training.batch_size
    )
    base, base_outputs = base_eval or ({}, [])
    results = evaluation_stage.compare(base, tuned)
    outcome = evaluation_stage.evaluate_gate(ev.gate, results) if ev.gate else None
    report = evaluation_stage.summary(results, outcome, ev.gate, len(sets.prompts))
    details = {
        **report,
        "gate": {
            **(report.get("gate") or {}),
            **ev.gate.model_dump(mode="json"),
            "checks": outcome.checks if outcome else [],
        }
        if ev.gate
        else None,
        "sampleSplit": sets.prompt_split,
        "decoding": {
            "strategy": "greedy",
            "maxNewTokens": ev.max_new_tokens,
            "maxSamples": ev.max_samples,
        },
        "examples": dict(sets.counts),
        "taskMetrics": list(ev.metrics),
        "baseline": ev.baseline,
    }
    samples = evaluation_stage.sample_records(sets, base_outputs, outputs, list(ev.metrics))
    evaluation_stage.write_files(artifact_dir, details, samples)
    state.evaluation = report
    log.info("evaluation: %s", report["headline"])
    if outcome is not None:
        (log.info if outcome.passed else log.warning)("evaluation %s", outcome.message)
    state.phase = "saving"
    return report


def _load_saved(artifact_dir: Path, model_dir: Path, config: TrainerConfig) -> Any:
    """The tuned model as saved in ``artifact_dir`` (full weights, or base + adapter)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if _cuda() else "cpu"
    if config.method.type == "full":
        tuned: Any = AutoModelForCausalLM.from_pretrained(str(artifact_dir))
        return tuned.to(device)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return PeftModel.from_pretrained(base, str(artifact_dir)).to(device)
