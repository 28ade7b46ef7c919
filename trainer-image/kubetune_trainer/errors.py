"""Errors the trainer reports to users, and the exit codes that carry them to the operator.

Exit codes are part of the contract with the operator (documented in docs/exit-codes.md):
a *retryable* failure may succeed on a new attempt (which resumes from the last complete
checkpoint); a non-retryable one will fail the same way again until the user changes
the job.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Non-retryable: the job's input must change.
    CONFIG_INVALID = 10
    DATASET_INVALID = 11
    MODEL_INVALID = 12
    CREDENTIALS_INVALID = 13
    UNSUPPORTED = 14
    # Retryable: the same job may succeed on another attempt.
    STORAGE_UNAVAILABLE = 20
    PREEMPTED = 21  # SIGTERM: a checkpoint was saved, resume on the next attempt
    INTERNAL = 22  # anything unexpected

    @property
    def retryable(self) -> bool:
        return self >= 20

    @property
    def reason(self) -> str:
        """The condition reason the operator shows for this exit code."""
        return _REASONS[self]


_REASONS = {
    ExitCode.OK: "Succeeded",
    ExitCode.CONFIG_INVALID: "ConfigInvalid",
    ExitCode.DATASET_INVALID: "DatasetInvalid",
    ExitCode.MODEL_INVALID: "ModelInvalid",
    ExitCode.CREDENTIALS_INVALID: "CredentialsInvalid",
    ExitCode.UNSUPPORTED: "Unsupported",
    ExitCode.STORAGE_UNAVAILABLE: "StorageUnavailable",
    ExitCode.PREEMPTED: "Preempted",
    ExitCode.INTERNAL: "InternalError",
}


class TrainerError(Exception):
    """A failure with a message a user can act on. ``hint`` says how to fix it."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigInvalid(TrainerError):
    exit_code = ExitCode.CONFIG_INVALID


class DatasetInvalid(TrainerError):
    exit_code = ExitCode.DATASET_INVALID


class ModelInvalid(TrainerError):
    exit_code = ExitCode.MODEL_INVALID


class CredentialsInvalid(TrainerError):
    exit_code = ExitCode.CREDENTIALS_INVALID


class Unsupported(TrainerError):
    exit_code = ExitCode.UNSUPPORTED


class StorageUnavailable(TrainerError):
    exit_code = ExitCode.STORAGE_UNAVAILABLE


class Preempted(TrainerError):
    """SIGTERM arrived; a checkpoint was saved when training had started."""

    exit_code = ExitCode.PREEMPTED


class PreemptionSignal(BaseException):
    """Raised by the SIGTERM handler when the pod is stopped outside the training loop.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way up
    (ours, or a library's, e.g. around a chat template or a file reader) can turn the
    preemption into another error. ``main.execute`` reports it as :class:`Preempted`
    (exit 21, retryable), whatever stage the run was in."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage
