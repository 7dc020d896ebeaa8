"""Per-block features and signals of the entropy price: the text is cut into blocks and
every character of every block is counted, vectorised with numpy (O(n), no sampling).
Scoring them into a price is pipeline/entropy.py."""

from __future__ import annotations

import unicodedata

import numpy as np

from sluice.gateway.pipeline.encodings import MASKS, token_features
from sluice.gateway.pipeline.entropy_config import EntropyConfig

# ---------------------------------------------------------------- script tables

_SAME_SCRIPT = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "BOPOMOFO": "CJK", "IDEOGRAPHIC": "CJK",
                "HALFWIDTH": "CJK", "FULLWIDTH": "LATIN", "VEDIC": "DEVANAGARI"}
_NEUTRAL_WORDS = {"COMBINING", "MODIFIER", "VARIATION", "SUPERSCRIPT", "SUBSCRIPT"}
ASTRAL = 0xFFFF  # script id of characters beyond the BMP (emoji, rare CJK): one system


def _script_table() -> np.ndarray:
    """Writing system of each BMP letter (Unicode categories L and M, named by the first
    word of the character's name, kana with kanji); 0 for everything else."""
    ids: dict[str, int] = {"LATIN": 1}
    table = np.zeros(0x10000, np.uint16)
    for cp in range(0x10000):
        ch = chr(cp)
        if unicodedata.category(ch)[0] not in "LM":
            continue
        word = unicodedata.name(ch, "").split(" ", 1)[0]
        if not word or word in _NEUTRAL_WORDS:
            continue
        word = _SAME_SCRIPT.get(word, word)
        table[cp] = ids.setdefault(word, len(ids) + 1)
    return table


def _char_info(scripts: np.ndarray) -> np.ndarray:
    """One lookup per BMP character: script id (bits 0-7), accented Latin letter (bit 8),
    its ASCII value or 127 for any non-ASCII character (bits 16-23)."""
    assert scripts.max() < 256
    cp = np.arange(0x10000, dtype=np.uint32)
    accented = (scripts == 1) & (cp >= 0xC0) & (cp < 0xFF00)
    return scripts.astype(np.uint32) | (accented.astype(np.uint32) << 8) | \
        (np.minimum(cp, 127) << 16)


_CHAR_INFO = _char_info(_script_table())
_C_LOG_C = np.arange(4096) * np.log2(np.maximum(np.arange(4096), 1))  # c log2 c


