"""The completion proxy in-process, with the real `openai` provider and its lean HTTP client
talking to a scripted upstream on loopback: what reaches the provider, what the caller gets
back (streams cut into events however the bytes arrive), errors mid-stream without secrets,
connections reused after a stream's end, and bad bodies that used to be 500s."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from app.inference.sse import event_data, split_events, sse_data
from app.models import Scope
from app.providers.base import ProviderServerError
from app.providers.openai import OpenAIProvider
from tests.test_auth import assert_envelope
from tests.test_upstream import Server, serve, sized  # noqa: F401 - `serve` is a fixture

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini-2024-07-18"
UPSTREAM_KEY = "sk-proj-UPSTREAMSECRETKEY0123456789"


def chunk(text: str, **extra: object) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": MODEL, "created": 1}
    body |= {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(body | extra) + b"\n\n"


USAGE = (
    b"data: "
    + orjson.dumps(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )
    + b"\n\n"
)


def streamed(*pieces: bytes) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + framed
        + b"0\r\n\r\n"
    )


@pytest.fixture
def upstream_answers() -> list[bytes]:
    return []


@pytest.fixture
async def upstream(serve, upstream_answers) -> Server:  # noqa: F811
    async def scripted(writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(upstream_answers.pop(0))
        return True

    return await serve(scripted)


@pytest.fixture
async def app(app_factory, upstream):
    provider = OpenAIProvider(api_key=UPSTREAM_KEY, base_url=f"http://127.0.0.1:{upstream.port}/v1")
    app = app_factory(providers={"openai": provider})
    yield app
    # Usage records are written while this test's transaction is still there (no lifespan
    # runs in-process, so the recorder is closed here).
    await app.state.usage.close()
    await provider.aclose()


@pytest.fixture
async def caller(client_for, factories):
    return client_for((await factories.key(scope=Scope.read)).key)


def ask(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def events(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block]


async def test_a_stream_is_relayed_event_by_event_and_its_connection_reused(
    caller, upstream, upstream_answers
) -> None:
    # Events split across pieces anywhere, CRLF line ends cut in half, a comment.
    raw = chunk("Hel") + b": keep-alive\n\n" + chunk("lo").replace(b"\n", b"\r\n") + USAGE
    pieces = [raw[:7], raw[7:60], raw[60:61], raw[61:-1], raw[-1:], b"data: [DONE]\n\n"]
    upstream_answers += [streamed(*pieces), streamed(chunk("again"), USAGE, b"data: [DONE]\n\n")]
    answer = await caller.post(CHAT, json=ask(stream=True))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith(
        "text/event-stream"
    )
    received = events(answer.text)
    assert received[-1] == "data: [DONE]"
    texts = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in received[:-1]]
    assert texts == ["Hel", "lo"]  # the usage chunk was not asked for
    sent = json.loads(upstream.requests[0].split(b"\r\n\r\n", 1)[1])
    assert sent["stream_options"] == {"include_usage": True}  # asked of the provider anyway
    with_usage = await caller.post(
        CHAT, json=ask(stream=True, stream_options={"include_usage": True})
    )
    assert json.loads(events(with_usage.text)[-2][6:])["usage"]["total_tokens"] == 5
    assert upstream.connections == 1  # the first stream's connection served the second


async def test_an_error_event_mid_stream_ends_the_stream_without_secrets(
    caller, upstream_answers
) -> None:
    error = {"error": {"message": f"upstream broke; key {UPSTREAM_KEY} rejected", "code": "x"}}
    upstream_answers.append(streamed(chunk("partial"), b"data: " + orjson.dumps(error) + b"\n\n"))
    answer = await caller.post(CHAT, json=ask(stream=True))
    assert answer.status_code == 200
    received = events(answer.text)
    assert json.loads(received[0][6:])["choices"][0]["delta"]["content"] == "partial"
    failure = json.loads(received[-1][6:])["error"]
    assert failure["type"] == "server_error" and "upstream broke" in failure["message"]
    assert UPSTREAM_KEY not in answer.text and "data: [DONE]" not in answer.text


async def test_plain_answers_pass_through_and_errors_keep_their_shape(
    caller, upstream, upstream_answers
) -> None:
    completion = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [], "usage": {}})
    refused = orjson.dumps({"error": {"message": f"bad key {UPSTREAM_KEY}", "code": "nope"}})
    upstream_answers += [
        b"HTTP/1.1 100 Continue\r\n\r\n" + sized(completion),
        sized(refused).replace(b"200 OK", b"400 Bad Request"),
        b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json!",
    ]
    answer = await caller.post(CHAT, json=ask(temperature=0.2, surprise={"x": 1}))
    assert answer.status_code == 200 and answer.content == completion
    sent = json.loads(upstream.requests[0].split(b"\r\n\r\n", 1)[1])
    assert sent["surprise"] == {"x": 1} and sent["temperature"] == 0.2  # passed through
    error = assert_envelope(await caller.post(CHAT, json=ask()), 400, "nope")
    assert UPSTREAM_KEY not in error["message"]
    assert_envelope(await caller.post(CHAT, json=ask()), 502, "upstream_error")


async def test_bodies_the_provider_could_read_differently_are_normalised_or_refused(
    caller, upstream, upstream_answers
) -> None:
    upstream_answers.append(sized(orjson.dumps({"object": "chat.completion", "choices": []})))
    duplicated = (
        b'\xef\xbb\xbf{"model": "ft:gpt-4o-mini-2024-07-18:other:x:y", "model": "'
        + MODEL.encode()
        + b'", "messages": [{"role": "user", "content": "hi"}]}'
    )
    answer = await caller.post(
        CHAT, content=duplicated, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 200
    sent = upstream.requests[0].split(b"\r\n\r\n", 1)[1]
    assert sent.count(b'"model"') == 1 and not sent.startswith(b"\xef\xbb\xbf")
    deep = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "x": []}
    nested: list[object] = deep["x"]  # type: ignore[assignment]
    for _ in range(300):
        nested.append([])
        nested = nested[0]  # type: ignore[assignment]
    too_deep = await caller.post(CHAT, json=deep | {"stream": True})
    assert_envelope(too_deep, 400, "invalid_json")


def test_server_sent_events_are_cut_at_blank_lines_of_any_line_end() -> None:
    blocks, rest = split_events(b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r")
    assert blocks == [b"data: a", b"data: b", b"data: c"] and rest == b"data: d\r"
    assert event_data(b"data: {}") == b"{}"
    assert event_data(b"event: x\ndata:{\ndata: }") == b"{\n}"
    assert event_data(b": a comment") is None


async def test_an_event_that_never_ends_is_cut_off_at_the_limit() -> None:
    class Endless:  # data lines, never the blank line that ends an event
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"data: {}\n\n"
            for _ in range(10_000):
                yield b"data: xxxxxxxx\n"

    received = []
    with pytest.raises(ProviderServerError, match="too large"):
        async for data in sse_data(Endless(), max_event_bytes=1_000):  # type: ignore[arg-type]
            received.append(data)
    assert received == [b"{}"]
