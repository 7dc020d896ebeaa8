"""Changing prices and budgets: one implementation for the admin API and the dashboard.

Inputs are validated by the models below (integers only, bounded), every change is
applied to the running gateway at once (price table, budget rule cache) and audited.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, Protocol

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy import delete, select

from sluice.gateway.db.models import ApiKey, new_id
from sluice.gateway.economics.budgets import BudgetRule, period_window
from sluice.gateway.economics.config import MAX_PRICE_MICROS, PriceConfig
from sluice.gateway.economics.prices import Price, add_price
from sluice.gateway.economics.tables import Budget
from sluice.gateway.errors import InvalidRequest, NotFound



class AppState(Protocol):
    """What changing money needs of the gateway's state (sluice/gateway/state.py; not
    imported: the state imports this package)."""

    registry: Any
    db: Any
    spend: Any
    audit: Any

MAX_BUDGET_MICROS = 10**15  # a billion currency units: above it, a typo


class PriceSet(PriceConfig):
    """A price version from an operator: integers only (no floats, no "1.5")."""

    input: StrictInt = Field(ge=0, le=MAX_PRICE_MICROS)
    output: StrictInt = Field(ge=0, le=MAX_PRICE_MICROS)
    cached_input: StrictInt | None = Field(None, ge=0, le=MAX_PRICE_MICROS)


class BudgetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    key_id: str | None = Field(None, max_length=32)
    period: Literal["day", "month"]
    limit_micros: int = Field(ge=1, le=MAX_BUDGET_MICROS)
    mode: Literal["hard", "soft"] = "hard"
    thresholds: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [50, 80, 100], max_length=10)
    webhook_url: AnyHttpUrl | None = None

    @field_validator("webhook_url")
    @classmethod
    def _short(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None and len(str(url)) > 2048:
            raise ValueError("webhook_url longer than 2048 characters")
        return url


def price_dict(p: Price) -> dict[str, Any]:
    return {"model": p.model, "input": p.input, "output": p.output,
            "cached_input": p.cached_input, "effective_from": p.effective_from.isoformat(),
            "unit": "micro-units per million tokens"}


async def set_price(state: AppState, model: str, body: PriceSet, actor: str) -> Price:
    if state.registry.get(model) is None:
        raise NotFound(f"The model '{model[:128]}' does not exist", param="model",
                       code="model_not_found")
    try:
        price = await add_price(state.db, model, body, source=actor)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="effective_from") from None
    state.spend.prices.add(price)
    await state.audit.record(actor, "price.set", model, decision="allow",
                             details=price_dict(price))
    return price


async def budget_dict(state: AppState, row: Any) -> dict[str, Any]:
    rule = BudgetRule.from_row(row)
    label, *_ = period_window(rule.period, dt.datetime.now(dt.UTC))
    return {"id": row.id, "tenant_id": row.tenant_id, "key_id": row.key_id,
            "period": row.period, "limit_micros": int(row.limit_micros), "mode": row.mode,
            "thresholds": row.thresholds, "webhook_url": row.webhook_url,
            "current_period": label, "spent_micros": await state.spend.budgets.spent(rule, label)}


async def list_budgets(state: AppState, tenant_id: str) -> list[dict[str, Any]]:
    async with state.db.connect() as conn:
        rows = (await conn.execute(select(Budget).where(Budget.tenant_id == tenant_id)
                                   .order_by(Budget.created_at))).all()
    return [await budget_dict(state, r) for r in rows]


async def create_budget(state: AppState, tenant_id: str, body: BudgetCreate,
                        actor: str) -> dict[str, Any]:
    values = {"id": new_id("bud"), "tenant_id": tenant_id, "key_id": body.key_id,
              "period": body.period, "limit_micros": body.limit_micros, "mode": body.mode,
              "thresholds": sorted(set(body.thresholds)),
              "webhook_url": str(body.webhook_url) if body.webhook_url else None,
              "created_at": dt.datetime.now(dt.UTC)}
    async with state.db.begin() as conn:
        if body.key_id is not None:
            owner = await conn.scalar(select(ApiKey.tenant_id).where(ApiKey.id == body.key_id))
            if owner != tenant_id:
                raise NotFound(f"this tenant has no key '{body.key_id}'", param="key_id",
                               code="key_not_found")
        await conn.execute(Budget.__table__.insert().values(**values))
        row = (await conn.execute(select(Budget).where(Budget.id == values["id"]))).one()
    state.spend.budgets.invalidate(tenant_id)
    await state.audit.record(actor, "budget.create", values["id"], decision="allow",
                             details={k: v for k, v in values.items() if k != "created_at"})
    return await budget_dict(state, row)


async def delete_budget(state: AppState, budget_id: str, actor: str) -> str:
    """Remove a budget; returns its tenant's id."""
    async with state.db.begin() as conn:
        tenant_id = await conn.scalar(select(Budget.tenant_id).where(Budget.id == budget_id))
        if tenant_id is None:
            raise NotFound(f"no budget '{budget_id[:64]}'", code="budget_not_found")
        await conn.execute(delete(Budget).where(Budget.id == budget_id))
    state.spend.budgets.invalidate(tenant_id)
    await state.audit.record(actor, "budget.delete", budget_id, decision="allow",
                             details={"tenant_id": tenant_id})
    return str(tenant_id)
