"""What a run's result depends on: the fingerprint that binds checkpoints and artifacts to it.

A checkpoint is resumed, and a published artifact reused, only by a run with the same
fingerprint (or, for checkpoints, by the same FineTuneJob object: see ``belongs_to``).
The fingerprint is the sha256 of every setting that changes the trained weights: the
base model (source and revision), the content (sha256) of every data file, how the data
is read and split, the method and its settings, and the training settings including the
seed. Left out are settings that change how a run is carried out but not its result:
``training.checkpoint_every_steps`` and ``training.gradient_checkpointing`` (memory for
compute), the world size and distribution strategy (checked separately when resuming:
train.check_resume_layout), where the data files live (their content counts) and
everything about output, reporting and tracking.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .config import TrainerConfig

# Training settings that do not change the result (see the module docstring).
NOT_IN_RESULT = frozenset({"checkpoint_every_steps", "gradient_checkpointing"})


@dataclass(frozen=True)
class RunIdentity:
    """A run's fingerprint, the settings it was computed from, and its job's uid."""

    fingerprint: str  # "sha256:<hex>"
    settings: dict[str, Any]  # "training.learning_rate" → value; "data" → the files' sha256
    job_uid: str | None = None

    @classmethod
    def of(
        cls, config: TrainerConfig, data_files: list[dict[str, Any]], job_uid: str | None = None
    ) -> RunIdentity:
        """The identity of a run of ``config`` on ``data_files`` (data.prepare's
        provenance records: one ``{"split", "sha256", ...}`` per file, in order)."""
        settings: dict[str, Any] = {
            "model.source": config.model.source,
            "model.revision": config.model.revision,
            "data": [f"{record['split']}:{record['sha256']}" for record in data_files],
        }
        dataset = config.dataset.model_dump(mode="json", exclude={"sources", "validation_sources"})
        settings |= {f"dataset.{key}": value for key, value in dataset.items()}
        # Prefix and prompt tuning's settings count only when set (always for those
        # methods), so other methods' fingerprints stay what they were before them.
        unset = {name for name in ("prefix", "prompt") if getattr(config.method, name) is None}
        method = config.method.model_dump(mode="json", exclude=unset)
        settings |= {f"method.{key}": value for key, value in method.items()}
        training = config.training.model_dump(mode="json", exclude=set(NOT_IN_RESULT))
        settings |= {f"training.{key}": value for key, value in training.items()}
        if config.evaluation is not None:  # the published eval.json and gate depend on it
            evaluation = config.evaluation.model_dump(
                mode="json", exclude={"test_sources", "retention_sources"}
            )
            settings |= {f"evaluation.{key}": value for key, value in evaluation.items()}
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return cls(fingerprint=f"sha256:{digest}", settings=settings, job_uid=job_uid)

    def record(self) -> dict[str, Any]:
        """What checkpoints' markers and the artifact's manifest store."""
        return {"fingerprint": self.fingerprint, "settings": self.settings, "jobUid": self.job_uid}

    def differences(self, recorded: dict[str, Any] | None) -> list[str]:
        """Settings (as ``training.learningRate``, ``data``, ...) in which a recorded run
        differs from this one; ``["fingerprint"]`` for a record without settings."""
        if not recorded or not isinstance(recorded.get("settings"), dict):
            return ["fingerprint"]
        theirs: dict[str, Any] = recorded["settings"]
        keys = sorted(set(self.settings) | set(theirs))
        changed = [_camel(k) for k in keys if self.settings.get(k) != theirs.get(k)]
        if not changed and recorded.get("fingerprint") != self.fingerprint:
            return ["fingerprint"]  # same settings, other hash: another kubetune's hashing
        return changed

    def same_result(self, recorded: dict[str, Any] | None) -> bool:
        """Whether a recorded run (a marker's or manifest's ``run``) has this fingerprint."""
        return recorded is not None and recorded.get("fingerprint") == self.fingerprint

    def belongs_to(self, recorded: dict[str, Any] | None) -> bool:
        """Whether a checkpoint with this record may be resumed by this run: the same
        fingerprint, or the same FineTuneJob (same uid: its spec was edited while it was
        suspended, which the user asked for)."""
        if self.same_result(recorded):
            return True
        uid = (recorded or {}).get("jobUid")
        return self.job_uid is not None and uid == self.job_uid


def _camel(key: str) -> str:
    """``training.learning_rate`` → ``training.learningRate``."""
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)
