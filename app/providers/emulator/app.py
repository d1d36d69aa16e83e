"""The emulator's ASGI app: OpenAI's routes, its auth and error envelope, faults and counting.

Faults and request counting sit in `EmulatorApp.__call__`, in front of everything else, so a
faulted request never reaches a handler and a dropped connection can close the socket before a
single byte is written. Control endpoints under `/_emulator` are neither faulted, counted nor
authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Message, Receive, Scope, Send

from app.providers.emulator.errors import (
    EmulatorError,
    bad_request,
    error_body,
    invalid_url,
    server_error,
    unauthorized,
)
from app.providers.emulator.faults import Fault, FaultConfig, fault_error
from app.providers.emulator.params import json_object
from app.providers.emulator.routes_chat import chat_router
from app.providers.emulator.routes_files import files_router
from app.providers.emulator.routes_jobs import jobs_router
from app.providers.emulator.routes_models import models_router
from app.providers.emulator.state import EmulatorState

DROP_WAIT_SECONDS = 5.0


class EmulatorApp(FastAPI):
    """FastAPI plus the fault injector and request counter in front of it."""

    emulator: EmulatorState
    api_routes: list[BaseRoute]
    """The `/v1` routes, to name a request by its path template even when it is faulted."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await super().__call__(scope, receive, send)
            return
        state = self.emulator
        method, template = scope["method"], self._template(scope)
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


def _control_router(state: EmulatorState) -> APIRouter:
    router = APIRouter(prefix="/_emulator")

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

    return router


async def _emulator_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EmulatorError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return invalid_url(request.method, request.url.path).response()
    body = error_body(str(exc.detail))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return bad_request(f"Invalid request: {first.get('msg', 'bad input')}", param=param).response()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return server_error().response()


def create_emulator_app(
    speed: float = 1.0, org: str = "org-emulator", faults: FaultConfig | None = None
) -> FastAPI:
    """An in-memory OpenAI look-alike; `speed` 10 runs jobs ten times faster than speed 1."""
    state = EmulatorState.create(speed, org, faults)
    app = EmulatorApp(
        title="tunegate OpenAI emulator",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.emulator = state
    app.state.emulator = state
    authenticated = [Depends(_require_key)]
    routers = [files_router(state), jobs_router(state), models_router(state), chat_router(state)]
    app.api_routes = [route for router in routers for route in router.routes]
    for router in routers:
        app.include_router(router, dependencies=authenticated)
    app.include_router(_control_router(state))
    app.add_exception_handler(EmulatorError, _emulator_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app
