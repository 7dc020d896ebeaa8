"""What the dashboard pages show, read from usage_events, usage_daily, audit_log and the
runtime. Plain functions over the gateway's engine; no HTTP here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.accounting import AuditRecord, usage_by_group
from sluice.gateway.db.models import ApiKey, Tenant, UsageEvent

# range name -> (length, bucket width)
RANGES: dict[str, tuple[dt.timedelta, dt.timedelta]] = {
    "1h": (dt.timedelta(hours=1), dt.timedelta(minutes=5)),
    "24h": (dt.timedelta(hours=24), dt.timedelta(hours=1)),
    "7d": (dt.timedelta(days=7), dt.timedelta(hours=6)),
    "30d": (dt.timedelta(days=30), dt.timedelta(days=1)),
}
MAX_OVERVIEW_ROWS = 200_000
PAGE_SIZE = 100


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of unsorted values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


@dataclass
class Bucket:
    start: dt.datetime
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)


@dataclass
class Overview:
    range: str
    start: dt.datetime
    end: dt.datetime
    buckets: list[Bucket]
    truncated: bool

    @property
    def requests(self) -> int:
        return sum(b.requests for b in self.buckets)

    @property
    def tokens(self) -> int:
        return sum(b.tokens for b in self.buckets)

    @property
    def errors(self) -> int:
        return sum(b.errors for b in self.buckets)

    def latency(self, q: float) -> float | None:
        return percentile([v for b in self.buckets for v in b.latencies], q)

    def ttft(self, q: float) -> float | None:
        return percentile([v for b in self.buckets for v in b.ttfts], q)


async def overview(engine: AsyncEngine, range_name: str, now: dt.datetime) -> Overview:
    length, width = RANGES[range_name]
    # Align buckets to whole widths so a chart does not shift on every reload.
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    end = epoch + ((now - epoch) // width + 1) * width
    start = end - length
    buckets = [Bucket(start + i * width) for i in range(int(length / width))]
    query = (
        select(UsageEvent.created_at, UsageEvent.status, UsageEvent.prompt_tokens,
               UsageEvent.completion_tokens, UsageEvent.latency_ms, UsageEvent.ttft_ms)
        .where(UsageEvent.created_at >= start)
        .order_by(UsageEvent.created_at.desc())
        .limit(MAX_OVERVIEW_ROWS + 1)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    truncated = len(rows) > MAX_OVERVIEW_ROWS
    for created, status, prompt, completion, latency, ttft in rows[:MAX_OVERVIEW_ROWS]:
        index = int((created - start) / width)
        if not 0 <= index < len(buckets):
            continue
        bucket = buckets[index]
        bucket.requests += 1
        bucket.tokens += prompt + completion
        if status >= 400:
            bucket.errors += 1
        bucket.latencies.append(latency)
        if ttft is not None:
            bucket.ttfts.append(ttft)
    return Overview(range_name, start, end, buckets, truncated)


@dataclass(frozen=True)
class UsageRow:
    group: str
    label: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


async def usage(engine: AsyncEngine, *, start: dt.date, end: dt.date, group_by: str,
                tenant_id: str | None) -> list[UsageRow]:
    """Totals per tenant, key or model over ``start..end`` (days, inclusive), from the
    daily rollup, most tokens first."""
    query = usage_by_group(start=start, end=end, group_by=group_by, tenant_id=tenant_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        labels = await _labels(conn, group_by, [r[0] for r in rows])
    result = [UsageRow(name, labels.get(name, name), int(n), int(p), int(c))
              for name, n, p, c in rows]
    return sorted(result, key=lambda r: (-r.total_tokens, r.label))


async def _labels(conn: Any, group_by: str, ids: list[str]) -> dict[str, str]:
    if not ids or group_by == "model":
        return {}
    if group_by == "tenant":
        rows = await conn.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids)))
        return {i: name for i, name in rows}
    rows = await conn.execute(select(ApiKey.id, ApiKey.prefix, ApiKey.name, Tenant.name)
                              .join(Tenant, Tenant.id == ApiKey.tenant_id)
                              .where(ApiKey.id.in_(ids)))
    return {i: f"{tenant} / sk-{prefix}…" + (f" ({name})" if name else "")
            for i, prefix, name, tenant in rows}


async def audit_records(engine: AsyncEngine, *, action: str = "", actor: str = "",
                        decision: str = "", before: int | None = None,
                        limit: int = PAGE_SIZE) -> list[Any]:
    """Newest first. ``action`` matches a prefix (``guard.`` or ``key.revoke``), ``actor``
    any part of the actor."""
    query = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if action:
        query = query.where(AuditRecord.action.startswith(action, autoescape=True))
    if actor:
        query = query.where(AuditRecord.actor.contains(actor, autoescape=True))
    if decision:
        query = query.where(AuditRecord.decision == decision)
    if before is not None:
        query = query.where(AuditRecord.id < before)
    async with engine.connect() as conn:
        return list((await conn.execute(query)).all())


def runtime_rows(status: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool status with each worker's scale-to-zero countdown: seconds until the reaper
    stops (or puts to sleep) an idle worker, None for a worker that is not idle."""
    pools = []
    for pool in status:
        config = pool["config"]
        workers = []
        for worker in pool["workers"]:
            countdown = None
            if worker["state"] == "ready" and worker["inflight"] == 0:
                countdown = max(0.0, config["idle_timeout_s"] - worker["idle_s"])
            elif worker["state"] == "sleeping" and config.get("stop_after_sleep_s"):
                countdown = max(0.0, config["stop_after_sleep_s"] - worker["idle_s"])
            workers.append({**worker, "countdown_s": countdown})
        pools.append({**pool, "workers": workers,
                      "below_min": len(workers) <= config["min_workers"]})
    return pools
