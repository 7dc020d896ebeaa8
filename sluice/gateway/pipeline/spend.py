"""Spend: what a call costs, held against budgets, and answered from the response cache.

At admission a call reserves its worst-case cost against the tenant's and key's budgets
(economics/budgets.py) and looks itself up in the response cache (pipeline/cache.py); at the
end it is priced exactly at the price in force (economics/prices.py), its budgets settle to
that cost, and a complete deterministic answer is stored for the next identical request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from prometheus_client import Counter

from sluice.gateway.economics.budgets import BudgetExceeded, Budgets
from sluice.gateway.economics.prices import PriceTable
from sluice.gateway.errors import RateLimitExceeded
from sluice.gateway.pipeline.cache import ResponseCache
from sluice.gateway.pipeline.call import Call
from sluice.gateway.telemetry import Telemetry

log = logging.getLogger("sluice.spend")


class Spend:
    def __init__(self, prices: PriceTable, budgets: Budgets, cache: ResponseCache,
                 telemetry: Telemetry) -> None:
        self.prices = prices
        self.budgets = budgets
        self.cache = cache
        self._tasks: set[asyncio.Task[Any]] = set()
        reg = telemetry.registry
        self.cost_total = Counter("cost", "Cost of served requests, in currency units",
                                  ["model", "backend"], namespace="sluice", registry=reg)
        self.cache_requests = Counter("cache_requests", "Response cache lookups",
                                      ["result"], namespace="sluice", registry=reg)

    async def admit(self, call: Call) -> None:
        """Reserve the worst case against budgets (429 ``budget_exceeded`` when a hard
        budget cannot take it), then look the call up in the cache."""
        await self._reserve(call)
        if call.body:
            call.cache_key = self.cache.key_for(
                tenant_id=call.principal.tenant_id, tenant_name=call.principal.tenant_name,
                endpoint=call.endpoint, model=call.model, body=call.body,
                headers={"cache-control": call.cache_control})
        if call.cache_key is not None:
            call.replay = await self.cache.get(call.cache_key)
            self.cache_requests.labels("hit" if call.replay is not None else "miss").inc()

    async def _reserve(self, call: Call) -> None:
        rules = await self.budgets.rules_for(call.principal.tenant_id, call.principal.key_id)
        if not rules:
            return
        price = self.prices.price_at(call.model, dt.datetime.now(dt.UTC))
        if price is None:
            return  # an unpriced model costs nothing: no budget can refuse it
        worst = price.cost(call.prompt_tokens, call.reserve_tokens * len(call.requests))
        try:
            call.budget = await self.budgets.reserve(call.principal.tenant_id,
                                                     call.principal.key_id, worst)
        except BudgetExceeded as exc:
            raise RateLimitExceeded(
                str(exc), code="budget_exceeded",
                headers={"retry-after": str(int(exc.retry_after_s) + 1)}) from None
        if call.budget is not None and call.budget.warnings:
            call.headers["x-sluice-budget-warning"] = "; ".join(call.budget.warnings)

    def price(self, call: Call, at: dt.datetime) -> int:
        """The call's exact cost in pico-units (a cache hit: zero, or the cached price)."""
        if call.replay is not None:
            if self.cache.config.hit_price == "zero":
                return 0
            price = self.prices.price_at(call.model, at)
            tokens = call.prompt_tokens + call.completion_tokens
            return tokens * price.cached_input if price else 0
        return self.prices.cost(call.model, at, call.prompt_tokens, call.completion_tokens)

    def finish(self, call: Call) -> None:
        """After the usage record: settle budgets, count the cost, fill the cache."""
        backend = call.served_by or call.pool.name
        if call.cost_pico:
            self.cost_total.labels(call.model, backend).inc(call.cost_pico / 1e12)
        if call.budget is not None:
            self._background(self.budgets.settle(call.budget, call.cost_pico))
        complete = (call.status == 200 and call.recorded is not None and call.replay is None
                    and all(c.finish_reason for c in call.choices))
        if complete and call.cache_key is not None:
            self._background(self.cache.put(call.cache_key, call.recorded or []))

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("spend settle failed: %s", task.exception())

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.budgets.close()
        await self.cache.close()
