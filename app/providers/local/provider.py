"""The `local` provider: open models trained and served on this deployment's own hardware.

Training does not go through this class: the `trainer` worker role (trainer.py) runs local jobs
straight from tunegate's own job table, so there is nothing to submit, sync or upload, and those
methods say so. What the rest of tunegate calls here is inference — base models, and fine-tuned
models as base weights plus the job's LoRA adapter (read from blob storage, kept in a small LRU
cache by the engine) — and the list of base models.

Generation runs in a worker thread; a stream hands each piece of text to the event loop as the
model produces it, and closing the stream stops the generation at the next token.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar, Final

import orjson

from app.config import Settings
from app.files.storage import BlobStorage, make_storage
from app.providers.base import (
    BaseModelInfo,
    Provider,
    ProviderBadRequest,
    ProviderCheckpoint,
    ProviderEvent,
    ProviderJob,
    ProviderNotFound,
    ProviderNotSupported,
    ProviderServerError,
)
from app.providers.local import engine
from app.providers.local.models import PROVIDER, source_for, sources
from app.validation.messages import ROLES

__all__ = ["LocalProvider", "adapter_key", "get_bytes", "put_bytes", "state_key"]

# OpenAI's chat parameters (CreateChatCompletionRequest), by what a local model does with them.
# Honoured, or without effect on the answer (identifiers, metadata, cache and tier hints):
_ACCEPTED: Final = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "n",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "metadata",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "service_tier",
    }
)
# Accepted at their default value only (what the answer is anyway):
_DEFAULT_ONLY: Final[dict[str, tuple[Any, ...]]] = {
    "logprobs": (False,),
    "store": (False,),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
# A local model cannot honour these: refused instead of silently ignored (unless empty).
_UNSUPPORTED: Final = frozenset(
    {
        "tools",
        "functions",
        "function_call",
        "tool_choice",
        "parallel_tool_calls",
        "audio",
        "prediction",
        "logit_bias",
        "top_logprobs",
        "reasoning_effort",
        "verbosity",
        "web_search_options",
        "moderation",
    }
)
_MAX_CHOICES = 8
_FINGERPRINT = "fp_tunegate_local"


def adapter_key(job_id: str, step: int | None = None) -> str:
    """Where a job's adapter is stored: its final one, or the checkpoint at `step`."""
    return (
        f"local/{job_id}/final.adapter" if step is None else f"local/{job_id}/step-{step}.adapter"
    )


def state_key(job_id: str, step: int) -> str:
    """The optimizer/scheduler state saved with the checkpoint at `step` (for resuming)."""
    return f"local/{job_id}/step-{step}.state"


async def put_bytes(storage: BlobStorage, key: str, data: bytes) -> None:
    storage.spool_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=storage.spool_dir, delete=False) as handle:
        handle.write(data)
    await storage.put_file(key, Path(handle.name))


