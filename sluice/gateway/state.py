"""The gateway's resources, built in Starlette's lifespan and closed in reverse order.

:func:`open_state` builds one :class:`AppState` and registers every resource's shutdown
on an :class:`~contextlib.AsyncExitStack` right after it starts, so the stack closes them
in reverse: the background tasks stop, the runtime drains in-flight requests, pending
rate-limit settles finish, usage and audit records are written (or spooled), then the
limiter, telemetry and the database go. Routes and the dashboard reach it with
:func:`app_state` (``request.app.state.sluice``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request

from sluice.gateway.accounts.auth import KeyStore
from sluice.gateway.accounts.tenants import Accounts
from sluice.gateway.accounts.throttle import LoginThrottle
from sluice.gateway.backends.contract import Backend
from sluice.gateway.backends.registry import ModelRegistry, build_backend, discover
from sluice.gateway.backends.routing import Router, RoutingConfig, check_routing
from sluice.gateway.backends.runtime import Pool, Runtime
from sluice.gateway.db.models import to_utc
from sluice.gateway.db.session import create_engine, sessionmaker
from sluice.gateway.economics.budgets import Budgets
from sluice.gateway.economics.prices import PriceTable, open_price_table, refresh_prices
from sluice.gateway.ledger.audit import AuditLog, audit_key, checkpoint_file, default_instance_id
from sluice.gateway.ledger.key_cache import KeyCacheFile
from sluice.gateway.ledger.metering import Meter
from sluice.gateway.ledger.spool import Spool
from sluice.gateway.ledger.wal import UsageWAL
from sluice.gateway.pipeline.finish import Recorder
from sluice.gateway.pipeline.guard import Guard
from sluice.gateway.pipeline.intake import Intake
from sluice.gateway.pipeline.ratelimit import RateLimiter
from sluice.gateway.pipeline.cache import ResponseCache
from sluice.gateway.pipeline.service import Pipeline
from sluice.gateway.pipeline.spend import Spend
from sluice.gateway.pipeline.stages import Authenticator, Guardrails, RateLimitStage, pool_completer
from sluice.gateway.settings import BackendConfig, Settings
from sluice.gateway.telemetry import Telemetry
from sluice.gateway.workers import CpuPool, TenantSlots

log = logging.getLogger("sluice.state")

LAST_USED_INTERVAL_S = 10.0
ADMIN_CHAIN = "admin"  # the audit chain of tenant and key changes (dashboard, admin API)
PRICE_REFRESH_S = 10.0


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    db: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    registry: ModelRegistry
    runtime: Runtime
    keys: KeyStore
    accounts: Accounts
    audit: AuditLog
    meter: Meter
    limiter: RateLimiter
    telemetry: Telemetry
    pipeline: Pipeline
    workers: CpuPool  # tokenization and password hashing, off the event loop (edge)
    logins: LoginThrottle  # failed dashboard logins per account and address (edge)
    router: Router  # model groups, aliases and backend health
    spend: Spend  # prices, budgets and the response cache


def app_state(request: Request) -> AppState:
    return request.app.state.sluice  # type: ignore[no-any-return]


async def open_state(settings: Settings, stack: contextlib.AsyncExitStack, *,
                     telemetry: Telemetry | None = None) -> AppState:
    db = create_engine(settings.database_url)
    stack.push_async_callback(db.dispose)
    workers = CpuPool()  # also the loop's default executor: backends' to_thread is bounded
    workers.install(asyncio.get_running_loop())
    stack.callback(workers.close)
    sessions = sessionmaker(db)

    telemetry = telemetry or Telemetry.from_settings(settings)
    stack.callback(telemetry.shutdown)

    limiter = RateLimiter.from_settings(settings.redis_url, settings.ratelimit,
                                        redis_cluster=settings.redis_cluster)
    stack.push_async_callback(limiter.close)

    # Keys as last read, on disk: a start while the database is down still knows them.
    persisted = None
    if settings.db_outage == "serve":
        persisted = KeyCacheFile(settings.data_dir / "keys.cache")
        stack.callback(persisted.close)
    keys = KeyStore(sessions, cache_ttl_s=settings.key_cache_ttl_s, persisted=persisted)
    stack.push_async_callback(_flush_last_used, keys)

    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    instance = settings.instance_id or default_instance_id()
    key = audit_key(settings)
    audit = AuditLog(db, instance, key=key, checkpoints=checkpoint_file(settings, key),
                     spool=Spool(settings.spool_dir / f"audit-{instance}.spool"))
    await audit.start()
    stack.push_async_callback(audit.close)

    meter = Meter(db, spool=Spool(settings.spool_dir / "usage.spool"),
                  wal=UsageWAL(settings.spool_dir / "wal"),
                  batch_size=settings.meter_batch_size,
                  flush_interval_s=settings.meter_flush_interval_s)
    # Prices before the meter starts: requests recovered from a crashed process's usage
    # WAL are priced like any other.
    prices = await open_price_table(db, settings.prices)
    meter.start(price=functools.partial(_price_recovered, prices))
    stack.push_async_callback(meter.close)  # every usage record written (or spooled)

    ratelimit = RateLimitStage(limiter)
    stack.push_async_callback(ratelimit.close)  # settles of the last requests

    plugins = discover(settings.plugins)
    registry, runtime, probes = _backends(settings, plugins)
    guard = _guard(settings, registry, runtime, plugins)
    router = Router(registry, RoutingConfig(groups=settings.groups, aliases=settings.aliases),
                    pools=runtime.pools, busy=lambda name: runtime.pools[name].load())
    check_routing(router.config, registry)
    spend = await _spend(settings, db, audit, telemetry, stack, prices)
    # Before taking requests, what each backend can ready without holding its accelerator
    # (the local engine's imports): seconds that would otherwise fall on a first request.
    await asyncio.gather(*(prepare() for b in probes.values() if (prepare := getattr(b, "prepare", None))))
    await runtime.start()
    stack.push_async_callback(runtime.close)  # drains in-flight requests first

    last_used = asyncio.create_task(_periodic_last_used(keys))
    stack.push_async_callback(_cancel, last_used)

    pipeline = Pipeline(
        auth=Authenticator(keys, audit),
        intake=Intake(registry, runtime, probes, meter, router, max_n=settings.max_n,
                      refuse_without_db=settings.db_outage == "refuse",
                      default_reserve_tokens=settings.default_reserve_tokens),
        ratelimit=ratelimit,
        guardrails=Guardrails(guard, audit, limiter, telemetry),
        spend=spend,
        recorder=Recorder(meter, ratelimit, spend, telemetry),
        telemetry=telemetry,
        workers=workers, slots=TenantSlots(settings.tenant_max_concurrency),
    )
    log.info("serving models: %s", ", ".join(c.id for c in registry.cards()) or "none")
    return AppState(
        settings=settings, db=db, sessions=sessions, registry=registry, runtime=runtime,
        # Admin changes append to one shared "admin" chain in their own transaction, so
        # none commits without its audit record (edge, issue 18).
        keys=keys, accounts=Accounts(sessions, audit=AuditLog(
            db, ADMIN_CHAIN, key=key, shared=True, checkpoints=checkpoint_file(settings, key))),
        audit=audit, meter=meter,
        limiter=limiter, telemetry=telemetry, pipeline=pipeline, router=router, spend=spend,
        workers=workers, logins=LoginThrottle(),
    )


async def _spend(settings: Settings, db: AsyncEngine, audit: AuditLog, telemetry: Telemetry,
                 stack: contextlib.AsyncExitStack, prices: PriceTable) -> Spend:
    """Prices (kept in step with other replicas), budgets and the response cache. Closed
    after the runtime has drained, so the last calls' budgets settle."""
    refresh = asyncio.create_task(refresh_prices(db, prices, PRICE_REFRESH_S))
    stack.push_async_callback(_cancel, refresh)

    async def alert(event: dict[str, Any]) -> None:
        await audit.record("system:budgets", "budget.alert", event["budget_id"],
                           decision="warn", details=event)

    budgets = Budgets.from_settings(db, settings.redis_url, cluster=settings.redis_cluster,
                                    cache_ttl_s=settings.key_cache_ttl_s, alert_sink=alert)
    cache = ResponseCache.from_settings(settings.cache, settings.redis_url,
                                        cluster=settings.redis_cluster)
    spend = Spend(prices, budgets, cache, telemetry)
    stack.push_async_callback(spend.close)
    return spend


