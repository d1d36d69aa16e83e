"""Proxy benchmark: what tunegate adds to a chat completion, next to calling the upstream directly.

Everything runs as the real processes of a deployment, on loopback: `tunegate serve --no-workers`
(one uvicorn process, its default; `--with-workers` also runs the worker roles in it) on a real
PostgreSQL (TEST_DATABASE_URL's server, in a database of its own, or an embedded one), and a fast
OpenAI-compatible upstream: this script started with `--upstream`, a minimal HTTP/1.1 keep-alive
server on plain asyncio that answers `POST /v1/chat/completions` with a fixed small
`chat.completion` (with usage), or, for `stream: true`, with server-sent events: `--chunks`
chunks `--chunk-delay-ms` apart (the first at once), the usage chunk when asked, `data: [DONE]`.
tunegate reaches it as OPENAI_BASE_URL with the `openai` provider; the caller uses the
TUNEGATE_BOOTSTRAP_ADMIN_KEY and the catalogued base model `gpt-4o-mini-2024-07-18` (no database
query to resolve it, so the database work per request is the key's authentication).

The load comes from this process (not tunegate's nor the upstream's), through a keep-alive
connection pool on plain asyncio (cheaper and steadier than an HTTP library on a machine this
small). The same request bytes (same headers, same body, `stream_options.include_usage` for
streams, as tunegate always asks its provider) go either straight to the upstream ("direct") or
through tunegate ("via"). What it measures:

1. **Latency at a fixed rate** (open loop): requests are sent at `--rate` per second whatever
   the answers do, and each latency counts from the time the request was *scheduled*, so a
   stall is not hidden by the requests it delayed (no coordinated omission). Four modes, plain
   and stream each direct and via, take turns in `--slice`-second slices (direct and via
   swapped every other round) until each has run `--seconds`; a `--warmup` of each comes first
   and is discarded. For streams: the time to the first complete chunk (TTFC) and to the end
   (the time from the first chunk to the end, via next to direct, shows any buffering).
   Added latency = via - direct (p50, p99); targets (the issue's): added p50 <= 2 ms and p99
   <= 10 ms at 300 requests/s for plain completions; for streams the time to the first chunk
   within 2 ms of direct at p50 (no added buffering), and its p99 within 10 ms.
2. **Throughput** (closed loop): `--concurrency` requests in flight for `--max-seconds` per
   mode, streams without the inter-chunk delay; requests per second direct and via, and their
   ratio.
3. **CPU**: per mode, the CPU time per request of tunegate, of the upstream, of this process
   and of the rest of the machine (mostly PostgreSQL), from /proc, in milliseconds.

Every process here, PostgreSQL included, shares the machine's cores (2 on the machines this was
written for): the load generator's and the upstream's work count against the "direct" numbers,
tunegate's and PostgreSQL's come on top for "via". Numbers from a busy machine are worse.

    .venv/bin/python bench/proxy.py                       # 300 requests/s, 10 s per mode
    .venv/bin/python bench/proxy.py --seconds 4 --max-seconds 2          # quick
    .venv/bin/python bench/proxy.py --profile /tmp/proxy.txt   # py-spy record of tunegate
    .venv/bin/python bench/proxy.py --json                # the result as JSON, last line

`--profile PATH` runs `py-spy record` (install it into the venv first) on the tunegate process
during the latency phase (`.svg`: a flame graph, `.json`: speedscope, anything else: collapsed
stacks); the sampler takes CPU of its own, so the numbers of such a run are worse.

Exit status: 0 when every target is met and no request failed, 1 otherwise, 2 on an error (a
process that died, a time-out, tunegate answering something else than the upstream's answer).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from syncer import database, free_port, percentile, process, tunegate, wait_until
from webhooks import cpu_seconds, machine_busy_seconds

from app.auth.keys import generate_key

DATABASE = "tunegate_bench_proxy"
MODEL = "gpt-4o-mini-2024-07-18"
UPSTREAM_KEY = "sk-bench-proxy-upstream"
IDLE_REUSE_SECONDS = 4.5  # uvicorn closes idle keep-alive connections after 5 s
REQUEST_TIMEOUT = 30.0
BUSY_CORES = 0.25  # busier than this before the start: the machine is not idle, say so

# -- the upstream (a process of its own) -----------------------------------------------------

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
CHUNK_END = b"0\r\n\r\n"
CREATED = 1767225600


def completion_answer() -> bytes:
    body = orjson.dumps(
        {
            "id": "chatcmpl-benchproxy",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help?"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            "system_fingerprint": "fp_bench",
        }
    )
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse_event(payload: Any) -> bytes:
    return http_chunk(b"data: " + orjson.dumps(payload) + b"\n\n")


def stream_events(chunks: int) -> tuple[list[bytes], bytes]:
    """The chunks of a streamed answer (as HTTP chunks), and its usage chunk."""
    base = {
        "id": "chatcmpl-benchproxy",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
    }
    events = []
    for k in range(chunks):
        delta: dict[str, Any] = {"content": f"tok{k} "}
        if k == 0:
            delta = {"role": "assistant", "content": ""}
        last = k == chunks - 1
        events.append(
            sse_event(
                base
                | {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {} if last else delta,
                            "logprobs": None,
                            "finish_reason": "stop" if last else None,
                        }
                    ],
                    "usage": None,
                }
            )
        )
    usage = sse_event(
        base
        | {
            "choices": [],
            "usage": {
                "prompt_tokens": 11,
                "completion_tokens": chunks,
                "total_tokens": 11 + chunks,
            },
        }
    )
    return events, usage


class Upstream:
    """What every connection of the upstream shares."""

    def __init__(self, chunks: int, delay: float) -> None:
        self.answer = completion_answer()
        self.events, self.usage = stream_events(chunks)
        self.done = http_chunk(b"data: [DONE]\n\n") + CHUNK_END
        self.delay = delay
        self.requests = {"plain": 0, "stream": 0}


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length request bodies; one exchange at a time per
    connection (a request that arrives while a stream is being sent waits for its end)."""

    def __init__(self, shared: Upstream) -> None:
        self.shared = shared
        self.buffer = bytearray()
        self.head: tuple[bytes, bytes, int] | None = None
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        assert self.transport is not None
        buffer = self.buffer
        while not self.streaming and not self.transport.is_closing():
            if self.head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > 65536:
                        self.fail()
                    return
                lines = bytes(buffer[:end]).split(b"\r\n")
                del buffer[: end + 4]
                try:
                    method, target, _ = lines[0].split(b" ", 2)
                    length = 0
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        name = name.strip().lower()
                        if name == b"content-length":
                            length = int(value)
                        elif name == b"transfer-encoding":
                            raise ValueError("chunked request bodies are not supported here")
                except ValueError:
                    self.fail()
                    return
                self.head = (method, target, length)
            method, target, length = self.head
            if len(buffer) < length:
                return
            body = bytes(buffer[:length])
            del buffer[:length]
            self.head = None
            self.answer(method, target, body)

    def answer(self, method: bytes, target: bytes, body: bytes) -> None:
        assert self.transport is not None
        shared = self.shared
        if method == b"GET" and target == b"/_stats":
            payload = orjson.dumps(shared.requests)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload
            )
            return
        if method != b"POST" or target.split(b"?", 1)[0] != b"/v1/chat/completions":
            self.transport.write(NOT_FOUND)
            return
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.fail()
            return
        if not request.get("stream"):
            shared.requests["plain"] += 1
            self.transport.write(shared.answer)
            return
        shared.requests["stream"] += 1
        usage = (request.get("stream_options") or {}).get("include_usage") is True
        delay = request.get("bench_chunk_delay_ms")
        delay = shared.delay if delay is None else float(delay) / 1000
        events = [*shared.events, shared.usage] if usage else list(shared.events)
        if delay <= 0:
            self.transport.write(STREAM_HEAD + b"".join(events) + shared.done)
            return
        self.streaming = True
        asyncio.get_running_loop().create_task(self.stream(events, delay))

    async def stream(self, events: list[bytes], delay: float) -> None:
        transport = self.transport
        assert transport is not None
        # The usage chunk goes with the last content chunk, as OpenAI sends it.
        steps = [STREAM_HEAD + events[0], *events[1:]]
        if len(steps) > 1 and len(events) > len(self.shared.events):
            steps[-2:] = [steps[-2] + steps[-1]]
        try:
            for n, step in enumerate(steps):
                if n:
                    await asyncio.sleep(delay)
                if transport.is_closing():
                    return
                transport.write(step)
            transport.write(self.shared.done)
        finally:
            self.streaming = False
        if self.buffer:
            self.process()

    def fail(self) -> None:
        assert self.transport is not None
        self.transport.write(BAD_REQUEST)
        self.transport.close()


