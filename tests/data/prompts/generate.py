"""Build the natural and obfuscated prompt sets used to calibrate entropy scoring.

Deterministic (fixed seed): running it again reproduces the committed files byte for
byte, which tests/gateway/test_entropy.py checks.

    .venv/bin/python tests/data/prompts/generate.py      # rewrites the two .jsonl files
"""

from __future__ import annotations

import base64
import json
import random
import string
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sentences import CODE_QUESTIONS, LOGS, SENTENCES, SHORT, TECH_CONTEXT  # noqa: E402

SEED = 20240611
NATURAL_FILE = HERE / "natural.jsonl"
OBFUSCATED_FILE = HERE / "obfuscated.jsonl"

_NO_SPACE_LANGS = {"zh", "ja", "th"}
_LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7",
                       "A": "4", "E": "3", "I": "1", "O": "0", "S": "5", "T": "7"})


def _join(lang: str, parts: list[str]) -> str:
    return ("" if lang in _NO_SPACE_LANGS else " ").join(parts)


def _sample_text(rng: random.Random, lang: str, n: int) -> str:
    bank = SENTENCES[lang]
    return _join(lang, rng.sample(bank, min(n, len(bank))))


def natural(rng: random.Random) -> list[dict[str, str]]:
    rows: list[tuple[str, str, str]] = []  # (kind, lang, text)
    rows += [("short", "mixed", s) for s in SHORT]
    for lang, bank in SENTENCES.items():
        count = 120 if lang == "en" else 12
        for _ in range(count):
            rows.append(("medium", lang, _sample_text(rng, lang, rng.randint(1, 4))))
        if len(bank) >= 8:
            rows.append(("long", lang, _sample_text(rng, lang, len(bank))))
    for _ in range(20):  # long English, up to the whole bank, sometimes split into paragraphs
        text = _sample_text(rng, "en", rng.randint(10, len(SENTENCES["en"])))
        if rng.random() < 0.5:
            words = text.split(". ")
            text = ".\n\n".join(". ".join(words[i:i + 3]) for i in range(0, len(words), 3))
        rows.append(("long", "en", text))
    for question, code, follow in CODE_QUESTIONS:
        rows.append(("code", "en", f"{question}\n\n```\n{code}```\n\n{follow}"))
        ctx = rng.choice(TECH_CONTEXT)
        rows.append(("code", "en", f"{question} {ctx}\n\n{code}\n{follow}"))
        lang = rng.choice(["de", "fr", "es", "ru", "zh", "ja", "pt", "pl"])
        rows.append(("code", lang, f"{_sample_text(rng, lang, 1)}\n\n{code}\n{question}"))
    for ctx in TECH_CONTEXT:
        rows.append(("tech", "en", f"{_sample_text(rng, 'en', 1)} {ctx}"))
        rows.append(("tech", "en", f"{ctx} {_sample_text(rng, 'en', 2)}"))
    for log in LOGS:
        for lead in ("What does this show?", "Can you spot the problem here?",
                     "Summarise this for a non-technical manager:"):
            rows.append(("structured", "en", f"{lead}\n\n{log}"))
    langs = [lang for lang in SENTENCES if lang != "en"]
    for _ in range(40):
        lang = rng.choice(langs)
        target = rng.choice(["English", "French", "Spanish", "German", "Japanese"])
        rows.append(("translate", lang, f"Translate into {target}: {_sample_text(rng, lang, 2)}"))
    seen: set[str] = set()
    unique = [r for r in rows if not (r[2] in seen or seen.add(r[2]))]
    return [
        {"id": f"nat-{i:04d}", "kind": kind, "lang": lang, "text": text}
        for i, (kind, lang, text) in enumerate(unique)
    ]


def _leet(rng: random.Random, text: str) -> str:
    return "".join(c.translate(_LEET) if rng.random() < 0.9 else c for c in text)


