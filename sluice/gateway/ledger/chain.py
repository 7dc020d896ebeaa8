"""The audit chain's arithmetic: canonical records, keyed links, signed heads.

A record's ``hash`` is ``HMAC-SHA256(key, prev_hash + canonical_json(record))``: the
canonical form has sorted keys, no whitespace and a fixed UTC timestamp format
(``2026-01-31T12:00:00.000000Z``). The key lives outside the database (``SLUICE_AUDIT_KEY``
or a 0600 file beside the spool), so someone who can write to the database cannot forge a
link: editing a row and recomputing the hashes (the attack an unkeyed SHA-256 chain
allows) breaks at the first edited row.

Every chain has one row in ``audit_chains`` (the registry) with its last sequence number,
last hash and a MAC over the three, updated in the same transaction as the records; heads
are also checkpointed to a signed file outside the database (ledger/checkpoints.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from sluice.gateway.db.models import Base, to_utc, utcnow

GENESIS_HASH = "0" * 64
HASHED_FIELDS = (
    "instance_id", "seq", "created_at", "actor", "action", "target",
    "request_id", "decision", "details", "prev_hash",
)  # fmt: skip
MIN_KEY_BYTES = 32
CLI_CHAIN = "cli"  # the one persistent chain every CLI command appends to


class AuditKeyError(Exception):
    """The audit key is missing, too short or unreadable (one line for the operator)."""


class AuditChain(Base):
    """The registry: one row per chain ever written, with its head and a MAC over it."""

    __tablename__ = "audit_chains"

    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Records 1..legacy_until were written before keyed chains (plain SHA-256 links) and
    # sealed by `sluice audit seal-legacy`; legacy_mac covers that boundary and its hash.
    legacy_until: Mapped[int] = mapped_column(BigInteger, default=0)
    legacy_mac: Mapped[str | None] = mapped_column(String(64))


def canonical_timestamp(ts: dt.datetime) -> str:
    return to_utc(ts).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def canonical_json(record: dict[str, Any]) -> str:
    body = {name: record[name] for name in HASHED_FIELDS}
    if isinstance(body["created_at"], dt.datetime):
        body["created_at"] = canonical_timestamp(body["created_at"])
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)  # fmt: skip


def chain_hash(record: dict[str, Any], key: bytes) -> str:
    """The hash a record must carry, given its fields, its ``prev_hash`` and the key."""
    message = (record["prev_hash"] + canonical_json(record)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def legacy_hash(record: dict[str, Any]) -> str:
    """The unkeyed link of chains written before migration 0005 (plain SHA-256)."""
    return hashlib.sha256((record["prev_hash"] + canonical_json(record)).encode()).hexdigest()


def legacy_mac(key: bytes, instance_id: str, until: int, hash_at_until: str) -> str:
    message = f"legacy|{instance_id}|{until}|{hash_at_until}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def head_mac(key: bytes, instance_id: str, seq: int, last_hash: str) -> str:
    """MAC of a chain head, as stored in the registry and the checkpoint file."""
    message = f"head|{instance_id}|{seq}|{last_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, payload: str) -> str:
    return hmac.new(key, b"checkpoint|" + payload.encode(), hashlib.sha256).hexdigest()


def prompt_digest(text: str, store: bool) -> dict[str, Any]:
    """What the audit log keeps of a prompt: its SHA-256 and length, and the text itself
    only when the tenant opted in (``tenants.store_prompts``)."""
    digest: dict[str, Any] = {
        "prompt_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "prompt_chars": len(text),
    }
    if store:
        digest["prompt"] = text
    return digest


def load_key(value: str | None, path: Path) -> bytes:
    """The audit key: ``value`` (``SLUICE_AUDIT_KEY``) if set, else the file at ``path``,
    created (0600, 48 random bytes) on first use. Shorter than 32 bytes is refused."""
    if value:
        key = value.encode()
    else:
        try:
            key = path.read_bytes().strip()
        except FileNotFoundError:
            key = _create_key_file(path)
        except OSError as exc:
            raise AuditKeyError(f"cannot read the audit key {path}: {exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise AuditKeyError(f"the audit key must be at least {MIN_KEY_BYTES} bytes")
    return key


def _create_key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48).encode()
    try:  # O_EXCL: two processes starting together end up with the same key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key
