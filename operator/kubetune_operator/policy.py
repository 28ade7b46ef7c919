"""A namespace's FineTunePolicies applied to its FineTuneJobs. Pure: no API calls.

Three things, each a plain function the handlers feed with what they read:

- :func:`violations`: what a job's spec breaks, as ``Violation(field, rule, message)``.
  The chart's ValidatingAdmissionPolicy (helm/kubetune/templates/admission-policy.yaml)
  checks the same rules, in the same order and with the same messages, in CEL; a test
  evaluates that CEL with cel-python over this module's table of cases. Patterns are
  prefixes (``startsWith`` in CEL, ``str.startswith`` here), so both agree by construction.
- :func:`with_defaults`: the Kueue labels a job's attempt Jobs carry: the job's own, else
  the policy's ``defaultQueueName`` / ``defaultPriorityClass``. The FineTuneJob itself
  is never changed (GitOps tools would see a diff). Likewise :func:`model_cache_claim`:
  the shared model cache's PVC the attempt pods mount (``spec.modelCache.claimName``).
- :func:`concurrency`: for ``maxConcurrentJobs``, how many jobs of the namespace hold a
  slot and how many created earlier wait for one, so that waiting jobs start in creation
  order. Jobs in a Kueue queue are neither limited nor counted: Kueue's quota governs them.

Several policies in one namespace all apply (as the admission binding evaluates each):
a job must satisfy every one, the smallest ``maxConcurrentJobs`` wins, and defaults come
from the first policy by name that sets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .api.policy import FineTunePolicy
from .api.sweep import (
    FineTuneSweepSpec,
    apply_parameters,
    shown,
    spec_field,
    spec_value,
    template_dict,
)
from .api.types import FineTuneJobSpec
from .workload import JOB_LABEL, PRIORITY_LABEL, QUEUE_LABEL

# The operator's reasons (status.state stays Invalid / Queued; these are its reason).
POLICY_VIOLATION = "PolicyViolation"
CONCURRENCY_LIMIT = "ConcurrencyLimit"

_ENDED = ("Succeeded", "Failed", "Invalid")


@dataclass(frozen=True)
class Violation:
    """One broken rule: the job's field to change, the policy's field that refuses it, and
    the message (the same text the admission policy returns)."""

    field: str  # of the FineTuneJob, e.g. spec.resources.nodes
    rule: str  # of the FineTunePolicy, e.g. spec.maxNodes
    message: str


def _prefixed(field: str, rule: str, value: str, policy: str) -> Violation:
    return Violation(
        field,
        rule,
        f"{field}: '{value}' is not allowed by FineTunePolicy {policy}: "
        f"no entry of {rule} is a prefix of it",
    )


def violations(spec: FineTuneJobSpec, policy: FineTunePolicy) -> list[Violation]:
    """The rules of ``policy`` that ``spec`` breaks (a parsed spec: defaults applied), in
    the admission policy's order."""
    rules, name = policy.spec, policy.metadata.name
    found: list[Violation] = []
    source = spec.model.source
    if rules.allowedModelSources is not None and not source.startswith(
        tuple(rules.allowedModelSources)
    ):
        found.append(_prefixed("spec.model.source", "spec.allowedModelSources", source, name))
    image = spec.image
    if (
        rules.allowedImages is not None
        and image is not None
        and not image.startswith(tuple(rules.allowedImages))
    ):
        found.append(_prefixed("spec.image", "spec.allowedImages", image, name))
    output = spec.output.uri if spec.output is not None else None
    if (
        rules.allowedOutputs is not None
        and output is not None
        and not output.startswith(tuple(rules.allowedOutputs))
    ):
        found.append(_prefixed("spec.output.uri", "spec.allowedOutputs", output, name))
    method = spec.method.type
    if rules.allowedMethods is not None and method not in rules.allowedMethods:
        found.append(
            Violation(
                "spec.method.type",
                "spec.allowedMethods",
                f"spec.method.type: '{method}' is not allowed by FineTunePolicy {name}: "
                "it is not in spec.allowedMethods",
            )
        )
    nodes, gpus = spec.resources.nodes, spec.resources.gpus
    if rules.maxGpusPerJob is not None and nodes * gpus > rules.maxGpusPerJob:
        found.append(
            Violation(
                "spec.resources",
                "spec.maxGpusPerJob",
                f"spec.resources: {nodes * gpus} GPUs (nodes × gpus) are over the limit of "
                f"FineTunePolicy {name}: spec.maxGpusPerJob is {rules.maxGpusPerJob}",
            )
        )
    if rules.maxNodes is not None and nodes > rules.maxNodes:
        found.append(
            Violation(
                "spec.resources.nodes",
                "spec.maxNodes",
                f"spec.resources.nodes: {nodes} is over the limit of FineTunePolicy {name}: "
                f"spec.maxNodes is {rules.maxNodes}",
            )
        )
    return found


