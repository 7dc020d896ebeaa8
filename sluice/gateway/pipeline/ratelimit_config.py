"""Rate-limit configuration: per-key/tenant limits, the adaptive risk model, the limiter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sluice.gateway.pipeline.entropy_config import EntropyConfig

@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None  # requests per minute (per window); None = unlimited
    tpm: int | None = None  # tokens per minute (per window); None = unlimited


class RiskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    half_life_s: float = Field(default=900.0, gt=0)
    weight: float = Field(default=0.5, ge=0)  # multiplier = 1 + weight * risk
    max_multiplier: float = Field(default=4.0, ge=1)
    clean_credit: float = Field(default=0.02, ge=0)  # risk removed per clean admitted request
    obfuscation_risk: float = Field(default=0.1, ge=0)  # risk added per unit of entropy score


class RateLimitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    window_s: float = Field(default=60.0, gt=0)  # rpm/tpm are "per window"; 60 s as OpenAI
    entropy: EntropyConfig = EntropyConfig()
    risk: RiskConfig = RiskConfig()
    key_prefix: str = "sluice:rl"
    on_store_error: Literal["open", "closed"] = "open"
    store_timeout_s: float = Field(default=0.1, gt=0)
    store_retry_s: float = Field(default=1.0, ge=0)  # after an error, skip the store this long
    error_log_interval_s: float = Field(default=60.0, ge=0)
    unavailable_retry_after_s: float = Field(default=1.0, gt=0)
