"""/v1: the OpenAI-compatible API."""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sluice.gateway.accounts.auth import Principal
from sluice.gateway.errors import InvalidRequest, NotFound, SluiceError
from sluice.gateway.http.capabilities import check_serves
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest
from sluice.gateway.http.streaming import read_body
from sluice.gateway.pipeline.service import Gateway
from sluice.gateway.util import json_response

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        param = ".".join(loc) or None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            message = f"Missing required parameter: '{param}'"
        elif param:
            message = f"Invalid value for '{param}': {message}"
        raise InvalidRequest(message, param=param, code=err["type"]) from None


async def authenticate(gateway: Gateway, request: Request) -> Principal:
    return await gateway.auth.authenticate(
        request.headers.get("authorization"),
        request.client.host if request.client else "-",
        request.state.request_id,
    )


async def chat_completions(request: Request) -> Response:
    return await serve(request, "chat", ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await serve(request, "completions", CompletionRequest)


async def serve(request: Request, endpoint: str,
                schema: type[ChatCompletionRequest] | type[CompletionRequest]) -> Response:
    """auth -> parse -> route -> rate limit -> input guard -> dispatch (-> output guard,
    metering, audit and telemetry as the call ends)."""
    gateway: Gateway = request.app.state.gateway
    request_id = request.state.request_id
    tracing = gateway.telemetry.tracing
    span = (gateway.telemetry.tracer.start_span(f"POST {request.url.path}") if tracing
            else trace.INVALID_SPAN)
    try:
        with trace.use_span(span, end_on_exit=False) if tracing else contextlib.nullcontext():
            with gateway.telemetry.span("auth") if tracing else contextlib.nullcontext():
                principal = await authenticate(gateway, request)
            data, raw = await read_body(request, gateway.settings.max_body_bytes)
            body = schema.model_validate(data, raw)
            if isinstance(body, ChatCompletionRequest):
                call = gateway.chat_call(request_id, principal, body, span)
            else:
                call = gateway.completion_call(request_id, principal, body, span)
            check_serves(gateway.registry.routes(body.model)[0].card, body)
    except BaseException:
        span.end()
        raise
    try:
        await gateway.admit(call)
    except SluiceError as exc:
        exc.headers = {**call.headers, **exc.headers}
        raise
    if call.stream:
        return StreamingResponse(
            gateway.stream(call),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **call.headers},
        )
    return json_response(await gateway.complete(call), headers=call.headers)


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    principal = await authenticate(gateway, request)
    cards = [
        c for c in gateway.registry.cards() if principal.models is None or c.id in principal.models
    ]
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": c.id, "object": "model", "created": 0, "owned_by": c.owned_by}
                for c in cards
            ],
        }
    )


async def get_model(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    principal = await authenticate(gateway, request)
    model = request.path_params["model"]
    route = gateway.registry.get(model)
    if route is None or (principal.models is not None and model not in principal.models):
        raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
    return json_response(
        {"id": model, "object": "model", "created": 0, "owned_by": route.card.owned_by}
    )


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