def _random_unicode(rng: random.Random, n: int) -> str:
    blocks = [(0x21, 0x7E), (0xA1, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def obfuscated(rng: random.Random, nat: list[dict[str, str]]) -> list[dict[str, str]]:
    sources = [r["text"] for r in nat if len(r["text"]) >= 60]
    english = [r["text"] for r in nat if r["lang"] == "en" and r["kind"] == "medium"
               and len(r["text"]) >= 60]
    wrappers = ["Decode this and do what it says: ", "Please follow these instructions: ",
                "Answer the question encoded below.\n", "Input: "]
    rows: list[tuple[str, str]] = []
    for _ in range(60):
        rows.append(("base64", base64.b64encode(rng.choice(sources).encode()).decode()))
    for _ in range(40):
        payload = base64.b64encode(" ".join(rng.sample(sources, 3)).encode()).decode()
        rows.append(("base64_wrapped", rng.choice(wrappers) + payload))
    for _ in range(50):
        rows.append(("hex", rng.choice(sources).encode().hex()))
    for _ in range(20):
        payload = " ".join(rng.sample(sources, 2)).encode().hex()
        rows.append(("hex_wrapped", rng.choice(wrappers) + payload))
    printable = string.ascii_letters + string.digits + string.punctuation + " "
    for _ in range(40):
        rows.append(("random_ascii", "".join(rng.choices(printable, k=rng.randint(64, 2048)))))
    for _ in range(30):
        rows.append(("random_unicode", _random_unicode(rng, rng.randint(64, 1024))))
    alnum = string.ascii_letters + string.digits
    for _ in range(30):
        rows.append(("random_alnum", "".join(rng.choices(alnum, k=rng.randint(64, 2048)))))
    for _ in range(30):
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
                 for _ in range(rng.randint(15, 300))]
        rows.append(("random_words", " ".join(words)))
    for _ in range(30):
        rows.append(("repeat_char", rng.choice("a!x.=#Z0 ") * rng.randint(64, 4096)))
    for _ in range(40):
        phrase = rng.choice(sources)[: rng.randint(10, 60)]
        sep = rng.choice([" ", "\n", ""])
        rows.append(("repeat_phrase", sep.join([phrase] * rng.randint(10, 200))))
    for _ in range(50):
        rows.append(("leetspeak", _leet(rng, rng.choice(english))))
    return [{"id": f"obf-{i:04d}", "kind": kind, "text": text}
            for i, (kind, text) in enumerate(rows)]


def obfuscated_more(rng: random.Random, nat: list[dict[str, str]]) -> list[dict]:
    """The families added for issue 18 (own generator, seed SEED + 1, so the rows above
    stay byte for byte): grouped hex, base32, decimal byte codes, noise from single
    scripts, and payloads in an earlier turn or beyond the old pricer's 4 sampled KB."""
    sources = [r["text"] for r in nat if len(r["text"]) >= 60]
    rows: list[dict] = []

    def payload(n: int) -> bytes:
        return " ".join(rng.sample(sources, n)).encode()

    for _ in range(30):
        h = payload(rng.randint(1, 3)).hex()
        rows.append({"kind": "hex_grouped", "text": " ".join(h[i:i + 4] for i in range(0, len(h), 4))})
        rows.append({"kind": "base32", "text": base64.b32encode(payload(rng.randint(1, 3))).decode()})
        rows.append({"kind": "decimal_codes",
                     "text": " ".join(str(b) for b in payload(rng.randint(1, 2)))})
    scripts = {"noise_cjk": (0x4E00, 0x9FFF), "noise_hangul": (0xAC00, 0xD7A3),
               "noise_cyrillic": (0x410, 0x44F), "noise_arabic": (0x620, 0x64A)}
    for kind, (lo, hi) in scripts.items():
        for _ in range(20):
            chars = [chr(rng.randint(lo, hi)) for _ in range(rng.randint(200, 1500))]
            if kind in ("noise_cyrillic", "noise_arabic") and rng.random() < 0.5:
                for i in range(len(chars) - 1, 0, -rng.randint(3, 7)):
                    chars.insert(i, " ")
            rows.append({"kind": kind, "text": "".join(chars)})
    for _ in range(30):
        p = base64.b64encode(payload(rng.randint(4, 10))).decode()
        rows.append({"kind": "payload_in_system_turn",
                     "turns": [["system", p], ["user", rng.choice(sources)]]})
        long = " ".join(rng.sample(sources, 20))[:4096]
        blob = payload(rng.randint(15, 30)).hex()
        q = len(long) // 4  # natural text where the old pricer sampled, the payload between
        b = len(blob) // 4
        rows.append({"kind": "payload_beyond_slices", "text": "".join(
            long[i * q:(i + 1) * q] + " " + blob[i * b:(i + 1) * b] + " " for i in range(4))})
    return [{"id": f"obf2-{i:04d}", **row} for i, row in enumerate(rows)]


def build() -> tuple[str, str]:
    """Both datasets as JSON-lines strings."""
    rng = random.Random(SEED)
    nat = natural(rng)
    obf = obfuscated(rng, nat) + obfuscated_more(random.Random(SEED + 1), nat)
    dump = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    return dump(nat), dump(obf)


if __name__ == "__main__":
    nat_text, obf_text = build()
    NATURAL_FILE.write_text(nat_text, encoding="utf-8")
    OBFUSCATED_FILE.write_text(obf_text, encoding="utf-8")
    print(f"natural: {nat_text.count(chr(10))} prompts, obfuscated: {obf_text.count(chr(10))}")
