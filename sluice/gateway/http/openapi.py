"""The gateway's own OpenAPI 3.1 document, generated from the wire models.

Requests are the schemas the gateway validates with (OpenAI's request types plus the
overlay in :mod:`sluice.gateway.http.schemas`); responses are OpenAI's response models
from the ``openai`` package (ChatCompletion, ChatCompletionChunk, Completion,
CreateEmbeddingResponse, Model).
"""

from __future__ import annotations

import functools
from typing import Any, get_args

import orjson
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from sluice.gateway.backends.contract import Capability
from sluice.gateway.http.schemas import (
    ErrorResponse,
    chat_schema,
    completion_schema,
    embedding_schema,
)

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


def _components() -> dict[str, Any]:
    """Every schema under ``components/schemas``, ``$defs`` refs rewritten to point there."""
    out: dict[str, Any] = {}

    def add(name: str, schema: dict[str, Any]) -> None:
        clash: set[str] = set()  # defs named like another schema's but different
        while True:
            text = orjson.dumps(schema)
            for def_name in clash:
                text = text.replace(f'"#/$defs/{def_name}"'.encode(),
                                    f'"#/$defs/{name}.{def_name}"'.encode())
            renamed = orjson.loads(text.replace(b"#/$defs/", b"#/components/schemas/"))
            defs = renamed.pop("$defs", {})
            more = {k for k, v in defs.items() if k in out and out[k] != v} - clash
            if not more:
                break
            clash |= more
        for def_name, definition in defs.items():
            out[f"{name}.{def_name}" if def_name in clash else def_name] = definition
        out[name] = renamed

    add("ChatCompletionRequest", chat_schema())
    add("CompletionRequest", completion_schema())
    add("EmbeddingRequest", embedding_schema())
    models: list[tuple[str, type[BaseModel]]] = [
        ("ChatCompletion", ChatCompletion), ("ChatCompletionChunk", ChatCompletionChunk),
        ("Completion", Completion), ("CreateEmbeddingResponse", CreateEmbeddingResponse),
        ("Model", Model), ("ErrorResponse", ErrorResponse),
    ]
    for name, model in models:
        add(name, model.model_json_schema(ref_template="#/$defs/{model}", mode="serialization"))
    # OpenAI's Model, plus what the model serves
    capabilities = {"type": "array", "items": {"enum": list(get_args(Capability))}}
    out["SluiceModel"] = {"allOf": [_ref("Model"), {
        "type": "object", "properties": {"capabilities": capabilities},
        "required": ["capabilities"]}]}
    out["ModelList"] = {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _ref("SluiceModel")}}}
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _post(summary: str, schema: str, answer: str, chunk: str | None) -> dict[str, Any]:
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
                        "application/json": {"schema": _ref(answer)},
                        **({"text/event-stream": {
                            "schema": {"type": "string",
                                       "description": f"data: <{chunk}> events, then "
                                                      "data: [DONE]"}}} if chunk else {}),
                    },
                },
                **_error_responses(),
            },
        }
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "sluice", "version": "0.1.0",
                 "description": "OpenAI-compatible API of the sluice gateway"},
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/chat/completions": _post("Create a chat completion", "ChatCompletionRequest",
                                          "ChatCompletion", "ChatCompletionChunk"),
            "/v1/completions": _post("Create a text completion", "CompletionRequest",
                                     "Completion", "Completion"),
            "/v1/embeddings": _post("Create embeddings", "EmbeddingRequest",
                                    "CreateEmbeddingResponse", None),
            "/v1/models": {
                "get": {
                    "summary": "List models",
                    "security": [{"bearer": []}],
                    "responses": {"200": {"description": "Models this key may use",
                                          "content": {"application/json": {
                                              "schema": _ref("ModelList")}}},
                                  **_error_responses()},
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "Retrieve a model",
                    "security": [{"bearer": []}],
                    "parameters": [{"name": "model", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The model",
                                          "content": {"application/json": {
                                              "schema": _ref("SluiceModel")}}},
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
