"""The completion proxy: `POST /v1/chat/completions` and `POST /v1/completions` as plain ASGI.

These two paths carry every inference request, so they skip FastAPI's routing, dependency
injection and body models (together about 0.8 ms of CPU per request on this machine, more than
everything else tunegate does for a completion): `HotPaths` sends them straight here from
inside `RequestContextMiddleware` (request ids, body limits, metrics and the access log still
apply), and the FastAPI routes in `endpoints.py` document them and serve them through the same
`CompletionProxy` when reached another way.

A request is authenticated (`authenticate_request`: the key cache, then the database), checked
(`bodies.py`: a JSON object with OpenAI's required fields of the right types; the rest passes
through),
counted against the per-key completion rate limit and resolved to a provider (a split alias
to one of its arms, by weight, sticky per `user`: `service.choose_arm`). Then:

- providers that speak OpenAI's HTTP API (`Provider.forwards_raw`) get the checked body
  re-encoded (the model the route chose; usage asked of a stream; exactly what was checked, so
  no duplicate key can mean something else upstream), and the caller gets the provider's bytes
  as they are: a plain answer is checked to be a JSON object and its usage read; a stream is
  cut into server-sent events (`sse.py`), each event checked and forwarded as soon as it is
  complete;
- other providers (the local one) answer through their dict methods.

Streams: `text/event-stream`, ending with `data: [DONE]`. An error before the first chunk is an
ordinary error response; after it, a `data: {"error": {...}}` event ends the stream. Usage is
always asked of the provider (it is recorded); the caller sees the usage chunk only when it
asked. A client that disconnects cancels the forwarding at once, which closes the upstream
request (its connection is dropped, not returned to the pool).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import orjson
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.dependencies import authenticate_request, check_scope
from app.auth.service import Principal
from app.inference import service
from app.inference.bodies import check_messages, check_prompt, checked_body
from app.inference.sse import sse_data
from app.inference.usage import UsageRecorder
from app.kit.errors import APIError, BadGateway, BadRequest
from app.kit.http import database_busy
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.kit.upstream import UpstreamError, UpstreamResponse, UpstreamTimeout
from app.models import Scope as KeyScope
from app.providers.base import (
    Provider,
    ProviderConnectionError,
    ProviderError,
    ProviderServerError,
    ProviderTimeout,
)

__all__ = ["CHAT", "TEXT", "CompletionProxy", "HotPaths"]

log = get_logger("tunegate.inference")

DONE: Final = b"data: [DONE]\n\n"
CLIENT_CLOSED: Final = 499  # the client went away mid-stream (nginx's convention)
# The largest non-streamed answer accepted from a provider.
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class Kind:
    """What differs between the two completion endpoints."""

    path: str  # as OpenAI names it, under /v1
    what: str  # for error messages
    check: Callable[[dict[str, Any]], None]
    answer: Callable[[Provider], Callable[..., Awaitable[dict[str, Any]]]]
    stream: Callable[[Provider], Callable[..., AsyncIterator[dict[str, Any]]]]


CHAT: Final = Kind(
    "/chat/completions",
    "chat completion",
    check_messages,
    lambda p: p.chat_completion,
    lambda p: p.stream_chat_completion,
)
TEXT: Final = Kind(
    "/completions",
    "completion",
    check_prompt,
    lambda p: p.completion,
    lambda p: p.stream_completion,
)


class _Usage:
    """The usage record of one request, handed to the recorder when the request ends."""

    __slots__ = ("created_at", "fields", "recorded", "recorder", "started")

    def __init__(
        self,
        recorder: UsageRecorder,
        principal: Principal,
        request_id: str,
        route: service.Route,
    ) -> None:
        self.recorder = recorder
        self.fields = {
            "project_id": principal.project_id,
            "api_key_id": principal.key_id,
            "request_id": request_id or None,
            "model": route.model,
            "alias": route.alias,
            "provider": route.provider.name,
        }
        self.started = time.perf_counter()
        self.created_at = utcnow()
        self.recorded = False

    def done(self, status: int, *, stream: bool, reported: Any = None) -> None:
        if self.recorded:
            return
        self.recorded = True
        tokens = reported if isinstance(reported, dict) else {}
        self.recorder.record(
            **self.fields,
            stream=stream,
            status=status,
            prompt_tokens=_count(tokens.get("prompt_tokens")),
            completion_tokens=_count(tokens.get("completion_tokens")),
            latency_ms=int((time.perf_counter() - self.started) * 1000),
            created_at=self.created_at,
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError  # nobody is waiting for an answer
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _send_json(send: Send, status: int, body: bytes, extra: Any = ()) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", b"%d" % len(body)), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: APIError) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await _send_json(send, error.status_code, orjson.dumps(error.body()), extra)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class _RouteName:
    """What `RequestContextMiddleware` labels metrics and logs with (`scope["route"].path`)."""

    def __init__(self, path: str) -> None:
        self.path = path


class CompletionProxy:
    """The ASGI app of one completion endpoint (`kind`)."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.route = _RouteName("/v1" + kind.path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        state = scope["app"].state
        try:
            principal = await authenticate_request(state, _header(scope, b"authorization"))
            check_scope(principal, KeyScope.read)
            raw = await _read_body(receive)
            body = checked_body(raw, _header(scope, b"content-type"), self.kind.check)
            state.inference_limiter.check(principal.key_id)
            user = body.get("user")
            route = await service.resolve(
                state.database.sessionmaker,
                state.providers or {},
                principal.project_id,
                body["model"],
                user if isinstance(user, str) else None,
            )
        except APIError as exc:
            await _send_error(send, exc)
            return
        except PoolTimeout:
            await _send_error(send, database_busy(scope["path"]))
            return
        request_id = str(scope.get("state", {}).get("request_id", ""))
        usage = _Usage(state.usage, principal, request_id, route)
        exchange = _Exchange(self.kind, route.provider, body, route.model, usage, state)
        watch = _ClientWatch(receive, send)
        try:
            if route.provider.forwards_raw:
                await exchange.forward(watch.send)
            else:
                await exchange.call(watch.send)
        except APIError as exc:  # before anything was sent
            await _send_error(watch.send, exc)
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            # The client went away: the provider's request was closed on the way out.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            usage.done(CLIENT_CLOSED, stream=exchange.stream, reported=exchange.reported)
        finally:
            watch.stop()


