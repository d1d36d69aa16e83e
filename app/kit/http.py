"""HTTP plumbing shared by every endpoint.

- `RequestContextMiddleware` (pure ASGI, so it adds next to nothing to each request): request ids,
  the request body limit enforced while the body streams in, one log line and the Prometheus
  metrics per request, and a 500 in OpenAI's envelope for anything unexpected.
- `JSONRoute`: JSON bodies parsed with orjson, with precise 400/415 answers.
- exception handlers that render every error in OpenAI's envelope.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine, Sequence
from email.message import Message as EmailMessage
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.kit.errors import (
    APIError,
    BadRequest,
    InvalidPayload,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    error_body,
    error_response,
    render,
)
from app.kit.ids import random_token
from app.kit.logging import get_logger
from app.kit.metrics import HTTPMetrics

log = get_logger("tunegate.http")

REQUEST_ID_HEADER = "x-request-id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_UNMATCHED_ROUTE = "<unmatched>"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A whole API key pasted into a URL must not reach the logs: keep its prefix only.
_KEY_IN_PATH = re.compile(r"(tg-[A-Za-z0-9]{1,16}-)[^/]+")


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; every non-2xx answer has this shape."""

    error: ErrorObject


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Documented on every route, so generated clients and schema checks know the error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc("Malformed request"),
    401: _error_doc("Missing or invalid API key"),
    403: _error_doc("The key's scope does not allow this"),
    404: _error_doc("Not found in the caller's project"),
    405: _error_doc("Method not allowed"),
    409: _error_doc("Conflicts with the current state (duplicate, in use, in progress)"),
    413: _error_doc("Request body too large"),
    415: _error_doc("Unsupported content type"),
    422: _error_doc("Invalid payload; `param` names the field"),
    429: _error_doc("Rate limited; see Retry-After"),
    500: _error_doc("Unexpected error; the message carries the request id"),
    502: _error_doc("The upstream provider failed or could not be reached"),
    503: _error_doc("Busy (no database connection free; see Retry-After), or not configured"),
}


def new_request_id() -> str:
    return f"req_{random_token(24)}"


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


BodyLimit = Callable[[Scope], int]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, body_limit: BodyLimit, metrics: HTTPMetrics) -> None:
        self.app = app
        self.body_limit = body_limit
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        request_id = _incoming_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        request_id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        limit = self.body_limit(scope)
        state = _ExchangeState(request_id)

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state.received += len(message.get("body", b""))
                if state.received > limit:
                    state.too_large = True
                    raise PayloadTooLarge(_too_large_message(limit), param=None)
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if state.too_large:
                    # Whatever the app made of a cut-off body, the answer is 413.
                    state.swallow = True
                    await _send_error(send, PayloadTooLarge(_too_large_message(limit)), state)
                    return
                state.status = message["status"]
                state.response_started = True
                message["headers"] = [*message.get("headers", []), request_id_header]
            elif state.swallow:
                return
            await send(message)

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await _send_error(send, PayloadTooLarge(_too_large_message(limit)), state)
            else:
                await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:
            if not state.response_started:
                await _send_error(send, exc, state)
        except Exception:
            if state.too_large and not state.response_started:
                await _send_error(send, PayloadTooLarge(_too_large_message(limit)), state)
            else:
                log.exception("unhandled error", path=scope.get("path"))
                if not state.response_started:
                    await _send_internal_error(send, state)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or _UNMATCHED_ROUTE
            method = scope.get("method", "")
            method = method if method in _KNOWN_METHODS else "OTHER"  # bounded label values
            self.metrics.requests.labels(method, template, str(state.status)).inc()
            self.metrics.latency.labels(method, template).observe(elapsed)
            log.info(
                "request",
                method=method,
                path=_KEY_IN_PATH.sub(r"\1***", scope.get("path", "")),
                route=template,
                status=state.status,
                duration_ms=round(elapsed * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("request_id")


class _ExchangeState:
    __slots__ = ("received", "request_id", "response_started", "status", "swallow", "too_large")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.received = 0
        self.too_large = False
        self.swallow = False
        self.response_started = False
        self.status = 500


def _too_large_message(limit: int) -> str:
    return f"Request body too large: the limit for this endpoint is {limit} bytes."


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SAFE_REQUEST_ID.match(candidate) else None
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, error: APIError, state: _ExchangeState) -> None:
    await _send_json(send, error.status_code, error.body(), state, error.headers)


async def _send_internal_error(send: Send, state: _ExchangeState) -> None:
    body = error_body(
        "The server had an error while processing your request. "
        f"Quote request id {state.request_id} when reporting it.",
        type="server_error",
        code="internal_error",
    )
    await _send_json(send, 500, body, state)


async def _send_json(
    send: Send,
    status: int,
    body: dict[str, Any],
    state: _ExchangeState,
    extra_headers: dict[str, str] | None = None,
) -> None:
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        # The client may still be sending a body we will not read: tell it we are done.
        (b"connection", b"close"),
    ]
    headers.append((REQUEST_ID_HEADER.encode(), state.request_id.encode()))
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    state.status = status
    state.response_started = True
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def body_limit_by_path(
    default: int, overrides: Sequence[tuple[re.Pattern[str], int]] = ()
) -> BodyLimit:
    """Per-path body limits: the first pattern matching the path wins, else `default`."""

    def limit(scope: Scope) -> int:
        path = scope.get("path", "")
        for pattern, value in overrides:
            if pattern.match(path):
                return value
        return default

    return limit


# --- JSON bodies -------------------------------------------------------------------------------


