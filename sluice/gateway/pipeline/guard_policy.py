"""A tenant's guard policy (modes, taxonomy, failure handling) and the verdict it yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from sluice.gateway.pipeline.guard_prompt import DEFAULT_CATEGORIES, GuardCategory

Decision = Literal["allow", "flag", "block"]
Mode = Literal["block", "flag", "off"]


class GuardPolicy(BaseModel):
    """A tenant's guard policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input_mode: Mode = "block"
    output_mode: Mode = "block"
    excluded_categories: frozenset[str] = frozenset()
    categories: tuple[GuardCategory, ...] | None = None  # None = Llama Guard 3 S1-S14
    on_error: Literal["block", "allow"] = "block"
    # A conversation longer than the guard budget: moderate turn edges + the most recent
    # content ("sample"), or refuse it ("block"). pipeline/guard_text.py has the details.
    long_input: Literal["sample", "block"] = "sample"

    @model_validator(mode="after")
    def _valid(self) -> GuardPolicy:
        codes = [c.code for c in self.taxonomy()]
        if len(set(codes)) != len(codes):
            raise ValueError("category codes must be unique")
        if unknown := self.excluded_categories - set(codes):
            raise ValueError(f"excluded categories not in the taxonomy: {sorted(unknown)}")
        if not set(codes) - self.excluded_categories:
            raise ValueError("every category is excluded; set the modes to 'off' instead")
        return self

    def taxonomy(self) -> tuple[GuardCategory, ...]:
        if self.categories is not None:
            return self.categories
        return tuple(GuardCategory(code=c, name=n) for c, n in DEFAULT_CATEGORIES)

    def active(self) -> tuple[GuardCategory, ...]:
        return tuple(c for c in self.taxonomy() if c.code not in self.excluded_categories)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    categories: tuple[str, ...]  # violated categories that count under the policy
    raw: str  # the guard model's answer ("" when not called)
    latency_s: float
    error: str | None = None  # a generic reason, fit for tenants ("guard model timed out")
    detail: str | None = None  # the failure itself, for logs and operators only
    windows: int = 1  # guard calls this verdict combines
    skipped_bytes: int = 0  # content left unmoderated by the "sample" long-input policy

    @property
    def allowed(self) -> bool:
        return self.decision != "block"
