"""Run the OpenAI emulator for real on loopback (uvicorn in a thread), for tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.providers.emulator import create_emulator_app
from tests.server import free_port, wait_for


class AnswerHold:
    """Keeps back the answer to one chosen request after the emulator has fully handled it.

    `arm("POST", "/v1/fine_tuning/jobs")` holds the next such request: its handler runs (the job
    exists upstream), then the answer waits until `release()` - the moment a client has been
    heard but has not heard back. Unarmed, or for any other request, it changes nothing.
    """

    def __init__(self, longest_seconds: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._target: tuple[str, str] | None = None
        self._released = threading.Event()
        self._longest_seconds = longest_seconds
        self.holding = threading.Event()

    def arm(self, method: str, path: str) -> None:
        with self._lock:
            self._target = (method, path)
            self._released.clear()
            self.holding.clear()

    def release(self) -> None:
        with self._lock:
            self._target = None
        self._released.set()

    def _take(self, scope: Scope) -> bool:
        """True for the one request to hold (the first match after `arm`)."""
        with self._lock:
            if scope["type"] != "http" or self._target != (scope["method"], scope["path"]):
                return False
            self._target = None
            return True

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def held(scope: Scope, receive: Receive, send: Send) -> None:
            if not self._take(scope):
                await app(scope, receive, send)
                return

            async def send_when_released(message: Message) -> None:
                if message["type"] == "http.response.start":
                    self.holding.set()
                    deadline = time.monotonic() + self._longest_seconds
                    while not self._released.is_set() and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                await send(message)

            await app(scope, receive, send_when_released)

        return held


@dataclass
class Emulator:
    base_url: str
    http: httpx.Client
    hold: AnswerHold = field(default_factory=AnswerHold)

    def faults(self, **faults: Any) -> dict[str, Any]:
        """Switch faults on (`rate_limit=1`, `slow_seconds=1.0`, ...)."""
        response = self.http.post("/_emulator/faults", json=faults)
        response.raise_for_status()
        return dict(response.json())

    def requests(self) -> dict[tuple[str, str], dict[str, int]]:
        """Requests seen per (method, path template), by outcome."""
        data = self.http.get("/_emulator/requests").json()["data"]
        return {(row["method"], row["path"]): row["outcomes"] for row in data}


@contextmanager
def running_emulator(speed: float, key: str) -> Iterator[Emulator]:
    port = free_port()
    hold = AnswerHold()
    config = uvicorn.Config(
        hold.wrap(create_emulator_app(speed=speed)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="openai-emulator", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"})

    def answers() -> bool:
        assert thread.is_alive(), "the emulator thread died"
        try:
            return http.get("/_emulator/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, timeout=15, what="the emulator to answer")
        yield Emulator(base_url, http, hold)
    finally:
        hold.release()
        http.close()
        server.should_exit = True
        thread.join(timeout=10)
