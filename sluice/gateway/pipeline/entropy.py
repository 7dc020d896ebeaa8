"""Entropy scoring: how far a prompt sits from the band of natural language.

Obfuscated payloads (base64, hex, leetspeak), random noise and degenerate repetition
are the cheap way to burn a model's compute or to slip past a guard model, so they
pay a higher rate-limit cost. Natural text in any language, prose with code, logs and
identifiers must stay at a multiplier of exactly 1.0.

`score_prompt(text, config)` measures a handful of features in one pass, maps each to
a signal in [0, 1] with a linear ramp (`lo` = the edge of natural text, `hi` = clearly
abnormal), takes the strongest signal as the score, and looks the score up in the
multiplier bands. The ramp edges are defaults measured on tests/data/prompts
(`loadtests/ratelimit_eval.py`, docs/ratelimit.md); every number is configuration.
"""

from __future__ import annotations

import math
import zlib
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

    def __call__(self, value: float) -> float:
        return min(1.0, max(0.0, (value - self.lo) / (self.hi - self.lo)))


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_score: float = Field(ge=0.0, le=1.0)
    multiplier: float = Field(ge=1.0)


class EntropyConfig(BaseModel):
    """Feature ramps and multiplier bands (defaults: docs/ratelimit.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_chars: int = Field(default=24, ge=1)  # shorter prompts are too small to judge
    sample_chars: int = Field(default=4096, ge=256)  # longer prompts are sampled in 4 slices
    run_min_chars: int = Field(default=16, ge=8)  # whitespace-free tokens this long may be payloads
    base64_min_switch_rate: float = 0.4  # char-class changes per char inside a base64-like run
    # Fraction of the prompt's characters inside hex/base64-like runs.
    encoded: Ramp = Ramp(lo=0.4, hi=0.75)
    # Letter-digit-letter sequences (h0w, m4k3) per whitespace-separated word.
    leet: Ramp = Ramp(lo=0.12, hi=0.3)
    # Character entropy (bits/char) of ASCII-only text: prose and code stay near 4-5.
    ascii_entropy: Ramp = Ramp(lo=5.4, hi=5.8)
    # Changes of writing system between consecutive letters (Japanese kana+kanji is one system).
    script_switch: Ramp = Ramp(lo=0.2, hi=0.45)
    # Vowels per ASCII letter (random letters ~0.23; European languages ~0.35-0.5).
    vowel_ratio: Ramp = Ramp(lo=0.275, hi=0.255)
    min_letters_for_vowels: int = 48
    min_letter_share_for_vowels: float = 0.7  # code (many symbols) is exempt
    max_avg_word_len_for_vowels: float = 12.0  # so are sequences (DNA) and other long tokens
    # zlib output/input bytes: repetition compresses far better than language.
    compress_ratio: Ramp = Ramp(lo=0.25, hi=0.12)
    min_bytes_for_compress: int = 160
    compress_bytes: int = Field(default=1024, ge=128)  # zlib runs on the first this many bytes
    # Distinct words / words.
    distinct_words: Ramp = Ramp(lo=0.3, hi=0.15)
    min_words_for_distinct: int = 30
    # Character entropy of any text: one repeated character is ~0 bits.
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
    score: float  # 0 = natural language, 1 = clearly obfuscated/degenerate
    multiplier: float
    reason: str  # the strongest signal's name, "" when score is 0
    features: dict[str, float]


NATURAL = EntropyScore(score=0.0, multiplier=1.0, reason="", features={})

_HEX = frozenset("0123456789abcdefABCDEF")
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")
_EDGE_PUNCT = "\"'`.,;:!?()[]{}<>"
_DIGITS = np.frombuffer(b"0123456789", np.uint8)


def _masks() -> np.ndarray:
    """(128, 3) columns: ASCII letter, vowel, digit; `histogram @ masks` counts all three."""
    m = np.zeros((128, 3), np.int64)
    m[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8), 0] = 1
    m[np.frombuffer(b"aeiouyAEIOUY", np.uint8), 1] = 1
    m[_DIGITS, 2] = 1
    return m


def _class_table() -> np.ndarray:
    table = np.full(256, 3, np.uint8)  # other
    table[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)] = 0
    table[np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)] = 1
    table[_DIGITS] = 2
    return table


def _script_table() -> np.ndarray:
    """Writing system of each BMP code point; 0 = neutral (spaces, digits, punctuation)."""
    t = (np.arange(0x10000, dtype=np.uint32) >> 7).astype(np.uint16) + 100  # one id per 128-block
    t[:0x80] = 0
    for lo, hi in ((0x41, 0x5A), (0x61, 0x7A)):
        t[lo:hi + 1] = 1
    groups = [
        (0xA0, 0xBF, 0), (0xC0, 0x24F, 1), (0x1E00, 0x1EFF, 1), (0x300, 0x36F, 0),
        (0x370, 0x3FF, 2), (0x1F00, 0x1FFF, 2), (0x400, 0x52F, 3), (0x590, 0x5FF, 4),
        (0x600, 0x6FF, 5), (0x750, 0x77F, 5), (0xFB50, 0xFDFF, 5), (0xFE70, 0xFEFF, 5),
        (0x1100, 0x11FF, 6), (0x3130, 0x318F, 6), (0xAC00, 0xD7AF, 6),
        (0x3040, 0x30FF, 7), (0x3400, 0x4DBF, 7), (0x4E00, 0x9FFF, 7), (0xF900, 0xFAFF, 7),
        (0x2000, 0x2BFF, 0), (0x3000, 0x303F, 0), (0xFF00, 0xFFEF, 0), (0xFE00, 0xFE0F, 0),
    ]
    for lo, hi, g in groups:
        t[lo:hi + 1] = g
    return t


_MASKS = _masks()
_IS_HEX_LETTER = np.zeros(256, bool)
_IS_HEX_LETTER[np.frombuffer(b"abcdefABCDEF", np.uint8)] = True
_CLASS = _class_table()
_SCRIPT = _script_table()


def _sample(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    step, size = len(text) // 4, limit // 4
    return "\n".join(text[i * step:i * step + size] for i in range(4))


def _encoded_chars(tokens: list[str], config: EntropyConfig) -> int:
    """Characters in whitespace-free runs that look like hex or base64."""
    total = 0
    for tok in [t for t in tokens if len(t) >= config.run_min_chars]:
        run = tok.strip(_EDGE_PUNCT)
        if len(run) < config.run_min_chars or not run.isascii():
            continue
        chars = set(run[:512])
        if chars <= _HEX and not chars.isdisjoint("0123456789") and not chars <= set("0123456789"):
            total += len(run)
            continue
        if not chars <= _B64:
            continue
        head = np.frombuffer(run[:512].encode("ascii"), np.uint8)
        classes = _CLASS[head]
        if classes.min() > 0 or classes.max() < 2 or not (classes == 1).any():
            continue  # base64 of real data mixes upper, lower and digits
        switch_rate = np.count_nonzero(classes[1:] != classes[:-1]) / (len(classes) - 1)
        if switch_rate >= config.base64_min_switch_rate:
            total += len(run)
    return total


def _leet_runs(raw: bytes) -> int:
    """Digit runs with a letter on both sides (h0w, m4k3), not counting hex (3f9a2c)."""
    cls = _CLASS[np.frombuffer(raw, np.uint8)]
    digit = np.concatenate(([False], cls == 2, [False]))
    edges = np.flatnonzero(digit[1:] != digit[:-1])  # run starts, then ends, alternating
    starts, ends = edges[0::2], edges[1::2]  # [start, end) in raw's coordinates
    ok = (starts > 0) & (ends < len(raw))
    starts, ends = starts[ok], ends[ok]
    before, after = cls[starts - 1], cls[ends]
    flanked = (before < 2) & (after < 2)
    hexish = _IS_HEX_LETTER[np.frombuffer(raw, np.uint8)[starts - 1]] & \
        _IS_HEX_LETTER[np.frombuffer(raw, np.uint8)[ends]]
    return int(np.count_nonzero(flanked & ~hexish))


def features(text: str, config: EntropyConfig) -> dict[str, float]:
    """The measured features of `text` (sampled when longer than config.sample_chars)."""
    text = _sample(text, config.sample_chars)
    n = len(text)
    raw = text.encode("utf-8", "surrogatepass")
    ascii_only = len(raw) == n
    if ascii_only:
        counts = np.bincount(np.frombuffer(raw, np.uint8), minlength=128)
        low = counts
        switch, latin = 0.0, 0
    else:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        counts = np.unique(cps, return_counts=True)[1]
        low = np.bincount(cps[cps < 128], minlength=128)
        scripts = _SCRIPT[np.minimum(cps, 0xFFFF)]
        scripts[cps > 0xFFFF] = 0  # emoji and other astral symbols are neutral
        # Accented Latin letters are mostly vowels (Vietnamese, French): count them as such.
        latin = int(np.count_nonzero(scripts[cps >= 0xC0] == 1))
        scripts = scripts[scripts != 0]
        switch = (int(np.count_nonzero(scripts[1:] != scripts[:-1])) / (len(scripts) - 1)
                  if len(scripts) > 1 else 0.0)
    head = raw[:config.compress_bytes]  # repetition shows within 1 KB; zlib is the slow part
    p = counts[counts > 0] / n
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # never -0.0
    letters_ascii, vowels, digits = (int(x) for x in low[:128] @ _MASKS)
    letters = letters_ascii + latin
    tokens = text.split()
    words = len(tokens)
    # Leetspeak needs digits; most prose has almost none, so skip the scan.
    leet = 0.0
    if words and digits * 20 >= n:
        # Long tokens (hashes, tokens, base64) are judged as runs, not as leetspeak words.
        short = [t for t in tokens if len(t) < config.run_min_chars]
        text_short = " ".join(short) if len(short) < words else text
        leet = _leet_runs(text_short.encode("utf-8", "surrogatepass")) / words
    return {
        "chars": float(n),
        "entropy": entropy,
        "ascii_entropy": entropy if ascii_only else 0.0,
        "compress_ratio": len(zlib.compress(head, 1)) / len(head) if head else 1.0,
        "bytes": float(len(raw)),
        "encoded_frac": _encoded_chars(tokens, config) / n,
        "leet_rate": leet,
        "script_switch": switch,
        "letters": float(letters),
        "vowel_ratio": (vowels + latin) / letters if letters else 0.0,
        "words": float(words),
        "distinct_words": len(set(tokens)) / words if words else 1.0,
        "avg_word_len": (n - text.count(" ") - text.count("\n")) / words if words else 0.0,
    }


def signals(f: dict[str, float], config: EntropyConfig) -> dict[str, float]:
    """Each feature mapped to [0, 1]; features measured on too little text give 0."""
    out = {
        "encoded": config.encoded(f["encoded_frac"]),
        "leet": config.leet(f["leet_rate"]),
        "ascii_entropy": config.ascii_entropy(f["ascii_entropy"]) if f["ascii_entropy"] else 0.0,
        "script_switch": config.script_switch(f["script_switch"]),
        "low_entropy": config.low_entropy(f["entropy"]),
        "vowel_ratio": 0.0,
        "compress_ratio": 0.0,
        "distinct_words": 0.0,
    }
    if (f["letters"] >= config.min_letters_for_vowels
            and f["letters"] >= config.min_letter_share_for_vowels * f["chars"]
            and f["avg_word_len"] <= config.max_avg_word_len_for_vowels):
        out["vowel_ratio"] = config.vowel_ratio(f["vowel_ratio"])
    if f["bytes"] >= config.min_bytes_for_compress:
        out["compress_ratio"] = config.compress_ratio(f["compress_ratio"])
    if f["words"] >= config.min_words_for_distinct:
        out["distinct_words"] = config.distinct_words(f["distinct_words"])
    return out


def multiplier_for(score: float, config: EntropyConfig) -> float:
    mult = 1.0
    for band in config.bands:
        if score >= band.min_score:
            mult = band.multiplier
    return mult


def score_prompt(text: str, config: EntropyConfig = EntropyConfig()) -> EntropyScore:
    """Score `text` against natural language; multiplier 1.0 means normal price."""
    if not config.enabled or len(text) < config.min_chars:
        return NATURAL
    f = features(text, config)
    sig = signals(f, config)
    reason, score = max(sig.items(), key=lambda kv: kv[1])
    if not math.isfinite(score) or score <= 0.0:
        return EntropyScore(score=0.0, multiplier=1.0, reason="", features=f)
    return EntropyScore(score=score, multiplier=multiplier_for(score, config),
                        reason=reason, features=f)
