"""The lean upstream client (app/kit/upstream.py) against a real HTTP server on loopback that
answers as told: keep-alive reuse, chunked and sized bodies, servers that close, hang or break
off, timeouts, and the proxy fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from app.kit.upstream import (
    LeanClient,
    ProxiedClient,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
    forwarder_for,
)

Answer = Callable[[asyncio.StreamWriter, bytes], Awaitable[bool]]  # True: keep the connection


@dataclass
class Server:
    """Reads one request at a time per connection and lets `answer` reply."""

    answer: Answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.answer(writer, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> Server:
        state = Server(answer)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        state.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return state

    yield start
    for server in servers:
        server.close()


def sized(body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{headers}\r\n".encode() + body


async def echo(writer: asyncio.StreamWriter, body: bytes) -> bool:
    writer.write(sized(b"echo:" + body))
    return True


def client_for(server: Server, **kwargs: float) -> LeanClient:
    return LeanClient(f"http://127.0.0.1:{server.port}/v1", {"authorization": "Bearer k"}, **kwargs)


async def test_requests_reuse_one_connection_and_carry_the_fixed_headers(serve) -> None:
    server = await serve(echo)
    client = client_for(server)
    for i in range(5):
        answer = await client.send("/chat/completions", b'{"n": %d}' % i, wait_seconds=5)
        assert answer.status == 200
        assert await answer.read(1000) == b'echo:{"n": %d}' % i
    assert server.connections == 1
    request = server.requests[0].decode()
    assert request.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "authorization: Bearer k\r\n" in request and "content-length: 8\r\n" in request
    await client.aclose()


async def test_a_chunked_answer_is_iterated_as_it_arrives(serve) -> None:
    release = asyncio.Event()

    async def chunked(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    server = await serve(chunked)
    client = client_for(server)
    answer = await client.send("/x", b"{}", wait_seconds=5)
    pieces = aiter(answer)
    assert await anext(pieces) == b"first"  # before the rest was even written
    release.set()
    assert [p async for p in pieces] == [b"second"]
    await answer.aclose()
    # Read to its end: the connection goes back to the pool and serves the next request.
    release.clear()
    again = await client.send("/x", b"{}", wait_seconds=5)
    release.set()
    assert await again.read(100) == b"firstsecond"
    assert server.connections == 1
    await client.aclose()


async def test_a_connection_closed_while_idle_is_replaced_without_an_error(serve) -> None:
    async def once(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(sized(b"ok"))
        return False  # the server closes every connection after one answer

    server = await serve(once)
    client = client_for(server)
    for _ in range(3):
        answer = await client.send("/x", b"{}", wait_seconds=5)
        assert await answer.read(10) == b"ok"
        await asyncio.sleep(0.05)  # the close reaches the pooled connection
    assert server.connections == 3 and len(server.requests) == 3
    await client.aclose()


async def test_connection_close_answers_are_not_pooled(serve) -> None:
    async def closing(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(sized(b"ok", "connection: close"))
        return True  # the server would keep it; the client must not

    server = await serve(closing)
    client = client_for(server)
    for _ in range(2):
        assert await (await client.send("/x", b"{}", wait_seconds=5)).read(10) == b"ok"
    assert server.connections == 2
    await client.aclose()


async def test_a_slow_head_and_a_stalled_body_time_out(serve) -> None:
    async def stall(writer: asyncio.StreamWriter, body: bytes) -> bool:
        if body == b"head":
            await asyncio.sleep(5)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await asyncio.sleep(5)
        return False

    server = await serve(stall)
    client = client_for(server)
    with pytest.raises(UpstreamTimeout):
        await client.send("/x", b"head", wait_seconds=0.3)
    answer = await client.send("/x", b"body", wait_seconds=0.3)
    pieces = aiter(answer)
    assert await anext(pieces) == b"hi"
    with pytest.raises(UpstreamTimeout):
        await anext(pieces)
    await answer.aclose()
    await client.aclose()


async def test_a_body_cut_off_or_too_large_is_an_error(serve) -> None:
    async def cut(writer: asyncio.StreamWriter, body: bytes) -> bool:
        if body == b"big":
            writer.write(sized(b"x" * 5000))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        return False

    server = await serve(cut)
    client = client_for(server)
    answer = await client.send("/x", b"cut", wait_seconds=5)
    with pytest.raises(UpstreamError, match="closed the connection"):
        await answer.read(1000)
    big = await client.send("/x", b"big", wait_seconds=5)
    with pytest.raises(UpstreamError, match="larger than 1000 bytes"):
        await big.read(1000)
    await client.aclose()


async def test_garbage_is_not_http(serve) -> None:
    async def garbage(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"\x00\x01 this is not HTTP\r\n\r\n")
        return False

    client = client_for(await serve(garbage))
    with pytest.raises(UpstreamError):
        await client.send("/x", b"{}", wait_seconds=5)
    await client.aclose()


async def test_nobody_listening_is_a_connect_error(serve) -> None:
    server = await serve(echo)
    port = server.port
    client = LeanClient(f"http://127.0.0.1:{port + 1 if port < 65535 else 1}", {})
    with pytest.raises(UpstreamConnectError):
        await client.send("/x", b"{}", wait_seconds=5)


async def test_a_stream_closed_early_drops_its_connection(serve) -> None:
    async def endless(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(200):
            writer.write(b"3\r\nabc\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        return False

    server = await serve(endless)
    client = client_for(server)
    answer = await client.send("/x", b"{}", wait_seconds=5)
    assert await anext(aiter(answer)) == b"abc"
    await answer.aclose()
    again = await client.send("/x", b"{}", wait_seconds=5)  # a new connection
    await again.aclose()
    assert server.connections == 2
    await client.aclose()


def test_a_configured_proxy_selects_httpx2(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert isinstance(forwarder_for("https://api.openai.com/v1", {}), ProxiedClient)
    assert isinstance(forwarder_for("http://localhost:9/v1", {}), LeanClient)
    monkeypatch.delenv("HTTPS_PROXY")
    assert isinstance(forwarder_for("https://api.openai.com/v1", {}), LeanClient)


async def test_a_request_is_never_sent_twice(serve) -> None:
    """A pooled connection the server drops without answering may have run the completion:
    the caller gets the error (and retries if it wants), tunegate does not send it again."""
    answered: set[int] = set()

    async def first_only(writer: asyncio.StreamWriter, body: bytes) -> bool:
        if id(writer) in answered:
            return False  # a second request on this connection: read, then closed unanswered
        answered.add(id(writer))
        writer.write(sized(b"ok"))
        return True

    server = await serve(first_only)
    client = client_for(server)
    assert await (await client.send("/x", b"{}", wait_seconds=5)).read(10) == b"ok"
    with pytest.raises(UpstreamError, match="closed the connection"):
        await client.send("/x", b"{}", wait_seconds=5)
    assert len(server.requests) == 2  # each send reached the server once
    assert await (await client.send("/x", b"{}", wait_seconds=5)).read(10) == b"ok"
    await client.aclose()


async def test_interim_answers_are_skipped_and_never_shift_answers(serve) -> None:
    async def continue_first(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n")
        writer.write(sized(b"answer:" + body))
        return True

    server = await serve(continue_first)
    client = client_for(server)
    for name in (b"one", b"two", b"three"):
        answer = await client.send("/x", name, wait_seconds=5)
        assert (answer.status, await answer.read(100)) == (200, b"answer:" + name)
        assert "link" not in answer.headers
    assert server.connections == 1
    await client.aclose()


async def test_an_answer_without_a_length_ends_with_the_connection(serve) -> None:
    async def until_close(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"a": 1}')
        await writer.drain()
        return False

    server = await serve(until_close)
    client = client_for(server)
    for _ in range(2):
        answer = await client.send("/x", b"{}", wait_seconds=5)
        assert await answer.read(100) == b'{"a": 1}'
    assert server.connections == 2
    await client.aclose()


async def test_idle_connections_expire(serve) -> None:
    server = await serve(echo)
    client = LeanClient(f"http://127.0.0.1:{server.port}", {}, keepalive_expiry=0.05)
    assert await (await client.send("/x", b"1", wait_seconds=5)).read(100) == b"echo:1"
    assert await (await client.send("/x", b"2", wait_seconds=5)).read(100) == b"echo:2"
    await asyncio.sleep(0.1)
    assert await (await client.send("/x", b"3", wait_seconds=5)).read(100) == b"echo:3"
    assert server.connections == 2
    await client.aclose()


async def test_bytes_on_an_idle_connection_retire_it(serve) -> None:
    async def chatty(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(sized(b"ok") + sized(b"unasked"))  # one answer too many
        return True

    server = await serve(chatty)
    client = client_for(server)
    assert await (await client.send("/x", b"{}", wait_seconds=5)).read(10) == b"ok"
    await asyncio.sleep(0.05)
    assert await (await client.send("/x", b"{}", wait_seconds=5)).read(10) == b"ok"
    assert server.connections == 2
    await client.aclose()


async def test_a_large_stream_read_slowly_pauses_and_resumes_the_socket(serve) -> None:
    piece = b"x" * 65536

    async def large(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(64):  # 4 MB, more than the client buffers before pausing
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    server = await serve(large)
    client = client_for(server)
    answer = await client.send("/x", b"{}", wait_seconds=5)
    received = 0
    async for chunk in answer:
        received += len(chunk)
        await asyncio.sleep(0.001)
    await answer.aclose()
    assert received == 64 * len(piece)
    # Read to its end: reusable, not left paused.
    again = await client.send("/x", b"{}", wait_seconds=5)
    assert len(await again.read(10 * 2**20)) == 64 * len(piece)
    assert server.connections == 1
    await client.aclose()


async def test_the_httpx2_client_behaves_the_same(serve) -> None:
    server = await serve(echo)
    client = ProxiedClient(f"http://127.0.0.1:{server.port}/v1", {"authorization": "Bearer k"})
    answer = await client.send("/chat/completions", b"{}", wait_seconds=5)
    assert (answer.status, await answer.read(100)) == (200, b"echo:{}")
    assert "authorization: bearer k" in server.requests[0].decode().lower()

    async def hang(writer: asyncio.StreamWriter, body: bytes) -> bool:
        await asyncio.sleep(5)
        return False

    slow = ProxiedClient(f"http://127.0.0.1:{(await serve(hang)).port}", {})
    with pytest.raises(UpstreamTimeout):
        await slow.send("/x", b"{}", wait_seconds=0.3)
    await client.aclose()
    await slow.aclose()


async def test_finishing_an_answer_whose_end_never_comes_gives_up_quietly(serve) -> None:
    async def unended(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ndone\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # the terminating chunk never comes in time
        return False

    server = await serve(unended)
    client = client_for(server)
    answer = await client.send("/x", b"{}", wait_seconds=5)
    assert await anext(aiter(answer)) == b"done"
    started = time.monotonic()
    await answer.finish()  # drains for at most a second, then drops the connection
    assert time.monotonic() - started < 2
    again = await client.send("/x", b"{}", wait_seconds=5)
    await again.aclose()
    assert server.connections == 2
    await client.aclose()
