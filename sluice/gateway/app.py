"""``create_app(settings)``: the stages of the request path, assembled in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sluice.gateway import dashboard
from sluice.gateway.accounts.tenants import Accounts
from sluice.gateway.ledger.audit import AuditLog, audit_key, checkpoint_file, default_instance_id
from sluice.gateway.accounts.auth import KeyStore
from sluice.gateway.backends.contract import Backend
from sluice.gateway.db.session import create_engine, sessionmaker
from sluice.gateway.errors import SluiceError, from_status
from sluice.gateway.ledger.metering import Meter
from sluice.gateway.http.middleware import RequestIdMiddleware
from sluice.gateway.backends.registry import ModelRegistry, build_backend, discover
from sluice.gateway.routes import admin, health, openai
from sluice.gateway.backends.runtime import Pool, Runtime
from sluice.gateway.pipeline.guard import Guard
from sluice.gateway.pipeline.ratelimit import RateLimiter
from sluice.gateway.pipeline.service import Gateway
from sluice.gateway.settings import BackendConfig, Settings
from sluice.gateway.ledger.spool import Spool
from sluice.gateway.ledger.wal import UsageWAL
from sluice.gateway.pipeline.stages import Admission, Authenticator, Guardrails, pool_completer
from sluice.gateway.telemetry import Telemetry

log = logging.getLogger("sluice.app")


def build_gateway(settings: Settings, *, telemetry: Telemetry | None = None) -> Gateway:
    engine = create_engine(settings.database_url)
    sessions = sessionmaker(engine)
    plugins = discover(settings.plugins)
    registry = ModelRegistry()
    runtime = Runtime()
    probes = {}
    for name, config in settings.backends.items():
        probes[name] = build_backend(name, config, plugins)
        registry.add(name, probes[name])
        runtime.add(
            Pool(name, lambda n=name, c=config: build_backend(n, c, plugins), config.pool)
        )
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    instance = settings.instance_id or default_instance_id()
    key = audit_key(settings)
    audit = AuditLog(engine, instance, key=key, checkpoints=checkpoint_file(settings, key),
                     spool=Spool(settings.spool_dir / f"audit-{instance}.spool"))
    telemetry = telemetry or Telemetry.from_settings(settings)
    limiter = RateLimiter.from_settings(settings.redis_url, settings.ratelimit,
                                          redis_cluster=settings.redis_cluster)
    guard = _guard(settings, registry, runtime, plugins)
    keys = KeyStore(sessions, cache_ttl_s=settings.key_cache_ttl_s)
    return Gateway(
        settings,
        auth=Authenticator(keys, audit),
        accounts=Accounts(sessions, audit=audit),
        registry=registry,
        runtime=runtime,
        probes=probes,
        admission=Admission(limiter),
        guardrails=Guardrails(guard, audit, limiter, telemetry),
        meter=Meter(
            engine,
            spool=Spool(settings.spool_dir / "usage.spool"),
            wal=UsageWAL(settings.spool_dir / "wal"),
            batch_size=settings.meter_batch_size,
            flush_interval_s=settings.meter_flush_interval_s,
        ),
        audit=audit,
        telemetry=telemetry,
    )


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


async def _periodic_last_used(gateway: Gateway) -> None:
    while True:
        await asyncio.sleep(10)
        try:
            await gateway.keys.flush_last_used()
        except Exception as exc:
            log.warning("could not record key last use: %s", exc)


def create_app(settings: Settings | None = None, *, telemetry: Telemetry | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    gateway = build_gateway(settings, telemetry=telemetry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.gateway = gateway
        gateway.meter.start()
        await gateway.audit.start()
        await gateway.runtime.start()
        last_used = asyncio.create_task(_periodic_last_used(gateway))
        models = ", ".join(card.id for card in gateway.registry.cards())
        log.info("serving models: %s", models or "none")
        try:
            yield
        finally:
            last_used.cancel()
            await gateway.runtime.close()  # drains in-flight requests first
            await gateway.meter.close()  # then every usage record is written (or spooled)
            await gateway.audit.close()
            await gateway.admission.limiter.close()
            with contextlib.suppress(Exception):
                await gateway.keys.flush_last_used()
            gateway.telemetry.shutdown()
            await gateway.meter.engine.dispose()

    async def sluice_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SluiceError)
        return exc.to_response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return from_status(exc.status_code, message).to_response()

    app = Starlette(
        routes=[
            *openai.routes,
            *admin.routes,
            *health.routes,
            *dashboard.build_routes(cookie_secure=settings.dashboard_cookie_secure),
        ],
        lifespan=lifespan,
        exception_handlers={SluiceError: sluice_error, HTTPException: http_error},
    )
    app.add_middleware(RequestIdMiddleware)
    app.state.gateway = gateway
    return app