def _price_recovered(prices: PriceTable, record: dict[str, Any]) -> int:
    created = record["created_at"]
    at = dt.datetime.fromisoformat(created) if isinstance(created, str) else created
    return prices.cost(record["model"], to_utc(at), record["prompt_tokens"],
                       record["completion_tokens"])


def check_backends(settings: Settings) -> None:
    """Build every configured backend once, starting nothing: an unknown plugin or a bad
    option fails here, as one SettingsError line, before a server starts."""
    plugins = discover(settings.plugins)
    for name, config in settings.backends.items():
        build_backend(name, config, plugins, (config.pool.devices or (None,))[0])


def _backends(settings: Settings, plugins: dict[str, type[Backend]],
              ) -> tuple[ModelRegistry, Runtime, dict[str, Backend]]:
    """The model registry, one runtime pool per configured backend, and one never-started
    instance of each (a probe) for what needs no worker (token counts)."""
    registry = ModelRegistry(frozenset(settings.groups))
    runtime = Runtime()
    probes: dict[str, Backend] = {}
    for name, config in settings.backends.items():
        probes[name] = build_backend(name, config, plugins, (config.pool.devices or (None,))[0])
        registry.add(name, probes[name])
        runtime.add(
            Pool(name, lambda device=None, n=name, c=config: build_backend(n, c, plugins, device), config.pool)
        )
    return registry, runtime, probes


def _guard(settings: Settings, registry: ModelRegistry, runtime: Runtime,
           plugins: dict[str, type[Backend]]) -> Guard | None:
    """LlamaGuard through a backend that serves ``guard_model``, or the in-process engine
    on a checkpoint directory of that name (a pool of its own, not a public model)."""
    if not settings.guard_model:
        log.warning("guardrails: OFF (set SLUICE_GUARD_MODEL to a Llama Guard model to enable)")
        return None
    route = registry.get(settings.guard_model)
    if route is not None:
        pool, model = runtime.pools[route.backend_name], route.card.id
        registry.hide(model)  # tenants neither list nor call it (unless a key is scoped to it)
    else:
        config = BackendConfig(plugin="local", options={"model": settings.guard_model,
                                                        "served_model_name": "llama-guard"})
        backend = build_backend("guard", config, plugins)
        model = backend.models()[0].id
        pool = Pool("guard", lambda: build_backend("guard", config, plugins), config.pool)
        runtime.add(pool)
    log.info("guardrails: on, LlamaGuard model %s", model)
    return Guard(pool_completer(pool, model))


async def _periodic_last_used(keys: KeyStore) -> None:
    while True:
        await asyncio.sleep(LAST_USED_INTERVAL_S)
        try:
            await keys.flush_last_used()
        except Exception as exc:
            log.warning("could not record key last use: %s", exc)


async def _flush_last_used(keys: KeyStore) -> None:
    try:
        await keys.flush_last_used()
    except Exception as exc:
        log.warning("could not record key last use at shutdown: %s", exc)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
