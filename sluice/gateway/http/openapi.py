"""The gateway's own OpenAPI 3.1 document, generated from the wire models."""

from __future__ import annotations

import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse

ERRORS = {
    "400": "Malformed JSON, wrong types or invalid values",
    "401": "Missing, wrong, revoked or expired API key",
    "403": "The key may not use this model",
    "404": "Unknown model",
    "413": "Request body too large",
    "429": "Rate limited (see Retry-After)",
    "503": "Backend overloaded or unavailable (see Retry-After)",
}


def _error_responses() -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        code: {"description": text, "content": {"application/json": {"schema": ref}}}
        for code, text in ERRORS.items()
    }


def _post(summary: str, schema: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
                },
            },
            "responses": {
                "200": {
                    "description": "The completion (JSON), or server-sent events when stream is true",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_error_responses(),
            },
        }
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (ChatCompletionRequest, "validation"),
            (CompletionRequest, "validation"),
            (ErrorResponse, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "sluice", "version": "0.1.0",
                 "description": "OpenAI-compatible API of the sluice gateway"},
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/chat/completions": _post("Create a chat completion", "ChatCompletionRequest"),
            "/v1/completions": _post("Create a text completion", "CompletionRequest"),
            "/v1/models": {
                "get": {
                    "summary": "List models",
                    "security": [{"bearer": []}],
                    "responses": {"200": {"description": "Models this key may use"},
                                  **_error_responses()},
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness",
                    "responses": {"200": {"description": "ready"},
                                  "503": {"description": "not ready"}},
                }
            },
        },
    }
