"""Evaluate entropy scoring on the prompt datasets and measure limiter overhead.

    .venv/bin/python loadtests/ratelimit_eval.py                       # tables + scoring speed
    .venv/bin/python loadtests/ratelimit_eval.py --overhead --redis-url redis://127.0.0.1:6379/0

Exits 1 when the acceptance bars fail: false-throttle rate on natural prompts
(multiplier > 1) above 1 %, or a mean multiplier below 3x on the obfuscated set.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import time
import timeit
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sluice.gateway.pipeline.entropy import EntropyConfig, features, score_prompt  # noqa: E402
from sluice.gateway.pipeline.ratelimit import Limits, MemoryStore, RateLimitConfig, RateLimiter  # noqa: E402

DATA = ROOT / "tests" / "data" / "prompts"
FEATURES = ["ascii_entropy", "entropy", "compress_ratio", "encoded_frac", "leet_rate",
            "script_switch", "vowel_ratio", "distinct_words", "avg_word_len"]


def applies(name: str, f: dict[str, float], config: EntropyConfig) -> bool:
    """Whether the feature feeds a signal for this prompt (the gates in entropy.signals)."""
    if name == "ascii_entropy":
        return f["ascii_entropy"] > 0
    if name == "vowel_ratio":
        return (f["letters"] >= config.min_letters_for_vowels
                and f["letters"] >= config.min_letter_share_for_vowels * f["chars"]
                and f["avg_word_len"] <= config.max_avg_word_len_for_vowels)
    if name == "compress_ratio":
        return f["bytes"] >= config.min_bytes_for_compress
    if name == "distinct_words":
        return f["words"] >= config.min_words_for_distinct
    return True


def load(name: str) -> list[dict[str, str]]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def evaluate(config: EntropyConfig) -> tuple[str, bool]:
    natural, obfuscated = load("natural.jsonl"), load("obfuscated.jsonl")
    lines = ["| natural kind | prompts | throttled (x>1) | rate |", "|---|---:|---:|---:|"]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for row in natural:
        by_kind[row["kind"]].append(score_prompt(row["text"], config).multiplier)
    for kind, mults in sorted(by_kind.items()):
        bad = sum(m > 1.0 for m in mults)
        lines.append(f"| {kind} | {len(mults)} | {bad} | {bad / len(mults):.1%} |")
    all_nat = [m for ms in by_kind.values() for m in ms]
    false_rate = sum(m > 1.0 for m in all_nat) / len(all_nat)
    langs = len({r["lang"] for r in natural})
    lines.append(f"| **all ({langs} languages)** | {len(all_nat)} | "
                 f"{sum(m > 1.0 for m in all_nat)} | **{false_rate:.2%}** |")
    lines += ["", "| obfuscated kind | prompts | mean multiplier | min | >= 3x | main signal |",
              "|---|---:|---:|---:|---:|---|"]
    obf: dict[str, list] = defaultdict(list)
    for row in obfuscated:
        obf[row["kind"]].append(score_prompt(row["text"], config))
    for kind, scores in obf.items():
        mults = [s.multiplier for s in scores]
        reasons = defaultdict(int)
        for s in scores:
            reasons[s.reason or "-"] += 1
        top = max(reasons, key=reasons.get)
        lines.append(f"| {kind} | {len(mults)} | {statistics.mean(mults):.2f} | {min(mults):.1f}"
                     f" | {sum(m >= 3 for m in mults) / len(mults):.0%} | {top} |")
    all_obf = [s.multiplier for ss in obf.values() for s in ss]
    mean_obf = statistics.mean(all_obf)
    lines.append(f"| **all** | {len(all_obf)} | **{mean_obf:.2f}** | {min(all_obf):.1f} | "
                 f"{sum(m >= 3 for m in all_obf) / len(all_obf):.0%} | |")
    ok = false_rate <= 0.01 and mean_obf >= 3.0
    lines.append(f"\nfalse-throttle rate {false_rate:.2%} (bar <= 1%), obfuscated mean "
                 f"{mean_obf:.2f}x (bar >= 3x): {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok


def feature_table(config: EntropyConfig) -> str:
    """Where natural text sits on each feature, against each obfuscated kind's range."""
    natural = [features(r["text"], config) for r in load("natural.jsonl")
               if len(r["text"]) >= config.min_chars]
    obf: dict[str, list] = defaultdict(list)
    for r in load("obfuscated.jsonl"):
        obf[r["kind"]].append(features(r["text"], config))

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    head = "| feature (where it applies) | natural p1 | natural p99 | natural min..max | " + \
        " | ".join(obf) + " |"
    lines = [head, "|---" * (4 + len(obf)) + "|"]
    for name in FEATURES:
        nat = [f[name] for f in natural if applies(name, f, config)]
        cells = []
        for fs in obf.values():
            vals = [f[name] for f in fs if applies(name, f, config)]
            cells.append(f"{min(vals):.2f}..{max(vals):.2f}" if vals else "n/a")
        lines.append(f"| {name} | {pct(nat, 0.01):.3f} | {pct(nat, 0.99):.3f} | "
                     f"{min(nat):.3f}..{max(nat):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scoring_speed(config: EntropyConfig) -> str:
    natural = load("natural.jsonl")
    en = " ".join(r["text"] for r in natural if r["lang"] == "en")[:2048]
    zh = "".join(r["text"] for r in natural if r["lang"] == "zh")[:683]  # ~2 KB of UTF-8
    code = "\n".join(r["text"] for r in natural if r["kind"] == "code" and r["lang"] == "en")
    samples = {"English prose": en, "Chinese prose": zh, "code question": code[:2048],
               "base64": base64.b64encode(en.encode()).decode()[:2048],
               "leetspeak": en.translate(str.maketrans("aeiost", "431057")),
               "100 KB prose (sampled)": (en + " ") * 50}
    lines = ["| prompt | bytes | µs per score (min of 7) | multiplier |", "|---|---:|---:|---:|"]
    for name, text in samples.items():
        n = 500
        us = min(timeit.repeat(lambda: score_prompt(text, config), number=n, repeat=7)) / n * 1e6
        lines.append(f"| {name} | {len(text.encode())} | {us:.0f} | "
                     f"{score_prompt(text, config).multiplier:g} |")
    return "\n".join(lines)


async def overhead(redis_url: str | None, n: int) -> str:
    natural = load("natural.jsonl")
    prompts = [r["text"] for r in natural if 200 <= len(r["text"].encode()) <= 2048]
    lines = ["| store | admit+settle µs p50 | p99 | ops/s (sequential) |", "|---|---:|---:|---:|"]
    stores = [("memory", None)] + ([("redis", redis_url)] if redis_url else [])
    for name, url in stores:
        prefix = f"sluice-eval-{uuid.uuid4().hex[:8]}"
        config = RateLimitConfig(key_prefix=prefix)
        lim = (RateLimiter.from_settings(url, config) if url
               else RateLimiter(MemoryStore(config), config))
        limits = Limits(rpm=10**9, tpm=10**12)
        times = []
        for i in range(n + 50):
            t0 = time.perf_counter()
            adm = await lim.admit(key_id=f"k{i % 50}", tenant_id=f"t{i % 5}", key_limits=limits,
                                  tenant_limits=limits, prompt=prompts[i % len(prompts)],
                                  prompt_tokens=300, max_tokens=500)
            await lim.settle(adm, actual_tokens=420)
            if i >= 50:  # warm-up: connection, script load
                times.append(time.perf_counter() - t0)
        if url:
            r = lim._store._r  # noqa: SLF001 - clean up this run's keys
            keys = [k async for k in r.scan_iter(match=prefix + "*")]
            if keys:
                await r.delete(*keys)
        await lim.close()
        times.sort()
        p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
        lines.append(f"| {name} | {p50 * 1e6:.0f} | {p99 * 1e6:.0f} | {n / sum(times):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", action="store_true", help="print the feature ranges table")
    ap.add_argument("--overhead", action="store_true", help="measure admit+settle")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("-n", type=int, default=2000, help="admit+settle pairs per store")
    args = ap.parse_args()
    config = EntropyConfig()
    table, ok = evaluate(config)
    print(table, end="\n\n")
    if args.features:
        print(feature_table(config), end="\n\n")
    print(scoring_speed(config), end="\n\n")
    if args.overhead:
        print(asyncio.run(overhead(args.redis_url, args.n)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
