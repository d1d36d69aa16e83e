"""The emulator's ASGI app: OpenAI's routes, its auth and error envelope, faults and counting.

Faults and request counting sit in `EmulatorApp.__call__`, in front of everything else, so a
faulted request never reaches a handler and a dropped connection can close the socket before a
single byte is written. Control endpoints under `/_emulator` are neither faulted, counted nor
authenticated. The app's lifespan runs the webhook sender (see `webhooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import Message, Receive, Scope, Send

from app.providers.emulator.errors import (
    EmulatorError,
    bad_request,
    invalid_url,
    missing_parameter,
    server_error,
    service_unavailable,
    unauthorized,
)
from app.providers.emulator.faults import Fault, FaultConfig, fault_error
from app.providers.emulator.params import json_object
from app.providers.emulator.routes_chat import chat_router
from app.providers.emulator.routes_files import files_router
from app.providers.emulator.routes_jobs import jobs_router
from app.providers.emulator.routes_models import models_router
from app.providers.emulator.state import EmulatorState
from app.providers.emulator.webhooks import InvalidWebhookTarget, WebhookSender, WebhookTarget

DROP_WAIT_SECONDS = 5.0
CONTROL_PREFIX = "/_emulator"


class EmulatorApp(FastAPI):
    """FastAPI plus the fault injector and request counter in front of it."""

    emulator: EmulatorState
    webhook_sender: WebhookSender
    api_routes: list[BaseRoute]
    """The `/v1` routes, to name a request by its path template even when it is faulted."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_control(scope["path"]):
            await super().__call__(scope, receive, send)
            return
        state = self.emulator
        method, template = scope["method"], self._template(scope)
        if state.faults.outage():
            # Down for everything but the control endpoints, and without using up counted
            # faults: they still apply once the outage is over.
            state.count_request(method, template, "503")
            await service_unavailable().response()(scope, receive, send)
            return
        if not scope["path"].startswith("/v1"):
            await super().__call__(scope, receive, send)
            return
        fault = state.faults.take()
        if fault is Fault.drop_connection:
            state.count_request(method, template, "dropped")
            await _drop_connection(receive, send)
            return
        slow = state.faults.slow_seconds()
        if slow > 0:
            await asyncio.sleep(slow)
        statuses: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(int(message["status"]))
            await send(message)

        try:
            error = fault_error(fault) if fault is not None else None
            if error is not None:
                await error.response()(scope, receive, counting_send)
            else:
                await super().__call__(scope, receive, counting_send)
        finally:
            state.count_request(method, template, str(statuses[0]) if statuses else "none")

    def _template(self, scope: Scope) -> str:
        """The route's path template (`/v1/files/{file_id}`), or the raw path when none."""
        partial = None
        for route in self.api_routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", scope["path"]))
            if match is Match.PARTIAL and partial is None:
                partial = str(getattr(route, "path", scope["path"]))
        return partial or str(scope["path"])


def _is_control(path: str) -> bool:
    return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")


async def _drop_connection(receive: Receive, send: Send) -> None:
    """Close the client's connection without answering.

    Under uvicorn, `send` is bound to the connection's request cycle, which holds the socket's
    transport: closing it sends nothing at all, and once uvicorn has seen the disconnect it does
    not try to answer 500. Under another server, start a response and break it off instead.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and callable(getattr(transport, "close", None)):
        transport.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(DROP_WAIT_SECONDS):
                while (await receive())["type"] != "http.disconnect":
                    pass
        return
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"64")]}
    await send(start)
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise ConnectionAbortedError("emulated dropped connection")


def _require_key(request: Request) -> None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized()


def _control_router(state: EmulatorState, webhooks: WebhookSender) -> APIRouter:
    router = APIRouter(prefix=CONTROL_PREFIX)

    @router.get("/streams")
    async def get_streams() -> dict[str, Any]:
        return {key: state.streams[key] for key in ("started", "finished", "cancelled")}

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "speed": state.speed, "organization": state.organization}

    @router.get("/faults")
    async def get_faults() -> dict[str, Any]:
        return state.faults.snapshot().as_dict()

    @router.post("/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        return state.faults.update(await json_object(request)).as_dict()

    @router.delete("/faults")
    async def clear_faults() -> dict[str, Any]:
        return state.faults.clear().as_dict()

    @router.get("/requests")
    async def get_requests() -> dict[str, Any]:
        return state.requests_json()

    @router.delete("/requests")
    async def clear_requests() -> dict[str, Any]:
        state.requests.clear()
        return state.requests_json()

    @router.get("/webhooks")
    async def get_webhooks() -> dict[str, Any]:
        return webhooks.as_json()

    @router.post("/webhooks")
    async def set_webhooks(request: Request) -> dict[str, Any]:
        body = await json_object(request)
        for name in body:
            if name not in {"url", "secret"}:
                raise bad_request(
                    f"Unknown parameter '{name}'.", param=name, code="unknown_parameter"
                )
        if body.get("url") is None:
            raise missing_parameter("url")
        try:
            webhooks.target = WebhookTarget.parse(body["url"], body.get("secret"))
        except InvalidWebhookTarget as exc:
            raise bad_request(str(exc), param=exc.param) from None
        return webhooks.as_json()

    @router.delete("/webhooks")
    async def clear_webhooks() -> dict[str, Any]:
        webhooks.target = None
        return webhooks.as_json()

    return router


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    assert isinstance(app, EmulatorApp)
    async with app.webhook_sender.running():
        yield


async def _emulator_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EmulatorError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return invalid_url(request.method, request.url.path).response()
    headers = dict(exc.headers or {})
    return EmulatorError(exc.status_code, str(exc.detail), headers=headers).response()


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return bad_request(f"Invalid request: {first.get('msg', 'bad input')}", param=param).response()


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return server_error().response()


def create_emulator_app(
    speed: float = 1.0,
    org: str = "org-emulator",
    faults: FaultConfig | None = None,
    *,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> FastAPI:
    """An in-memory OpenAI look-alike; `speed` 10 runs jobs ten times faster than speed 1.

    With `webhook_url`, finished jobs are announced there, signed with `webhook_secret` when
    given (`whsec_<base64>` or a plain string). Raises ValueError for a bad URL or secret.
    """
    state = EmulatorState.create(speed, org, faults)
    if webhook_url is None and webhook_secret is not None:
        raise InvalidWebhookTarget("a webhook secret needs a webhook URL", "secret")
    target = None if webhook_url is None else WebhookTarget.parse(webhook_url, webhook_secret)
    app = EmulatorApp(
        title="tunegate OpenAI emulator",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=_lifespan,
    )
    app.emulator = state
    app.state.emulator = state
    app.webhook_sender = WebhookSender(state, target)
    app.state.webhook_sender = app.webhook_sender
    authenticated = [Depends(_require_key)]
    routers = [files_router(state), jobs_router(state), models_router(state), chat_router(state)]
    app.api_routes = [route for router in routers for route in router.routes]
    for router in routers:
        app.include_router(router, dependencies=authenticated)
    app.include_router(_control_router(state, app.webhook_sender))
    app.add_exception_handler(EmulatorError, _emulator_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app
