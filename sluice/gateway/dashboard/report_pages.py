"""Read-only pages: overview charts, usage (with CSV), guard events, audit log, runtime."""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sluice.gateway.ledger.exports import iter_usage_export
from sluice.gateway.dashboard import charts, reports
from sluice.gateway.dashboard.charts import Series
from sluice.gateway.dashboard.session import Session
from sluice.gateway.dashboard.web import page, render
from sluice.gateway.errors import NotFound
from sluice.gateway.state import app_state


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms"


@page("overview")
async def overview(request: Request, session: Session) -> Response:
    state = app_state(request)
    chosen = request.query_params.get("range", "24h")
    range_name = chosen if chosen in reports.RANGES else "24h"
    data = await reports.overview(state.db, range_name, dt.datetime.now(dt.UTC))
    starts = [b.start for b in data.buckets]

    def per_bucket(q: float, field: str) -> list[float | None]:
        return [reports.percentile(getattr(b, field), q) for b in data.buckets]

    made = [
        charts.build("Requests", "requests", "bars", starts,
                     [Series("requests", [b.requests for b in data.buckets])],
                     f"{data.requests:,} requests"),
        charts.build("Tokens", "tokens", "bars", starts,
                     [Series("tokens", [b.tokens for b in data.buckets])],
                     f"{data.tokens:,} tokens"),
        charts.build("Errors", "errors", "bars", starts,
                     [Series("errors", [b.errors for b in data.buckets])],
                     f"{data.errors:,} errors"),
        charts.build("Latency", "ms", "lines", starts,
                     [Series("p50", per_bucket(50, "latencies")),
                      Series("p95", per_bucket(95, "latencies"))],
                     f"p50 {_ms(data.latency(50))}, p95 {_ms(data.latency(95))}"),
        charts.build("Time to first token", "ms", "lines", starts,
                     [Series("p50", per_bucket(50, "ttfts")),
                      Series("p95", per_bucket(95, "ttfts"))],
                     f"p50 {_ms(data.ttft(50))}, p95 {_ms(data.ttft(95))}"),
    ]
    return render(request, "overview.html", {
        "data": data, "charts": made, "ranges": list(reports.RANGES), "range": range_name,
    }, session=session)


def _day(value: str | None, default: dt.date) -> tuple[dt.date, str]:
    if not value:
        return default, ""
    try:
        return dt.date.fromisoformat(value), ""
    except ValueError:
        return default, f"'{value}' is not a date (YYYY-MM-DD); showing {default} instead."


async def _usage_query(request: Request) -> tuple[dt.date, dt.date, str | None, list[str]]:
    """The range and tenant a usage request asks for, with a message per bad value."""
    q = request.query_params
    today = dt.datetime.now(dt.UTC).date()
    start, e1 = _day(q.get("from"), today - dt.timedelta(days=30))
    end, e2 = _day(q.get("to"), today)
    errors = [e for e in (e1, e2) if e]
    if end < start:
        errors.append("'to' is before 'from'; the two were swapped.")
        start, end = end, start
    tenant_id = None
    if ref := q.get("tenant"):
        try:
            tenant_id = (await app_state(request).accounts.tenant(ref)).id
        except NotFound as exc:
            errors.append(exc.message)
    return start, end, tenant_id, errors


@page("usage")
async def usage(request: Request, session: Session) -> Response:
    state = app_state(request)
    start, end, tenant_id, errors = await _usage_query(request)
    group = request.query_params.get("group_by", "tenant")
    if group not in ("tenant", "key", "model"):
        errors.append("group by must be tenant, key or model.")
        group = "tenant"
    rows = await reports.usage(state.db, start=start, end=end, group_by=group,
                               tenant_id=tenant_id)
    return render(request, "usage.html", {
        "rows": rows, "start": start, "end": end, "group": group, "tenant_id": tenant_id or "",
        "tenants": await state.accounts.list_tenants(), "errors": errors,
        "totals": {"requests": sum(r.requests for r in rows),
                   "prompt": sum(r.prompt_tokens for r in rows),
                   "completion": sum(r.completion_tokens for r in rows)},
    }, session=session)


@page("usage")
async def usage_csv(request: Request, session: Session) -> Response:
    """Usage events of whole UTC days ``from..to`` as CSV, streamed (the same export as
    ``/admin/api/usage/export``), and audited as ``usage.export``."""
    state = app_state(request)
    start_day, end_day, tenant_id, errors = await _usage_query(request)
    if errors:
        return render(request, "error.html", {"title": "Cannot export",
                                              "message": " ".join(errors)},
                      session=session, status=400)
    start = dt.datetime.combine(start_day, dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(end_day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    await state.audit.record(session.actor, "usage.export", tenant_id or "*", decision="allow",
                          details={"from": start.isoformat(), "to": end.isoformat(),
                                   "format": "csv", "via": "dashboard"})
    body = iter_usage_export(state.db, start=start, end=end, tenant=tenant_id, fmt="csv")
    name = f"usage-{start_day}-{end_day}.csv"
    return StreamingResponse(body, media_type="text/csv",
                             headers={"content-disposition": f'attachment; filename="{name}"'})


def _before(request: Request) -> int | None:
    value = request.query_params.get("before", "")
    return int(value) if value.isdigit() else None


@page("guard")
async def guard_events(request: Request, session: Session) -> Response:
    state = app_state(request)
    q = request.query_params
    decision = q.get("decision", "")
    records = await reports.audit_records(state.db, action="guard.", decision=decision,
                                          before=_before(request))
    return render(request, "guard.html", {
        "records": records, "decision": decision, "page_size": reports.PAGE_SIZE,
        "guard_on": state.pipeline.guardrails.enabled,
    }, session=session)


@page("audit")
async def audit(request: Request, session: Session) -> Response:
    state = app_state(request)
    q = request.query_params
    action_filter, actor = q.get("action", "").strip(), q.get("actor", "").strip()
    await state.audit.flush()  # show this session's own changes, not only what the writer wrote
    records = await reports.audit_records(state.db, action=action_filter, actor=actor,
                                          before=_before(request))
    report = await state.audit.verify()  # incremental: only records new since the last view
    return render(request, "audit.html", {
        "records": records, "action": action_filter, "actor": actor, "report": report,
        "page_size": reports.PAGE_SIZE,
    }, session=session)


@page("runtime")
async def runtime(request: Request, session: Session) -> Response:
    pools = reports.runtime_rows(app_state(request).runtime.status())
    return render(request, "runtime.html", {"pools": pools}, session=session)
