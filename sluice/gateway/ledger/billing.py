"""The Stripe push: one Billing Meter event per tenant, closed window and meter (input and
output tokens). Exactly-once comes from three layers:

1. ``billing_exports``: each event is written (value frozen) before it is sent and marked
   ``sent_at`` after; a re-run resends only unmarked rows, with the same ``identifier``.
2. ``identifier`` is derived from tenant + window + meter, so Stripe rejects a resend whose
   first attempt did arrive (the answer was lost); that rejection counts as delivered.
3. ``billing_watermarks`` moves past a window only when all its events are delivered, so a
   crash never skips a window and a re-run never re-plans one.

Usage exports (CSV, JSON lines) are in ledger/exports.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

import stripe
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sluice.gateway.db.accounting import BillingWatermark, StripeMeterEvent
from sluice.gateway.db.models import Tenant, UsageEvent, to_utc
from sluice.gateway.ledger.audit import AuditLog
from sluice.gateway.ledger.exports import BillingError, iso

__all__ = ["BillingError", "PushReport", "floor_window", "meter_identifier", "push_stripe",
           "stripe_client"]  # fmt: skip

Window = Literal["hour", "day"]
WINDOWS: dict[str, dt.timedelta] = {"hour": dt.timedelta(hours=1), "day": dt.timedelta(days=1)}
# Stripe answers a resend of an event it already has with this error code.
DUPLICATE_EVENT_CODES = frozenset({"resource_already_exists"})


# -- Stripe ----------------------------------------------------------------------------------


def stripe_client(
    api_key: str, *, api_base: str | None = None, max_network_retries: int = 2
) -> stripe.StripeClient:
    """The official client; ``api_base`` points it elsewhere (a proxy, or the test fake)."""
    base = {"api": api_base.rstrip("/")} if api_base else None
    return stripe.StripeClient(api_key, base_addresses=base,  # type: ignore[arg-type]
                               max_network_retries=max_network_retries)  # fmt: skip


def floor_window(ts: dt.datetime, window: Window) -> dt.datetime:
    ts = to_utc(ts).replace(minute=0, second=0, microsecond=0)
    return ts.replace(hour=0) if window == "day" else ts


def meter_identifier(tenant_id: str, window: Window, start: dt.datetime, event_name: str) -> str:
    """Same tenant, window and meter -> same identifier, in every run."""
    key = f"{tenant_id}|{window}|{iso(start)}|{event_name}"
    return "sluice-" + hashlib.sha256(key.encode()).hexdigest()[:48]


@dataclass
class PushReport:
    windows: int = 0  # closed windows planned in this run
    sent: int = 0  # events Stripe accepted
    already_present: int = 0  # resends Stripe already had (an earlier answer was lost)
    pushed_until: dt.datetime | None = None


async def push_stripe(
    engine: AsyncEngine,
    client: stripe.StripeClient,
    *,
    window: Window = "hour",
    until: dt.datetime,
    input_meter_event_name: str,
    output_meter_event_name: str,
    audit: AuditLog | None = None,
    actor: str = "billing",
    max_attempts: int = 6,
    base_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
) -> PushReport:
    """Send every window that closed at or before ``until`` and has not been pushed yet.

    Events that arrive after their window was pushed are not billed: keep ``until`` behind
    the metering writer (the CLI defaults to five minutes ago)."""
    if window not in WINDOWS:
        raise BillingError(f"unknown window {window!r} (hour or day)")
    if input_meter_event_name == output_meter_event_name:
        raise BillingError("input and output meters must have different event names")
    meters = (input_meter_event_name, output_meter_event_name)
    name = f"stripe:{input_meter_event_name}:{output_meter_event_name}"
    size, limit = WINDOWS[window], floor_window(until, window)
    report = PushReport()
    cursor = await _resume_point(engine, name, window)
    while cursor is not None and cursor + size <= limit:
        for event in await _plan_window(engine, window, cursor, meters):
            outcome = await _send(client, event, max_attempts, base_delay_s, max_delay_s)
            async with engine.begin() as conn:
                await conn.execute(
                    StripeMeterEvent.__table__.update()
                    .where(StripeMeterEvent.id == event.id)
                    .values(sent_at=dt.datetime.now(dt.UTC))
                )
            report.sent += outcome == "sent"
            report.already_present += outcome == "already_present"
            if audit is not None:
                await audit.record(actor, "billing.stripe_push", event.tenant_id, decision=outcome,
                                   details=_event_details(event))  # fmt: skip
        report.windows += 1
        cursor = await _next_cursor(engine, window, cursor + size, limit)
        await _set_watermark(engine, name, window, cursor)
        report.pushed_until = cursor
    return report


async def _resume_point(engine: AsyncEngine, name: str, window: Window) -> dt.datetime | None:
    async with engine.connect() as conn:
        mark = (
            await conn.execute(
                select(BillingWatermark.window, BillingWatermark.pushed_until)
                .where(BillingWatermark.name == name)
            )
        ).first()
    if mark is not None:
        if mark.window != window:
            raise BillingError(f"{name} was pushed with window={mark.window}; pushing it with "
                               f"window={window} would bill usage twice")  # fmt: skip
        return mark.pushed_until  # aware UTC (db.models.UTCDateTime)
    first = await _first_usage(engine, None)
    return None if first is None else floor_window(first, window)


async def _next_cursor(
    engine: AsyncEngine, window: Window, after: dt.datetime, limit: dt.datetime
) -> dt.datetime:
    """The next window worth planning: skips windows without billable usage."""
    first = await _first_usage(engine, after)
    return limit if first is None else min(max(floor_window(first, window), after), limit)


async def _first_usage(engine: AsyncEngine, after: dt.datetime | None) -> dt.datetime | None:
    stmt = (
        select(func.min(UsageEvent.created_at))
        .join(Tenant, Tenant.id == UsageEvent.tenant_id)
        .where(Tenant.stripe_customer_id.is_not(None))
    )
    if after is not None:
        stmt = stmt.where(UsageEvent.created_at >= after)
    async with engine.connect() as conn:
        return (await conn.execute(stmt)).scalar_one()


async def _plan_window(
    engine: AsyncEngine, window: Window, start: dt.datetime, meters: tuple[str, str]
) -> list[Any]:
    """Freeze this window's events in ``billing_exports`` (once) and return the unsent ones."""
    end = start + WINDOWS[window]
    async with engine.begin() as conn:
        sums = await conn.execute(
            select(Tenant.id, Tenant.stripe_customer_id, func.sum(UsageEvent.prompt_tokens),
                   func.sum(UsageEvent.completion_tokens))  # fmt: skip
            .join(Tenant, Tenant.id == UsageEvent.tenant_id)
            .where(Tenant.stripe_customer_id.is_not(None),
                   UsageEvent.created_at >= start, UsageEvent.created_at < end)  # fmt: skip
            .group_by(Tenant.id, Tenant.stripe_customer_id)
            .order_by(Tenant.id)
        )
        rows = [
            {"identifier": meter_identifier(tenant_id, window, start, meter),
             "tenant_id": tenant_id, "stripe_customer_id": customer, "event_name": meter,
             "window": window, "window_start": start, "value": int(value),
             "created_at": dt.datetime.now(dt.UTC)}  # fmt: skip
            for tenant_id, customer, prompt, completion in sums
            for meter, value in zip(meters, (prompt, completion), strict=True)
            if value
        ]
        if rows:
            await conn.execute(_insert_ignore(conn, rows))
        unsent = await conn.execute(
            select(StripeMeterEvent.__table__)
            .where(StripeMeterEvent.window == window, StripeMeterEvent.window_start == start,
                   StripeMeterEvent.event_name.in_(meters), StripeMeterEvent.sent_at.is_(None))
            .order_by(StripeMeterEvent.id)
        )  # fmt: skip
        return list(unsent)


