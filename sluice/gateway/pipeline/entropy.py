"""Entropy pricing: how much of a prompt sits outside the band of natural language.

Obfuscated payloads (base64, hex, base32, decimal byte codes, leetspeak), random noise in
any script and degenerate repetition are the cheap way to burn a model's compute or to
slip past a guard model, so they pay a higher rate-limit cost. Natural text in any
language, prose with code, logs and identifiers stay at (or within a hair of) 1.0.

The whole conversation is scored, every character of it, in O(n) numpy passes (no
sampling): the text is cut into blocks of `block_chars`; each block gets a score in
[0, 1] (the strongest of its signals, each a linear ramp from the edge of natural text
`lo` to clearly abnormal `hi`), the score a multiplier band, and the prompt's multiplier
is the blocks' multipliers averaged by their length. A payload therefore costs its
band's price whatever surrounds it: padding it with natural text only adds text billed
at 1x, and hiding it in an earlier turn or deep inside a long prompt changes nothing.

Signals (per block):

- `encoded`: share of the block's characters inside encoded spans, found token by token
  (pipeline/encodings.py) over the whole text: base64 tokens (>= 16 chars, upper+lower+digits, frequent class
  changes), and runs of consecutive tokens that are all hex (grouped or not, `0x`
  prefixes and separators allowed), all base32 (A-Z, 2-7, `=`), or all decimal digits,
  with the composition of random data (hex: digits and a-f letters; base32: digits 2-7
  and few vowels; decimal: >= 32 digits).
- `ascii_entropy`: character entropy of an ASCII block (random printable text).
- `distinct`: distinct characters per character of a non-ASCII block (uniform noise from
  a large script: CJK, Hangul, anything; natural CJK text repeats its common characters).
- `uniformity`: entropy / log2(distinct characters) of a non-ASCII block (uniform noise
  from a small script: random Cyrillic, Greek, Arabic letters).
- `script_switch`: changes of writing system between consecutive letters (mixed noise).
- `vowel_ratio`: vowels per letter in Latin-letter blocks (random "words").
- `leet`: letter-digit-letter sequences (h0w, m4k3) per word.
- `repetition`: share of repeated 4-character shingles in the block (repeated phrases).
- `low_entropy`: entropy below 2.5 bits/char (one character repeated).

The ramp edges are configuration; the defaults were fitted on tests/data/prompts and
evaluated on held-out sets built from other sources (`python -m loadtests.ratelimit_eval`,
docs/ratelimit.md).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np

from sluice.gateway.pipeline.entropy_config import (  # noqa: F401  (re-exported)
    NATURAL,
    SIGNALS,
    Band,
    EntropyConfig,
    EntropyScore,
    Ramp,
)
from sluice.gateway.pipeline.entropy_features import (  # noqa: F401  (re-exported)
    block_features,
    block_signals,
)

# ---------------------------------------------------------------- scoring

def score_prompt(text: str | Sequence[tuple[str, str]] | Sequence[str],
                 config: EntropyConfig = EntropyConfig()) -> EntropyScore:
    """Price `text` (a string, or every turn of a conversation) against natural language;
    a multiplier of 1.0 means normal price."""
    if not isinstance(text, str):
        text = "\n".join(t if isinstance(t, str) else t[1] for t in text)
    if not config.enabled or len(text) < config.min_chars:
        return NATURAL
    if len(text) <= SHORT_MAX_CHARS and _short_is_natural(text, config):
        return NATURAL
    return _score_blocks(text, config)


def _score_blocks(text: str, config: EntropyConfig) -> EntropyScore:
    """The numpy path: every block's signals (any length)."""
    sizes, sig = block_signals(text, config)
    scores = np.max(np.stack([sig[name] for name in SIGNALS]), axis=0)
    mults = np.ones_like(scores)
    for band in config.bands:
        mults[scores >= band.min_score] = band.multiplier
    total = float(sizes.sum())
    multiplier = float((mults * sizes).sum() / total)
    if multiplier <= 1.0 + 1e-9:
        return EntropyScore(score=0.0, multiplier=1.0, reason="", features={})
    priced = mults > 1.0
    shares = {name: float(sizes[priced & (sig[name] >= scores)].sum() / total)
              for name in SIGNALS}
    reason = max(shares, key=lambda k: shares[k])
    score = float((scores * sizes).sum() / total)
    return EntropyScore(score=score, multiplier=round(multiplier, 6), reason=reason,
                        features={k: v for k, v in shares.items() if v > 0})


