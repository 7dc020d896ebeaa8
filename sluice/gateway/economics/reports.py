"""Cost reports from the daily rollup (admin API and dashboard)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.models import UsageDaily
from sluice.gateway.economics import PICO_PER_MICRO


async def cost_by_day(engine: AsyncEngine, start: dt.date, end: dt.date,
                      tenant_id: str | None = None) -> list[dict[str, Any]]:
    """Requests and exact cost per day and model (pico-units, and micro-units rounded down)."""
    query = (select(UsageDaily.day, UsageDaily.model, func.sum(UsageDaily.requests),
                    func.sum(UsageDaily.cost_pico))
             .where(UsageDaily.day >= start, UsageDaily.day <= end)
             .group_by(UsageDaily.day, UsageDaily.model)
             .order_by(UsageDaily.day, UsageDaily.model))
    if tenant_id is not None:
        query = query.where(UsageDaily.tenant_id == tenant_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [{"day": day.isoformat(), "model": model, "requests": int(n), "cost_pico": int(cost),
             "cost_micros": int(cost) // PICO_PER_MICRO} for day, model, n, cost in rows]
