"""The economics tables (schema changes go through sluice/migrations like every table)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from sluice.gateway.db.models import AutoBigInt, Base, new_id, utcnow


class ModelPrice(Base):
    """One price version of a model; the version in force at a usage row's time prices it."""

    __tablename__ = "model_prices"
    __table_args__ = (Index("ix_model_prices_model_from", "model", "effective_from"),)

    id: Mapped[int] = mapped_column(AutoBigInt, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128))
    effective_from: Mapped[dt.datetime] = mapped_column()
    # micro-units of the currency per million tokens
    input_micros: Mapped[int] = mapped_column(BigInteger)
    output_micros: Mapped[int] = mapped_column(BigInteger)
    cached_input_micros: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(64), default="config")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Budget(Base):
    """A spending limit for a tenant (``key_id`` None) or one of its keys, per day or month."""

    __tablename__ = "budgets"
    __table_args__ = (Index("ix_budgets_tenant", "tenant_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: new_id("bud"))
    tenant_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str | None] = mapped_column(String(32))
    period: Mapped[str] = mapped_column(String(8))  # "day" | "month" (UTC)
    limit_micros: Mapped[int] = mapped_column(BigInteger)
    mode: Mapped[str] = mapped_column(String(8))  # "hard": refuse past it; "soft": warn only
    thresholds: Mapped[list[Any]] = mapped_column(JSON, default=lambda: [50, 80, 100])
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
