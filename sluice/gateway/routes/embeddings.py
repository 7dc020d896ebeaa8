"""/v1/embeddings: auth, rate limit, one backend call, metered from the backend's usage.

The same stages as a completion, minus what has no meaning here (guardrails, streaming,
choices): the call is a :class:`~sluice.gateway.pipeline.call.Call` without generation
requests, so the rate limiter, the meter and telemetry treat it like any other.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from sluice.gateway.backends.contract import EmbeddingRequest
from sluice.gateway.errors import InvalidRequest, NotFound, SluiceError
from sluice.gateway.http.formats import ChatFormat
from sluice.gateway.http.schemas import EmbeddingRequestBody
from sluice.gateway.http.streaming import read_body
from sluice.gateway.pipeline.call import Call
from sluice.gateway.pipeline.dispatch import as_sluice_error
from sluice.gateway.state import app_state
from sluice.gateway.telemetry import gen_ai_attributes, trace_headers
from sluice.gateway.util import json_response


def _texts(value: Any) -> list[str]:
    """The inputs that are text (token-id inputs have none to score)."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)]


def _estimate(value: Any) -> int:
    """Prompt tokens before the backend counts them (for rate limiting): ~4 bytes a token,
    one per token id."""
    if isinstance(value, str):
        return 1 + len(value.encode()) // 4
    return sum(_estimate(v) if isinstance(v, (str, list)) else 1 for v in value)


async def embeddings(request: Request) -> Response:
    state = app_state(request)
    pipeline = state.pipeline
    request_id = request.state.request_id
    tracing = state.telemetry.tracing
    span = state.telemetry.request_span(f"POST {request.url.path}", request.headers)
    with state.telemetry.opening(span):
        principal = await pipeline.auth.authenticate(
            request.headers.get("authorization"),
            request.client.host if request.client else "-", request_id)
        data, raw = await read_body(request, state.settings.max_body_bytes)
        body = EmbeddingRequestBody.model_validate(data, raw)
        route = state.registry.get(body.model)
        if route is None:
            raise NotFound(f"The model '{body.model}' does not exist", param="model",
                           code="model_not_found")
        principal.check_model(body.model)
        if not route.card.serves("embeddings"):
            raise InvalidRequest(f"The model '{body.model}' does not support embeddings.",
                                 param="model", code="unsupported_parameter")
    span.set_attributes(gen_ai_attributes(model=body.model, operation="embeddings",
                                          provider=route.card.provider))
    texts = _texts(body.input)
    call = Call(
        request_id=request_id, endpoint="embeddings", principal=principal, model=body.model,
        pool=state.runtime.pools[route.backend_name], requests=[],
        count_prompt=lambda: _estimate(body.input), prompt_text="\n".join(texts)[:4096],
        conversation=[], reserve_tokens=0, fmt=ChatFormat(), span=span,
    )
    job = EmbeddingRequest(
        request_id, body.model, body.input, dimensions=body.dimensions,
        encoding_format=body.encoding_format, user=body.user, body=body.data, raw=raw,
        trace_headers=trace_headers(request.headers, span if tracing else None),
    )
    try:
        await pipeline.ratelimit.admit(call)
        await pipeline.spend.admit(call)  # budgets count embeddings too
        await pipeline.recorder.open(call)  # write-ahead usage record, as for completions
        call.dispatched = True
        async with call.pool.lease() as worker:
            result = await worker.backend.embed(job)
        call.prompt_tokens = result.usage.prompt_tokens
    except BaseException as exc:
        error = as_sluice_error(exc)
        call.status = error.status
        call.prompt_tokens = 0  # nothing was embedded
        if isinstance(error, SluiceError) and call.headers:
            error.headers = {**call.headers, **error.headers}
        pipeline.finish(call)
        if error is exc:
            raise
        raise error from None
    pipeline.finish(call)
    return json_response({
        "object": "list", "data": result.data, "model": body.model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens,
                  "total_tokens": result.usage.prompt_tokens},
    }, headers=call.headers)
