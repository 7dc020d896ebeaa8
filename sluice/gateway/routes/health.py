"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sluice.gateway.http.openapi import openapi_document
from sluice.gateway.state import app_state
from sluice.gateway.util import json_response


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the database answers and no backend is stuck failing to start."""
    state = app_state(request)
    checks: dict[str, str] = {}
    try:
        async with state.sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    for name, pool in state.runtime.pools.items():
        checks[f"backend:{name}"] = "ok" if pool.ready else f"error: {pool.last_error}"
    ready = all(v == "ok" for v in checks.values())
    return json_response({"status": "ok" if ready else "unavailable", "checks": checks},
                         status=200 if ready else 503)


async def metrics(request: Request) -> Response:
    """Prometheus exposition: request, token, latency and pool metrics."""
    state = app_state(request)
    telemetry = state.telemetry
    for status in state.runtime.status():
        telemetry.set_queue_depth(status["backend"], status["queue_depth"])
        counts: dict[str, int] = dict.fromkeys(
            ("starting", "ready", "busy", "going_to_sleep", "sleeping", "waking", "stopping"), 0)
        for worker in status["workers"]:
            counts[worker["state"]] = counts.get(worker["state"], 0) + 1
        for state, count in counts.items():
            telemetry.set_pool_workers(status["backend"], state, count)
        for device in status["config"].get("devices") or ():  # data-parallel pools: per device
            on = [w["state"] for w in status["workers"] if w.get("device") == device]
            for state in counts:
                telemetry.set_device_workers(status["backend"], device, state, on.count(state))
        telemetry.set_pool_starts(
            status["backend"], cold_starts=status["cold_starts"],
            last_cold_start_s=status["last_cold_start_s"], wakes=status["wakes"],
            last_wake_s=status["last_wake_s"])
        telemetry.set_pool_transitions(status["backend"], status.get("transitions", {}))
    body, content_type = telemetry.metrics_response()
    return Response(body, media_type=content_type)


async def openapi(request: Request) -> Response:
    return json_response(openapi_document())


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
