"""Accounting tables (the hash-chained audit log, the Stripe push ledger) and the one
usage-by-group query that the admin API and the dashboard share.

They share :class:`gateway.db.models.Base`; migration 0002 creates them (and, on Postgres,
the trigger that makes ``audit_log`` append-only).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, Index, Select, String, UniqueConstraint, func, select
from sqlalchemy.orm import Mapped, mapped_column

from sluice.gateway.db.models import AutoBigInt, Base, UsageDaily, utcnow

#: What usage can be grouped by, and the rollup column of each.
USAGE_GROUPS = {"tenant": UsageDaily.tenant_id, "key": UsageDaily.key_id,
                "model": UsageDaily.model}


def usage_by_group(*, start: dt.date, end: dt.date, group_by: str,
                   tenant_id: str | None = None, per_day: bool = False) -> Select[Any]:
    """Requests and prompt/completion tokens per tenant, key or model (per day too with
    ``per_day``) over ``start..end`` (days, inclusive), from the daily rollup.

    Rows: ``[day,] group, requests, prompt_tokens, completion_tokens``.
    """
    column = USAGE_GROUPS[group_by]
    keys = [UsageDaily.day, column] if per_day else [column]
    query = (
        select(*keys, func.sum(UsageDaily.requests), func.sum(UsageDaily.prompt_tokens),
               func.sum(UsageDaily.completion_tokens))
        .where(UsageDaily.day >= start, UsageDaily.day <= end)
        .group_by(*keys)
        .order_by(*keys)
    )
    if tenant_id:
        query = query.where(UsageDaily.tenant_id == tenant_id)
    return query


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
