"""/v1: the OpenAI-compatible API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sluice.gateway.accounts.auth import Principal
from sluice.gateway.backends.contract import ModelCard
from sluice.gateway.errors import InvalidRequest, NotFound, SluiceError
from sluice.gateway.http.capabilities import check_serves
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest
from sluice.gateway.http.streaming import read_body
from sluice.gateway.routes.embeddings import embeddings
from sluice.gateway.state import AppState, app_state
from sluice.gateway.telemetry import trace_headers
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


async def authenticate(state: AppState, request: Request) -> Principal:
    return await state.pipeline.auth.authenticate(
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
    state = app_state(request)
    request_id = request.state.request_id
    tracing = state.telemetry.tracing
    # request.url.path without request.url, which rebuilds the whole URL (~4% of a call)
    span = state.telemetry.request_span(f"POST {request.scope['path']}", request.headers)
    with state.telemetry.opening(span):
        with state.telemetry.span("auth") if tracing else contextlib.nullcontext():
            principal = await authenticate(state, request)
        data, raw = await read_body(request, state.settings.max_body_bytes)
        body = schema.model_validate(data, raw)
        body.trace_headers = trace_headers(request.headers, span if tracing else None)
        if isinstance(body, ChatCompletionRequest):
            call = state.pipeline.chat_call(request_id, principal, body, span)
        else:
            if body.token_prompts and state.pipeline.guardrails.enabled:
                raise InvalidRequest("Invalid value for 'prompt': token-id prompts cannot be "
                                     "checked by the input guard; send the prompt as text",
                                     param="prompt", code="unsupported_parameter")
            call = state.pipeline.completion_call(request_id, principal, body, span)
        call.cache_control = request.headers.get("cache-control", "")
        check_serves(state.registry.routes(call.model)[0].card, body)
    try:
        await state.pipeline.admit(call)
    except SluiceError as exc:
        exc.headers = {**call.headers, **exc.headers}
        raise
    if call.stream:
        return await _stream(state, call)
    return json_response(await state.pipeline.complete(call), headers=call.headers)


async def _stream(state: AppState, call: Any) -> Response:
    """The SSE response, its first event awaited before the headers go: a call that fails
    before sending anything (an upstream's 429, 503, a bad request) is answered with its
    status and headers (Retry-After, x-ratelimit-*), as a plain request would be."""
    events = state.pipeline.stream(call)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    if call.error is not None:
        await events.aclose()  # the pipeline has ended the call (metered, settled)
        call.error.headers = {**call.headers, **call.error.headers}  # the failure's win
        return call.error.to_response()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in events:
                yield chunk
        finally:
            await events.aclose()  # a client gone mid-stream: the pipeline records it

    return StreamingResponse(
        body(), media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **call.headers},
    )


async def list_models(request: Request) -> Response:
    state = app_state(request)
    principal = await authenticate(state, request)
    cards = [
        c for c in state.registry.cards() if state.registry.visible(c.id, principal.models)
    ]
    return json_response(
        {
            "object": "list",
            "data": [_model(c) for c in cards],
        }
    )


async def get_model(request: Request) -> Response:
    state = app_state(request)
    principal = await authenticate(state, request)
    model = request.path_params["model"]
    route = state.registry.get(model)
    if route is None or not state.registry.visible(model, principal.models):
        raise NotFound(f"The model '{model}' does not exist", param="model", code="model_not_found")
    return json_response(_model(route.card))


def _model(card: ModelCard) -> dict[str, Any]:
    """OpenAI's Model object, plus what the model serves (sorted, for stable output)."""
    return {"id": card.id, "object": "model", "created": 0, "owned_by": card.owned_by,
            "capabilities": sorted(card.capabilities)}


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
