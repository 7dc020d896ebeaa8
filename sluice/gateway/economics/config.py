"""The config-file shapes of prices (kept free of database imports: Settings reads them)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

# A price above 1,000,000 currency units per million tokens is a typo, not a price.
MAX_PRICE_MICROS = 10**12


class PriceConfig(BaseModel):
    """One model's price in micro-units per million tokens, as written in the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: int = Field(ge=0, le=MAX_PRICE_MICROS)
    output: int = Field(ge=0, le=MAX_PRICE_MICROS)
    # Prompt tokens served from a cache (prefix cache upstream, or sluice's response cache).
    cached_input: int | None = Field(None, ge=0, le=MAX_PRICE_MICROS)
    effective_from: dt.datetime | None = None
