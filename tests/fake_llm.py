"""A small OpenAI-compatible chat server on loopback for the eval tests: models whose answers
the tests know, and a judge.

- `gpt-4.1-mini-2025-04-14` (the "good" model) knows sentiment: 1 for a message with 真棒,
  0 for one with 糟透了; its answers to anything else are the prompt echoed;
- every other model echoes the last user message (a model that learned nothing);
- a request whose system message is tunegate's judge instructions is judged: the answer equal
  to the reference wins ("A" or "B"), "tie" when both or neither are;
- under /refuse/v1 every request is refused as OpenAI refuses a wrong key (401).

`hold(after=N)` makes every answer after the next N wait until `release()` (a worker stopped
mid-eval); `requests` counts requests per model.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.server import free_port, wait_for

GOOD_MODEL = "gpt-4.1-mini-2025-04-14"
_JUDGED = re.compile(
    r"Reference answer:\n(?P<reference>.*?)\n\nAnswer A:\n(?P<a>.*?)\n\nAnswer B:\n(?P<b>.*?)"
    r"\n\nWhich answer",
    re.S,
)


@dataclass
class FakeLLM:
    base_url: str = ""
    requests: Counter[str] = field(default_factory=Counter)
    gate: threading.Event = field(default_factory=threading.Event)
    free: int | None = None  # answers still let through before the gate applies

    def __post_init__(self) -> None:
        self.gate.set()

    def hold(self, after: int = 0) -> None:
        self.free = after
        self.gate.clear()

    def release(self) -> None:
        self.free = None
        self.gate.set()

    def passes(self) -> bool:
        if self.gate.is_set():
            return True
        if self.free:
            self.free -= 1
            return True
        return False


def _reply(model: str, messages: list[dict[str, Any]]) -> str:
    system = messages[0].get("content", "") if messages[0].get("role") == "system" else ""
    last = next((m.get("content", "") for m in reversed(messages) if m["role"] == "user"), "")
    if isinstance(system, str) and system.startswith("You are an impartial judge"):
        found = _JUDGED.search(last)
        if found is None:
            return "I cannot tell."
        a_right = found["a"].strip() == found["reference"].strip()
        b_right = found["b"].strip() == found["reference"].strip()
        return "A" if a_right and not b_right else "B" if b_right and not a_right else "tie"
    if model == GOOD_MODEL:
        if "真棒" in last:
            return "1"
        if "糟透了" in last:
            return "0"
    return str(last)


def create_app(fake: FakeLLM) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        model = body["model"]
        fake.requests[model] += 1
        if not fake.passes():
            while not fake.gate.is_set():  # held: the answer waits
                await asyncio.sleep(0.01)
        text = _reply(model, body["messages"])
        return {
            "id": f"chatcmpl-fake{sum(fake.requests.values())}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": sum(len(str(m.get("content", ""))) for m in body["messages"]),
                "completion_tokens": len(text),
                "total_tokens": 0,
            },
        }

    @app.post("/refuse/v1/chat/completions")
    async def refuse(request: Request) -> JSONResponse:
        fake.requests["refused"] += 1
        error = {"message": "Incorrect API key provided.", "type": "invalid_request_error"}
        return JSONResponse({"error": error | {"param": None, "code": "invalid_api_key"}}, 401)

    return app


@contextmanager
def running_fake_llm() -> Iterator[FakeLLM]:
    fake = FakeLLM()
    port = free_port()
    config = uvicorn.Config(create_app(fake), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-llm", daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, 15, "the fake LLM to start")
    try:
        yield fake
    finally:
        fake.release()
        server.should_exit = True
        thread.join(timeout=10)