class _ClientWatch:
    """Cancels the request's task when its client disconnects before the whole answer was
    sent, which closes the provider's request wherever it is (waiting for the answer's head,
    reading a plain answer, relaying a stream). `send` is the request's `send`, noting when
    the last message goes out (a disconnect after it is the end of the exchange, not an
    abandoned one)."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self.fired = False
        self._answered = False
        self._send = send
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(_disconnected(receive))
        self._watcher.add_done_callback(self._disconnected)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._answered = True
        await self._send(message)

    def stop(self) -> None:
        self._watcher.cancel()

    def _disconnected(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled() or self._answered or self._task is None:
            return
        self.fired = True
        self._task.cancel()


class _Exchange:
    """One completion request on its way to its provider and back."""

    def __init__(
        self,
        kind: Kind,
        provider: Provider,
        body: dict[str, Any],
        model: str,
        usage: _Usage,
        state: Any,
    ) -> None:
        self.kind = kind
        self.provider = provider
        self.body = body
        self.asked_model = str(body["model"])
        self.model = model  # an alias's target, asked of the provider and recorded
        self.usage = usage
        self.stream = body.get("stream") is True
        options = body.get("stream_options")
        self.wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.timeout: float = state.settings.inference.timeout.total_seconds()
        self.reported: Any = None  # the usage the provider reported

    def _refuse(self, exc: ProviderError) -> NoReturn:
        """Record and raise the error answer for a failure before the first chunk."""
        failure = service.upstream_error(exc, self.asked_model, self.kind.what)
        self.usage.done(failure.status_code, stream=self.stream)
        raise failure

    # -- providers that take the caller's bytes ------------------------------------------

    async def forward(self, send: Send) -> None:
        body = self.body
        if self.stream and not self.wants_usage:
            options = body.get("stream_options") or {}
            body = {**body, "stream_options": {**options, "include_usage": True}}
        # Always the checked body, re-encoded: the provider reads exactly what tunegate
        # checked (one `model`, whatever duplicate keys or byte-order mark the caller sent).
        try:
            raw = orjson.dumps({**body, "model": self.model})
        except orjson.JSONEncodeError:
            raise BadRequest(
                "The request body is nested too deeply (at most 250 levels).", code="invalid_json"
            ) from None
        try:
            answer = await self.provider.forward(self.kind.path, raw, wait_seconds=self.timeout)
        except ProviderError as exc:
            self._refuse(exc)
        if answer.status != 200 or not self.stream:
            try:
                data = await answer.read(MAX_ANSWER_BYTES)
            except UpstreamError as exc:
                self._refuse(_broken(exc))
            if answer.status != 200:
                self._refuse(self.provider.answer_error(answer.status, data, answer.headers))
            parsed = _json_object(data)
            if parsed is None:
                self._refuse(ProviderServerError("The provider's answer did not parse."))
            self.usage.done(200, stream=False, reported=parsed.get("usage"))
            await _send_json(send, 200, data)
            return
        chunks = _raw_chunks(self.provider, answer)
        await self._relay(chunks, send, answer.aclose, answer.finish)

    # -- providers with dict methods (the local one) ---------------------------------------

    async def call(self, send: Send) -> None:
        payload = {key: value for key, value in self.body.items() if value is not None}
        payload["model"] = self.model
        if self.kind is TEXT and "prompt" in self.body and self.body["prompt"] is None:
            payload["prompt"] = None  # OpenAI's document start; null passes through
        if not self.stream:
            try:
                answer = await self.kind.answer(self.provider)(payload, wait_seconds=self.timeout)
            except ProviderError as exc:
                self._refuse(exc)
            self.usage.done(200, stream=False, reported=answer.get("usage"))
            await _send_json(send, 200, orjson.dumps(answer))
            return
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
        chunks = self.kind.stream(self.provider)(payload, wait_seconds=self.timeout)
        await self._relay(_dict_chunks(chunks), send, chunks.aclose)  # type: ignore[attr-defined]

    # -- streams -------------------------------------------------------------------------

    async def _relay(
        self,
        chunks: AsyncIterator[tuple[dict[str, Any], bytes | None]],
        send: Send,
        close: Callable[[], Awaitable[None]],
        finish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Send the stream's events as they come. An error before the first one is a plain
        error answer (raised). The provider's stream is closed on every way out (`finish`, if
        given, after its end, so its connection can serve again)."""
        events = self._events(chunks)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            await close()
            self._refuse(ProviderServerError("The provider's stream ended before any chunk."))
        except ProviderError as exc:
            await close()
            self._refuse(exc)
        except BaseException:
            await close()
            raise
        ended = False
        try:
            ended = await self._send_events(first, events, send)
        finally:
            await (finish() if ended and finish is not None else close())

    async def _events(
        self, chunks: AsyncIterator[tuple[dict[str, Any], bytes | None]]
    ) -> AsyncIterator[bytes]:
        """The events to send: each chunk as the provider encoded it, unless the usage the
        caller did not ask for must come out of it (then re-encoded, or left out)."""
        async for chunk, raw in chunks:
            usage = chunk.get("usage")
            if usage:
                self.reported = usage
                if not self.wants_usage and not chunk.get("choices"):
                    continue  # the usage-only chunk the caller did not ask for
            if not self.wants_usage and "usage" in chunk:
                del chunk["usage"]
                raw = None
            yield b"data: " + (raw if raw is not None else orjson.dumps(chunk)) + b"\n\n"

    async def _send_events(self, first: bytes, events: AsyncIterator[bytes], send: Send) -> bool:
        """Relay the events; True when the provider's stream ended as it should."""
        status = CLIENT_CLOSED
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            status = 200
            await send({"type": "http.response.body", "body": DONE, "more_body": False})
            return True
        except ProviderError as exc:
            failure = service.upstream_error(exc, self.asked_model, self.kind.what)
            status = failure.status_code
            await _end_with_error(send, failure)
        except (asyncio.CancelledError, OSError):
            raise  # the client went away
        except Exception:  # a bug here must still end the stream with an error event
            log.exception("completion stream failed", model=self.model, kind=self.kind.what)
            failure = BadGateway("The stream failed inside tunegate; see its logs.")
            status = failure.status_code
            await _end_with_error(send, failure)
        finally:
            self.usage.done(status, stream=True, reported=self.reported)
        return False


