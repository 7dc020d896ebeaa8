"""Login throttling: failed passwords per account and per client address, with growing
back-off, and audit records at most once per window for each.

After ``free`` failures within ``window_s``, the account (or the address) is locked for
``base_s * 2**(failures - free)`` seconds, capped at ``max_s``. A locked login is refused
(429 + Retry-After) before the password is hashed, so a guessing run costs the server
nothing once it is locked. A success clears the account and the address. State is kept
per process in two LRU maps of bounded size (a flood of made-up addresses evicts the
oldest entries, never grows memory); replicas each apply the bound on their own.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last_at: float = 0.0
    locked_until: float = 0.0
    audited_at: float = -math.inf
    suppressed: int = 0  # failures not audited since the last audit record


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one failure: the lock it caused and whether to audit it."""

    retry_after_s: float  # 0: not locked
    audit: bool
    suppressed: int  # failures since the last audited one (with ``audit``)


class LoginThrottle:
    def __init__(self, *, free: int = 5, base_s: float = 1.0, max_s: float = 900.0,
                 window_s: float = 900.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free = free
        self.base_s = base_s
        self.max_s = max_s
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._accounts: OrderedDict[str, _Failures] = OrderedDict()
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()

    def retry_after(self, account: str, address: str) -> float:
        """Seconds until a login for ``account`` from ``address`` may be tried (0: now)."""
        now = self._clock()
        wait = 0.0
        for table, key in ((self._accounts, account.lower()), (self._addresses, address)):
            entry = table.get(key)
            if entry is not None:
                wait = max(wait, entry.locked_until - now)
        return max(0.0, wait)

    def failure(self, account: str, address: str) -> Verdict:
        now = self._clock()
        waits, audit, suppressed = [], False, 0
        for table, key in ((self._accounts, account.lower()), (self._addresses, address)):
            entry = self._entry(table, key, now)
            entry.count += 1
            entry.last_at = now
            over = entry.count - self.free
            if over >= 0:
                entry.locked_until = now + min(self.max_s, self.base_s * 2.0 ** over)
            waits.append(max(0.0, entry.locked_until - now))
            if table is self._accounts:  # one audit record per account per window
                if now - entry.audited_at >= self.window_s:
                    audit, suppressed = True, entry.suppressed
                    entry.audited_at, entry.suppressed = now, 0
                else:
                    entry.suppressed += 1
        return Verdict(max(waits), audit, suppressed)

    def refused(self, account: str) -> None:
        """A login refused while locked: not audited on its own, counted in the next record."""
        entry = self._accounts.get(account.lower())
        if entry is not None:
            entry.suppressed += 1

    def success(self, account: str, address: str) -> None:
        self._accounts.pop(account.lower(), None)
        self._addresses.pop(address, None)

    def _entry(self, table: OrderedDict[str, _Failures], key: str, now: float) -> _Failures:
        entry = table.get(key)
        if entry is None or (now - entry.last_at > self.window_s and now >= entry.locked_until):
            audited_at = entry.audited_at if entry else -math.inf
            entry = _Failures(audited_at=audited_at)
            table[key] = entry
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)
        return entry
