"""A real webhook receiver on loopback for tests: records every request (headers, body, when it
started and ended) and answers per path as told: a status, a delay, a Retry-After, or nothing at
all while it is down (the port refuses connections)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    started: float
    finished: float = 0.0

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Answer:
    status: int = 200
    delay: float = 0.0
    body: bytes = b"ok"
    retry_after: str | None = None


@dataclass
class Receiver:
    port: int = 0
    received: list[Received] = field(default_factory=list)
    # Per path: answers used once each, in order, then `default[path]` (or 200).
    script: dict[str, deque[Answer]] = field(default_factory=dict)
    default: dict[str, Answer] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None
    connections: set[socket.socket] = field(default_factory=set)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, *answers: Answer, then: Answer | None = None) -> None:
        with self.lock:
            self.script[path] = deque(answers)
            if then is not None:
                self.default[path] = then

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path and r.finished]

    def received_at(self, path: str) -> list[Received]:
        """Every request to `path`, answered or not (one cut off by a crash too)."""
        with self.lock:
            return [r for r in self.received if r.path == path]

    def _next_answer(self, path: str) -> Answer:
        with self.lock:
            queued = self.script.get(path)
            if queued:
                return queued.popleft()
            return self.default.get(path, Answer())

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver.connections.add(self.connection)

            def finish(self) -> None:
                with receiver.lock:
                    receiver.connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                record = Received(
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length),
                    started=time.monotonic(),
                )
                with receiver.lock:
                    receiver.received.append(record)
                answer = receiver._next_answer(self.path)
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                self.send_header("content-length", str(len(answer.body)))
                if answer.retry_after is not None:
                    self.send_header("retry-after", answer.retry_after)
                self.end_headers()
                self.wfile.write(answer.body)
                record.finished = time.monotonic()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop listening: connections to the port are refused until `up()`."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with self.lock:
            open_connections = list(self.connections)
        for connection in open_connections:  # kept-alive connections end too
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.up()
    try:
        yield receiver
    finally:
        receiver.down()
