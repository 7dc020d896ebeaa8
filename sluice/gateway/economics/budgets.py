"""Budgets in money per tenant and per key, per UTC day or month, shared across replicas.

A request reserves its most expensive outcome at admission (prompt at the input price plus
``max_tokens`` at the output price) against every budget that covers it, and settles to its
real cost when it finishes. A hard budget refuses a reservation that would take spent plus
reserved past the limit, so concurrent requests cannot overspend: the only excess possible is
a request whose real cost exceeds its reservation (none, when ``max_tokens`` bounds it). Soft
budgets never refuse; both send alerts as spend crosses their thresholds (50/80/100% by
default), once per period across all replicas, to a webhook with retries and into the audit
log.

Spend is kept in Redis (the limiter's server) when configured, else in process memory, in
whole micro-units rounded up per request; the exact cost is on the usage rows. A period's
counter starts from the usage already in the database, so a Redis restart forgets nothing
that was written.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.economics import PICO_PER_MICRO
from sluice.gateway.economics.spend_store import MemorySpendStore, RedisSpendStore, SpendStore
from sluice.gateway.economics.tables import Budget
from sluice.gateway.db.models import UsageDaily

log = logging.getLogger("sluice.budgets")

AlertSink = Callable[[dict[str, Any]], Awaitable[None]]


def micros_up(pico: int) -> int:
    return -(-pico // PICO_PER_MICRO)


@dataclass(frozen=True, slots=True)
class BudgetRule:
    id: str
    tenant_id: str
    key_id: str | None
    period: str
    limit_micros: int
    hard: bool
    thresholds: tuple[int, ...]
    webhook_url: str | None

    @classmethod
    def from_row(cls, row: Any) -> BudgetRule:
        return cls(id=row.id, tenant_id=row.tenant_id, key_id=row.key_id, period=row.period,
                   limit_micros=int(row.limit_micros), hard=row.mode == "hard",
                   thresholds=tuple(sorted(int(t) for t in (row.thresholds or []))),
                   webhook_url=row.webhook_url)


def period_window(period: str, now: dt.datetime) -> tuple[str, dt.date, dt.date, float]:
    """(label, first day, last day, seconds until the period ends) of the UTC period."""
    today = now.astimezone(dt.UTC).date()
    if period == "day":
        first = last = today
    else:
        first = today.replace(day=1)
        last = today.replace(day=calendar.monthrange(today.year, today.month)[1])
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC)
    label = first.isoformat() if period == "day" else first.strftime("%Y-%m")
    return label, first, last, max((end - now).total_seconds(), 1.0)


@dataclass(slots=True)
class Reservation:
    """What admission took from each budget; handed back to :meth:`Budgets.settle`."""

    keys: list[str]
    rules: list[BudgetRule]
    amount_micros: int
    warnings: list[str] = field(default_factory=list)


class BudgetExceeded(Exception):
    def __init__(self, rule: BudgetRule, spent: int) -> None:
        who = "key" if rule.key_id else "tenant"
        super().__init__(f"The {rule.period}ly budget of this {who} is spent "
                         f"({spent} of {rule.limit_micros} micro-units).")
        self.rule = rule
        self.retry_after_s = period_window(rule.period, dt.datetime.now(dt.UTC))[3]


class Budgets:
    """Budget rules (read from the database, cached briefly) and their enforcement."""

    def __init__(self, engine: AsyncEngine, store: SpendStore, *, cache_ttl_s: float = 5.0,
                 key_prefix: str = "sluice:budget:", alert_sink: AlertSink | None = None,
                 webhook_retries: int = 3, webhook_timeout_s: float = 5.0) -> None:
        self._engine = engine
        self.store = store
        self._ttl = cache_ttl_s
        self._prefix = key_prefix
        self._rules: dict[str, tuple[float, list[BudgetRule]]] = {}
        self._loading: dict[str, asyncio.Future[list[BudgetRule]]] = {}  # tenant -> query
        self._seeded: set[str] = set()
        self._alert_sink = alert_sink
        self._retries = webhook_retries
        self._timeout = webhook_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, engine: AsyncEngine, redis_url: str | None, *, cluster: bool = False,
                      **kw: Any) -> Budgets:
        if not redis_url:
            return cls(engine, MemorySpendStore(), **kw)
        client = RedisCluster.from_url(redis_url) if cluster else aioredis.Redis.from_url(redis_url)
        return cls(engine, RedisSpendStore(client), **kw)

    async def rules_for(self, tenant_id: str, key_id: str) -> list[BudgetRule]:
        cached = self._rules.get(tenant_id)
        if cached is None or cached[0] < time.monotonic():
            # One query per tenant at a time: when the cache expires under load, every call
            # in flight would otherwise open a connection and ask the same question.
            loading = self._loading.get(tenant_id)
            if loading is None:
                loading = asyncio.ensure_future(self._load(tenant_id))
                self._loading[tenant_id] = loading
                loading.add_done_callback(lambda t: self._loaded(tenant_id, t))
            rules = await asyncio.shield(loading)
        else:
            rules = cached[1]
        return [r for r in rules if r.key_id is None or r.key_id == key_id]

    async def _load(self, tenant_id: str) -> list[BudgetRule]:
        cached = self._rules.get(tenant_id)
        try:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(
                    select(Budget).where(Budget.tenant_id == tenant_id))).all()  # fmt: skip
        except (SQLAlchemyError, OSError) as exc:
            # Database unreachable (SLUICE_DB_OUTAGE=serve keeps serving): the last rules
            # known, else none enforced until it is back; never a 500 (ledger, issue 18).
            log.warning("budget rules for %s unavailable (%s)", tenant_id, exc)
            return cached[1] if cached else []
        rules = [BudgetRule.from_row(r) for r in rows]
        if self._loading.get(tenant_id) is asyncio.current_task():  # not invalidated since
            self._rules[tenant_id] = (time.monotonic() + self._ttl, rules)
        return rules

    def _loaded(self, tenant_id: str, task: asyncio.Future[list[BudgetRule]]) -> None:
        if self._loading.get(tenant_id) is task:
            del self._loading[tenant_id]

    async def spent(self, rule: BudgetRule, label: str) -> int | None:
        """Micro-units spent in the period ``label`` (None: nothing counted yet here)."""
        return await self.store.spent(self._key(rule, label))

    def invalidate(self, tenant_id: str | None = None) -> None:
        if tenant_id is None:
            self._rules.clear()
            self._loading.clear()  # a query begun before the change must not be shared
        else:
            self._rules.pop(tenant_id, None)
            self._loading.pop(tenant_id, None)

    def _key(self, rule: BudgetRule, label: str) -> str:
        return f"{self._prefix}{{{rule.tenant_id}}}:{rule.id}:{label}"

    async def _spent_in_db(self, rule: BudgetRule, first: dt.date, last: dt.date) -> int:
        query = select(func.coalesce(func.sum(UsageDaily.cost_pico), 0)).where(
            UsageDaily.tenant_id == rule.tenant_id, UsageDaily.day >= first, UsageDaily.day <= last)
        if rule.key_id is not None:
            query = query.where(UsageDaily.key_id == rule.key_id)
        async with self._engine.connect() as conn:
            return micros_up(int((await conn.execute(query)).scalar_one()))

    async def reserve(self, tenant_id: str, key_id: str, cost_pico: int) -> Reservation | None:
        """Reserve ``cost_pico`` against every budget of the tenant and key; None without
        budgets. Raises :class:`BudgetExceeded` when a hard budget cannot take it."""
        rules = await self.rules_for(tenant_id, key_id)
        if not rules:
            return None
        now = dt.datetime.now(dt.UTC)
        keys, ttl = [], 0.0
        for rule in rules:
            label, first, last, left_s = period_window(rule.period, now)
            key = self._key(rule, label)
            if key not in self._seeded:
                await self.store.seed(key, await self._spent_in_db(rule, first, last), left_s + 86400)
                self._seeded.add(key)
            keys.append(key)
            ttl = max(ttl, left_s + 86400)
        amount = micros_up(cost_pico)
        refused, spent = await self.store.reserve(
            keys, [r.limit_micros if r.hard else None for r in rules], amount, ttl)
        if refused:
            raise BudgetExceeded(rules[refused - 1], spent[refused - 1])
        warnings = [f"{r.period}ly {'key' if r.key_id else 'tenant'} budget exceeded"
                    for r, s in zip(rules, spent, strict=True)
                    if not r.hard and s + amount > r.limit_micros]
        return Reservation(keys=keys, rules=rules, amount_micros=amount, warnings=warnings)

    async def settle(self, reservation: Reservation | None, cost_pico: int) -> None:
        """Replace the reservation by the real cost and send any threshold alerts."""
        if reservation is None:
            return
        moves = await self.store.settle(reservation.keys, reservation.amount_micros,
                                        micros_up(cost_pico))
        for rule, key, (before, after) in zip(reservation.rules, reservation.keys, moves,
                                              strict=True):
            for threshold in rule.thresholds:
                mark = rule.limit_micros * threshold / 100
                if before < mark <= after:
                    self._alert(rule, key, threshold, after)

    def _alert(self, rule: BudgetRule, key: str, threshold: int, spent: int) -> None:
        task = asyncio.create_task(self._deliver(rule, key, threshold, spent))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, rule: BudgetRule, key: str, threshold: int, spent: int) -> None:
        if not await self.store.claim_alert(f"{key}:alert:{threshold}", 40 * 86400):
            return  # another replica (or an earlier crossing) sent it
        event = {"type": "budget.threshold", "budget_id": rule.id, "tenant_id": rule.tenant_id,
                 "key_id": rule.key_id, "period": rule.period, "threshold_percent": threshold,
                 "spent_micros": spent, "limit_micros": rule.limit_micros,
                 "mode": "hard" if rule.hard else "soft", "delivered": None}
        if rule.webhook_url:
            event["delivered"] = await self._post(rule.webhook_url, event)
        log.warning("budget %s of tenant %s at %d%% (%d of %d micro-units)", rule.id,
                    rule.tenant_id, threshold, spent, rule.limit_micros)
        if self._alert_sink is not None:
            await self._alert_sink(event)

    async def _post(self, url: str, event: dict[str, Any]) -> bool:
        delay = 0.5
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            for attempt in range(self._retries):
                try:
                    response = await client.post(url, json=event)
                    if response.status_code < 300:
                        return True
                    if response.status_code < 500 and response.status_code != 429:
                        return False  # the receiver refuses it; retrying will not help
                except httpx.HTTPError as exc:
                    log.info("budget webhook attempt %d failed: %s", attempt + 1, exc)
                if attempt + 1 < self._retries:
                    await asyncio.sleep(delay)
                    delay *= 2
        return False

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
