"""Does a CPU-heavy call release the GIL? (Why the gateway's worker pool is threads.)

    .venv/bin/python tests/reliability/gil_release.py

For each call, a second thread sleeps 1 ms in a loop while the call runs on the main
thread; the longest gap between its wake-ups is how long the call held the GIL (plus the
machine's own scheduling noise, which the ``sleep`` row shows). A call that holds the GIL
for its whole duration shows a gap close to its own duration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def longest_gap(call: Callable[[], object]) -> tuple[float, float]:
    """(seconds the call took, longest gap seen by another thread, seconds)."""
    stop = threading.Event()
    gaps: list[float] = []

    def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.05)
    started = time.perf_counter()
    call()
    took = time.perf_counter() - started
    stop.set()
    thread.join()
    return took, max(gaps)


def main() -> None:
    import argon2
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    from sluice.plugins._tokenizer import MixtralTokenizer

    text = ("The quick brown fox jumps over the lazy dog. " * 22_000)[:1_000_000]
    sp = MixtralTokenizer()
    hasher = argon2.PasswordHasher()
    stored = hasher.hash("a-long-password-1")
    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator([text[:2000]] * 10, BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))

    def argon_x5() -> None:
        for _ in range(5):
            try:
                hasher.verify(stored, "wrong-password")
            except argon2.exceptions.VerificationError:
                pass

    calls: dict[str, Callable[[], object]] = {
        "sleep 0.3 s (noise floor)": lambda: time.sleep(0.3),
        "SentencePiece encode 1 MB": lambda: sp.encode(text),
        "argon2 verify x5": argon_x5,
        "tokenizers encode 1 MB": lambda: hf.encode(text),
        "tokenizers encode_batch([1 MB])": lambda: hf.encode_batch([text]),
    }
    for name, call in calls.items():
        took, gap = longest_gap(call)
        print(f"{name:34s} took {took * 1000:7.0f} ms   longest gap {gap * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
