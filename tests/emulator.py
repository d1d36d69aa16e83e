"""Run the OpenAI emulator for real on loopback (uvicorn in a thread), for tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from app.providers.emulator import create_emulator_app
from tests.server import free_port, wait_for


@dataclass
class Emulator:
    base_url: str
    http: httpx.Client

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
    config = uvicorn.Config(
        create_emulator_app(speed=speed), host="127.0.0.1", port=port, log_level="warning"
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
        yield Emulator(base_url, http)
    finally:
        http.close()
        server.should_exit = True
        thread.join(timeout=10)
