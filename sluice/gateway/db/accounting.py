"""Accounting tables: the hash-chained audit log and the Stripe push ledger.

They share :class:`gateway.db.models.Base`; migration 0002 creates them (and, on Postgres,
the trigger that makes ``audit_log`` append-only).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from sluice.gateway.db.models import AutoBigInt, Base, utcnow


class AuditRecord(Base):
    """One audit event. ``hash`` covers the canonical form of every other column (but ``id``)
    and ``prev_hash``, so each gateway instance writes one tamper-evident chain."""

    __tablename__ = "audit_log"
    __table_args__ = (
        UniqueConstraint("instance_id", "seq", name="uq_audit_log_instance_seq"),
        Index("ix_audit_log_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(AutoBigInt, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    decision: Mapped[str | None] = mapped_column(String(32))
    details: Mapped[dict[str, Any] | None] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class StripeMeterEvent(Base):
    """One Billing Meter event per tenant, window and meter, written *before* it is sent.

    The value is frozen here, so a re-run resends exactly the same request (same
    ``identifier``) instead of recomputing it from usage that may have changed since.
    """

    __tablename__ = "billing_exports"

    id: Mapped[int] = mapped_column(AutoBigInt, primary_key=True, autoincrement=True)
    identifier: Mapped[str] = mapped_column(String(100), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    stripe_customer_id: Mapped[str] = mapped_column(String(64))
    event_name: Mapped[str] = mapped_column(String(100))
    window: Mapped[str] = mapped_column(String(8))
    window_start: Mapped[dt.datetime] = mapped_column()
    value: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column()


class BillingWatermark(Base):
    """Per destination (Stripe + meter pair): every window that ends at or before
    ``pushed_until`` has been delivered completely."""

    __tablename__ = "billing_watermarks"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    window: Mapped[str] = mapped_column(String(8))
    pushed_until: Mapped[dt.datetime] = mapped_column()
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