async def get_bytes(storage: BlobStorage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


def device_for(setting: str) -> str:
    """`TUNEGATE_LOCAL__DEVICE`: "auto" is CUDA when torch sees a GPU, else the CPU."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_job(model: str) -> tuple[str, int | None] | None:
    """The job id (and checkpoint step) of a local fine-tuned model id:
    `ft:<base>:<project>:<suffix>:<job id>[:ckpt-step-<N>]`."""
    parts = model.split(":")
    if len(parts) < 5 or parts[0] != "ft":
        return None
    if len(parts) == 6 and parts[5].startswith("ckpt-step-"):
        step = parts[5].removeprefix("ckpt-step-")
        return (parts[4], int(step)) if step.isdigit() else None
    return (parts[4], None) if len(parts) == 5 else None


class LocalProvider(Provider):
    name: ClassVar[str] = PROVIDER
    supports_pause: ClassVar[bool] = True

    def __init__(self, settings: Settings, storage: BlobStorage | None = None) -> None:
        self.settings = settings
        self._storage = storage
        self._adapters: OrderedDict[str, bytes] = OrderedDict()
        self._adapters_lock = asyncio.Lock()

    @property
    def storage(self) -> BlobStorage:
        if self._storage is None:
            self._storage = make_storage(self.settings)
        return self._storage

    async def aclose(self) -> None:
        self._adapters.clear()

    # Jobs: run by the trainer role from tunegate's own table, never submitted.

    def _not_submitted(self) -> ProviderNotSupported:
        return ProviderNotSupported(
            "Local jobs are run by tunegate's trainer worker, not submitted to a provider."
        )

    async def upload_file(self, filename: str, path: Path, purpose: str = "fine-tune") -> str:
        raise self._not_submitted()

    async def create_job(self, **_: Any) -> ProviderJob:
        raise self._not_submitted()

    async def find_job_by_metadata(self, key: str, value: str) -> ProviderJob | None:
        raise self._not_submitted()

    async def retrieve_job(self, job_id: str) -> ProviderJob:
        raise self._not_submitted()

    async def cancel_job(self, job_id: str) -> ProviderJob:
        raise self._not_submitted()

    async def list_events(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> list[ProviderEvent]:
        raise self._not_submitted()

    async def list_checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> list[ProviderCheckpoint]:
        raise self._not_submitted()

    async def delete_model(self, model_id: str) -> None:
        found = model_job(model_id)
        if found is not None and found[1] is None:
            async with self._adapters_lock:
                self._adapters.pop(adapter_key(found[0]), None)
            await self.storage.delete(adapter_key(found[0]))

    async def list_base_models(self) -> list[BaseModelInfo]:
        return [
            BaseModelInfo(
                id=source.id,
                context_limit=source.context_limit,
                training_usd_per_1m=None,
                methods=("supervised",),
                shutdown_date=None,
            )
            for source in sources(self.settings)
        ]

    # Inference

    async def chat_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> dict[str, Any]:
        request = await self._request(body)
        answers = []
        prompt_tokens = completion_tokens = 0
        for index in range(request.choices):
            generation = await request.start(index)
            text = await asyncio.to_thread("".join, generation)
            prompt_tokens = generation.prompt_tokens
            completion_tokens += generation.completion_tokens
            answers.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            )
        return {
            "id": request.id,
            "object": "chat.completion",
            "created": request.created,
            "model": request.model,
            "choices": answers,
            "usage": _usage(prompt_tokens, completion_tokens),
            "system_fingerprint": _FINGERPRINT,
        }

    async def stream_chat_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        request = await self._request(body)
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head = {
            "id": request.id,
            "object": "chat.completion.chunk",
            "created": request.created,
            "model": request.model,
            "system_fingerprint": _FINGERPRINT,
        }

        def chunk(index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            body = {
                **head,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
                ],
            }
            return body | ({"usage": None} if include_usage else {})

        prompt_tokens = completion_tokens = 0
        for index in range(request.choices):
            generation = await request.start(index)
            pieces: Iterator[str] = iter(generation)
            yield chunk(index, {"role": "assistant", "content": "", "refusal": None}, None)
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    if piece:
                        yield chunk(index, {"content": piece}, None)
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:  # the client went away: stop generating
                    await asyncio.to_thread(close)
            prompt_tokens = generation.prompt_tokens
            completion_tokens += generation.completion_tokens
            yield chunk(index, {}, generation.finish_reason)
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}

    async def _request(self, body: dict[str, Any]) -> _Request:
        model = body.get("model")
        if not isinstance(model, str):
            raise ProviderBadRequest("model must be a string.", param="model")
        source = source_for(model)
        if source is None:
            raise ProviderNotFound(f"The model `{model}` does not exist.", param="model")
        _check_parameters(body)
        adapter = None
        if model.startswith("ft:"):
            found = model_job(model)
            if found is None:
                raise ProviderNotFound(f"The model `{model}` does not exist.", param="model")
            adapter = await self._adapter(adapter_key(*found), model)
        return _Request(body, model, source, adapter, device_for(self.settings.local.device))

    async def _adapter(self, key: str, model: str) -> bytes:
        async with self._adapters_lock:
            cached = self._adapters.get(key)
            if cached is not None:
                self._adapters.move_to_end(key)
                return cached
        try:
            data = await get_bytes(self.storage, key)
        except FileNotFoundError:
            raise ProviderNotFound(f"The model `{model}` does not exist.", param="model") from None
        except OSError as exc:
            raise ProviderServerError(
                f"The adapter of `{model}` could not be read: {exc}"
            ) from None
        async with self._adapters_lock:
            self._adapters[key] = data
            while len(self._adapters) > self.settings.local.adapter_cache:
                self._adapters.popitem(last=False)
        return data


class _Request:
    """One chat request, checked: the parameters a local model honours."""

    def __init__(
        self,
        body: dict[str, Any],
        model: str,
        source: engine.BaseModelSource,
        adapter: bytes | None,
        device: str = "cpu",
    ) -> None:
        self.device = device
        self.id = "chatcmpl-" + secrets.token_urlsafe(21).replace("-", "a").replace("_", "b")
        self.created = int(time.time())
        self.model = model
        self.source = source
        self.adapter = adapter
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ProviderBadRequest("messages must be a non-empty array.", param="messages")
        self.messages = [_plain_message(m, i) for i, m in enumerate(messages)]
        self.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ProviderBadRequest("max_tokens must be a positive integer.", param="max_tokens")
        self.max_tokens: int | None = limit
        self.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
        self.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
        options = body.get("stream_options")
        if options is not None:
            if body.get("stream") is not True:
                raise ProviderBadRequest(
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    param="stream_options",
                )
            include_usage = options.get("include_usage")
            if include_usage is not None and not isinstance(include_usage, bool):
                raise ProviderBadRequest(
                    "stream_options.include_usage must be a boolean.",
                    param="stream_options.include_usage",
                )
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)
        ):
            raise ProviderBadRequest("stop must be a string or up to 4 strings.", param="stop")
        self.stop = [s for s in stop or [] if s]
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ProviderBadRequest("seed must be an integer.", param="seed")
        self.seed: int | None = seed
        choices = body.get("n", 1)
        if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= 8:
            raise ProviderBadRequest(
                f"n must be between 1 and {_MAX_CHOICES} for local models.", param="n"
            )
        self.choices = choices

    async def start(self, index: int) -> engine.Generation:
        """Choice `index`'s generation (the model loads on first use: in a thread)."""
        seed = None if self.seed is None else self.seed + index
        try:
            return await asyncio.to_thread(
                engine.generate,
                self.source,
                self.adapter,
                self.messages,
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_tokens,
                stop=self.stop or None,
                seed=seed,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                device=self.device,
            )
        except ValueError as exc:  # the prompt does not fit the context
            raise ProviderBadRequest(str(exc), param="messages") from None


def _check_parameters(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in _ACCEPTED:
            continue
        if name in _DEFAULT_ONLY:
            if value is None or value in _DEFAULT_ONLY[name]:
                continue
            shown = orjson.dumps(value).decode()[:100]
            raise ProviderBadRequest(
                f"The local provider does not support `{name}` {shown}; only its default "
                f"({orjson.dumps(_DEFAULT_ONLY[name][0]).decode()}).",
                param=name,
            )
        if name in _UNSUPPORTED:
            if value in (None, [], {}):
                continue
            raise ProviderBadRequest(f"The local provider does not support `{name}`.", param=name)
        # As OpenAI answers an argument it does not know.
        raise ProviderBadRequest(
            f"Unrecognized request argument supplied: {name[:64]}", param=name[:64]
        )


# OpenAI's message roles, listed as OpenAI lists them when it refuses one.
_ROLES_TEXT: Final = ", ".join(f"'{role}'" for role in ROLES[:-1]) + f", and '{ROLES[-1]}'"


def _plain_message(message: Any, index: int) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ProviderBadRequest("Each message needs a role.", param=f"messages[{index}]")
    if message["role"] not in ROLES:
        # As OpenAI answers: a chat template would otherwise wrap any word as a turn.
        shown = message["role"][:64]
        raise ProviderBadRequest(
            f"Invalid value: '{shown}'. Supported values are: {_ROLES_TEXT}.",
            param=f"messages[{index}].role",
        )
    role = message["role"]
    for name in ("tool_calls", "function_call"):
        if message.get(name) not in (None, []):
            raise ProviderBadRequest(
                "The local provider does not support tool calls.",
                param=f"messages[{index}].{name}",
            )
    if role in ("tool", "function"):
        # A tool's answer follows an assistant message with tool calls, which are refused.
        raise ProviderBadRequest(
            f"Invalid parameter: messages with role '{role}' must be a response to a "
            "preceding message with 'tool_calls'.",
            param=f"messages[{index}].role",
        )
    content = message.get("content")
    if content is None:
        raise ProviderBadRequest(
            f"Invalid value for 'messages[{index}].content': expected a string or an array "
            "of text parts, got null.",
            param=f"messages[{index}].content",
        )
    if isinstance(content, list):  # content parts: text only
        if not content:
            raise ProviderBadRequest(
                f"Invalid 'messages[{index}].content': empty array. Expected an array with "
                "minimum length 1.",
                param=f"messages[{index}].content",
            )
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ProviderBadRequest(
                    "Local models accept text content parts only.",
                    param=f"messages[{index}].content",
                )
            if not isinstance(part.get("text"), str):
                raise ProviderBadRequest(
                    f"Missing required parameter: 'messages[{index}].content[{number}].text'.",
                    param=f"messages[{index}].content[{number}].text",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ProviderBadRequest(
            "content must be a string or text parts.", param=f"messages[{index}].content"
        )
    return {"role": "system" if role == "developer" else role, "content": content}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise ProviderBadRequest(f"{name} must be a number from {low} to {high}.", param=name)
    return float(value)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