async def _end_with_error(send: Send, failure: APIError) -> None:
    event = b"data: " + orjson.dumps(failure.body()) + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _broken(exc: UpstreamError) -> ProviderError:
    if isinstance(exc, UpstreamTimeout):
        return ProviderTimeout("The provider sent nothing more in time.")
    return ProviderConnectionError(str(exc))


async def _raw_chunks(
    provider: Provider, answer: UpstreamResponse
) -> AsyncIterator[tuple[dict[str, Any], bytes]]:
    """Each event of a forwarded stream, checked to be a chunk: (parsed, as sent)."""
    try:
        async for data in sse_data(answer, MAX_ANSWER_BYTES):
            chunk = _json_object(data)
            if chunk is None:
                raise ProviderServerError("A chunk of the provider's stream did not parse.")
            error = chunk.get("error")
            if error is not None and "choices" not in chunk:
                raise provider.stream_error(error)
            yield chunk, data
    except UpstreamError as exc:
        raise _broken(exc) from None


async def _dict_chunks(
    chunks: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[tuple[dict[str, Any], bytes | None]]:
    async for chunk in chunks:
        yield chunk, None


class HotPaths:
    """Sends `POST` to the completion paths straight to their `CompletionProxy`, past the
    router; everything else goes on to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes = {"/v1/chat/completions": CompletionProxy(CHAT)}
        self.routes["/v1/completions"] = CompletionProxy(TEXT)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            proxy = self.routes.get(scope["path"])
            if proxy is not None:
                await proxy(scope, receive, send)
                return
        await self.app(scope, receive, send)
