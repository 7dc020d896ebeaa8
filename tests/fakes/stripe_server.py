"""A local stand-in for the Stripe API's Billing Meter Events endpoint.

Every request is checked against the published OpenAPI document
(tests/data/stripe_meter_events.openapi.json, copied from github.com/stripe/openapi): the
path and method must exist, the form-encoded body is decoded (``payload[key]=v`` as a
deepObject) and coerced to the schema's types, then validated with jsonschema (required
fields, types, ``maxLength``, ``additionalProperties: false``). Accepted events are kept;
a second event with the same ``identifier`` is refused the way this client expects Stripe
to refuse it (400, ``resource_already_exists``); ``Idempotency-Key`` replays the saved
answer. Faults can be queued: ``429``, ``500``, ``drop`` (connection closed before the
event is recorded) and ``drop_after_commit`` (recorded, then the answer is lost).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jsonschema

SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "stripe_meter_events.openapi.json"
FORM = "application/x-www-form-urlencoded"


def load_spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding: ``a[b]=1`` -> ``{"a": {"b": "1"}}``, ``a[0]=x`` -> list."""
    out: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True, strict_parsing=bool(body)):
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        node = out
        for part, nxt in zip(parts, parts[1:], strict=False):
            node = node.setdefault(part, [] if nxt.isdigit() or nxt == "[]" else {})
        last = parts[-1]
        if isinstance(node, list):
            node.append(value)
        else:
            node[last] = value
    return out


def coerce(value: Any, schema: dict[str, Any]) -> Any:
    """Form values are strings; turn them into what the schema declares where they parse
    (leaving them as they are otherwise, so jsonschema reports the mismatch)."""
    kind = schema.get("type")
    if kind == "integer" and isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    if kind == "boolean" and value in ("true", "false"):
        return value == "true"
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: coerce(v, props.get(k) or (extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        }
    if kind == "array" and isinstance(value, list):
        return [coerce(v, schema.get("items", {})) for v in value]
    return value


class FakeStripe:
    """Run with ``with FakeStripe() as fake:``; ``fake.url`` is the API base."""

    def __init__(self) -> None:
        self.spec = load_spec()
        self.events: dict[str, dict[str, Any]] = {}  # identifier -> meter event
        self.requests: list[dict[str, Any]] = []  # every request seen, decoded
        self.invalid: list[str] = []  # why requests failed validation
        self.faults: list[str] = []
        self._idempotent: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, *faults: str) -> None:
        """Queue faults; each request takes the next one (``"ok"`` for none)."""
        with self._lock:
            self.faults.extend(faults)

    def forget_idempotency_keys(self) -> None:
        """What Stripe does after 24 hours."""
        with self._lock:
            self._idempotent.clear()

    def __enter__(self) -> FakeStripe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- request handling ------------------------------------------------------------------

    def _operation(self, method: str, path: str) -> dict[str, Any] | None:
        return self.spec["paths"].get(path, {}).get(method.lower())

    def validate(self, method: str, path: str, headers: Any, body: str) -> dict[str, Any]:
        """The decoded, coerced params; raises ``ValueError`` naming what is wrong."""
        op = self._operation(method, path)
        if op is None:
            raise LookupError(f"{method} {path} is not in the OpenAPI document")
        if not (headers.get("Authorization") or "").startswith("Bearer sk_"):
            raise PermissionError("missing or malformed Authorization: Bearer sk_...")
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip()
        media = op["requestBody"]["content"].get(content_type)
        if media is None:
            raise ValueError(f"content type {content_type!r} not accepted")
        schema = media["schema"]
        params = coerce(decode_form(body), schema)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(params), key=str)
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path) or "body"
            raise ValueError(f"{where}: {errors[0].message}")
        return params

    def handle(self, method: str, path: str, headers: Any, body: str) -> tuple[int, dict] | None:
        """Status and JSON body, or None to drop the connection without an answer."""
        with self._lock:
            fault = self.faults.pop(0) if self.faults else "ok"
        try:
            params = self.validate(method, path, headers, body)
        except LookupError as exc:
            return 404, _error("invalid_request_error", str(exc))
        except PermissionError as exc:
            return 401, _error("invalid_request_error", str(exc))
        except ValueError as exc:
            with self._lock:
                self.invalid.append(f"{method} {path}: {exc}")
            return 400, _error("invalid_request_error", str(exc), code="parameter_invalid")
        with self._lock:
            self.requests.append(params)
        if fault == "drop":
            return None
        if fault in ("429", "500"):
            message = "Too many requests" if fault == "429" else "An unknown error occurred"
            return int(fault), _error("api_error" if fault == "500" else "invalid_request_error",
                                      message, code="rate_limit" if fault == "429" else None)
        key = headers.get("Idempotency-Key")
        with self._lock:
            if key and key in self._idempotent:
                saved_body, status, answer = self._idempotent[key]
                if saved_body != body:
                    return 400, _error("idempotency_error", "Keys for idempotent requests "
                                       "can only be used with the same parameters they were "
                                       "first used with.")  # fmt: skip
                return status, answer
            status, answer = self._create_event(params)
            if key:
                self._idempotent[key] = (body, status, answer)
        if fault == "drop_after_commit":
            return None
        return status, answer

    def _create_event(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        identifier = params.get("identifier") or f"gen_{len(self.events)}"
        if identifier in self.events:
            return 400, _error("invalid_request_error",
                               f"An event with identifier {identifier} already exists.",
                               code="resource_already_exists", param="identifier")  # fmt: skip
        event = {
            "object": "billing.meter_event",
            "created": int(time.time()),
            "event_name": params["event_name"],
            "identifier": identifier,
            "livemode": False,
            "payload": params["payload"],
            "timestamp": params.get("timestamp", int(time.time())),
        }
        # The fake must answer with what the spec promises, too.
        jsonschema.validate(event, self.spec["components"]["schemas"]["billing.meter_event"])
        self.events[identifier] = event
        return 200, event

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                answer = fake.handle(self.command, self.path.split("?")[0], self.headers, body)
                if answer is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, payload = answer
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_fake_{len(fake.requests)}")
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _error(kind: str, message: str, *, code: str | None = None, param: str | None = None):
    error: dict[str, Any] = {"type": kind, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    return {"error": error}
