"""Typed API errors, rendered everywhere in OpenAI's envelope.

`{"error": {"message", "type", "param", "code"}}` is what every non-2xx answer carries, so the
official `openai` SDK maps tunegate's errors to its own exception classes unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class BadRequest(APIError):
    status_code = 400


class Unauthorized(APIError):
    status_code = 401
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_scope"


class NotFound(APIError):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(APIError):
    status_code = 405
    code = "method_not_allowed"


class Conflict(APIError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "request_too_large"


class UnsupportedMediaType(APIError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidPayload(APIError):
    status_code = 422
    code = "invalid_payload"


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class BadGateway(APIError):
    """The upstream provider failed (5xx, a broken connection, an answer we cannot use)."""

    status_code = 502
    type = "server_error"
    code = "upstream_error"


class GatewayTimeout(APIError):
    status_code = 504
    type = "server_error"
    code = "upstream_timeout"


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status_code: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        content=orjson.dumps(body),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def render(error: APIError) -> Response:
    return error_response(error.status_code, error.body(), error.headers)
