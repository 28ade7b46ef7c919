"""The FineTunePolicy API (kubetune.io/v1alpha1): what a platform team allows the
FineTuneJobs of one tenant namespace.

A platform team creates a FineTunePolicy in a tenant's namespace (tenants may read it,
not change it: the chart's aggregated roles give them no write access). Every field is
optional; an unset field allows anything. The policy is enforced twice, with the same
rules and the same messages: at admission by the chart's ValidatingAdmissionPolicy (CEL,
with the namespace's FineTunePolicy as its parameter) and by the operator, which marks a
violating job ``Accepted=False``/``PolicyViolation`` and creates no workload (see
:mod:`kubetune_operator.policy`). ``maxConcurrentJobs`` and the defaults are the
operator's alone: admission cannot count running jobs.

Patterns are **prefixes**: a value is allowed when it starts with one of the listed
strings (``startsWith``, which the API server's CEL and Python evaluate identically). End a
prefix with ``/`` or ``:`` so that ``s3://team-a/`` does not also allow
``s3://team-a-other/``; list a whole value to allow just it.

As for FineTuneJob, these pydantic models are the single source of the CRD (``kubetune crd
--kind FineTunePolicy``) and of its field reference (docs/policy-reference.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from kubetune_trainer.config import Method as MethodType

from .rules import ApiModel
from .types import API_VERSION
from .validation import parse_document

KIND = "FineTunePolicy"
PLURAL = "finetunepolicies"
SINGULAR = "finetunepolicy"
SHORT_NAMES = ["ftp"]

# A prefix; no wildcards (a `*` would be taken literally, so the schema refuses it).
Prefix = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[^*]+$")]
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

_PREFIXES = (
    " Each entry is a prefix: a value is allowed when it starts with one of them (no "
    "wildcards; end an entry with / or : so that it does not also allow longer names). "
    "Unset: anything; an empty list: nothing."
)


class ModelCachePolicy(ApiModel):
    """The shared model cache of this namespace's jobs (docs/multi-tenancy.md)."""

    claimName: str = Field(
        min_length=1,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description=(
            "A ReadWriteMany PersistentVolumeClaim in this namespace that every attempt pod "
            "mounts as the shared model cache: each s3:// or hf:// base model is downloaded "
            "once for all attempts and jobs. Overrides the chart's modelCache.claimName."
        ),
    )


class FineTunePolicySpec(ApiModel):
    """What FineTuneJobs in this namespace may ask for. Unset fields allow anything."""

    allowedModelSources: list[Prefix] | None = Field(
        default=None,
        max_length=64,
        description="Base models (spec.model.source) jobs may fine-tune." + _PREFIXES,
        examples=[["hf://meta-llama/", "s3://approved-models/"]],
    )
    allowedImages: list[Prefix] | None = Field(
        default=None,
        max_length=64,
        description=(
            "Trainer images a job may set in spec.image. A job without spec.image runs the "
            "operator's trainer image (set by the platform team), which is always allowed; "
            "an empty list forbids overriding it." + _PREFIXES
        ),
        examples=[["registry.example.com/kubetune/trainer:"]],
    )
    allowedOutputs: list[Prefix] | None = Field(
        default=None,
        max_length=64,
        description=(
            "Where jobs may write adapters and checkpoints (spec.output.uri)." + _PREFIXES
        ),
        examples=[["s3://team-a-artifacts/"]],
    )
    allowedMethods: list[MethodType] | None = Field(
        default=None,
        max_length=8,
        description="Fine-tuning methods (spec.method.type) jobs may use. Unset: any.",
    )
    maxGpusPerJob: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description=(
            "Most GPUs one job may ask for in all: spec.resources.nodes × "
            "spec.resources.gpus. 0 allows CPU jobs only."
        ),
    )
    maxNodes: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Most nodes (trainer pods) one job may span: spec.resources.nodes.",
    )
    maxConcurrentJobs: int | None = Field(
        default=None,
        ge=0,
        le=10000,
        description=(
            "Most jobs of this namespace running at once (checked by the operator; a job "
            "over the limit waits in state Queued, reason ConcurrencyLimit, and starts in "
            "creation order when a slot frees). Jobs in a Kueue queue (the "
            "kueue.x-k8s.io/queue-name label, or defaultQueueName) are not counted: Kueue's "
            "quota governs them. 0 holds every new job."
        ),
    )
    defaultQueueName: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=_DNS_SUBDOMAIN,
        description=(
            "Kueue LocalQueue for jobs without a kueue.x-k8s.io/queue-name label: the "
            "operator puts it on their attempt Jobs (the FineTuneJob is not changed)."
        ),
    )
    defaultPriorityClass: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=_DNS_SUBDOMAIN,
        description=(
            "Kueue WorkloadPriorityClass for jobs without a kueue.x-k8s.io/priority-class "
            "label: the operator puts it on their attempt Jobs."
        ),
    )
    modelCache: ModelCachePolicy | None = Field(
        default=None,
        description=(
            "The shared model cache of this namespace's jobs (a setting, not a limit). Unset: "
            "the operator's (the chart's modelCache.claimName), if any."
        ),
    )


class PolicyObjectMeta(ApiModel):
    """The parts of metadata kubetune reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        description="Policy name: a DNS subdomain (lowercase letters, digits, '-' and '.').",
    )
    namespace: str | None = None
    generation: int | None = None


class FineTunePolicy(ApiModel):
    """Limits and defaults for the FineTuneJobs of one namespace, set by the platform team."""

    apiVersion: Literal["kubetune.io/v1alpha1"] = Field(description=API_VERSION)
    kind: Literal["FineTunePolicy"] = Field(description=KIND)
    metadata: PolicyObjectMeta
    spec: FineTunePolicySpec = Field(default_factory=FineTunePolicySpec)


def parse_policy(document: object) -> FineTunePolicy:
    """Parse a FineTunePolicy manifest (a dict), or raise InvalidManifest naming each field."""
    return parse_document(document, FineTunePolicy, KIND)


__all__ = [
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "FineTunePolicy",
    "FineTunePolicySpec",
    "parse_policy",
]
