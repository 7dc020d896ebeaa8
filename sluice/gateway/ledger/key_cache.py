"""API-key entries as last read from the database, kept on local disk beside the spool.

With ``SLUICE_DB_OUTAGE=serve`` a gateway that starts (or meets a key it has not cached in
memory) while the database is unreachable authenticates from here; usage goes to the WAL
and the spool as usual. Only keys that exist are stored (a prefix nobody owns is never
written, so unauthenticated traffic cannot grow the file), and only when what the
database said changed. Entries hold what the key store caches in memory anyway: the
SHA-256 of the key, never the key. An SQLite file (stdlib), 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How old a persisted entry may be and still be served during an outage. A key revoked
# while the database is down cannot be known; this bounds how long that lasts.
MAX_AGE_S = 24 * 3600.0


class KeyCacheFile:
    def __init__(self, path: Path, *, max_age_s: float = MAX_AGE_S) -> None:
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (prefix TEXT PRIMARY KEY, "
                         "entry TEXT NOT NULL, saved_at REAL NOT NULL)")  # fmt: skip
        self._lock = threading.Lock()
        self._saved: dict[str, str] = {}

    def save(self, prefix: str, entry: dict[str, Any] | None) -> None:
        """Remember what the database said for ``prefix`` (None: no such key)."""
        text = None if entry is None else json.dumps(entry, sort_keys=True)
        if self._saved.get(prefix) == text or (text is None and prefix not in self._saved):
            return  # unchanged, or a prefix nobody owns (never written: no disk growth)
        try:
            with self._lock:
                if text is None:
                    self._db.execute("DELETE FROM keys WHERE prefix = ?", (prefix,))
                else:
                    self._db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?)",
                                     (prefix, text, time.time()))  # fmt: skip
        except sqlite3.Error as exc:
            log.warning("key cache %s: write failed: %s", self.path, exc)
            return
        if text is None:
            self._saved.pop(prefix, None)
        else:
            self._saved[prefix] = text

    def load(self, prefix: str) -> dict[str, Any] | None:
        """The persisted entry, unless older than ``max_age_s``."""
        try:
            with self._lock:
                row = self._db.execute("SELECT entry, saved_at FROM keys WHERE prefix = ?",
                                       (prefix,)).fetchone()  # fmt: skip
        except sqlite3.Error as exc:
            log.warning("key cache %s: read failed: %s", self.path, exc)
            return None
        if row is None or time.time() - row[1] > self.max_age_s:
            return None
        return dict(json.loads(row[0]))

    def close(self) -> None:
        with self._lock:
            self._db.close()