def all_violations(spec: FineTuneJobSpec, policies: Sequence[FineTunePolicy]) -> list[Violation]:
    """What ``spec`` breaks of every policy of its namespace."""
    return [v for policy in _by_name(policies) for v in violations(spec, policy)]


def sweep_violations(
    spec: FineTuneSweepSpec, policies: Sequence[FineTunePolicy]
) -> list[Violation]:
    """What a sweep's trials would break: the template itself, the template with each
    parameter at each of its values or bounds, and with every integer parameter at its
    largest value at once (nodes × gpus). The operator marks such a sweep Invalid (reason
    PolicyViolation) instead of creating trials that the admission policy or the
    operator would refuse. Call it on a sweep that passed ``sweep_problems``."""
    found = [
        Violation(
            "spec.template." + v.field.removeprefix("spec."),
            v.rule,
            f"spec.template.{v.message.removeprefix('spec.')}",
        )
        for v in all_violations(spec.template, policies)
    ]
    broken = {v.rule for v in found}
    template = template_dict(spec)
    variants: list[tuple[str, dict[str, Any]]] = []
    for i, param in enumerate(spec.parameters):
        field = spec_field(param.path)
        values = param.values if param.type == "categorical" else [param.low, param.high]
        for value in values or ():
            change = {param.path: spec_value(field, value)}
            variants.append((f"spec.parameters[{i}]", change))
    highs: dict[str, Any] = {}  # every integer parameter at its largest value
    for param in spec.parameters:
        numbers = [v for v in param.values or () if isinstance(v, int)]
        if param.type == "int":
            highs[param.path] = param.high
        elif param.type == "categorical" and numbers and len(numbers) == len(param.values or ()):
            highs[param.path] = max(numbers)
    if len(highs) > 1:
        variants.append(("spec.parameters", highs))
    for at, change in variants:
        trial = FineTuneJobSpec.model_validate(apply_parameters(template, change))
        for v in all_violations(trial, policies):
            if v.rule in broken:
                continue  # one message per rule
            broken.add(v.rule)
            setting = ", ".join(f"{path} = {shown(value)}" for path, value in change.items())
            found.append(
                Violation(at, v.rule, f"{at}: with {setting} a trial breaks it: {v.message}")
            )
    return found


def _by_name(policies: Iterable[FineTunePolicy]) -> list[FineTunePolicy]:
    return sorted(policies, key=lambda p: p.metadata.name)


def with_defaults(labels: Mapping[str, str], policies: Sequence[FineTunePolicy]) -> dict[str, str]:
    """The job's labels with the policies' default Kueue queue and priority class added
    where the job sets none (what its attempt Jobs carry)."""
    result = dict(labels)
    for policy in _by_name(policies):
        if policy.spec.defaultQueueName and QUEUE_LABEL not in result:
            result[QUEUE_LABEL] = policy.spec.defaultQueueName
        if policy.spec.defaultPriorityClass and PRIORITY_LABEL not in result:
            result[PRIORITY_LABEL] = policy.spec.defaultPriorityClass
    return result


def model_cache_claim(policies: Sequence[FineTunePolicy]) -> str | None:
    """The shared model cache's PVC that the namespace's policies name (the first by
    policy name); None: the operator's own setting applies."""
    for policy in _by_name(policies):
        if policy.spec.modelCache is not None:
            return policy.spec.modelCache.claimName
    return None


