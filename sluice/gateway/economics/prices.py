"""Per-model prices, versioned by effective time, and the exact cost of a request.

A price change is a new row with a later ``effective_from``: usage before that instant keeps
the price it was billed at, so a change never rewrites history. Prices come from the config
file (``[prices.<model>]``, effective from the epoch unless given) and from the admin API,
which inserts versions; the table below is the one source both read.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sluice.gateway.db.models import to_utc
from sluice.gateway.economics.config import PriceConfig
from sluice.gateway.economics.tables import ModelPrice

log = logging.getLogger("sluice.prices")

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Price:
    model: str
    effective_from: dt.datetime
    input: int
    output: int
    cached_input: int

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """Exact cost in pico-units: cached prompt tokens at the cached price, the rest at
        the input price, completion tokens at the output price."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        return ((prompt_tokens - cached) * self.input + cached * self.cached_input
                + completion_tokens * self.output)


class PriceTable:
    """Every price version of every model, sorted by effective time; lookups are O(log n)."""

    def __init__(self, prices: list[Price] | None = None) -> None:
        self._by_model: dict[str, list[Price]] = {}
        self._starts: dict[str, list[dt.datetime]] = {}  # effective_from of each version
        for price in prices or []:
            self.add(price)

    def add(self, price: Price) -> None:
        versions = self._by_model.setdefault(price.model, [])
        starts = self._starts.setdefault(price.model, [])
        at = bisect.bisect_right(starts, price.effective_from)
        if at and starts[at - 1] == price.effective_from:
            versions[at - 1] = price  # same instant: the later write wins
        else:
            versions.insert(at, price)
            starts.insert(at, price.effective_from)

    def price_at(self, model: str, at: dt.datetime) -> Price | None:
        starts = self._starts.get(model)
        if not starts:
            return None
        i = bisect.bisect_right(starts, at)
        return self._by_model[model][i - 1] if i else None

    def cost(self, model: str, at: dt.datetime, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0) -> int:
        """Pico-units; a model without a price costs 0 (metered in tokens only)."""
        price = self.price_at(model, at)
        return price.cost(prompt_tokens, completion_tokens, cached_tokens) if price else 0

    def current(self) -> list[Price]:
        now = dt.datetime.now(dt.UTC)
        out = []
        for model in sorted(self._by_model):
            if (price := self.price_at(model, now)) is not None:
                out.append(price)
        return out

    def history(self, model: str) -> list[Price]:
        return list(self._by_model.get(model, []))

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def replace(self, prices: list[Price]) -> None:
        self._by_model, self._starts = {}, {}
        for price in prices:
            self.add(price)


async def load_prices(engine: AsyncEngine) -> list[Price]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(ModelPrice).order_by(ModelPrice.id))).all()
    return [Price(model=r.model, effective_from=r.effective_from, input=r.input_micros,
                  output=r.output_micros, cached_input=r.cached_input_micros) for r in rows]


def config_prices(config: dict[str, PriceConfig]) -> list[Price]:
    return [Price(model=model, effective_from=to_utc(p.effective_from or EPOCH), input=p.input,
                  output=p.output, cached_input=p.input if p.cached_input is None else p.cached_input)
            for model, p in config.items()]


async def sync_config_prices(engine: AsyncEngine, config: dict[str, PriceConfig]) -> None:
    """Write config-file prices as versions unless that exact version is already stored, so
    the database holds the whole history whichever replica started with which file."""
    wanted = config_prices(config)
    if not wanted:
        return
    stored = {(p.model, p.effective_from): p for p in await load_prices(engine)}
    async with engine.begin() as conn:
        for price in wanted:
            have = stored.get((price.model, price.effective_from))
            if have == price:
                continue
            await conn.execute(ModelPrice.__table__.insert().values(
                model=price.model, effective_from=price.effective_from,
                input_micros=price.input, output_micros=price.output,
                cached_input_micros=price.cached_input, source="config"))


async def add_price(engine: AsyncEngine, model: str, config: PriceConfig, *,
                    source: str) -> Price:
    """A new price version (admin API). ``effective_from`` defaults to now; a time in the
    past is refused, since billed usage must keep the price it was billed at."""
    now = dt.datetime.now(dt.UTC)
    effective = to_utc(config.effective_from) if config.effective_from else now
    if effective < now - dt.timedelta(seconds=5):
        raise ValueError("effective_from is in the past: a price change applies from now on")
    price = Price(model=model, effective_from=effective, input=config.input, output=config.output,
                  cached_input=config.input if config.cached_input is None else config.cached_input)
    async with engine.begin() as conn:
        await conn.execute(ModelPrice.__table__.insert().values(
            model=model, effective_from=effective, input_micros=price.input,
            output_micros=price.output, cached_input_micros=price.cached_input, source=source))
    return price


async def open_price_table(engine: AsyncEngine, config: dict[str, PriceConfig]) -> PriceTable:
    """The price table at start-up: config prices stored as versions, then every version
    read back. With the database unreachable, the config's prices alone (logged)."""
    try:
        await sync_config_prices(engine, config)
        return PriceTable(await load_prices(engine))
    except (SQLAlchemyError, OSError) as exc:
        log.warning("prices: database unreachable (%s); using the config file's prices", exc)
        return PriceTable(config_prices(config))


async def refresh_prices(engine: AsyncEngine, table: PriceTable, interval_s: float) -> None:
    """Keep ``table`` in step with versions added on other replicas (admin API)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            table.replace(await load_prices(engine))
        except (SQLAlchemyError, OSError) as exc:
            log.info("prices: refresh failed (%s); keeping the last table", exc)
