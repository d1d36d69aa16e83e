"""A lean HTTP/1.1 client for the inference hot path: one origin, keep-alive pool, raw bytes.

The proxy forwards a completion request as JSON it has checked and hands the answer back as
the bytes the provider sent, so it needs no request builder, no response model and no
JSON round trip - only a socket that is reused. httpx2 (what the `openai` SDK runs on) spends
about 0.5 ms of CPU per request on this machine; this client, an `asyncio.Protocol` with
httptools' response parser, about a tenth of that, which is most of the difference between a
proxy that adds 2 ms and one that adds 0.3 ms.

What it does: HTTP/1.1 to one `http://` or `https://` origin (TLS verified with the trust
httpx2 uses: SSL_CERT_FILE / SSL_CERT_DIR, else the system's), keep-alive connections kept in
a LIFO pool and dropped after `KEEPALIVE_EXPIRY` idle, answers with `Content-Length`, chunked
(httptools removes the framing) or ended by the server closing, interim 1xx heads skipped, a
timeout for the answer's head and between body chunks, flow control (a slow reader pauses the
socket). A connection is reused only when its answer was read to the end; one that receives
bytes while no request uses it is closed. A request is never sent twice: a POST that may have
reached the server is not retried (the caller's 502 is retried by the openai SDK).

What it does not: proxies (`forwarder_for` falls back to httpx2 when the environment sets one
for the origin), HTTP/2, redirects, compression (it asks for `identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import httpcore2
import httptools

__all__ = [
    "Forwarder",
    "LeanClient",
    "ProxiedClient",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "forwarder_for",
    "proxy_for",
]

# Idle connections kept per origin; more are closed when they are given back.
MAX_IDLE: Final = 64
# An idle connection older than this is not reused (httpcore's default is 5 s; servers such as
# uvicorn close idle connections after 5 s, so reusing one that old races with its close).
KEEPALIVE_EXPIRY: Final = 4.0
# After a stream's [DONE], how long and how much of the rest of its body is read so that its
# connection can be reused.
_DRAIN_SECONDS: Final = 1.0
_DRAIN_BYTES: Final = 64 * 1024
# The socket stops reading while this much of a streamed answer waits for its reader.
_HIGH_WATER: Final = 1024 * 1024


class UpstreamError(Exception):
    """The origin could not be reached, or the connection broke before the answer ended."""


class UpstreamConnectError(UpstreamError):
    """No connection to the origin (refused, DNS, TLS)."""


class UpstreamTimeout(UpstreamError):
    """No answer head, or no next body chunk, within the timeout."""


class UpstreamResponse(Protocol):
    """An answer whose head has arrived; its body is read with `read` or iterated, once."""

    status: int
    headers: Mapping[str, str]  # lower-case names

    async def read(self, limit: int) -> bytes:
        """The whole body (UpstreamError past `limit` bytes); the connection is released."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunk framing removed)."""
        ...

    async def finish(self) -> None:
        """The reader has what it needs (a stream's `[DONE]`): the rest of the body is read
        briefly so the connection can be reused, then it is released."""
        ...

    async def aclose(self) -> None:
        """Release the connection: back to the pool when the body was read to its end, else
        closed (a streamed answer the client stopped reading). Idempotent."""
        ...


class Forwarder(Protocol):
    async def send(
        self,
        path: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        wait_seconds: float | None = None,
    ) -> UpstreamResponse:
        """POST `body` to `path` (under the base URL); returns once the answer's head is in."""
        ...

    async def aclose(self) -> None: ...


