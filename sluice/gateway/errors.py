"""One error hierarchy, mapped once to OpenAI's error JSON.

    SluiceError                      500 server_error
     ├── InvalidRequest              400 invalid_request_error
     │    └── ContentPolicyViolation 400 invalid_request_error / content_policy_violation
     ├── AuthenticationFailed        401 invalid_request_error / invalid_api_key
     ├── PermissionDenied            403 permission_error
     ├── NotFound                    404 invalid_request_error / model_not_found
     ├── MethodNotAllowed            405 invalid_request_error / method_not_allowed
     ├── PayloadTooLarge             413 invalid_request_error / request_too_large
     ├── RateLimitExceeded           429 requests / rate_limit_exceeded (+ Retry-After)
     ├── UpstreamFailed              502 api_error / upstream_error
     ├── ServiceUnavailable          503 api_error / service_unavailable (+ Retry-After)
     └── GatewayTimeout              504 api_error / timeout

Every response body is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import orjson
from starlette.responses import Response


class SluiceError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.instance_code = code
        self.headers = dict(headers or {})
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.instance_code or self.code,
        }
        error.update(self.extra)
        return {"error": error}

    def to_response(self) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


class InvalidRequest(SluiceError):
    status = 400
    type = "invalid_request_error"
    code = None


class ContentPolicyViolation(InvalidRequest):
    code = "content_policy_violation"


class AuthenticationFailed(SluiceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(SluiceError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(SluiceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(SluiceError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(SluiceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimitExceeded(SluiceError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class UpstreamFailed(SluiceError):
    status = 502
    type = "api_error"
    code = "upstream_error"


class ServiceUnavailable(SluiceError):
    status = 503
    type = "api_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw: Any) -> None:
        super().__init__(message, **kw)
        if not any(name.lower() == "retry-after" for name in self.headers):
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))


class GatewayTimeout(SluiceError):
    status = 504
    type = "api_error"
    code = "timeout"


BY_STATUS: dict[int, type[SluiceError]] = {
    cls.status: cls
    for cls in (
        InvalidRequest,
        AuthenticationFailed,
        PermissionDenied,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        RateLimitExceeded,
        UpstreamFailed,
        ServiceUnavailable,
        GatewayTimeout,
    )
}


class SettingsError(Exception):
    """Configuration is invalid; the message is one line meant for the operator (no HTTP
    status: it stops the gateway from starting, it never reaches a client)."""


def from_status(status: int, message: str, **kw: Any) -> SluiceError:
    """The error class for an HTTP status (used to map backend failures)."""
    return BY_STATUS.get(status, UpstreamFailed)(message, **kw)