def upstream_main(port: int, chunks: int, delay_ms: float) -> int:
    shared = Upstream(chunks, delay_ms / 1000)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(
            lambda: UpstreamProtocol(shared), "127.0.0.1", port, backlog=1024, reuse_address=True
        )
        async with server:
            await stop.wait()

    asyncio.run(serve())
    return 0


# -- the load generator ------------------------------------------------------------------------


class BenchError(Exception):
    """Something went wrong (not a missed target): exit status 2."""


class Exchange:
    """One request on a connection: its answer as it is parsed, and when its parts arrived."""

    __slots__ = (
        "body",
        "chunked",
        "done",
        "first",
        "future",
        "head_done",
        "length",
        "status",
    )

    def __init__(self, future: asyncio.Future[Exchange]) -> None:
        self.future = future
        self.head_done = False
        self.status = 0
        self.chunked = False
        self.length = 0
        self.body = bytearray()
        self.first = 0.0  # the first complete server-sent event (streams)
        self.done = 0.0


class ClientConnection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection: Content-Length or chunked answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.exchange: Exchange | None = None
        self.closed = False
        self.last_used = time.perf_counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None and not self.exchange.future.done():
            self.exchange.future.set_exception(ConnectionError("the server closed the connection"))
        self.exchange = None

    def send(self, request: bytes) -> asyncio.Future[Exchange]:
        assert self.transport is not None and self.exchange is None
        future: asyncio.Future[Exchange] = asyncio.get_running_loop().create_future()
        self.exchange = Exchange(future)
        self.transport.write(request)
        return future

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        exchange = self.exchange
        if exchange is None:
            self.abort()
            return
        try:
            finished = self.parse(exchange, now)
        except ValueError as exc:
            exchange.future.set_exception(exc)
            self.exchange = None
            self.abort()
            return
        if finished:
            exchange.done = now
            self.exchange = None
            self.last_used = now
            exchange.future.set_result(exchange)

    def parse(self, exchange: Exchange, now: float) -> bool:
        buffer = self.buffer
        if not exchange.head_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[: end + 4]
            exchange.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    exchange.length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    exchange.chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    self.closed = True  # not reused
            exchange.head_done = True
        if not exchange.chunked:
            if len(buffer) < exchange.length:
                return False
            exchange.body += buffer[: exchange.length]
            del buffer[: exchange.length]
            if not exchange.first:
                exchange.first = now
            return True
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buffer) < line_end + 4:
                    return False
                del buffer[: line_end + 4]  # no trailers here
                return True
            if len(buffer) < line_end + 4 + size:
                return False
            exchange.body += buffer[line_end + 2 : line_end + 2 + size]
            del buffer[: line_end + 4 + size]
            if not exchange.first and b"\n\n" in exchange.body:
                exchange.first = now

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one server; a new one whenever none is free."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[ClientConnection] = []
        self.opened = 0

    async def connection(self) -> ClientConnection:
        now = time.perf_counter()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.last_used < IDLE_REUSE_SECONDS:
                return conn
            conn.abort()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(ClientConnection, "127.0.0.1", self.port)
        self.opened += 1
        return conn

    async def exchange(self, request: bytes) -> Exchange:
        conn = await self.connection()
        try:
            answer = await asyncio.wait_for(conn.send(request), REQUEST_TIMEOUT)
        except BaseException:
            conn.abort()
            raise
        if not conn.closed:
            self.idle.append(conn)
        return answer

    def close(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()


@dataclass
class Target:
    name: str  # direct or via
    pool: Pool
    host: str  # the Host header


def chat_request(host: str, key: str, stream: bool, delay_ms: float | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if delay_ms is not None:
        body["bench_chunk_delay_ms"] = delay_ms  # passes through tunegate unchanged
    payload = orjson.dumps(body)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


@dataclass
class Samples:
    """One mode's measurements."""

    latency: list[float] = field(default_factory=list)  # seconds, from the scheduled send
    first: list[float] = field(default_factory=list)  # streams: to the first chunk
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0  # from the first scheduled send to the last answer, summed over slices
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(what)


def check_answer(answer: Exchange, stream: bool, chunks: int) -> str | None:
    """What is wrong with an answer, or None."""
    body = bytes(answer.body)
    if answer.status != 200:
        return f"HTTP {answer.status}: {body[:300]!r}"
    if not stream:
        return None if b'"chat.completion"' in body else f"not a chat.completion: {body[:300]!r}"
    events = body.count(b"data: ")
    if not body.endswith(b"data: [DONE]\n\n") or events != chunks + 2:
        return f"{events} events (expected {chunks + 2}) or no [DONE]: {body[-300:]!r}"
    return None


async def one(
    target: Target, request: bytes, scheduled: float, stream: bool, chunks: int, into: Samples
) -> float:
    try:
        answer = await target.pool.exchange(request)
    except (OSError, TimeoutError, ValueError) as exc:
        into.error(f"{type(exc).__name__}: {exc}")
        return time.perf_counter()
    problem = check_answer(answer, stream, chunks)
    if problem:
        into.error(problem)
        return answer.done
    into.latency.append(answer.done - scheduled)
    if stream:
        into.first.append(answer.first - scheduled)
    return answer.done


class CpuSampler:
    """CPU seconds of named processes and of the whole machine between `start` and `stop`."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.began: dict[str, float] = {}

    def sample(self) -> dict[str, float]:
        found = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return found | {"machine": machine_busy_seconds()}

    def start(self) -> None:
        self.began = self.sample()

    def stop(self, into: dict[str, float]) -> None:
        ended = self.sample()
        for name, value in ended.items():
            into[name] = into.get(name, 0.0) + value - self.began[name]


async def open_loop(
    target: Target,
    request: bytes,
    rate: float,
    seconds: float,
    stream: bool,
    chunks: int,
    into: Samples,
    cpu: CpuSampler | None = None,
) -> None:
    """`rate` requests per second for `seconds`, sent on schedule whatever the answers do."""
    count = max(1, round(rate * seconds))
    if cpu is not None:
        cpu.start()
    start = time.perf_counter() + 0.002
    tasks = []
    for i in range(count):
        scheduled = start + i / rate
        wait = scheduled - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(target, request, scheduled, stream, chunks, into)))
    ends = await asyncio.gather(*tasks)
    into.seconds += max(ends) - start
    if cpu is not None:
        cpu.stop(into.cpu)


async def closed_loop(
    target: Target, request: bytes, concurrency: int, seconds: float, stream: bool, chunks: int
) -> tuple[float, Samples]:
    """`concurrency` requests always in flight for `seconds`: completed requests per second."""
    into = Samples()
    began = time.perf_counter()
    deadline = began + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            await one(target, request, sent, stream, chunks, into)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return len(into.latency) / elapsed, into


@dataclass(frozen=True)
class Mode:
    kind: str  # plain or stream
    target: Target

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.target.name}"


def ms(value: float) -> float:
    return round(1000 * value, 3)


def distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "p50": ms(percentile(values, 0.50)),
        "p90": ms(percentile(values, 0.90)),
        "p99": ms(percentile(values, 0.99)),
        "max": ms(max(values)),
        "mean": ms(statistics.fmean(values)),
    }


def mode_result(samples: Samples) -> dict[str, Any]:
    done = len(samples.latency)
    found: dict[str, Any] = {
        "requests": done,
        "errors": samples.errors,
        "rps": round(done / samples.seconds, 1) if samples.seconds else 0.0,
        "latency_ms": distribution(samples.latency),
    }
    if samples.first:
        found["first_chunk_ms"] = distribution(samples.first)
    if samples.error_examples:
        found["error_examples"] = samples.error_examples
    if samples.cpu and done:
        machine = samples.cpu.pop("machine", 0.0)
        per = {name: value for name, value in samples.cpu.items()}
        per["rest"] = max(0.0, machine - sum(per.values()))
        found["cpu_ms_per_request"] = {k: round(1000 * v / done, 3) for k, v in per.items()}
        found["cpu_cores"] = {k: round(v / samples.seconds, 2) for k, v in per.items()}
        found["cpu_cores"]["machine"] = round(machine / samples.seconds, 2)
    return found


async def latency_phase(
    args: argparse.Namespace, modes: list[Mode], requests: dict[str, bytes], cpu: CpuSampler
) -> dict[str, Samples]:
    # Warm-up: open the connections, fill caches, let each process import what it imports late.
    for mode in modes:
        await open_loop(
            mode.target,
            requests[mode.name],
            args.rate,
            args.warmup,
            mode.kind == "stream",
            args.chunks,
            Samples(),
        )
    found = {mode.name: Samples() for mode in modes}
    # Each round runs every mode once; every other round swaps direct and via, so neither is
    # always the one after the other (a mode's connections are never idle for long).
    swapped = [modes[k ^ 1] for k in range(len(modes))]
    rounds = max(1, round(args.seconds / args.slice))
    for n in range(rounds):
        for mode in modes if n % 2 == 0 else swapped:
            await open_loop(
                mode.target,
                requests[mode.name],
                args.rate,
                args.slice,
                mode.kind == "stream",
                args.chunks,
                found[mode.name],
                cpu,
            )
    return found


async def throughput_phase(
    args: argparse.Namespace, modes: list[Mode], requests: dict[str, bytes]
) -> dict[str, dict[str, Any]]:
    found = {}
    for mode in modes:
        request = requests[f"max-{mode.name}"]
        stream = mode.kind == "stream"
        # A short run first: the connections for this concurrency are opened outside the count.
        await closed_loop(mode.target, request, args.concurrency, 0.5, stream, args.chunks)
        rps, samples = await closed_loop(
            mode.target, request, args.concurrency, args.max_seconds, stream, args.chunks
        )
        found[mode.name] = {
            "rps": round(rps, 1),
            "errors": samples.errors,
            "latency_ms": distribution(samples.latency),
        }
        if samples.error_examples:
            found[mode.name]["error_examples"] = samples.error_examples
    return found


def targets(result: dict[str, Any], kinds: list[str]) -> list[dict[str, Any]]:
    checks: list[tuple[str, str, str, float]] = []
    if "plain" in kinds:
        checks += [
            ("plain: added latency p50", "plain", "added_p50_ms", 2.0),
            ("plain: added latency p99", "plain", "added_p99_ms", 10.0),
        ]
    if "stream" in kinds:
        checks += [
            ("stream: added time to first chunk p50", "stream", "added_first_chunk_p50_ms", 2.0),
            ("stream: added time to first chunk p99", "stream", "added_first_chunk_p99_ms", 10.0),
        ]
    return [
        {
            "target": name,
            "value_ms": result[kind][key],
            "limit_ms": limit,
            "met": result[kind][key] <= limit,
        }
        for name, kind, key, limit in checks
    ]


def fmt(value: Any, width: int = 8) -> str:
    if value is None or value == "":
        return " " * (width - 1) + "-"
    if isinstance(value, float):
        return f"{value:{width}.2f}"
    return f"{value:>{width}}"


def print_report(args: argparse.Namespace, result: dict[str, Any], kinds: list[str]) -> None:
    print(
        f"\nlatency at {args.rate:g} requests/s (open loop, {args.seconds:g} s per mode in "
        f"{args.slice:g} s slices taking turns, {args.warmup:g} s warm-up each discarded); "
        f"streams: {args.chunks} chunks {args.chunk_delay_ms:g} ms apart; times in ms from "
        "the scheduled send"
    )
    columns = ("req/s", "p50", "p90", "p99", "max", "TTFC p50", "TTFC p99", "errors")
    print(f"{'':16}" + "".join(f"{c:>10}" for c in columns))
    for kind in kinds:
        section = result[kind]
        for name in ("direct", "via"):
            row = section[name]
            lat, first = row["latency_ms"], row.get("first_chunk_ms", {})
            cells = (
                row["rps"],
                lat.get("p50"),
                lat.get("p90"),
                lat.get("p99"),
                lat.get("max"),
                first.get("p50"),
                first.get("p99"),
                row["errors"],
            )
            print(f"{kind + ' ' + name:16}" + "".join(fmt(c, 10) for c in cells))
        added = (
            "",
            section["added_p50_ms"],
            section["added_p90_ms"],
            section["added_p99_ms"],
            "",
            section.get("added_first_chunk_p50_ms"),
            section.get("added_first_chunk_p99_ms"),
            "",
        )
        print(f"{kind + ' added':16}" + "".join(fmt(c, 10) for c in added))
    print("\nCPU per request in ms (and cores used while the mode ran)")
    names = ("tunegate", "upstream", "client", "rest")
    print(f"{'':16}" + "".join(f"{n:>16}" for n in names) + f"{'machine':>10}")
    for kind in kinds:
        for name in ("direct", "via"):
            row = result[kind][name]
            per, cores = row.get("cpu_ms_per_request", {}), row.get("cpu_cores", {})
            cells = "".join(
                f"{per.get(n, 0):9.3f} ({cores.get(n, 0):4.2f})" for n in names
            )  # fmt: skip
            print(f"{kind + ' ' + name:16}{cells}{cores.get('machine', 0):10.2f}")
    if "throughput" in result:
        print(
            f"\nthroughput (closed loop, {args.concurrency} in flight, {args.max_seconds:g} s; "
            "streams without the chunk delay), requests/s"
        )
        print(f"{'':16}{'direct':>10}{'via':>10}{'ratio':>10}{'via p50':>10}{'via p99':>10}")
        for kind in kinds:
            found = result["throughput"][kind]
            print(
                f"{kind:16}{found['direct_rps']:10.0f}{found['via_rps']:10.0f}"
                f"{found['ratio']:10.2f}{fmt(found['via_p50_ms'], 10)}"
                f"{fmt(found['via_p99_ms'], 10)}"
            )
    print("\ntargets")
    for check in result["targets"]:
        print(
            f"  {check['target']:42} {check['value_ms']:8.2f} ms <= {check['limit_ms']:g} ms  "
            f"{'met' if check['met'] else 'MISSED'}"
        )
    if "stream" in kinds:
        print(
            "  (stream, first chunk -> last, p50: "
            f"{result['stream']['added_spread_p50_ms']:+.2f} ms through tunegate; chunks held "
            "back and sent together would show here)"
        )
    # With tunegate idle, what is not the client, the upstream or PostgreSQL's few idle
    # connections is someone else's work.
    others = max(result[kind]["direct"].get("cpu_cores", {}).get("rest", 0.0) for kind in kinds)
    if others > BUSY_CORES:
        print(
            f"\nWARNING: other processes used up to {others:.2f} cores during the direct runs "
            "(tunegate idle): the machine was busy, the numbers above are worse than on an idle "
            "one"
        )
    cpus = result["cpus"]
    print(
        f"\n{cpus} CPU(s) shared by the load generator, tunegate, the upstream and PostgreSQL "
        f"(and whatever else runs on this machine: {result['load_before']:.2f} cores busy "
        "before the run)",
        flush=True,
    )


def added(via: dict[str, float], direct: dict[str, float], key: str) -> float:
    return round(via[key] - direct[key], 3)


async def bench(
    args: argparse.Namespace,
    upstream_port: int,
    serve_port: int,
    key: str,
    pids: dict[str, int],
    kinds: list[str],
) -> dict[str, Any]:
    direct = Target("direct", Pool(upstream_port), f"127.0.0.1:{upstream_port}")
    via = Target("via", Pool(serve_port), f"127.0.0.1:{serve_port}")
    modes = [Mode(kind, target) for kind in kinds for target in (direct, via)]
    requests: dict[str, bytes] = {}
    for mode in modes:
        stream = mode.kind == "stream"
        requests[mode.name] = chat_request(mode.target.host, key, stream)
        requests[f"max-{mode.name}"] = chat_request(
            mode.target.host, key, stream, 0 if stream else None
        )
    # One of each, checked, before anything is timed: a wrong set-up fails here, clearly.
    for mode in modes:
        answer = await mode.target.pool.exchange(requests[mode.name])
        problem = check_answer(answer, mode.kind == "stream", args.chunks)
        if problem:
            raise BenchError(f"{mode.name}: {problem}")

    cpu = CpuSampler(**pids)
    profiler = start_profiler(args, pids["tunegate"])
    try:
        found = await latency_phase(args, modes, requests, cpu)
    finally:
        stop_profiler(profiler, args)
    result: dict[str, Any] = {}
    for kind in kinds:
        section = {
            "direct": mode_result(found[f"{kind}-direct"]),
            "via": mode_result(found[f"{kind}-via"]),
        }
        d, v = section["direct"]["latency_ms"], section["via"]["latency_ms"]
        if not d or not v:
            raise BenchError(f"{kind}: no successful request ({section})")
        for q in ("p50", "p90", "p99"):
            section[f"added_{q}_ms"] = added(v, d, q)
        if kind == "stream":
            d, v = section["direct"]["first_chunk_ms"], section["via"]["first_chunk_ms"]
            for q in ("p50", "p90", "p99"):
                section[f"added_first_chunk_{q}_ms"] = added(v, d, q)
            # From the first chunk to the end: the upstream's pace when chunks are forwarded as
            # they come; buffering in between would make it longer through tunegate.
            spread = {
                name: section[name]["latency_ms"]["p50"] - section[name]["first_chunk_ms"]["p50"]
                for name in ("direct", "via")
            }
            section["added_spread_p50_ms"] = round(spread["via"] - spread["direct"], 3)
        result[kind] = section

    if args.max_seconds > 0:
        found_max = await throughput_phase(args, modes, requests)
        result["throughput"] = {"concurrency": args.concurrency, "seconds": args.max_seconds}
        for kind in kinds:
            d, v = found_max[f"{kind}-direct"], found_max[f"{kind}-via"]
            result["throughput"][kind] = {
                "direct_rps": d["rps"],
                "via_rps": v["rps"],
                "ratio": round(v["rps"] / d["rps"], 3) if d["rps"] else 0.0,
                "direct_p50_ms": d["latency_ms"].get("p50"),
                "via_p50_ms": v["latency_ms"].get("p50"),
                "via_p99_ms": v["latency_ms"].get("p99"),
                "errors": d["errors"] + v["errors"],
            }
            for name, row in (("direct", d), ("via", v)):
                if row.get("error_examples"):
                    result["throughput"][kind][f"{name}_error_examples"] = row["error_examples"]
    result["connections"] = {"direct": direct.pool.opened, "via": via.pool.opened}
    direct.pool.close()
    via.pool.close()
    return result


def start_profiler(args: argparse.Namespace, pid: int) -> subprocess.Popen[bytes] | None:
    if not args.profile:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    suffix = Path(args.profile).suffix
    form = {".svg": "flamegraph", ".json": "speedscope"}.get(suffix, "raw")
    command = [spy, "record", "--pid", str(pid), "--rate", "200", "-o", args.profile, "-f", form]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached before the load starts
    if proc.poll() is not None:
        raise BenchError(f"py-spy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
    return proc


def stop_profiler(proc: subprocess.Popen[bytes] | None, args: argparse.Namespace) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(f"profile of tunegate written to {args.profile}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    import psutil

    kinds = ["plain", "stream"] if args.mode == "both" else [args.mode]
    upstream_port, serve_port = free_port(), free_port()
    key, _ = generate_key()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEGATE_", "OPENAI_"))}
    upstream_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--upstream",
        "--port", str(upstream_port),
        "--chunks", str(args.chunks),
        "--chunk-delay-ms", str(args.chunk_delay_ms),
    ]  # fmt: skip
    load_before = psutil.cpu_percent(interval=1.0) * (psutil.cpu_count() or 1) / 100
    if load_before > BUSY_CORES:
        print(
            f"WARNING: {load_before:.2f} cores were busy before the benchmark started; this "
            "machine is not idle and every number below is worse than on an idle one",
            file=sys.stderr,
            flush=True,
        )
    with database(workdir, DATABASE) as url:
        env = base_env | {
            "TUNEGATE_DATA_DIR": str(workdir / "data"),
            "TUNEGATE_DATABASE_URL": url,
            "TUNEGATE_LOG__LEVEL": "WARNING",
            "TUNEGATE_BOOTSTRAP_ADMIN_KEY": key,
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            # Not needed here, and it would load torch into the process when installed.
            "TUNEGATE_LOCAL__ENABLED": "off",
        }
        serve_cmd = [*tunegate(), "serve", "--port", str(serve_port)]
        if not args.with_workers:
            serve_cmd.append("--no-workers")
        with (
            process(upstream_cmd, base_env, workdir / "upstream.log") as upstream,
            process(serve_cmd, env, workdir / "serve.log") as serve,
        ):
            upstream_url = f"http://127.0.0.1:{upstream_port}"
            wait_until(
                lambda: httpx.get(f"{upstream_url}/_stats", timeout=5).is_success,
                30,
                "the upstream",
            )
            serve_url = f"http://127.0.0.1:{serve_port}"

            def ready() -> bool:
                if serve.poll() is not None:
                    raise BenchError(f"tunegate serve exited with status {serve.returncode}")
                return httpx.get(f"{serve_url}/readyz", timeout=5).is_success

            wait_until(ready, 90, "tunegate serve")
            print(
                f"upstream pid {upstream.pid} on port {upstream_port}; tunegate serve pid "
                f"{serve.pid} on port {serve_port}"
                f"{' (with its worker roles)' if args.with_workers else ' (--no-workers)'}",
                file=sys.stderr,
                flush=True,
            )
            pids = {"tunegate": serve.pid, "upstream": upstream.pid, "client": os.getpid()}
            result = asyncio.run(bench(args, upstream_port, serve_port, key, pids, kinds))
            counts = httpx.get(f"{upstream_url}/_stats", timeout=5).json()
            for child, name in ((serve, "tunegate serve"), (upstream, "the upstream")):
                if child.poll() is not None:
                    raise BenchError(f"{name} exited with status {child.returncode}")

    result = {
        "rate": args.rate,
        "seconds": args.seconds,
        "slice": args.slice,
        "warmup": args.warmup,
        "chunks": args.chunks,
        "chunk_delay_ms": args.chunk_delay_ms,
        "with_workers": args.with_workers,
        "cpus": psutil.cpu_count(),
        "load_before": round(load_before, 2),
        "upstream_requests": counts,
        **result,
    }
    result["targets"] = targets(result, kinds)
    errors = sum(result[kind][name]["errors"] for kind in kinds for name in ("direct", "via"))
    errors += sum(result.get("throughput", {}).get(kind, {}).get("errors", 0) for kind in kinds)
    result["errors"] = errors
    result["met"] = errors == 0 and all(check["met"] for check in result["targets"])
    print_report(args, result, kinds)
    for kind in kinds:
        for name in ("direct", "via"):
            examples = result[kind][name].get("error_examples")
            if examples:
                print(f"{kind} {name} errors, e.g.: {examples}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["met"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s, open loop")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds per mode")
    parser.add_argument("--slice", type=float, default=0.5, help="seconds before the next mode")
    parser.add_argument("--mode", choices=("both", "plain", "stream"), default="both")
    parser.add_argument("--chunks", type=int, default=8, help="chunks of a streamed answer")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=5.0, help="between the upstream's chunks"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="throughput phase")
    parser.add_argument(
        "--max-seconds", type=float, default=5.0, help="throughput phase per mode; 0: skip"
    )
    parser.add_argument(
        "--with-workers", action="store_true", help="run the worker roles in tunegate serve too"
    )
    parser.add_argument("--profile", help="py-spy record of tunegate to this file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        return upstream_main(args.port, args.chunks, args.chunk_delay_ms)
    if args.rate <= 0 or args.seconds <= 0 or args.slice <= 0 or args.chunks < 2:
        parser.error("--rate, --seconds and --slice must be positive, --chunks at least 2")

    workdir = Path(tempfile.mkdtemp(prefix="tunegate-bench-proxy-"))
    # The embedded server's library takes a lock file under it once more at exit, in an atexit
    # handler registered after this one (so run before it: atexit is last in, first out).
    remove_at_exit: list[Path] = []
    atexit.register(lambda: [shutil.rmtree(path, ignore_errors=True) for path in remove_at_exit])
    failed = True
    try:
        status = run(args, workdir)
        failed = status == 2
        return status
    except (BenchError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
            raise
        print(
            f"benchmark failed: {exc.code if isinstance(exc, SystemExit) else exc}", file=sys.stderr
        )
        return 2
    except Exception:
        traceback.print_exc()
        print("benchmark failed", file=sys.stderr)
        return 2
    finally:
        log = workdir / "serve.log"
        if failed and log.exists() and log.stat().st_size:
            tail = log.read_text(errors="replace")[-3000:]
            print(f"--- tunegate serve log ({log}), last lines ---\n{tail}", file=sys.stderr)
        if args.keep or failed:
            if not args.keep:
                shutil.rmtree(workdir / "pg", ignore_errors=True)  # an embedded server's data
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            remove_at_exit.append(workdir)


if __name__ == "__main__":
    sys.exit(main())
