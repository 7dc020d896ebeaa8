"""Held-out prompt sets for entropy pricing, built from sources the defaults never saw.

The defaults in sluice/gateway/pipeline/entropy.py were set on tests/data/prompts
(natural.jsonl, obfuscated.jsonl: hand-written sentences, seed 20240611). These sets are
built by different code, from different text, with a different seed:

- natural: real translations of program messages in every language this machine's
  gettext catalogs hold (/usr/share/locale/*/LC_MESSAGES, ~100 languages, many scripts),
  source code (CPython's standard library, C headers from /usr/include, JavaScript shipped
  with playwright), CPython's CJK codec test texts, prose carrying identifiers (UUIDs,
  hashes, URLs, API-key-like tokens), and multi-turn conversations;
- obfuscated: the same kind of text encoded by every family the pricer claims to catch
  (base64 in four shapes, hex in five, base32 in three, decimal byte codes and big
  integers, random noise from 15 scripts, random ASCII/alphanumerics/words, leetspeak,
  repetition), plus the placements that dodged the old pricer: the payload in an earlier
  turn, deep inside a long prompt, and diluted with natural text.

Nothing is written to the repository (the catalogs' texts keep their own licences); the
sets are rebuilt on each run, deterministically from the machine's files, and
`fingerprint()` names the exact build. `build()` returns (natural, obfuscated) rows:
{"kind", "lang", "text" or "turns", "payload_chars" (obfuscated)}.
"""

from __future__ import annotations

import base64
import gettext
import hashlib
import json
import random
import string
import sys
import uuid
from pathlib import Path

# Not the development sets' seed. 77_031_405 was the draw looked at while the pricer was
# being built (docs/ratelimit.md gives its numbers too); this one was drawn once the code
# was frozen, and its first run is the result reported.
SEED = 20_261_203
LOCALE = Path("/usr/share/locale")
DOMAINS = ("glib20", "gtk30", "Linux-PAM", "coreutils", "grep", "tar", "bash", "dpkg", "apt",
           "libc", "git", "findutils", "sed", "wget", "diffutils")
PY_LIB = Path(gettext.__file__).resolve().parent
CJK = PY_LIB / "test" / "cjkencodings"


def available() -> bool:
    return LOCALE.is_dir() and any(LOCALE.glob("*/LC_MESSAGES/glib20.mo"))


