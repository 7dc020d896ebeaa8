"""Encoded payloads and leetspeak, found token by token (the `encoded` and `leet` signals
of pipeline/entropy.py).

A token is a run of non-whitespace. Per token, one pass each of `bitwise_or.reduceat`
(which character classes occur) and `add.reduceat` over packed per-character counts
(digits, letters, vowels; non-space length, punctuation, upper/lower/digit changes) gives
everything the rules need:

- base64: a token of >= 16 characters with upper, lower and digits, >= 0.35 class changes
  per character and no punctuation inside (so JWTs, URLs and dotted names are not);
- hex / base32 / decimal: a run of consecutive tokens that are all hex (`0x` prefixes and
  `:`/`-`/`,` separators allowed), all base32 (one case, digits 2-7) or all digits, whose
  composition is that of encoded data (hex: >= 25% digits; base32: >= 1/12 digits 2-7 and
  <= 30% vowels; decimal: >= 32 digits), the separators counted with it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ScanThresholds(Protocol):
    """What the scan reads of :class:`~sluice.gateway.pipeline.entropy.EntropyConfig` (a
    protocol: entropy.py imports this module, so this one must not import it back)."""

    @property
    def base64_min_chars(self) -> int: ...
    @property
    def base64_min_switch_rate(self) -> float: ...
    @property
    def run_min_alnum(self) -> int: ...
    @property
    def decimal_min_digits(self) -> int: ...

# ---------------------------------------------------------------- character tables
# Per-character values come from 128-entry tables indexed by min(code point, 127); 127
# (DEL, never in text) stands for every non-ASCII character.

_WS, _DIG, _DIG0189, _UPPER, _LOWER, _NOTHEX, _SEP, _PUNCT, _OTHER = (1 << i for i in range(9))
_F = 21  # bits per packed count field; segments are cut to < 2**20 characters


def _ascii(chars: str) -> np.ndarray:
    return np.frombuffer(chars.encode(), np.uint8)


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    bits = np.full(128, _OTHER, np.uint16)
    bits[_ascii(" \t\n\r\x0b\x0c")] = _WS
    bits[_ascii("0123456789")] = _DIG
    bits[_ascii("0189")] |= _DIG0189
    bits[_ascii("ABCDEFGHIJKLMNOPQRSTUVWXYZ")] = _UPPER
    bits[_ascii("abcdefghijklmnopqrstuvwxyz")] = _LOWER
    bits[_ascii("ghijklmnopqrstuvwyzGHIJKLMNOPQRSTUVWYZ")] |= _NOTHEX  # x: 0x prefixes
    bits[_ascii("+/=_-")] = _SEP  # base64 symbols, hyphens
    bits[_ascii(".,:;()[]{}\"'`")] = _PUNCT
    group = np.full(128, 3, np.uint8)  # upper, lower, digit, other: class changes
    group[_ascii("ABCDEFGHIJKLMNOPQRSTUVWXYZ")] = 0
    group[_ascii("abcdefghijklmnopqrstuvwxyz")] = 1
    group[_ascii("0123456789")] = 2
    packed = np.zeros(128, np.int64)  # digits | letters << F | vowels << 2F
    packed[_ascii("0123456789")] = 1
    packed[_ascii("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")] = 1 << _F
    packed[_ascii("aeiouAEIOU")] += 1 << (2 * _F)
    # Mask over the 128 values: ASCII letters, vowels (y too: it is a vowel in most
    # Latin-script languages), digits, whitespace.
    masks = np.zeros((128, 4), np.int64)
    masks[_ascii("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"), 0] = 1
    masks[_ascii("aeiouyAEIOUY"), 1] = 1
    masks[_ascii("0123456789"), 2] = 1
    masks[_ascii(" \t\n\r\x0b\x0c"), 3] = 1
    return bits, group, packed, masks


def _segment_table(bits: np.ndarray) -> np.ndarray:
    """Per character: non-space << F | punctuation << 2F (class changes are added)."""
    return (((bits & _WS) == 0).astype(np.int64) << _F) | \
        (((bits & _PUNCT) > 0).astype(np.int64) << (2 * _F))


_BITS, _GROUP, _PACKED, MASKS = _tables()
_SEGMENT = _segment_table(_BITS)
_IS_HEX_LETTER = np.zeros(128, bool)
_IS_HEX_LETTER[_ascii("abcdefABCDEF")] = True


def token_features(v: np.ndarray, candidates: np.ndarray, sizes: np.ndarray, w: int,
                    config: ScanThresholds) -> tuple[np.ndarray, np.ndarray]:
    """Per block: characters in encoded spans and leetspeak hits, scanning the candidate
    blocks in one pass (runs of consecutive candidate blocks kept apart by a space)."""
    nb = len(sizes)
    encoded, leet = np.zeros(nb), np.zeros(nb)
    first = np.concatenate([[0], np.flatnonzero(np.diff(candidates) > 1) + 1])  # run starts
    starts = (candidates[first] * w).tolist()
    ends = (starts + np.add.reduceat(sizes[candidates], first)).tolist()
    space = np.full(1, 32, np.uint8)
    text = np.concatenate([piece for a, b in zip(starts, ends) for piece in (v[a:b], space)])
    # Where each candidate block starts in `text` (one separator after each run).
    run_of = np.cumsum(np.isin(np.arange(len(candidates)), first)) - 1
    offsets = np.concatenate([[0], np.cumsum(sizes[candidates])[:-1]]) + run_of
    enc_mask, leet_pos = _scan_tokens(text, config)
    if enc_mask is not None:
        encoded[candidates] = np.add.reduceat(enc_mask.view(np.uint8), offsets, dtype=np.int64)
    if len(leet_pos):
        block = np.searchsorted(offsets, leet_pos, side="right") - 1
        leet[candidates] = np.bincount(block, minlength=len(candidates))
    return encoded, leet


def _scan_tokens(v: np.ndarray, config: ScanThresholds) -> tuple[np.ndarray | None,
                                                                 np.ndarray]:
    """A mask over `v` of characters inside encoded spans (see the module docstring; None:
    none at all) and the positions of leetspeak hits inside tokens shorter than
    `base64_min_chars`."""
    n = len(v)
    bits = _BITS[v]
    nonspace = (bits & _WS) == 0
    start = nonspace.copy()
    start[1:] &= ~nonspace[:-1]
    start[::1 << (_F - 2)] = True  # cut longer segments: every packed count stays < 2**20
    starts = np.flatnonzero(start)
    g = _GROUP[v]
    leet_pos = _leet_hits(v, g)
    tbits = np.bitwise_or.reduceat(bits, starts)
    mask = (1 << _F) - 1
    packed = np.add.reduceat(_PACKED[v], starts)
    tdig, tlet, tvow = packed & mask, (packed >> _F) & mask, (packed >> 2 * _F) & mask
    # Per segment (a token and the whitespace after it): upper/lower/digit changes,
    # non-space length, and punctuation inside the token (edges excluded).
    per_char = _SEGMENT[v]  # non-space << F | punctuation << 2F
    per_char[1:] += (g[1:] != g[:-1]) & (g[1:] < 3) & (g[:-1] < 3)
    seg = np.add.reduceat(per_char, starts)
    tchg, tlen, tpunct = seg & mask, (seg >> _F) & mask, (seg >> 2 * _F) & mask
    ends = starts + np.maximum(tlen, 1)  # end of each token's non-space part
    edge_punct = ((bits[starts] & _PUNCT) > 0).astype(np.int64) + \
        ((bits[ends - 1] & _PUNCT) > 0) * (tlen > 1)
    alnum = tdig + tlet
    has = lambda b: (tbits & b) > 0  # noqa: E731
    b64 = ~has(_OTHER) & (tpunct == edge_punct) & has(_UPPER) & has(_LOWER) & has(_DIG) \
        & (tlen >= config.base64_min_chars) & (tchg >= config.base64_min_switch_rate * tlen)
    hexish = ~has(_NOTHEX | _OTHER) & (alnum > 0)
    b32ish = ~has(_DIG0189 | _OTHER) & ~(has(_UPPER) & has(_LOWER)) & (alnum > 0)
    decish = ~has(_UPPER | _LOWER | _OTHER) & (tdig > 0)
    cum = lambda x: np.concatenate([[0], np.cumsum(x)])  # noqa: E731
    c_dig, c_let, c_vow, c_aln = cum(tdig), cum(tlet), cum(tvow), cum(alnum)
    runs = np.zeros(len(starts) + 1, np.int64)
    for fam in (hexish, b32ish, decish):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], fam.astype(np.int8), [0]])))
        a, b = edges[0::2], edges[1::2]  # runs of tokens [a, b)
        dig, let, vow, aln = (c[b] - c[a] for c in (c_dig, c_let, c_vow, c_aln))
        if fam is hexish:  # random bytes: 62% digits; ASCII text's bytes: ~10% letters
            ok = (aln >= config.run_min_alnum) & (dig * 4 >= aln) & (let * 32 >= aln)
        elif fam is b32ish:  # random base32: 19% digits 2-7, letters with 19% vowels
            ok = (aln >= config.run_min_alnum) & (dig * 12 >= aln) & (let * 2 >= aln) \
                & (vow * 10 <= let * 3)
        else:
            ok = dig >= config.decimal_min_digits
        np.add.at(runs, a[ok], 1)
        np.add.at(runs, b[ok], -1)
    enc = b64 | (np.cumsum(runs[:-1]) > 0)
    if len(leet_pos):  # only inside tokens shorter than base64_min_chars
        token = np.searchsorted(starts, leet_pos, side="right") - 1
        leet_pos = leet_pos[tlen[token] < config.base64_min_chars]
    if not enc.any():
        return None, leet_pos
    seg_end = np.append(starts[1:], n)
    marks = np.zeros(n + 1, np.int8)
    np.add.at(marks, starts[enc], 1)
    np.add.at(marks, seg_end[enc], -1)
    return np.cumsum(marks[:-1], dtype=np.int8) > 0, leet_pos


def _leet_hits(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Positions of digit runs of 1-2 with a letter on both sides (h0w, m4k3, l33t), not
    where both sides are hex letters (3f9a2c): checked around each digit only."""
    d = np.flatnonzero(g[1:-1] == 2) + 1  # digits with a character on both sides
    if len(d) == 0:
        return d
    letter = (g < 2)
    hexl = _IS_HEX_LETTER[v[np.concatenate([d - 1, d + 1, np.minimum(d + 2, len(v) - 1)])]]
    before, after, after2 = hexl[:len(d)], hexl[len(d):2 * len(d)], hexl[2 * len(d):]
    one = letter[d - 1] & letter[d + 1] & ~(before & after)
    two = (d + 2 < len(v)) & (g[d + 1] == 2) & letter[d - 1] \
        & letter[np.minimum(d + 2, len(v) - 1)] & ~(before & after2)
    return d[one | two]