def parse_json_body(body: bytes) -> Any:
    """orjson parse with precise errors: invalid UTF-8, NaN/Infinity, too deep, bad syntax."""
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid UTF-8 (invalid byte at offset {exc.start}).",
            code="invalid_encoding",
        ) from None
    if b"\\u0000" in body:
        # PostgreSQL text cannot hold NUL; refuse it here rather than fail deep inside.
        raise BadRequest(
            "JSON strings must not contain NUL characters (\\u0000).", code="invalid_json"
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        reason = exc.msg
        if "recursion" in reason.lower() or "depth" in reason.lower():
            reason = "nested too deeply (at most 1024 levels)"
        raise BadRequest(
            f"We could not parse the JSON body of your request: {reason} "
            f"(line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from None


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    message = EmailMessage()
    message["content-type"] = value
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


class JSONRoute(APIRoute):
    """Strict request parsing for every route: a query parameter given twice is refused, and
    JSON bodies are parsed by orjson so malformed input gets a precise 400 or 415."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_field = self.body_field
        expects_json = body_field is not None and not isinstance(body_field.field_info, Form)
        known_query = _query_parameter_names(self.dependant)
        # `metadata[key]=value` style parameters a route accepts (openapi_extra x-dynamic-query).
        dynamic = tuple(
            f"{name}[" for name in (self.openapi_extra or {}).get("x-dynamic-query", ())
        )

        async def route_handler(request: Request) -> Response:
            _check_query_parameters(request, known_query, dynamic)
            if expects_json:
                body = await request.body()
                if body:
                    content_type = request.headers.get("content-type")
                    if not is_json_content_type(content_type):
                        raise UnsupportedMediaType(
                            f"Unsupported Content-Type {content_type or '(none)'!r}: "
                            "send the body as JSON with 'Content-Type: application/json'."
                        )
                    request._json = parse_json_body(body)
            return await handler(request)

        return route_handler


def _query_parameter_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_parameter_names(sub)
    return names


def _check_query_parameters(request: Request, known: set[str], dynamic: tuple[str, ...]) -> None:
    for name, value in request.path_params.items():
        if "\x00" in str(value):
            raise NotFound(f"No object with this {name}: it contains a NUL character.", param=name)
    seen: set[str] = set()
    for name, value in request.query_params.multi_items():
        if "\x00" in value or "\x00" in name:
            raise InvalidPayload(f"Query parameter '{name}' contains a NUL character.", param=name)
        if name not in known and not (dynamic and name.startswith(dynamic) and name.endswith("]")):
            accepted = ", ".join(sorted(known)) or "none"
            raise InvalidPayload(
                f"Unknown query parameter '{name}' (accepted: {accepted}).", param=name
            )
        if name in seen:
            raise InvalidPayload(f"Query parameter '{name}' was given more than once.", param=name)
        seen.add(name)


# --- exception handlers ------------------------------------------------------------------------


_TYPE_TAGS = frozenset(
    {"int", "float", "str", "bool", "none", "list", "dict", "constrained-int", "constrained-float"}
)


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or "[" in part or "(" in part


def _param_from_location(location: Sequence[Any]) -> str | None:
    parts = list(location)
    if parts and parts[0] in {"body", "query", "path", "header", "cookie"}:
        parts = parts[1:]
    param = ""
    for part in parts:
        if isinstance(part, str) and _is_type_tag(part):
            continue  # pydantic names the union member it tried: not a field of the request
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else str(part)
    return param or None


async def _handle_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return render(exc)


async def _handle_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = first.get("loc", ())
    param = _param_from_location(location)
    if param is None and location and location[0] == "body":
        message = "The request body is missing or is not a JSON object."
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}."
    if len(errors) > 1:
        others = ", ".join(
            f"'{_param_from_location(e.get('loc', ())) or 'body'}'" for e in errors[1:6]
        )
        message += f" Also invalid: {others}."
    return error_response(422, error_body(message, param=param, code="invalid_payload"))


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        body = error_body(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
    elif exc.status_code == 405:
        allowed = _allowed_methods(request) or sorted(
            m.strip() for m in headers.get("Allow", "GET").split(",")
        )
        headers["Allow"] = ", ".join(allowed)
        body = error_body(
            f"Method {request.method} is not allowed for {request.url.path}; "
            f"allowed: {', '.join(allowed)}.",
            code="method_not_allowed",
        )
    else:
        body = error_body(str(exc.detail), code=None)
    return error_response(exc.status_code, body, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method served at this path, from the app's OpenAPI paths (Starlette's own Allow
    names only the first matching route's)."""
    app = request.app
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            regex = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            table.append((re.compile(f"^{regex}$"), {m.upper() for m in operations}))
        app.state.allow_table = table
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for compiled, served in table:
        if compiled.match(path):
            methods |= served
    return sorted(methods)


async def _handle_integrity_error(request: Request, exc: Exception) -> Response:
    # A concurrent change won (e.g. the file was deleted while a report about it was made).
    log.warning("integrity error", path=request.url.path, error=type(exc).__name__)
    return error_response(
        409,
        error_body(
            "The request conflicts with a concurrent change (an object it refers to was "
            "deleted or created meanwhile); retry.",
            code="conflict",
        ),
    )


def database_busy(path: str) -> ServiceUnavailable:
    """What a request gets when no database connection came free in time."""
    log.warning("database pool exhausted", path=path)
    return ServiceUnavailable(
        "The service is busy (no database connection free); retry shortly.",
        headers={"Retry-After": "1"},
    )


async def _handle_pool_timeout(request: Request, exc: Exception) -> Response:
    return render(database_busy(request.url.path))


def install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app.add_exception_handler(IntegrityError, _handle_integrity_error)
    app.add_exception_handler(PoolTimeout, _handle_pool_timeout)
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
