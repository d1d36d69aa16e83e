"""Errors the emulator answers with, in OpenAI's envelope and with OpenAI's status codes.

Every non-2xx answer is `{"error": {"message", "type", "param", "code"}}`; the messages copy
OpenAI's wording where it is known, so clients that match on them behave as they would upstream.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from app.kit.errors import error_body, error_response


class EmulatorError(Exception):
    """An error answer: raised anywhere in a handler, rendered by one exception handler."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> Response:
        return error_response(self.status_code, self.body(), self.headers)


def bad_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> EmulatorError:
    return EmulatorError(400, message, param=param, code=code)


def missing_parameter(name: str) -> EmulatorError:
    return bad_request(
        f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
    )


def invalid_type(name: str, expected: str, value: Any) -> EmulatorError:
    return bad_request(
        f"Invalid type for '{name}': expected {expected}, but got {type_name(value)} instead.",
        param=name,
        code="invalid_type",
    )


def invalid_value(name: str, message: str) -> EmulatorError:
    return bad_request(f"Invalid value for '{name}': {message}", param=name, code="invalid_value")


def unauthorized() -> EmulatorError:
    return EmulatorError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password "
        "field (with blank username) if you're accessing the API from your browser and are "
        "prompted for a username and password. You can obtain an API key from "
        "https://platform.openai.com/account/api-keys.",
    )


def file_not_found(file_id: str) -> EmulatorError:
    return EmulatorError(404, f"No such File object: {file_id}", param="id")


def job_not_found(job_id: str) -> EmulatorError:
    return EmulatorError(
        404, f"Fine-tuning job {job_id} not found.", param="fine_tuning_job_id", code=None
    )


def model_not_found(model: str) -> EmulatorError:
    return EmulatorError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def rate_limited() -> EmulatorError:
    return EmulatorError(
        429,
        "Rate limit reached for requests in organization on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 1s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1", "x-ratelimit-reset-requests": "1s"},
    )


def server_error() -> EmulatorError:
    return EmulatorError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


def service_unavailable() -> EmulatorError:
    return EmulatorError(
        503,
        "The server is temporarily unavailable.",
        type="server_error",
        code="service_unavailable",
    )


def training_not_available() -> EmulatorError:
    return EmulatorError(
        403,
        "Fine-tuning is not available for this organization. Please contact support if you "
        "believe this is a mistake.",
        code="training_not_available",
    )


def invalid_url(method: str, path: str) -> EmulatorError:
    return EmulatorError(404, f"Invalid URL ({method} {path})")


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
