"""The entropy price's configuration (``[ratelimit.entropy]``) and its result type.

Kept apart from the scoring code (pipeline/entropy.py) and the per-block features
(pipeline/entropy_features.py), which both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Ramp(BaseModel):
    """Signal = 0 at `lo`, 1 at `hi`, linear between; `hi < lo` ramps downwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lo: float
    hi: float

    @model_validator(mode="after")
    def _distinct(self) -> Ramp:
        if self.lo == self.hi:
            raise ValueError("ramp needs lo != hi")
        return self

    def __call__(self, value: np.ndarray) -> np.ndarray:
        # minimum/maximum, not np.clip: the same values without clip's Python dispatch,
        # which cost more than the arithmetic on a short prompt's one block.
        return np.minimum(np.maximum((value - self.lo) / (self.hi - self.lo), 0.0), 1.0)


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_score: float = Field(ge=0.0, le=1.0)
    multiplier: float = Field(ge=1.0)


class EntropyConfig(BaseModel):
    """Block size, feature ramps and multiplier bands (defaults: docs/ratelimit.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_chars: int = Field(default=24, ge=1)  # shorter prompts are too small to judge
    # Longer prompts are priced off the event loop (RateLimiter.admit): ~0.1 ms inline.
    inline_max_chars: int = Field(default=32_768, ge=0)
    block_chars: int = Field(default=512, ge=64, multiple_of=4)  # the last takes the rest
    # Encoded spans: tokens at least this long may be base64; runs at least this many
    # alphanumerics long may be hex / base32; decimal runs need this many digits.
    base64_min_chars: int = 16
    base64_min_switch_rate: float = 0.35  # upper/lower/digit changes per char
    run_min_alnum: int = 24
    decimal_min_digits: int = 32
    # One identifier per block is natural (a hash, a UUID, a key): this many encoded
    # characters per block are not counted.
    encoded_allowance_chars: int = Field(default=64, ge=0)
    encoded: Ramp = Ramp(lo=0.3, hi=0.6)
    ascii_entropy: Ramp = Ramp(lo=5.3, hi=5.7)
    distinct: Ramp = Ramp(lo=0.8, hi=0.92)
    uniformity: Ramp = Ramp(lo=0.94, hi=0.97)
    pair_novelty: Ramp = Ramp(lo=0.95, hi=0.99)
    min_letters_for_distinct: int = 128  # noise statistics need this many letters
    script_switch: Ramp = Ramp(lo=0.2, hi=0.45)
    vowel_ratio: Ramp = Ramp(lo=0.275, hi=0.255)
    min_letters_for_vowels: int = 48
    min_letter_share_for_vowels: float = 0.7  # code (many symbols) is exempt
    max_avg_word_len_for_vowels: float = 12.0  # so are sequences (DNA) and other long tokens
    leet: Ramp = Ramp(lo=0.12, hi=0.3)
    repetition: Ramp = Ramp(lo=0.55, hi=0.75)
    min_chars_for_repetition: int = 160
    low_entropy: Ramp = Ramp(lo=2.5, hi=1.5)
    bands: tuple[Band, ...] = (
        Band(min_score=0.0, multiplier=1.0),
        Band(min_score=0.5, multiplier=3.0),
        Band(min_score=0.85, multiplier=4.0),
    )

    @model_validator(mode="after")
    def _bands_sorted(self) -> EntropyConfig:
        scores = [b.min_score for b in self.bands]
        if not scores or scores[0] != 0.0 or scores != sorted(scores):
            raise ValueError("bands must start at min_score 0.0 and be sorted")
        return self


@dataclass(frozen=True, slots=True)
class EntropyScore:
    score: float  # length-weighted mean block score: 0 = all natural, 1 = all obfuscated
    multiplier: float  # length-weighted mean of the blocks' band multipliers
    reason: str  # the signal that raised the price most, "" when nothing did
    features: dict[str, float]  # per signal: share of the text it priced above 1x


NATURAL = EntropyScore(score=0.0, multiplier=1.0, reason="", features={})
SIGNALS = ("encoded", "ascii_entropy", "distinct", "uniformity", "pair_novelty", "script_switch",
           "vowel_ratio", "leet", "repetition", "low_entropy")
