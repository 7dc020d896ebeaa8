"""The pure-Python check for short prompts (pipeline/entropy.py `_short_is_natural`) never
changes a result: score_prompt (which takes it when it can) equals the numpy path
(`_score_blocks`) on every prompt of tests/data/prompts/*.jsonl, on their prefixes of
every size class, and on random short strings built to sit near the signals' edges, under
the default configuration and under ones with moved ramps and bands."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from sluice.gateway.pipeline.entropy import (
    SHORT_MAX_CHARS,
    Band,
    EntropyConfig,
    Ramp,
    _score_blocks,
    _short_is_natural,
    score_prompt,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "prompts"

CONFIGS = [
    EntropyConfig(),
    EntropyConfig(ascii_entropy=Ramp(lo=4.0, hi=4.6), repetition=Ramp(lo=0.2, hi=0.4),
                  min_chars_for_repetition=40, min_letters_for_vowels=10),
    EntropyConfig(vowel_ratio=Ramp(lo=0.36, hi=0.30), low_entropy=Ramp(lo=3.5, hi=3.0),
                  bands=(Band(min_score=0.0, multiplier=1.0), Band(min_score=0.2, multiplier=2.0)),
                  encoded_allowance_chars=0, block_chars=256),
]


def _texts() -> list[str]:
    out = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            text = row["text"] if "text" in row else "\n".join(t for _, t in row["turns"])
            out.append(text)
            out += [text[:k] for k in (24, 40, 69, 100, 160, 300, 511, 700, 1023) if k < len(text)]
    rng = random.Random(19)
    words = [w for t in out[:400] for w in t.split()] or ["word"]
    alphabets = [string.printable[:94], string.ascii_lowercase + " ", "aeiou ", "bcdfghjklmnpqrstvwxz ",
                 "ab ", string.ascii_letters + string.digits + "+/", string.printable]
    for _ in range(3000):
        n = rng.randint(24, SHORT_MAX_CHARS + 40)
        kind = rng.randrange(4)
        if kind == 0:
            alphabet = rng.choice(alphabets)
            out.append("".join(rng.choice(alphabet) for _ in range(n)))
        elif kind == 1:
            out.append(" ".join(rng.choice(words) for _ in range(n // 5 + 1))[:n])
        elif kind == 2:  # repeated phrases of every period
            unit = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(rng.randint(1, 40)))
            out.append((unit * (n // len(unit) + 1))[:n])
        else:  # natural words with some digits (around the 2% token-scan edge)
            t = list(" ".join(rng.choice(words) for _ in range(n // 5 + 1))[:n])
            for _ in range(rng.randint(0, n // 30)):
                t[rng.randrange(len(t))] = rng.choice(string.digits)
            out.append("".join(t))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "tight", "bands"])
def test_short_path_gives_the_numpy_result(config: EntropyConfig) -> None:
    fast = 0
    for text in _texts():
        assert score_prompt(text, config) == (_score_blocks(text, config) if len(text) >= config.min_chars
                                              else score_prompt(text, config)), text[:80]
        fast += len(text) >= config.min_chars and _short_is_natural(text, config)
    assert fast > 1000  # the short path did decide most natural prompts


def test_short_path_only_says_natural() -> None:
    config = EntropyConfig()
    for text in _texts():
        if len(text) >= config.min_chars and _short_is_natural(text, config):
            assert _score_blocks(text, config).multiplier == 1.0
