"""Cross-field rules, written once and enforced twice.

Each rule carries a CEL expression (emitted into the CRD as ``x-kubernetes-validations``
so the API server rejects a bad manifest at ``kubectl apply``) and the same rule as a
Python predicate (enforced by the pydantic models, so ``kubetune validate`` and the
operator give the same answer when no API server checks). A test evaluates every CEL
rule with a CEL interpreter against the examples and the bad manifests, so the two
forms cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Rule:
    """One cross-field rule: CEL for the API server, a predicate for Python."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    # The field to change when the rule is broken, relative to the model (".maxSteps"):
    # the CRD's fieldPath, and the path kubetune validate reports.
    field_path: str | None = None

    def as_crd_validation(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        return validation


def _add_rules_to_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    rules: tuple[Rule, ...] = getattr(model, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_crd_validation() for rule in rules]


class ApiModel(BaseModel):
    """Base of every API type: unknown fields rejected, cross-field rules checked.

    Field names are the wire names (camelCase), so no aliases are needed.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_add_rules_to_schema,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        broken = tuple(i for i, rule in enumerate(self.rules) if not rule.holds(self))
        if broken:
            # One error for the model; api.validation reports each broken rule at its
            # field_path (the field to change), from the indices in the context.
            raise PydanticCustomError(
                "cross_field_rule",
                "{message}",
                {"message": "; ".join(self.rules[i].message for i in broken), "broken": broken},
            )
        return self
