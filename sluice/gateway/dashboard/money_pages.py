"""Money: prices (current and history, a form for a new version), cost per day and model,
and a tenant's budgets with this period's spend. Changes go through
:mod:`sluice.gateway.economics.manage`, as the admin API's do, and are audited."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from sluice.gateway.dashboard.session import Session
from sluice.gateway.dashboard.web import action, page, render, text
from sluice.gateway.economics import manage
from sluice.gateway.economics.reports import cost_by_day
from sluice.gateway.errors import SluiceError
from sluice.gateway.state import app_state


def _whole(form: FormData, name: str) -> int | None:
    value = text(form, name)
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number")
    return int(value)


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else err["msg"]
    return exc.message if isinstance(exc, SluiceError) else str(exc)


async def _money_page(request: Request, session: Session, *, error: str = "",
                      status: int = 200) -> Response:
    state = app_state(request)
    table = state.spend.prices
    tenants = await state.accounts.list_tenants()
    chosen = request.query_params.get("tenant") or (tenants[0].id if tenants else "")
    tenant = next((t for t in tenants if chosen in (t.id, t.name)), None)
    today = dt.datetime.now(dt.UTC).date()
    costs = await cost_by_day(state.db, today - dt.timedelta(days=30), today,
                              tenant.id if tenant else None)
    totals: dict[str, dict[str, Any]] = {}
    for row in costs:
        total = totals.setdefault(row["model"], {"requests": 0, "cost_pico": 0})
        total["requests"] += row["requests"]
        total["cost_pico"] += row["cost_pico"]
    return render(request, "money.html", {
        "prices": table.current(), "history": {m: table.history(m) for m in table.models()},
        "models": [c.id for c in state.registry.cards()], "tenants": tenants, "tenant": tenant,
        "budgets": await manage.list_budgets(state, tenant.id) if tenant else [],
        "totals": totals, "error": error, "notice": request.query_params.get("notice", ""),
    }, session=session, status=status)


@page("money")
async def money(request: Request, session: Session) -> Response:
    return await _money_page(request, session)


@action("money")
async def set_price(request: Request, session: Session, form: FormData) -> Response:
    state = app_state(request)
    try:
        body = manage.PriceSet.model_validate({
            "input": _whole(form, "input"), "output": _whole(form, "output"),
            "cached_input": _whole(form, "cached_input"),
            "effective_from": text(form, "effective_from") or None})
        await manage.set_price(state, text(form, "model"), body, session.actor)
    except (ValidationError, ValueError, SluiceError) as exc:
        return await _money_page(request, session, error=_problem(exc), status=400)
    return RedirectResponse("/admin/money?notice=Price+saved.", status_code=303)


@action("money")
async def create_budget(request: Request, session: Session, form: FormData) -> Response:
    state = app_state(request)
    try:
        tenant = await state.accounts.tenant(text(form, "tenant"))
        body = manage.BudgetCreate.model_validate({
            "key_id": text(form, "key_id") or None, "period": text(form, "period"),
            "limit_micros": _whole(form, "limit_micros"), "mode": text(form, "mode"),
            "webhook_url": text(form, "webhook_url") or None})
        await manage.create_budget(state, tenant.id, body, session.actor)
    except (ValidationError, ValueError, SluiceError) as exc:
        return await _money_page(request, session, error=_problem(exc), status=400)
    return RedirectResponse(f"/admin/money?tenant={tenant.id}&notice=Budget+created.",
                            status_code=303)


@action("money")
async def delete_budget(request: Request, session: Session, form: FormData) -> Response:
    try:
        tenant_id = await manage.delete_budget(app_state(request),
                                               request.path_params["budget"], session.actor)
    except SluiceError as exc:
        return await _money_page(request, session, error=_problem(exc), status=404)
    return RedirectResponse(f"/admin/money?tenant={tenant_id}&notice=Budget+removed.",
                            status_code=303)