def _insert_ignore(conn: AsyncConnection, rows: list[dict[str, Any]]) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(StripeMeterEvent).values(rows).on_conflict_do_nothing(
        index_elements=["identifier"]
    )


async def _set_watermark(engine: AsyncEngine, name: str, window: Window, until: dt.datetime):
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    values = {"name": name, "window": window, "pushed_until": until,
              "updated_at": dt.datetime.now(dt.UTC)}  # fmt: skip
    stmt = dialect.insert(BillingWatermark).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"], set_={"pushed_until": until, "updated_at": values["updated_at"]}
    )
    async with engine.begin() as conn:
        await conn.execute(stmt)


async def _send(
    client: stripe.StripeClient, event: Any, max_attempts: int, base: float, cap: float
) -> str:
    """POST one meter event: ``"sent"`` or ``"already_present"``; raises after
    ``max_attempts`` rate-limited / failed / unanswered attempts."""
    params = {
        "event_name": event.event_name,
        "payload": {"stripe_customer_id": event.stripe_customer_id, "value": str(event.value)},
        "identifier": event.identifier,
        "timestamp": int(event.window_start.timestamp()),
    }
    for attempt in range(max_attempts):
        # A fresh idempotency key per attempt of ours: Stripe replays a saved 500 for a
        # reused key; the identifier is what keeps the event unique.
        options = {"idempotency_key": f"{event.identifier}-{attempt}"}
        try:
            meter_events = client.v1.billing.meter_events
            await meter_events.create_async(params, options)  # type: ignore[arg-type]
            return "sent"
        except stripe.InvalidRequestError as exc:
            if exc.code in DUPLICATE_EVENT_CODES:
                return "already_present"
            raise BillingError(f"Stripe rejected {event.identifier}: {exc.user_message}") from exc
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as exc:
            if attempt + 1 == max_attempts:
                raise BillingError(f"Stripe unavailable after {max_attempts} attempts: "
                                   f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
            delay = min(cap, base * 2**attempt)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _event_details(event: Any) -> dict[str, Any]:
    return {"identifier": event.identifier, "event_name": event.event_name,
            "window": event.window, "window_start": iso(event.window_start),
            "value": event.value, "stripe_customer_id": event.stripe_customer_id}  # fmt: skip