def block_signals(text: str, config: EntropyConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(block sizes, {signal: per-block value in [0, 1]}) for the whole of `text`."""
    f = block_features(text, config)
    sizes = f["chars"]
    sig = {
        "encoded": config.encoded(f["encoded_frac"]),
        "ascii_entropy": np.where(f["nonascii"] == 0, config.ascii_entropy(f["entropy"]), 0.0),
        "distinct": config.distinct(f["distinct_ratio"]),
        "uniformity": config.uniformity(f["uniformity"]),
        "pair_novelty": config.pair_novelty(f["pair_novelty"]),
        "script_switch": config.script_switch(f["script_switch"]),
        "leet": config.leet(f["leet_rate"]),
        "low_entropy": config.low_entropy(f["entropy"]),
        "repetition": np.where(sizes >= config.min_chars_for_repetition,
                               config.repetition(f["repeated_shingles"]), 0.0),
    }
    vowels_apply = ((f["letters"] >= config.min_letters_for_vowels)
                    & (f["letters"] >= config.min_letter_share_for_vowels * sizes)
                    & (f["avg_word_len"] <= config.max_avg_word_len_for_vowels))
    sig["vowel_ratio"] = np.where(vowels_apply, config.vowel_ratio(f["vowel_ratio"]), 0.0)
    return sizes, sig


def block_features(text: str, config: EntropyConfig) -> dict[str, np.ndarray]:
    """Per-block features of `text` (each an array with one value per block).

    Cheap passes first: one histogram per block over ASCII values (non-ASCII counted
    together) gives entropy, letters, vowels, digits and spaces. The token-level scans
    (encodings, leetspeak) run only on blocks with >= 2% digits, which every encoding
    family and leetspeak has; non-ASCII statistics only when there is non-ASCII text."""
    n = len(text)
    w = config.block_chars
    nb = max(1, n // w)
    head = (nb - 1) * w  # blocks 0 .. nb-2 are [i*w, (i+1)*w); the last is [head, n)
    sizes = np.full(nb, w, np.int64)
    sizes[-1] = n - head
    if text.isascii():
        cps = None
        v = np.frombuffer(text.encode("ascii"), np.uint8)
    else:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        astral = bool(cps.max() > 0xFFFF)
        folded = ((cps & 0xFFFF) ^ ((cps >> 16) * 0x3C6F)).astype(np.uint16) if astral \
            else cps.astype(np.uint16)
        info = _CHAR_INFO[folded]
        v = (info >> 16).astype(np.uint8)
        if astral:
            v[cps > 0xFFFF] = 127
    hist = _histograms(v, nb, w, head)
    letters, vowels, digits, spaces = (hist @ MASKS).T
    nonascii = hist[:, 127]
    words = np.maximum(spaces, 1)
    encoded, leet = np.zeros(nb), np.zeros(nb)
    candidates = np.flatnonzero(digits * 50 >= sizes)
    if len(candidates):
        encoded, leet = token_features(v, candidates, sizes, w, config)
    f: dict[str, np.ndarray] = {
        "chars": sizes.astype(np.float64),
        "nonascii": nonascii,
        "entropy": _entropy_rows(hist, sizes),
        "encoded_frac": np.maximum(encoded - config.encoded_allowance_chars, 0) / sizes,
        "leet_rate": leet / words,
        "avg_word_len": (sizes - spaces) / words,
        "script_switch": np.zeros(nb),
        "distinct_ratio": np.zeros(nb),
        "uniformity": np.zeros(nb),
        "pair_novelty": np.zeros(nb),
    }
    latin = np.zeros(nb, np.int64)
    if cps is None:
        f["repeated_shingles"] = _repeated_shingles(v, np.uint32, sizes, w)
    else:
        # Script statistics only where there is non-ASCII text (one pass over those blocks).
        sel = np.flatnonzero(nonascii > 0)
        sub = _script_features(_blocks_of(folded, sel, sizes, w), _blocks_of(info, sel, sizes, w),
                               _blocks_of(cps, sel, sizes, w) if astral else None, sizes[sel], w,
                               max(config.low_entropy.lo, config.low_entropy.hi))
        latin[sel] = sub["latin"]
        f["script_switch"][sel] = sub["switch"]
        count, distinct, ent = sub["count"], sub["distinct"], sub["entropy"]
        mostly = (nonascii[sel] * 2 >= sizes[sel]) & (count >= config.min_letters_for_distinct)
        f["entropy"][sel] = np.where(count >= 16, np.maximum(ent, f["entropy"][sel]),
                                     f["entropy"][sel])
        f["distinct_ratio"][sel] = np.where(mostly, distinct / np.maximum(count, 1), 0.0)
        # Uniformity needs every letter seen a few times: small alphabets only (large
        # ones are the distinct ratio's).
        f["uniformity"][sel] = np.where(mostly & (count >= 4 * distinct),
                                        ent / np.log2(np.maximum(distinct, 2)), 0.0)
        n_pairs, new_pairs = sub["pairs"], sub["new_pairs"]
        f["pair_novelty"][sel] = np.where(mostly & (distinct > 64) & (n_pairs >= 64),
                                          new_pairs / np.maximum(n_pairs, 1), 0.0)
        f["repeated_shingles"] = _repeated_shingles(folded, np.uint64, sizes, w)
    f["letters"] = (letters + latin).astype(np.float64)
    f["vowel_ratio"] = (vowels + latin) / np.maximum(letters + latin, 1)
    return f


def _histograms(v: np.ndarray, nb: int, w: int, head: int) -> np.ndarray:
    """(nb, 128) counts of each ASCII value (127: any non-ASCII) per block. Indexes are
    built in 16 bits, 512 blocks at a time (512 x 128 = 2**16): half the memory traffic
    of 64-bit ones."""
    rows = v[:head].reshape(nb - 1, w)
    tag = np.arange(512, dtype=np.uint16) << np.uint16(7)
    parts = []
    for c in range(0, nb - 1, 512):
        chunk = rows[c:c + 512].astype(np.uint16)
        chunk |= tag[:len(chunk), None]
        parts.append(np.bincount(chunk.ravel(), minlength=len(chunk) * 128))
    parts.append(np.bincount(v[head:], minlength=128))
    return np.concatenate(parts).reshape(nb, 128)


def _blocks_of(x: np.ndarray, sel: np.ndarray, sizes: np.ndarray, w: int) -> np.ndarray:
    """The blocks `sel` of `x`, one after another (all when `sel` is every block)."""
    if len(sel) == len(sizes):
        return x
    first = np.concatenate([[0], np.flatnonzero(np.diff(sel) > 1) + 1])  # run starts
    starts = (sel[first] * w).tolist()
    ends = (starts + np.add.reduceat(sizes[sel], first)).tolist()
    return np.concatenate([x[a:b] for a, b in zip(starts, ends)])


def _script_features(folded: np.ndarray, info: np.ndarray, cps: np.ndarray | None,
                     sizes: np.ndarray, w: int, entropy_floor: float) -> dict[str, np.ndarray]:
    """Per block (of these blocks): accented Latin letters, script switches, letters,
    distinct letters, letter entropy, letter pairs and distinct letter pairs."""
    scripts = (info & 0xFF).astype(np.uint16)
    if cps is not None:  # there are characters beyond the BMP
        scripts[cps > 0xFFFF] = ASTRAL
    nb = len(sizes)
    # Accented Latin letters are mostly vowels (Vietnamese, French): count them as such.
    accented = np.flatnonzero(info & 0x100)
    out = {"latin": np.bincount(np.minimum(accented // w, nb - 1), minlength=nb),
           "switch": _script_switches(scripts, sizes, w)}
    letter = scripts > 0
    out["count"], out["distinct"], out["entropy"] = _letter_rows(
        np.where(letter, folded, 0), sizes, w, entropy_floor)
    # Medium and large alphabets: natural text repeats letter pairs (words, common
    # syllables), uniform noise almost never does.
    pairs = np.zeros(len(folded), np.uint16)  # 0: not a pair of letters
    pairs[1:] = (folded[:-1] * np.uint16(40503)) ^ folded[1:]
    pairs[1:] |= 1  # never 0 for a pair ...
    pairs[1:] *= letter[1:] & letter[:-1]  # ... and 0 for the rest
    out["pairs"], out["new_pairs"] = _distinct_rows(pairs, sizes, w)
    return out


def _entropy_rows(hist: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Entropy (bits/char) from counts: log2(size) - sum(c log2 c) / size."""
    c_log_c = _C_LOG_C[np.minimum(hist, len(_C_LOG_C) - 1)].sum(axis=1)
    return np.maximum(np.log2(sizes) - c_log_c / sizes, 0.0)


def _script_switches(scripts: np.ndarray, sizes: np.ndarray, w: int) -> np.ndarray:
    """Per block: changes of writing system between adjacent letters, per adjacent pair
    of letters (neutral characters such as spaces and punctuation break pairs)."""
    letter = scripts != 0
    pair = np.zeros(len(scripts), bool)
    pair[1:] = letter[1:] & letter[:-1]
    switch = np.zeros(len(scripts), bool)
    switch[1:] = pair[1:] & (scripts[1:] != scripts[:-1])
    pairs = np.concatenate([g.sum(axis=1) for g in _row_groups(pair, sizes, w) if g.size])
    switches = np.concatenate([g.sum(axis=1) for g in _row_groups(switch, sizes, w)
                               if g.size])
    return switches / np.maximum(pairs, 1)


def _row_groups(x: np.ndarray, sizes: np.ndarray, w: int) -> list[np.ndarray]:
    """Full blocks as a (nb - 1, w) array, and the last block as a (1, size) array."""
    head = len(x) - int(sizes[-1])
    return [x[:head].reshape(-1, w), x[head:][None, :]]


def _distinct_rows(x: np.ndarray, sizes: np.ndarray, w: int) -> tuple[np.ndarray,
                                                                     np.ndarray]:
    """Per block: non-zero values and distinct non-zero values."""
    count, distinct = [], []
    for rows in _row_groups(x, sizes, w):
        if rows.size == 0:
            continue
        rows = np.sort(rows, axis=1, kind="stable")
        count.append(np.count_nonzero(rows, axis=1))
        new = rows[:, 1:] != rows[:, :-1]
        distinct.append(np.count_nonzero(new, axis=1) + (rows[:, 0] != 0))
    return np.concatenate(count), np.concatenate(distinct).astype(np.float64)


def _letter_rows(letters: np.ndarray, sizes: np.ndarray, w: int,
                 entropy_floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: letters, distinct letters and the letters' entropy (bits/letter), from
    sorted rows of (folded) code points where 0 stands for a non-letter.

    The exact entropy is computed only where it can matter: where uniformity applies
    (letters >= 4 x distinct) or where its lower bound, (distinct - 1) / letters x
    log2(letters), is under `entropy_floor` (the low-entropy signal's edge). Elsewhere the
    bound stands in: both signals read 0 from either value."""
    total, distinct, ent = [], [], []
    for rows in _row_groups(letters, sizes, w):
        if rows.size == 0:
            continue
        rows = np.sort(rows, axis=1, kind="stable")  # radix sort for 16-bit values
        n_letters = np.count_nonzero(rows, axis=1)
        d = np.count_nonzero(rows[:, 1:] != rows[:, :-1], axis=1) + (rows[:, 0] != 0)
        safe = np.maximum(n_letters, 1)
        e = (d - 1).clip(0) / safe * np.log2(safe)  # the lower bound
        need = np.flatnonzero((n_letters >= 4 * d) | (e < entropy_floor))
        if len(need):
            e[need] = _run_entropy(rows[need], safe[need])
        total.append(n_letters)
        distinct.append(d)
        ent.append(e)
    return (np.concatenate(total), np.concatenate(distinct).astype(np.float64),
            np.concatenate(ent))


def _run_entropy(rows: np.ndarray, n_letters: np.ndarray) -> np.ndarray:
    """Entropy of the non-zero values of each sorted row, from its runs of equal values."""
    m = rows.shape[1]
    new = np.ones(rows.shape, bool)
    new[:, 1:] = rows[:, 1:] != rows[:, :-1]
    new &= rows != 0
    starts = np.flatnonzero(new.ravel())
    row_ends = np.searchsorted(starts, np.arange(1, len(rows) + 1) * m)
    nxt = np.append(starts[1:], 0)
    has = row_ends > np.concatenate([[0], row_ends[:-1]])  # rows with letters
    nxt[row_ends[has] - 1] = (np.flatnonzero(has) + 1) * m
    counts = nxt - starts  # runs of one letter (non-letters sort first, so never inside)
    row_of = starts // m
    return np.log2(n_letters) - np.bincount(row_of, counts * np.log2(counts),
                                            minlength=len(rows)) / n_letters


def _repeated_shingles(chars: np.ndarray, word: type, sizes: np.ndarray,
                       w: int) -> np.ndarray:
    """Per block: share of the 4-character shingles starting at multiples of 4 that
    occur earlier in the block. A phrase repeated with period p repeats its shingles
    within 4 periods whatever p mod 4 is, so this sees repetition without hashing every
    position: four characters are one machine word (`word`), read in place."""
    quads = chars[:len(chars) // 4 * 4].view(word)
    if word is np.uint32:
        h = ((quads * np.uint32(0x9E3779B1)) >> np.uint32(16)).astype(np.uint16)
    else:
        h = ((quads * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(48)).astype(np.uint16)
    q = w // 4
    groups = [h[:(len(sizes) - 1) * q].reshape(-1, q), h[(len(sizes) - 1) * q:][None, :]]
    out = []
    for rows in groups:
        if rows.shape[0] == 0:
            continue
        if rows.shape[1] < 2:
            out.append(np.zeros(rows.shape[0]))
            continue
        rows = np.sort(rows, axis=1, kind="stable")
        repeats = np.count_nonzero(rows[:, 1:] == rows[:, :-1], axis=1)
        out.append(repeats / rows.shape[1])
    return np.concatenate(out)
