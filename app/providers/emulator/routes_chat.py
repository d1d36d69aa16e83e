"""`/v1/chat/completions` and `/v1/completions`: deterministic answers, plain or streamed
(SSE), with usage.

A base model echoes the last user message (or the prompt). A fine-tuned model (or one of its
checkpoints) answers a prompt it was trained on with the trained answer, and echoes anything
else, so a test can tell a tuned model from its base. `max_tokens`/`max_completion_tokens`,
`stop`, `n` and `stream_options.include_usage` behave as OpenAI's do.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.providers.emulator.catalog import BASE_MODELS
from app.providers.emulator.errors import (
    invalid_type,
    invalid_value,
    missing_parameter,
    model_not_found,
)
from app.providers.emulator.params import json_object, optional_int, optional_object, required_str
from app.providers.emulator.state import EmulatorState, random_id
from app.providers.emulator.training_data import (
    CHAT_ROLES,
    TOKEN,
    count_tokens,
    last_prompt,
    messages_tokens,
)

_PIECE = re.compile(r"\s*\S+|\s+$")
FINGERPRINT = "fp_emulator"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise missing_parameter("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_type("messages", "a non-empty array", messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise invalid_value(f"messages[{index}].role", "expected a known role.")
    return messages


def _truncate(text: str, limit: int | None) -> tuple[str, bool]:
    if limit is None:
        return text, False
    tokens = list(TOKEN.finditer(text))
    if len(tokens) <= limit:
        return text, False
    return (text[: tokens[limit - 1].end()] if limit else ""), True


def _stop(text: str, stop: Any) -> str:
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cut = len(text)
    for sequence in sequences:
        if isinstance(sequence, str) and sequence and sequence in text:
            cut = min(cut, text.index(sequence))
    return text[:cut]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_router(state: EmulatorState) -> APIRouter:
    router = APIRouter()

    def resolve(model: str, now: float) -> tuple[str, dict[str, str]]:
        if model in BASE_MODELS:
            base = BASE_MODELS[model]
            return base.snapshot or base.id, {}
        job = state.job_for_model(model, now)
        if job is None:
            raise model_not_found(model)
        return model, job.answers

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
        body = await json_object(request)
        now = state.tick()
        model, answers = resolve(required_str(body, "model"), now)
        messages = _messages(body)
        limit = optional_int(body, "max_completion_tokens") or optional_int(body, "max_tokens")
        choices = _choices(body)
        prompt = last_prompt(messages) or ""
        answer = answers.get(prompt, f"Echo: {prompt}")
        content, truncated = _truncate(_stop(answer, body.get("stop")), limit)
        finish_reason = "length" if truncated else "stop"
        usage = _usage(messages_tokens(messages), count_tokens(content) * choices)
        completion_id = random_id("chatcmpl-", 29)
        head = {"id": completion_id, "created": int(now), "model": model}
        extra = {"service_tier": "default", "system_fingerprint": FINGERPRINT}
        if body.get("stream") is True:
            options = optional_object(body, "stream_options") or {}
            include_usage = options.get("include_usage") is True
            chunks = _chunks(head | extra, content, finish_reason, choices, usage, include_usage)
            return StreamingResponse(
                _observed(state, chunks, _chunk_delay(body)), media_type="text/event-stream"
            )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": [],
        }
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason}
                for i in range(choices)
            ],
            "usage": usage,
            **extra,
        }

    @router.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> dict[str, Any] | StreamingResponse:
        body = await json_object(request)
        now = state.tick()
        model, answers = resolve(required_str(body, "model"), now)
        prompts = _prompts(body)
        limit = optional_int(body, "max_tokens")
        choices = _choices(body)
        texts = []
        for prompt in prompts:
            answer = answers.get(prompt, f"Echo: {prompt}")
            texts.append(_truncate(_stop(answer, body.get("stop")), limit))
        completion_tokens = sum(count_tokens(text) for text, _ in texts) * choices
        usage = _usage(sum(count_tokens(p) for p in prompts), completion_tokens)
        del usage["prompt_tokens_details"], usage["completion_tokens_details"]
        head = {
            "id": random_id("cmpl-", 29),
            "object": "text_completion",
            "created": int(now),
            "model": model,
            "system_fingerprint": FINGERPRINT,
        }
        results = [
            (p * choices + c, text, "length" if cut else "stop")
            for p, (text, cut) in enumerate(texts)
            for c in range(choices)
        ]
        if body.get("stream") is True:
            options = optional_object(body, "stream_options") or {}
            include_usage = options.get("include_usage") is True
            pieces = _text_chunks(head, results, usage, include_usage)
            return StreamingResponse(
                _observed(state, pieces, _chunk_delay(body)), media_type="text/event-stream"
            )
        return {
            **head,
            "choices": [
                {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
                for index, text, reason in results
            ],
            "usage": usage,
        }

    return router


def _choices(body: dict[str, Any]) -> int:
    choices = optional_int(body, "n") or 1
    if not 1 <= choices <= 128:
        raise invalid_value("n", "expected a value between 1 and 128.")
    return choices


def _prompts(body: dict[str, Any]) -> list[str]:
    """The prompt as strings: a string or an array of strings (token arrays are not emulated)."""
    if "prompt" not in body:
        raise missing_parameter("prompt")
    prompt = body["prompt"]
    if prompt is None:
        return ["<|endoftext|>"]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise invalid_type("prompt", "a string or a non-empty array of strings", prompt)


async def _text_chunks(
    head: dict[str, Any],
    results: list[tuple[int, str, str]],
    usage: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(text: str, index: int, reason: str | None) -> str:
        body: dict[str, Any] = {
            **head,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}],
        }
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    for index, text, reason in results:
        for piece in _PIECE.findall(text):
            yield chunk(piece, index, None)
        yield chunk("", index, reason)
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def _chunk_delay(body: dict[str, Any]) -> float:
    """Test knob (not OpenAI's): `emulator_chunk_delay` seconds before each streamed chunk."""
    delay = body.get("emulator_chunk_delay")
    if delay is None:
        return 0.0
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 5:
        raise invalid_value("emulator_chunk_delay", "expected seconds between 0 and 5.")
    return float(delay)


async def _observed(
    state: EmulatorState, chunks: AsyncIterator[str], delay: float
) -> AsyncIterator[str]:
    """Counts streams started, finished and cancelled (the client went away), for
    `GET /_emulator/streams`; waits `delay` before each chunk."""
    state.streams["started"] += 1
    try:
        async for chunk in chunks:
            if delay:
                await asyncio.sleep(delay)
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        state.streams["cancelled"] += 1
        raise
    state.streams["finished"] += 1


async def _chunks(
    head: dict[str, Any],
    content: str,
    finish_reason: str,
    choices: int,
    usage: dict[str, Any],
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], index: int, reason: str | None) -> str:
        body: dict[str, Any] = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            ],
        }
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    for index in range(choices):
        yield chunk({"role": "assistant", "content": "", "refusal": None}, index, None)
        for piece in _PIECE.findall(content):
            yield chunk({"content": piece}, index, None)
        yield chunk({}, index, finish_reason)
    if include_usage:
        final = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"
