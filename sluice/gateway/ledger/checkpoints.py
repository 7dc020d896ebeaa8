"""Signed checkpoints of audit chain heads, kept outside the database.

An append-only file the operator names (``SLUICE_AUDIT_CHECKPOINTS``: a local volume, a
mount on another host, a WORM bucket's fuse mount). Each line is one JSON object::

    {"at": "2026-...Z", "heads": {"<chain>": [<seq>, "<hash>"]}, "sig": "<hmac>"}

signed with the audit key, so lines cannot be forged by whoever edits the database.
:func:`~sluice.gateway.ledger.verify.verify` compares the newest head per chain with the
database: a chain cut short below its checkpoint, a checkpointed record changed, or a
checkpointed chain gone altogether is reported. Lines are written with one ``write`` on
an ``O_APPEND`` descriptor and fsync'd, so processes sharing the file do not interleave.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sluice.gateway.ledger.chain import canonical_timestamp, sign

Head = tuple[int, str]


@dataclass
class Checkpoints:
    """What a checkpoint file says: the newest head per chain, and lines it rejected."""

    heads: dict[str, Head] = field(default_factory=dict)
    bad_lines: list[str] = field(default_factory=list)


class CheckpointFile:
    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self.key = key

    def append(self, heads: dict[str, Head]) -> None:
        payload = json.dumps({"at": canonical_timestamp(dt.datetime.now(dt.UTC)),
                              "heads": {k: list(v) for k, v in sorted(heads.items())}},
                             sort_keys=True, separators=(",", ":"))  # fmt: skip
        line = json.dumps({"payload": payload, "sig": sign(self.key, payload)},
                          separators=(",", ":")) + "\n"  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> Checkpoints:
        found = Checkpoints()
        self.read_into(found, 0)
        return found

    def read_into(self, found: Checkpoints, offset: int) -> int:
        """Add the complete lines after byte ``offset`` to ``found``; returns the offset
        after them (so a caller that keeps ``found`` reads each line once)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return offset
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        lines = data[:end].decode(errors="replace").splitlines()
        for line in lines:
            try:
                outer = json.loads(line)
                payload, sig = outer["payload"], outer["sig"]
                ok = hmac.compare_digest(sign(self.key, payload), sig)
                heads = json.loads(payload)["heads"] if ok else {}
            except (ValueError, KeyError, TypeError):
                ok, heads = False, {}
            if not ok:
                found.bad_lines.append(f"{self.path}: line at byte {offset}+: bad signature "
                                       "or format")  # fmt: skip
                continue
            for chain, (seq, last_hash) in heads.items():
                if seq >= found.heads.get(chain, (0, ""))[0]:
                    found.heads[chain] = (int(seq), str(last_hash))
        return offset + end
