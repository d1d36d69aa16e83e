"""`POST /v1/chat/completions`, OpenAI-compatible, streamed or not, for every model the caller's
project may use. The request body passes through to the provider unchanged (every OpenAI
parameter); the provider's answer comes back in OpenAI's shape.

Streaming: `text/event-stream`, each chunk forwarded as it arrives (`data: {…}`), ending with
`data: [DONE]`. An error before the first chunk is an ordinary error response; one after it is a
`data: {"error": {…}}` event, then the stream ends. A client that goes away closes the
upstream request at once (the provider's stream is closed when ours is).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.responses import Response, StreamingResponse

from app.auth.dependencies import ReadPrincipal
from app.inference import service
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.providers.base import Provider, ProviderError

router = APIRouter(
    prefix="/v1", tags=["inference"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

DONE = b"data: [DONE]\n\n"


class ChatCompletionCreate(BaseModel):
    """OpenAI's request body; fields not named here pass through to the provider as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=100_000)
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None


@router.post(
    "/chat/completions",
    response_model=dict[str, Any],
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, principal: ReadPrincipal
) -> Response:
    """A chat completion from a base model, a fine-tuned model of this project or one of its
    checkpoints. `stream: true` answers server-sent events."""
    state = request.app.state
    route = await service.resolve(
        state.database.sessionmaker, state.providers or {}, principal.project_id, body.model
    )
    payload = body.model_dump(exclude_none=True)
    timeout = state.settings.inference.timeout.total_seconds()
    if body.stream:
        return await _stream(route.provider, payload, body.model, timeout)
    try:
        answer = await route.provider.chat_completion(payload, wait_seconds=timeout)
    except ProviderError as exc:
        raise service.upstream_error(exc, body.model) from None
    return Response(orjson.dumps(answer), media_type="application/json")


async def _stream(
    provider: Provider, payload: dict[str, Any], model: str, wait_seconds: float
) -> Response:
    chunks = provider.stream_chat_completion(payload, wait_seconds=wait_seconds)
    try:
        first = await anext(chunks)  # errors before any chunk: a plain error response
    except StopAsyncIteration:
        first = None
    except ProviderError as exc:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise service.upstream_error(exc, model) from None
    return StreamingResponse(
        _events(first, chunks, model),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _events(
    first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]], model: str
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield b"data: " + orjson.dumps(first) + b"\n\n"
            async for chunk in chunks:
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield DONE
    except ProviderError as exc:
        failure = service.upstream_error(exc, model)
        yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
    finally:
        # Also when the client went away (the response task is cancelled): the provider's
        # stream, and its upstream connection, close now.
        await chunks.aclose()  # type: ignore[attr-defined]
