"""Evaluate the entropy price on held-out prompt sets and measure scoring and limiter cost.

    .venv/bin/python -m loadtests.ratelimit_eval                  # tables, bars, speed
    .venv/bin/python -m loadtests.ratelimit_eval --features       # + per-feature ranges (dev)
    .venv/bin/python -m loadtests.ratelimit_eval --overhead --redis-url redis://127.0.0.1:6379/0

Two kinds of sets. The development sets (tests/data/prompts/*.jsonl, seed 20240611) are
where the defaults were set. The held-out sets (tests/data/prompts/heldout.py, seed
77031405) are built from other text by other code and were not used to set anything;
the acceptance bars are checked on them:

- natural prompts (many languages, code, identifiers, conversations): at most 1% priced
  above 1.2x;
- every obfuscation family: a mean price of at least 3x per payload character
  (`payload multiplier` = what the prompt costs beyond 1x on its natural part, per
  payload character; for a bare payload it is the prompt's multiplier).

Exits 1 when a held-out bar fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import sys
import time
import timeit
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "prompts"
sys.path.insert(0, str(DATA))

import heldout  # noqa: E402

from sluice.gateway.pipeline.entropy import (  # noqa: E402
    EntropyConfig,
    block_features,
    score_prompt,
)
from sluice.gateway.pipeline.ratelimit import (  # noqa: E402
    Limits,
    MemoryStore,
    RateLimitConfig,
    RateLimiter,
)

NATURAL_BAR = 1.2  # a natural prompt priced above this counts against the 1% bar
NATURAL_RATE_BAR = 0.01
FAMILY_BAR = 3.0


def load(name: str) -> list[dict[str, Any]]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def text_of(row: dict[str, Any]) -> Any:
    return row["text"] if "text" in row else [(r, t) for r, t in row["turns"]]


def total_chars(row: dict[str, Any]) -> int:
    return len(row["text"]) if "text" in row else len("\n".join(t for _, t in row["turns"]))


@dataclass
class Report:
    natural: dict[str, tuple[int, int]]  # kind -> (prompts, priced above the bar)
    languages: int
    families: dict[str, dict[str, Any]]  # kind -> stats
    natural_rate: float
    failing: list[str]  # families under the bar

    @property
    def ok(self) -> bool:
        return self.natural_rate <= NATURAL_RATE_BAR and not self.failing


def evaluate(natural: list[dict], obfuscated: list[dict], config: EntropyConfig) -> Report:
    nat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in natural:
        priced = score_prompt(text_of(row), config).multiplier > NATURAL_BAR
        nat[row["kind"]][0] += 1
        nat[row["kind"]][1] += priced
    fams: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for row in obfuscated:
        s = score_prompt(text_of(row), config)
        n, p = total_chars(row), row.get("payload_chars") or total_chars(row)
        fams[row["kind"]].append((s.multiplier, (s.multiplier * n - (n - p)) / p,
                                  s.reason or "-"))
    families = {}
    for kind, xs in fams.items():
        reasons: dict[str, int] = defaultdict(int)
        for _, _, r in xs:
            reasons[r] += 1
        pay = [x[1] for x in xs]
        families[kind] = {"n": len(xs), "mean": statistics.mean(x[0] for x in xs),
                          "payload_mean": statistics.mean(pay), "payload_min": min(pay),
                          "at_least_3x": sum(p >= FAMILY_BAR for p in pay) / len(pay),
                          "signal": max(reasons, key=lambda k: reasons[k])}
    total = sum(c for c, _ in nat.values())
    rate = sum(b for _, b in nat.values()) / total
    failing = [k for k, f in families.items() if f["payload_mean"] < FAMILY_BAR]
    return Report({k: (c, b) for k, (c, b) in nat.items()},
                  len({r.get("lang") for r in natural}), families, rate, failing)


def heldout_report(config: EntropyConfig = EntropyConfig()) -> tuple[Report, str, int]:
    """The held-out evaluation: (report, fingerprint of the sets, rows)."""
    natural, obfuscated = heldout.build()
    return (evaluate(natural, obfuscated, config),
            heldout.fingerprint(natural + obfuscated), len(natural) + len(obfuscated))


def render(report: Report, title: str) -> str:
    lines = [f"### {title}", "", f"| natural kind | prompts | priced > {NATURAL_BAR}x | rate |",
             "|---|---:|---:|---:|"]
    for kind, (c, b) in sorted(report.natural.items()):
        lines.append(f"| {kind} | {c} | {b} | {b / c:.1%} |")
    total = sum(c for c, _ in report.natural.values())
    bad = sum(b for _, b in report.natural.values())
    lines += [f"| **all ({report.languages} languages/sources)** | {total} | {bad} | "
              f"**{report.natural_rate:.2%}** |", "",
              "| obfuscated family | prompts | mean multiplier | mean per payload char | "
              "min per payload char | >= 3x | main signal |", "|---|---:|---:|---:|---:|---:|---|"]
    for kind, f in report.families.items():
        lines.append(f"| {kind} | {f['n']} | {f['mean']:.2f} | **{f['payload_mean']:.2f}** | "
                     f"{f['payload_min']:.2f} | {f['at_least_3x']:.0%} | {f['signal']} |")
    verdict = "PASS" if report.ok else f"FAIL ({', '.join(report.failing) or 'natural rate'})"
    lines.append(f"\nnatural priced > {NATURAL_BAR}x: {report.natural_rate:.2%} (bar <= 1%); "
                 f"every family >= {FAMILY_BAR}x per payload char: {verdict}")
    return "\n".join(lines)


def feature_table(config: EntropyConfig) -> str:
    """Per-block features on the development sets: natural p99/max against each family."""
    names = ["encoded_frac", "entropy", "distinct_ratio", "uniformity", "pair_novelty",
             "script_switch", "vowel_ratio", "leet_rate", "repeated_shingles"]
    nat: dict[str, list[float]] = defaultdict(list)
    for row in load("natural.jsonl"):
        text = row["text"]
        if len(text) >= config.min_chars:
            f = block_features(text, config)
            for name in names:
                nat[name] += [float(x) for x in f[name] if x > 0]
    lines = ["| block feature (> 0) | natural p99 | natural max | ramp lo -> hi |", "|---|---:|---:|---|"]
    ramps = {"encoded_frac": config.encoded, "entropy": config.ascii_entropy,
             "distinct_ratio": config.distinct, "uniformity": config.uniformity,
             "pair_novelty": config.pair_novelty, "script_switch": config.script_switch,
             "vowel_ratio": config.vowel_ratio, "leet_rate": config.leet,
             "repeated_shingles": config.repetition}
    for name in names:
        vals = sorted(nat[name]) or [0.0]
        r = ramps[name]
        lines.append(f"| {name} | {vals[int(0.99 * (len(vals) - 1))]:.3f} | {vals[-1]:.3f} | "
                     f"{r.lo} -> {r.hi} |")
    return "\n".join(lines)


def speed_samples() -> dict[str, Any]:
    natural = load("natural.jsonl")
    en = " ".join(r["text"] for r in natural if r["lang"] == "en")
    zh = "".join(r["text"] for r in natural if r["lang"] == "zh")
    code = "\n".join(r["text"] for r in natural if r["kind"] == "code")
    rng = random.Random(5)
    b64 = base64.b64encode(rng.randbytes(786_432)).decode()
    mb = 1 << 20

    def grow(text: str, n: int) -> str:
        return (text * (n // len(text) + 1))[:n]

    turns = [("system", grow(en, mb // 4)), ("user", b64[:mb // 4]),
             ("assistant", grow(zh, mb // 4)), ("user", grow(code, mb // 4))]
    return {"English prose, 2 KB": en[:2048], "Chinese prose, 2 KB": zh[:683],
            "code question, 2 KB": code[:2048], "base64, 2 KB": b64[:2048],
            "English prose, 1 MB": grow(en, mb), "Chinese prose, 1 M chars": grow(zh, mb),
            "code, 1 MB": grow(code, mb), "base64, 1 MB": b64[:mb],
            "4-turn conversation, 1 M chars (prose, base64, Chinese, code)": turns}


def scoring_speed(config: EntropyConfig) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"CPU time per score (time.process_time), best of 7; load average {load} on "
             f"{os.cpu_count()} CPUs", "",
             "| prompt | chars | CPU ms per score | multiplier |", "|---|---:|---:|---:|"]
    for name, text in speed_samples().items():
        chars = len(text) if isinstance(text, str) else sum(len(t) for _, t in text)
        n = 200 if chars < 10_000 else 3
        ms = min(timeit.repeat(lambda: score_prompt(text, config), number=n, repeat=7,
                               timer=time.process_time)) / n * 1e3
        lines.append(f"| {name} | {chars} | {ms:.3f} | {score_prompt(text, config).multiplier:g} |")
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
    ap.add_argument("--features", action="store_true", help="per-feature ranges on the dev sets")
    ap.add_argument("--overhead", action="store_true", help="measure admit+settle")
    ap.add_argument("--no-speed", action="store_true", help="skip the scoring-speed table")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("-n", type=int, default=2000, help="admit+settle pairs per store")
    args = ap.parse_args()
    config = EntropyConfig()
    dev = evaluate(load("natural.jsonl"), load("obfuscated.jsonl"), config)
    print(render(dev, "Development sets (tests/data/prompts, where the defaults were set)"),
          end="\n\n")
    if not heldout.available():
        print("held-out sets unavailable: no gettext catalogs under /usr/share/locale")
        return 1
    report, fingerprint, rows = heldout_report(config)
    print(render(report, f"Held-out sets ({rows} prompts, fingerprint {fingerprint})"),
          end="\n\n")
    if args.features:
        print(feature_table(config), end="\n\n")
    if not args.no_speed:
        print(scoring_speed(config), end="\n\n")
    if args.overhead:
        print(asyncio.run(overhead(args.redis_url, args.n)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