# ---------------------------------------------------------------- short prompts

# Up to this many characters a prompt may take the pure-Python check below: numpy's
# per-call overhead (tens of microseconds) dwarfs the arithmetic on one short block.
SHORT_MAX_CHARS = 1024
_MARGIN = 1e-9  # a Python float may differ from numpy's in the last bits; stay clear of edges
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_VOWELS = frozenset("aeiouyAEIOUY")
_DIGITS = frozenset("0123456789")
_SPACES = frozenset(" \t\n\r\x0b\x0c")
_LITTLE = sys.byteorder == "little"


def _ramp(r: Ramp, value: float) -> float:
    return min(max((value - r.lo) / (r.hi - r.lo), 0.0), 1.0)


def _short_is_natural(text: str, config: EntropyConfig) -> bool:
    """True when `text` certainly prices at 1x; False means "ask the numpy path" (which
    then decides). Only for what the numpy path treats as one ASCII block without a
    token scan (no DEL, fewer than 2% digits): there every signal is computed here the
    same way, and a score within `_MARGIN` of a priced band is left to numpy."""
    n = len(text)
    if n >= 2 * config.block_chars or not text.isascii() or "\x7f" in text or not _LITTLE:
        return False
    counts = Counter(text)
    digits = sum(counts[c] for c in _DIGITS if c in counts)
    if digits * 50 >= n:  # encodings and leetspeak: the token scan
        return False
    letters = vowels = spaces = 0
    c_log_c = 0.0
    for ch, c in counts.items():
        c_log_c += c * math.log2(c)
        if ch in _LETTERS:
            letters += c
            if ch in _VOWELS:
                vowels += c
        elif ch in _SPACES:
            spaces += c
    entropy = max(math.log2(n) - c_log_c / n, 0.0)
    words = max(spaces, 1)
    zero = 0.0  # the signals the numpy path leaves at 0 for such a block (non-ASCII, tokens)
    score = max(_ramp(config.encoded, max(0 - config.encoded_allowance_chars, 0) / n),
                _ramp(config.ascii_entropy, entropy), _ramp(config.distinct, zero),
                _ramp(config.uniformity, zero), _ramp(config.pair_novelty, zero),
                _ramp(config.script_switch, zero), _ramp(config.leet, zero / words),
                _ramp(config.low_entropy, entropy))
    if n >= config.min_chars_for_repetition:
        score = max(score, _ramp(config.repetition, _repeated_share(text)))
    if (letters >= config.min_letters_for_vowels
            and letters >= config.min_letter_share_for_vowels * n
            and (n - spaces) / words <= config.max_avg_word_len_for_vowels):
        score = max(score, _ramp(config.vowel_ratio, vowels / max(letters, 1)))
    return (multiplier_for(score - _MARGIN, config) <= 1.0 + 1e-9
            and multiplier_for(score + _MARGIN, config) <= 1.0 + 1e-9)


def _repeated_share(text: str) -> float:
    """_repeated_shingles of one ASCII block: the same 16-bit hashes of the same words."""
    m = len(text) // 4
    if m < 2:
        return 0.0
    quads = memoryview(text[:m * 4].encode("ascii")).cast("I")
    distinct = len({((q * 0x9E3779B1) & 0xFFFFFFFF) >> 16 for q in quads})
    return (m - distinct) / m


def multiplier_for(score: float, config: EntropyConfig) -> float:
    mult = 1.0
    for band in config.bands:
        if score >= band.min_score:
            mult = band.multiplier
    return mult