def concurrency_limit(policies: Sequence[FineTunePolicy]) -> tuple[int, str] | None:
    """The smallest maxConcurrentJobs of the namespace's policies, and whose it is."""
    limits = [
        (p.spec.maxConcurrentJobs, p.metadata.name)
        for p in policies
        if p.spec.maxConcurrentJobs is not None
    ]
    return min(limits) if limits else None


@dataclass(frozen=True)
class Slots:
    """The namespace's concurrency, as one job waiting to start sees it."""

    limit: int
    policy: str  # the FineTunePolicy that sets the limit
    running: int  # jobs holding a slot
    ahead: int  # jobs created earlier that wait for a slot too

    @property
    def free(self) -> bool:
        return self.running + self.ahead < self.limit

    def message(self) -> str:
        ahead = f"; {self.ahead} created earlier wait before it" if self.ahead else ""
        return (
            f"waits for a slot: FineTunePolicy {self.policy} lets at most {self.limit} jobs "
            f"of this namespace run at once (spec.maxConcurrentJobs) and {self.running} run"
            f"{ahead}; it starts when one finishes"
        )


def uses_queue(body: Mapping[str, Any], policies: Sequence[FineTunePolicy]) -> bool:
    """The job's attempts go through a Kueue queue (its label, or the default queue)."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    return QUEUE_LABEL in with_defaults(labels, policies)


def waits_for_slot(status: Mapping[str, Any]) -> bool:
    """The job is Queued by the concurrency limit (not by Kueue)."""
    queued = next((x for x in status.get("conditions") or [] if x.get("type") == "Queued"), None)
    return (
        status.get("state") == "Queued"
        and queued is not None
        and queued.get("reason") == CONCURRENCY_LIMIT
    )


def _order(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def concurrency(
    body: Mapping[str, Any],
    namespace_jobs: Iterable[Mapping[str, Any]],
    attempt_jobs: Iterable[Mapping[str, Any]],
    policies: Sequence[FineTunePolicy],
) -> Slots | None:
    """How the FineTuneJob ``body`` stands against the namespace's maxConcurrentJobs,
    from every FineTuneJob of the namespace and every attempt Job (batch/v1) there; None
    when no limit applies to it (no limit set, or it goes through a Kueue queue).

    A job holds a slot from its first attempt until it ends or is suspended: while one of
    its attempt Jobs runs, or while its status says it has started and is not waiting
    (either is enough, so a Job created just now or a status written just now both count).
    Every other job that has not ended, is not suspended and is not in a Kueue queue waits
    for a slot; those created before ``body`` (then by name) are ahead of it.
    """
    limit = concurrency_limit(policies)
    if limit is None or uses_queue(body, policies):
        return None
    own = (body.get("metadata") or {}).get("name")
    active: set[str] = set()
    for job in attempt_jobs:
        meta = job.get("metadata") or {}
        labels = meta.get("labels") or {}
        conditions = (job.get("status") or {}).get("conditions") or []
        finished = any(
            x.get("type") in ("Complete", "Failed") and x.get("status") == "True"
            for x in conditions
        )
        suspended = bool((job.get("spec") or {}).get("suspend"))  # runs no pods
        gone = finished or suspended or bool(meta.get("deletionTimestamp"))
        if labels.get(JOB_LABEL) and QUEUE_LABEL not in labels and not gone:
            active.add(labels[JOB_LABEL])
    running = ahead = 0
    for other in namespace_jobs:
        meta = other.get("metadata") or {}
        name = meta.get("name")
        if name == own or meta.get("deletionTimestamp") or uses_queue(other, policies):
            continue
        status = other.get("status") or {}
        state = status.get("state")
        if state in _ENDED or ((other.get("spec") or {}).get("suspend")):
            continue
        started = int(status.get("attempts") or 0) > 0 and state != "Suspended"
        if name in active or (started and not waits_for_slot(status)):
            running += 1
        elif _order(other) < _order(body):
            ahead += 1
    return Slots(limit=limit[0], policy=limit[1], running=running, ahead=ahead)
