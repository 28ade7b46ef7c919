"""The FineTuneJob API: typed models, the generated CRD and manifest validation."""

from .types import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
]
