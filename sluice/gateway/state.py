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
import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import Request

from sluice.gateway.accounts.auth import KeyStore
from sluice.gateway.accounts.tenants import Accounts
from sluice.gateway.backends.contract import Backend
from sluice.gateway.backends.registry import ModelRegistry, build_backend, discover
from sluice.gateway.backends.runtime import Pool, Runtime
from sluice.gateway.db.session import create_engine, sessionmaker
from sluice.gateway.ledger.audit import AuditLog, audit_key, checkpoint_file, default_instance_id
from sluice.gateway.ledger.key_cache import KeyCacheFile
from sluice.gateway.ledger.metering import Meter
from sluice.gateway.ledger.spool import Spool
from sluice.gateway.ledger.wal import UsageWAL
from sluice.gateway.pipeline.finish import Recorder
from sluice.gateway.pipeline.guard import Guard
from sluice.gateway.pipeline.intake import Intake
from sluice.gateway.pipeline.ratelimit import RateLimiter
from sluice.gateway.pipeline.service import Pipeline
from sluice.gateway.pipeline.stages import Authenticator, Guardrails, RateLimitStage, pool_completer
from sluice.gateway.settings import BackendConfig, Settings
from sluice.gateway.telemetry import Telemetry

log = logging.getLogger("sluice.state")

LAST_USED_INTERVAL_S = 10.0


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


def app_state(request: Request) -> AppState:
    return request.app.state.sluice  # type: ignore[no-any-return]


async def open_state(settings: Settings, stack: contextlib.AsyncExitStack, *,
                     telemetry: Telemetry | None = None) -> AppState:
    db = create_engine(settings.database_url)
    stack.push_async_callback(db.dispose)
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
    meter.start()
    stack.push_async_callback(meter.close)  # every usage record written (or spooled)

    ratelimit = RateLimitStage(limiter)
    stack.push_async_callback(ratelimit.close)  # settles of the last requests

    plugins = discover(settings.plugins)
    registry, runtime, probes = _backends(settings, plugins)
    guard = _guard(settings, registry, runtime, plugins)
    await runtime.start()
    stack.push_async_callback(runtime.close)  # drains in-flight requests first

    last_used = asyncio.create_task(_periodic_last_used(keys))
    stack.push_async_callback(_cancel, last_used)

    pipeline = Pipeline(
        auth=Authenticator(keys, audit),
        intake=Intake(settings, registry, runtime, probes, meter),
        ratelimit=ratelimit,
        guardrails=Guardrails(guard, audit, limiter, telemetry),
        recorder=Recorder(meter, ratelimit, telemetry),
        telemetry=telemetry,
    )
    log.info("serving models: %s", ", ".join(c.id for c in registry.cards()) or "none")
    return AppState(
        settings=settings, db=db, sessions=sessions, registry=registry, runtime=runtime,
        keys=keys, accounts=Accounts(sessions, audit=audit), audit=audit, meter=meter,
        limiter=limiter, telemetry=telemetry, pipeline=pipeline,
    )


def check_backends(settings: Settings) -> None:
    """Build every configured backend once, starting nothing: an unknown plugin or a bad
    option fails here, as one SettingsError line, before a server starts."""
    plugins = discover(settings.plugins)
    for name, config in settings.backends.items():
        build_backend(name, config, plugins)


def _backends(settings: Settings, plugins: dict[str, type[Backend]],
              ) -> tuple[ModelRegistry, Runtime, dict[str, Backend]]:
    """The model registry, one runtime pool per configured backend, and one never-started
    instance of each (a probe) for what needs no worker (token counts)."""
    registry = ModelRegistry()
    runtime = Runtime()
    probes: dict[str, Backend] = {}
    for name, config in settings.backends.items():
        probes[name] = build_backend(name, config, plugins)
        registry.add(name, probes[name])
        runtime.add(
            Pool(name, lambda n=name, c=config: build_backend(n, c, plugins), config.pool)
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