def proxy_for(url: str) -> str | None:
    """The proxy the environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY) sets for `url`."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


async def _read_all(response: UpstreamResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response:
            size += len(chunk)
            if size > limit:
                raise UpstreamError(f"The upstream's answer is larger than {limit} bytes.")
            parts.append(chunk)
    finally:
        await response.aclose()
    return b"".join(parts)


async def _drain(response: UpstreamResponse) -> None:
    """Read what is left of a body the reader is done with, for a moment and a few KB at most
    (a server that is slow to end it is not waited for), then release the connection: reused
    when the body ended, else closed."""
    with contextlib.suppress(UpstreamError, TimeoutError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            left = 0
            async for chunk in response:
                left += len(chunk)
                if left > _DRAIN_BYTES:
                    break
    await response.aclose()


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer it is receiving."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.active = False  # a request is using it (bytes arriving otherwise are a fault)
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._header_list: list[tuple[str, str]] = []
        self._error: BaseException | None = None
        self._interim = False  # the head being parsed is a 1xx (100 Continue, 103 ...)
        self._until_close = False  # the body ends when the server closes (no length given)
        self.complete = False
        self.keep_alive = True

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP or TLS transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Nobody asked: a server talking out of turn. The connection cannot be trusted
            # to line answers up with requests any more.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("The upstream switched protocols."))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"The upstream's answer is not valid HTTP/1.1 ({exc})."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self._until_close and exc is None and self._head is not None and self._head.done():
            self.complete = True  # an answer without a length ends with the connection
            self.keep_alive = False
            self._wake()
            return
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamError(f"The upstream closed the connection{reason}."))

    def pause_writing(self) -> None:  # bodies are written at once; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --------------------------------------------------------------
    # After the answer is complete, anything more in the same bytes is an answer nobody asked
    # for: it is ignored, and the connection is not reused.

    def on_message_begin(self) -> None:
        if self.complete:
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self._header_list.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # not the answer: the real head follows
            self._header_list = []
            return
        self.keep_alive = self._parser.should_keep_alive()
        names = {name for name, _ in self._header_list}
        self._until_close = "content-length" not in names and "transfer-encoding" not in names
        self._until_close = self._until_close and status not in (204, 304)
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.complete:
            self.complete = True
            self._wake()

    # -- used by LeanClient / _LeanResponse -----------------------------------------------

    def start(self, request: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._head = loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self._header_list = []
        self._error = None
        self._interim = self._until_close = False
        self.complete = False
        self.active = True
        self.transport.write(request)
        return self._head

    def status(self) -> int:
        return int(self._parser.get_status_code())

    def header_map(self) -> dict[str, str]:
        return dict(self._header_list)

    @property
    def reusable(self) -> bool:
        """Its answer was read to the end and the server keeps it open."""
        return self.complete and self.keep_alive and not self.closed and not self._chunks

    async def next_chunk(self, wait_seconds: float | None) -> bytes | None:
        """The next piece of the body; None at its end."""
        while not self._chunks:
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout(wait_seconds):
                    await self._waiter
            except TimeoutError:
                raise UpstreamTimeout("The upstream sent nothing more in time.") from None
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        self.active = False
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: no "never retrieved" warning if nobody waits
        self._wake()
        if self.transport is not None:
            self.transport.close()


class _LeanResponse:
    def __init__(
        self, client: LeanClient, connection: _Connection, wait_seconds: float | None
    ) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self._wait_seconds = wait_seconds
        self.status = connection.status()
        self.headers: Mapping[str, str] = connection.header_map()

    async def read(self, limit: int) -> bytes:
        return await _read_all(self, limit)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while (chunk := await connection.next_chunk(self._wait_seconds)) is not None:
            yield chunk

    async def finish(self) -> None:
        await _drain(self)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client.release(connection)


class LeanClient:
    """Keep-alive HTTP/1.1 to one origin. `headers` go with every request (auth, identity)."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout: float = 10.0,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = _tls_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        fixed = {
            "host": parts.netloc.rpartition("@")[2],  # IPv6 literals keep their brackets
            "accept-encoding": "identity",
            "content-type": "application/json",
            **{name.lower(): value for name, value in headers.items()},
        }
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode(
            "latin-1"
        )
        self._connect_timeout = connect_timeout
        self._keepalive_expiry = keepalive_expiry
        self._idle: list[_Connection] = []
        self._closed = False

    async def send(
        self,
        path: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        wait_seconds: float | None = None,
    ) -> UpstreamResponse:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        request = b"".join(
            (
                f"POST {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1"),
                self._fixed,
                extra.encode("latin-1"),
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        loop = asyncio.get_running_loop()
        connection = self._pooled() or await self._connect(loop)
        head = connection.start(request, loop)
        # No retry, even on a pooled connection the server dropped before answering: it may
        # have run the completion anyway, and a second one would be billed twice. The caller
        # gets a 502, which the openai SDK retries on its own.
        try:
            async with asyncio.timeout(wait_seconds):
                await head
        except TimeoutError:
            connection.close()
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except BaseException:
            connection.close()  # an error, or cancelled: the request goes with its socket
            raise
        return _LeanResponse(self, connection, wait_seconds)

    def release(self, connection: _Connection) -> None:
        connection.active = False
        if connection.reusable and not self._closed and len(self._idle) < MAX_IDLE:
            connection.reused = True
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _pooled(self) -> _Connection | None:
        expired_before = time.monotonic() - self._keepalive_expiry
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if connection.closed or transport is None or transport.is_closing():
                continue
            if connection.idle_since < expired_before:
                connection.close()  # the server (or a NAT on the way) may have dropped it
                continue
            return connection
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"Could not connect to {self._host}:{self._port} in time."
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(
                f"Could not connect to {self._host}:{self._port}: {exc.strerror or exc}"
                if isinstance(exc, OSError)
                else f"TLS with {self._host} failed: {exc}"
            ) from None
        return connection


def _tls_context() -> ssl.SSLContext:
    """The trust httpx2 (and so the SDK's own requests) uses: SSL_CERT_FILE / SSL_CERT_DIR,
    else the system's certificates."""
    context: ssl.SSLContext = httpcore2.default_ssl_context()
    return context


class _Httpx2Response:
    def __init__(self, response: Any) -> None:
        self._response = response
        self.status = int(response.status_code)
        self.headers: Mapping[str, str] = {
            name.lower(): value for name, value in response.headers.items()
        }

    async def read(self, limit: int) -> bytes:
        return await _read_all(self, limit)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import httpx2

        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx2.TimeoutException:
            raise UpstreamTimeout("The upstream sent nothing more in time.") from None
        except httpx2.TransportError as exc:
            raise UpstreamError(f"The connection to the upstream broke: {exc}") from None

    async def finish(self) -> None:
        await _drain(self)

    async def aclose(self) -> None:
        await self._response.aclose()


class ProxiedClient:
    """The same interface over httpx2, for an origin reached through an HTTP proxy."""

    def __init__(self, base_url: str, headers: Mapping[str, str]) -> None:
        import httpx2

        self._base = base_url.rstrip("/")
        self._headers = {"accept-encoding": "identity", "content-type": "application/json"}
        self._headers |= {name.lower(): value for name, value in headers.items()}
        self._client = httpx2.AsyncClient(trust_env=True, follow_redirects=False)

    async def send(
        self,
        path: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        wait_seconds: float | None = None,
    ) -> UpstreamResponse:
        import httpx2

        request = self._client.build_request(
            "POST",
            self._base + path,
            content=body,
            headers={**self._headers, **(headers or {})},
            timeout=httpx2.Timeout(wait_seconds, connect=min(wait_seconds or 10.0, 10.0)),
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx2.TimeoutException:
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except httpx2.ConnectError as exc:
            raise UpstreamConnectError(f"Could not connect to the upstream: {exc}") from None
        except httpx2.TransportError as exc:
            raise UpstreamError(f"The request to the upstream failed: {exc}") from None
        return _Httpx2Response(response)

    async def aclose(self) -> None:
        await self._client.aclose()


def forwarder_for(base_url: str, headers: Mapping[str, str]) -> Forwarder:
    """The lean client, or httpx2 when the environment sets a proxy for `base_url`."""
    if proxy_for(base_url) is not None:
        return ProxiedClient(base_url, headers)
    return LeanClient(base_url, headers)