def _messages() -> dict[str, list[str]]:
    """Translated messages per language (untranslated and tiny ones left out)."""
    out: dict[str, list[str]] = {}
    for lang_dir in sorted(LOCALE.iterdir()):
        msgs: list[str] = []
        for domain in DOMAINS:
            mo = lang_dir / "LC_MESSAGES" / f"{domain}.mo"
            if not mo.is_file():
                continue
            try:
                with open(mo, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog  # noqa: SLF001
            except (OSError, UnicodeDecodeError, ValueError, IndexError, KeyError):
                continue
            for key, text in sorted(catalog.items(), key=lambda kv: str(kv[0])):
                msgid = key[0] if isinstance(key, tuple) else key
                if isinstance(text, str) and len(text) >= 16 and text != msgid and msgid:
                    msgs.append(text.strip())
        if len(msgs) >= 40:
            out[lang_dir.name] = msgs
    return out


def _code_files() -> list[Path]:
    files = sorted(PY_LIB.glob("*.py"))[:400]
    files += sorted(Path("/usr/include").glob("*.h"))[:200]
    venv = Path(sys.prefix) / "lib"
    files += sorted(venv.glob("python3*/site-packages/playwright/driver/package/lib/**/*.js"))[:200]
    return [f for f in files if f.is_file() and f.stat().st_size > 400]


LEADS = ["Why does this code behave differently on my laptop and on the server?",
         "Can you review this and point out anything risky?",
         "Explain what this does, line by line, for a new colleague.",
         "I get a crash somewhere in here; where would you start looking?",
         "Please rewrite this to be easier to test.",
         "What would you rename here, and why?"]


def _identifier(rng: random.Random) -> str:
    kind = rng.randrange(8)
    raw = rng.randbytes(32)
    if kind == 0:
        return str(uuid.UUID(bytes=raw[:16]))
    if kind == 1:
        return hashlib.sha1(raw).hexdigest()
    if kind == 2:
        return hashlib.sha256(raw).hexdigest()
    if kind == 3:
        return f"https://example.org/api/v2/items/{rng.randrange(10**6)}?page={rng.randrange(40)}&sort=desc"
    if kind == 4:
        return "sk-" + "".join(rng.choices(string.ascii_letters + string.digits, k=32))
    if kind == 5:
        return ":".join(f"{rng.randrange(65536):x}" for _ in range(8))
    if kind == 6:
        return base64.b64encode(raw[:12]).decode()
    return f"v{rng.randrange(1, 20)}.{rng.randrange(40)}.{rng.randrange(200)}-rc{rng.randrange(9)}"


def natural(rng: random.Random, msgs: dict[str, list[str]]) -> list[dict]:
    rows: list[dict] = []
    for lang, bank in msgs.items():
        for _ in range(6):
            k = rng.randint(1, 5)
            rows.append({"kind": "messages", "lang": lang,
                         "text": rng.choice([" ", "\n"]).join(rng.sample(bank, k))})
        if len(bank) >= 120:
            picked, size = [], 0
            target = rng.randint(4500, 14000)
            for m in rng.sample(bank, len(bank)):
                picked.append(m)
                size += len(m)
                if size >= target:
                    break
            rows.append({"kind": "long", "lang": lang, "text": "\n".join(picked)})
    for path in rng.sample(_code_files(), 160):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        start = rng.randrange(max(1, len(lines) - 10))
        snippet = "\n".join(lines[start:start + rng.randint(10, 150)])[:6000]
        lead = rng.choice(LEADS) if rng.random() < 0.7 else \
            rng.choice(msgs[rng.choice(sorted(msgs))])
        rows.append({"kind": "code", "lang": path.suffix, "text": f"{lead}\n\n{snippet}"})
    for path in sorted(CJK.glob("*-utf8.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for _ in range(4):
            start = rng.randrange(max(1, len(text) - 200))
            rows.append({"kind": "cjk_text", "lang": path.name.split("-")[0],
                         "text": text[start:start + rng.randint(200, 1500)]})
    langs = sorted(msgs)
    for _ in range(80):
        lang = rng.choice(langs)
        text = " ".join(rng.sample(msgs[lang], rng.randint(1, 3)))
        words = text.split(" ")
        words.insert(rng.randrange(len(words) + 1), _identifier(rng))
        rows.append({"kind": "identifiers", "lang": lang, "text": " ".join(words)})
    for _ in range(100):
        lang = rng.choice(langs)
        bank = msgs[lang]
        turns = [["system", " ".join(rng.sample(bank, rng.randint(1, 3)))],
                 ["user", rng.choice(bank)], ["assistant", " ".join(rng.sample(bank, 2))],
                 ["user", rng.choice(bank)]]
        rows.append({"kind": "conversation", "lang": lang, "turns": turns})
    return rows


SCRIPTS = {  # name: code point ranges (random noise from each)
    "cjk": [(0x4E00, 0x9FFF)], "hangul": [(0xAC00, 0xD7A3)], "cyrillic": [(0x430, 0x44F)],
    "greek": [(0x3B1, 0x3C9)], "arabic": [(0x621, 0x64A)], "devanagari": [(0x905, 0x939)],
    "thai": [(0xE01, 0xE2E)], "hebrew": [(0x5D0, 0x5EA)], "ethiopic": [(0x1200, 0x135A)],
    "armenian": [(0x561, 0x586)], "georgian": [(0x10D0, 0x10FA)], "tamil": [(0xB85, 0xBB9)],
    "cjk_ext_b": [(0x20000, 0x2A6DF)], "emoji": [(0x1F300, 0x1F64F)],
    "mixed": [(0x21, 0x7E), (0x400, 0x4FF), (0x600, 0x6FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x900, 0x97F), (0x370, 0x3FF)],
}
WRAPS = ["Decode the following and act on it:\n", "Here is my question, encoded: ",
         "Respond to whatever this says -> ", "Input data follows.\n\n"]


def _noise(rng: random.Random, ranges: list[tuple[int, int]], n: int, spaced: bool) -> str:
    chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(n)]
    if spaced:  # random "words" of 2-8 characters
        i = 0
        while i < len(chars):
            i += rng.randint(2, 8)
            chars.insert(i, " ")
            i += 1
    return "".join(chars)


def _encoders(rng: random.Random) -> dict[str, object]:
    def grouped_hex(b: bytes) -> str:
        h = b.hex()
        size = rng.choice([2, 4, 8])
        sep = rng.choice([" ", "\n", ":", "-"])
        return sep.join(h[i:i + size] for i in range(0, len(h), size))

    def b32_grouped(b: bytes) -> str:
        s = base64.b32encode(b).decode()
        return " ".join(s[i:i + 8] for i in range(0, len(s), 8))

    def b64_lines(b: bytes) -> str:
        s = base64.b64encode(b).decode()
        return "\n".join(s[i:i + 76] for i in range(0, len(s), 76))

    def bigint(b: bytes) -> str:
        s = str(int.from_bytes(b, "big"))
        return s if rng.random() < 0.5 else "\n".join(s[i:i + 60] for i in range(0, len(s), 60))

    return {
        "base64": lambda b: base64.b64encode(b).decode(),
        "base64_lines": b64_lines,
        "base64_url": lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
        "hex": lambda b: b.hex(),
        "hex_upper": lambda b: b.hex().upper(),
        "hex_grouped": grouped_hex,
        "hex_0x": lambda b: ", ".join(f"0x{x:02x}" for x in b),
        "base32": lambda b: base64.b32encode(b).decode(),
        "base32_grouped": b32_grouped,
        "base32_lower": lambda b: base64.b32encode(b).decode().lower().rstrip("="),
        "decimal_codes": lambda b: rng.choice([" ", ", ", ","]).join(str(x) for x in b),
        "decimal_bigint": bigint,
    }


def obfuscated(rng: random.Random, msgs: dict[str, list[str]]) -> list[dict]:
    langs = sorted(msgs)
    english = [m for lang in ("en_GB", "en_AU", "en_CA") for m in msgs.get(lang, [])]

    def payload_text(lo: int, hi: int) -> bytes:
        bank = msgs[rng.choice(langs)]
        out = ""
        target = rng.randint(lo, hi)
        while len(out.encode()) < target:
            out += rng.choice(bank) + " "
        return out.encode()[:target]

    rows: list[dict] = []

    def add(kind: str, text: str, payload: int | None = None, **extra: object) -> None:
        rows.append({"kind": kind, "text": text, "payload_chars": payload or len(text), **extra})

    encoders = _encoders(rng)
    for name, enc in encoders.items():
        for _ in range(25):
            add(name, enc(payload_text(40, 1500)))
    for name in ("base64", "hex_grouped", "base32", "decimal_codes"):
        for _ in range(15):
            p = encoders[name](payload_text(60, 1200))
            add(f"{name}_wrapped", rng.choice(WRAPS) + p, len(p))
    for script, ranges in SCRIPTS.items():
        for _ in range(12):
            spaced = script not in ("cjk", "cjk_ext_b", "emoji") and rng.random() < 0.5
            add(f"noise_{script}", _noise(rng, ranges, rng.randint(150, 2500), spaced))
    printable = string.ascii_letters + string.digits + string.punctuation + " "
    for _ in range(25):
        add("random_ascii", "".join(rng.choices(printable, k=rng.randint(100, 3000))))
        add("random_alnum", "".join(rng.choices(string.ascii_letters + string.digits,
                                                k=rng.randint(100, 3000))))
        add("random_words", " ".join("".join(rng.choices(string.ascii_lowercase,
                                                         k=rng.randint(1, 10)))
                                     for _ in range(rng.randint(30, 400))))
    leet = str.maketrans("aeiostgbAEIOSTGB", "4310579843105798")
    for _ in range(25):
        add("leetspeak", " ".join(rng.sample(english, rng.randint(1, 4))).translate(leet))
    for _ in range(20):
        add("repeat_char", rng.choice("xX.#=-_ 0é中") * rng.randint(100, 5000))
        phrase = rng.choice(english)[:rng.randint(8, 120)]
        add("repeat_phrase", rng.choice([" ", "\n", ". "]).join([phrase] * rng.randint(8, 150)))
    names = ["base64", "hex_grouped", "base32", "decimal_codes", "hex"]
    for _ in range(40):  # the payload in an earlier turn, a harmless last user turn
        name = rng.choice(names)
        p = encoders[name](payload_text(400, 4000))
        bank = msgs[rng.choice(langs)]
        role = rng.choice(["system", "user", "assistant", "tool"])
        turns = [[role, p], ["user", rng.choice(bank)]]
        if rng.random() < 0.5:
            turns.insert(0, ["system", rng.choice(bank)])
        rows.append({"kind": "hidden_in_turn", "turns": turns, "payload_chars": len(p),
                     "family": name})
    for _ in range(30):  # deep inside a long prompt, where the old pricer sampled nothing
        name = rng.choice(names)
        p = encoders[name](payload_text(8000, 20000))
        bank = msgs[rng.choice(langs)]
        lead = "\n".join(rng.sample(bank, 6))
        tail = "\n".join(rng.sample(bank, 6))
        add("hidden_deep", f"{lead}\n{p}\n{tail}", len(p), family=name)
    for _ in range(30):  # chopped and diluted with natural text
        name = rng.choice(names)
        bank = msgs[rng.choice(langs)]
        pieces, payload = [], 0
        for _ in range(rng.randint(6, 20)):
            p = encoders[name](payload_text(150, 400))
            payload += len(p)
            pieces += [p, rng.choice(bank)]
        add("diluted", "\n".join(pieces), payload, family=name)
    return rows


def build() -> tuple[list[dict], list[dict]]:
    msgs = _messages()
    rng = random.Random(SEED)
    return natural(rng, msgs), obfuscated(rng, msgs)


def text_of(row: dict) -> str | list[tuple[str, str]]:
    return row["text"] if "text" in row else [(r, t) for r, t in row["turns"]]


def total_chars(row: dict) -> int:
    return len(row["text"]) if "text" in row else len("\n".join(t for _, t in row["turns"]))


def fingerprint(rows: list[dict]) -> str:
    blob = json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


if __name__ == "__main__":
    nat, obf = build()
    print(f"natural {len(nat)} rows, {len({r['lang'] for r in nat})} languages/sources; "
          f"obfuscated {len(obf)} rows; fingerprint {fingerprint(nat + obf)}")
