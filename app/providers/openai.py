"""The `openai` provider: OpenAI's fine-tuning, files, models and chat APIs via the official SDK.

One `AsyncOpenAI` per provider (so per process), built from the `OPENAI_*` settings, with the
SDK's own retries off by default: every SDK exception is translated into the `ProviderError`
hierarchy (`translate_error`) and the caller decides, from `retryable`, whether to try again.
Messages keep OpenAI's wording, `code` and `param`; the API key never appears in them.

Choices worth knowing:
- `list_events` / `list_checkpoints`: OpenAI lists newest first and its `after` cursor pages
  towards *older* items, so "what happened since event X" cannot be asked directly. We page
  from the newest until we meet the cursor (or run out of pages), keep the oldest `limit` items
  of what we passed (a bounded deque) and return them oldest first. An unknown cursor therefore
  reads from the very first event, which is what a caller whose cursor was lost needs.
- `create_job` sends `Idempotency-Key` as a header: this SDK client sets no idempotency header,
  so its `idempotency_key` request option would be dropped before reaching the wire. The real
  protection against duplicate jobs is the metadata tag looked up by `find_job_by_metadata`.
- Completions asked through tunegate's inference proxy do not use the SDK at all: `forward`
  sends the caller's request bytes as they are over `app.kit.upstream`'s lean keep-alive
  client (httpx2 when a proxy is configured) and the proxy passes OpenAI's bytes back, so
  every parameter reaches OpenAI unchanged at a fraction of the SDK's CPU per request. The
  dict methods (`chat_completion` ...) go through `client.post(..., cast_to=object)`.
- Files up to 512 MB are one multipart request streamed from the open file; larger ones use
  the Uploads API in 64 MB parts (OpenAI's limits).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Protocol, cast

import openai
import orjson
from openai import AsyncOpenAI, AsyncStream, omit

from app import __version__
from app.kit.upstream import (
    Forwarder,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    forwarder_for,
)
from app.providers.base import (
    BaseModelInfo,
    Provider,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderCheckpoint,
    ProviderConnectionError,
    ProviderError,
    ProviderEvent,
    ProviderJob,
    ProviderNotFound,
    ProviderPermissionDenied,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    retry_after_seconds,
)
from app.validation.catalog import known_models

__all__ = ["OPENAI_BASE_MODELS", "OpenAIProvider", "status_error", "translate_error"]

# Largest file in one POST /v1/files; above it OpenAI wants the Uploads API (up to 8 GB).
DIRECT_UPLOAD_MAX_BYTES = 512 * 1024 * 1024
# Part size for the Uploads API (OpenAI's maximum part).
UPLOAD_PART_BYTES = 64 * 1024 * 1024
# Items per list request (OpenAI's maximum for job, event and checkpoint lists).
PAGE_SIZE = 100
# First page when reading what is new since a known item: usually all there is.
FIRST_PAGE_SIZE = 10
# `find_job_by_metadata` gives up after this many pages: the tagged job is among the newest.
METADATA_SEARCH_PAGES = 3

# What OpenAI can fine-tune (context per training example, USD per 1M training tokens, methods):
# the validation catalog's OpenAI entries, so prices and limits are written down once.
OPENAI_BASE_MODELS: tuple[BaseModelInfo, ...] = tuple(
    BaseModelInfo(
        id=spec.id,
        context_limit=spec.context_limit,
        training_usd_per_1m=spec.training_usd_per_1m,
        methods=spec.methods,
        shutdown_date=None,
    )
    for spec in known_models()
    if spec.provider == "openai"
)

# Anything that looks like an OpenAI secret key, in case an upstream message quotes one.
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{16,}")


class _Identified(Protocol):
    id: str


class _Page(Protocol):
    """The part of the SDK's `AsyncCursorPage` we use."""

    @property
    def data(self) -> list[Any]: ...

    def has_next_page(self) -> bool: ...

    async def get_next_page(self) -> Any: ...


def translate_error(exc: openai.OpenAIError, *, secrets: Iterable[str] = ()) -> ProviderError:
    """The `ProviderError` for an `openai` SDK exception, with OpenAI's message, code, param."""
    hidden = [secret for secret in secrets if secret]
    if isinstance(exc, openai.APITimeoutError):
        return ProviderTimeout("The request to OpenAI timed out.")
    if isinstance(exc, openai.APIConnectionError):
        return ProviderConnectionError(f"Could not reach OpenAI: {exc.message}")
    if isinstance(exc, openai.APIStatusError):
        return status_error(
            exc.status_code, exc.body, exc.response.headers, hidden, code=exc.code, param=exc.param
        )
    if isinstance(exc, openai.APIError):
        # No HTTP status: an error event in the middle of a stream, or an answer that did not
        # parse. Both are the provider's trouble.
        message = _redact(_upstream_message(exc.body, exc.message), hidden)
        return ProviderServerError(message, code=exc.code, param=exc.param)
    return ProviderError(_redact(str(exc) or type(exc).__name__, hidden))


_STATUS_ERRORS: dict[int, type[ProviderError]] = {
    400: ProviderBadRequest,
    401: ProviderAuthError,
    403: ProviderPermissionDenied,
    404: ProviderNotFound,
    408: ProviderServerError,
    409: ProviderServerError,
    422: ProviderBadRequest,
    429: ProviderRateLimited,
}


def status_error(
    status: int,
    body: object,
    headers: Mapping[str, str],
    secrets: list[str],
    *,
    code: str | None = None,
    param: str | None = None,
) -> ProviderError:
    """The `ProviderError` for an HTTP answer of `status` whose JSON body (OpenAI's error
    envelope, or its inner object) is `body`; `code`/`param` default to the body's own."""
    inner = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(inner, dict):
        code = code if code is not None else _optional_str(inner.get("code"))
        param = param if param is not None else _optional_str(inner.get("param"))
    message = _redact(_upstream_message(body, f"OpenAI answered HTTP {status}."), secrets)
    return _STATUS_ERRORS.get(status, _status_fallback(status))(
        message,
        status=status,
        code=code,
        param=param,
        retry_after=retry_after_seconds(headers),
    )


def _status_fallback(status: int) -> type[ProviderError]:
    return ProviderServerError if status >= 500 else ProviderBadRequest


def _upstream_message(body: object, fallback: str) -> str:
    """OpenAI's `error.message` (the SDK hands us the inner `error` object as the body)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message")
            if isinstance(message, str) and message.strip():
                return message
    return fallback


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return _KEY_PATTERN.sub("sk-[redacted]", text)


class _Translated:
    """`with self._translated():` turns any `openai` exception into a `ProviderError`."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, openai.OpenAIError):
            raise translate_error(exc, secrets=[self._secret]) from exc
        if isinstance(exc, ValueError):  # a 200 whose body (or a stream's line) is not JSON
            raise ProviderServerError(
                f"The provider's answer did not parse ({type(exc).__name__})."
            ) from exc


class OpenAIProvider(Provider):
    """OpenAI through one shared `AsyncOpenAI`."""

    name: ClassVar[str] = "openai"
    supports_pause: ClassVar[bool] = True

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 0,
    ) -> None:
        self._api_key = api_key
        self._client = AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            organization=organization,
            project=project,
            timeout=timeout,
            max_retries=max_retries,
        )
        headers = {"authorization": f"Bearer {api_key}", "user-agent": f"tunegate/{__version__}"}
        if organization:
            headers["openai-organization"] = organization
        if project:
            headers["openai-project"] = project
        self._forwarder: Forwarder = forwarder_for(str(self._client.base_url), headers)

    def _translated(self) -> _Translated:
        return _Translated(self._api_key)

    async def aclose(self) -> None:
        await self._client.close()
        await self._forwarder.aclose()

    # Completions through the inference proxy

    forwards_raw: ClassVar[bool] = True

    async def forward(
        self, path: str, body: bytes, *, wait_seconds: float | None = None
    ) -> UpstreamResponse:
        try:
            return await self._forwarder.send(path, body, wait_seconds=wait_seconds)
        except UpstreamTimeout:
            raise ProviderTimeout("The request to OpenAI timed out.") from None
        except UpstreamConnectError as exc:
            raise ProviderConnectionError(
                f"Could not reach OpenAI: {_redact(str(exc), [self._api_key])}"
            ) from None
        except UpstreamError as exc:
            raise ProviderConnectionError(
                f"The connection to OpenAI broke: {_redact(str(exc), [self._api_key])}"
            ) from None

    def answer_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> ProviderError:
        try:
            parsed: object = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        return status_error(status, parsed, headers, [self._api_key])

    def stream_error(self, error: Any) -> ProviderError:
        details = error if isinstance(error, dict) else {}
        message = _upstream_message(details, "OpenAI's stream failed.")
        return ProviderServerError(
            _redact(message, [self._api_key]),
            code=_optional_str(details.get("code")),
            param=_optional_str(details.get("param")),
        )

    # Files

    async def upload_file(self, filename: str, path: Path, purpose: str = "fine-tune") -> str:
        size = (await asyncio.to_thread(path.stat)).st_size
        with self._translated():
            if size > DIRECT_UPLOAD_MAX_BYTES:
                return await self._upload_in_parts(filename, path, purpose, size)
            # A retry inside the SDK would resend an already consumed file object: none here.
            client = self._client
            if client.max_retries:
                client = client.with_options(max_retries=0)
            handle = await asyncio.to_thread(path.open, "rb")
            try:
                created = await client.files.create(
                    file=(filename, handle), purpose=cast(Any, purpose)
                )
            finally:
                await asyncio.to_thread(handle.close)
            return str(created.id)

    async def _upload_in_parts(self, filename: str, path: Path, purpose: str, size: int) -> str:
        """The Uploads API: one part of at most 64 MB in memory at a time."""
        uploads = self._client.uploads
        upload = await uploads.create(
            bytes=size,
            filename=filename,
            mime_type="text/jsonl" if filename.endswith(".jsonl") else "text/plain",
            purpose=cast(Any, purpose),
        )
        part_ids: list[str] = []
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            while data := await asyncio.to_thread(handle.read, UPLOAD_PART_BYTES):
                part = await uploads.parts.create(upload_id=upload.id, data=data)
                part_ids.append(part.id)
        finally:
            await asyncio.to_thread(handle.close)
        completed = await uploads.complete(upload.id, part_ids=part_ids)
        if completed.file is None:
            raise ProviderServerError(
                f"OpenAI completed upload {completed.id} without a file ({completed.status})."
            )
        return str(completed.file.id)

    async def download_file(self, file_id: str, limit: int) -> tuple[str, bytes]:
        with self._translated():
            info = await self._client.files.retrieve(file_id)
            if info.bytes is not None and info.bytes > limit:
                raise ProviderBadRequest(
                    f"File {file_id} is {info.bytes} bytes, over the {limit}-byte limit."
                )
            content = await self._client.files.content(file_id)
        data = content.content
        if len(data) > limit:
            raise ProviderBadRequest(f"File {file_id} is over the {limit}-byte limit.")
        return str(info.filename or f"{file_id}.csv"), data

    # Jobs

    async def create_job(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        method: dict[str, Any] | None,
        hyperparameters: dict[str, Any] | None,
        suffix: str | None,
        seed: int | None,
        metadata: dict[str, str],
        idempotency_key: str | None = None,
    ) -> ProviderJob:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        with self._translated():
            job = await self._client.fine_tuning.jobs.create(
                model=model,
                training_file=training_file,
                validation_file=validation_file if validation_file is not None else omit,
                method=cast(Any, method) if method is not None else omit,
                hyperparameters=cast(Any, hyperparameters) if hyperparameters is not None else omit,
                suffix=suffix if suffix is not None else omit,
                seed=seed if seed is not None else omit,
                metadata=metadata,
                extra_headers=headers,
            )
        return _job(job.to_dict(mode="json"))

    async def find_job_by_metadata(self, key: str, value: str) -> ProviderJob | None:
        with self._translated():
            page: _Page = await self._client.fine_tuning.jobs.list(
                metadata={key: value}, limit=PAGE_SIZE
            )
            for _ in range(METADATA_SEARCH_PAGES):
                # Checked here too: an upstream that ignores the filter must not match anything.
                for job in page.data:
                    raw = job.to_dict(mode="json")
                    tags = raw.get("metadata")
                    if isinstance(tags, dict) and tags.get(key) == value:
                        return _job(raw)
                if not page.has_next_page():
                    break
                page = await page.get_next_page()
        return None

    async def retrieve_job(self, job_id: str) -> ProviderJob:
        return await self._job_call(self._client.fine_tuning.jobs.retrieve, job_id)

    async def cancel_job(self, job_id: str) -> ProviderJob:
        return await self._job_call(self._client.fine_tuning.jobs.cancel, job_id)

    async def pause_job(self, job_id: str) -> ProviderJob:
        return await self._job_call(self._client.fine_tuning.jobs.pause, job_id)

    async def resume_job(self, job_id: str) -> ProviderJob:
        return await self._job_call(self._client.fine_tuning.jobs.resume, job_id)

    async def _job_call(self, call: Callable[[str], Awaitable[Any]], job_id: str) -> ProviderJob:
        with self._translated():
            job = await call(job_id)
        return _job(job.to_dict(mode="json"))

    async def list_events(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> list[ProviderEvent]:
        jobs = self._client.fine_tuning.jobs
        items = await self._newer_than(
            lambda size, older_than: jobs.list_events(
                job_id, limit=size, after=older_than or openai.omit
            ),
            after,
            limit,
        )
        return [_event(item.to_dict(mode="json")) for item in items]

    async def list_checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> list[ProviderCheckpoint]:
        checkpoints = self._client.fine_tuning.jobs.checkpoints
        items = await self._newer_than(
            lambda size, older_than: checkpoints.list(
                job_id, limit=size, after=older_than or openai.omit
            ),
            after,
            limit,
        )
        return [_checkpoint(item.to_dict(mode="json")) for item in items]

    async def _newer_than(
        self,
        page_of: Callable[[int, str | None], Awaitable[Any]],
        after: str | None,
        limit: int,
    ) -> list[Any]:
        """The oldest `limit` items newer than `after` from a newest-first listing, oldest
        first (see the module docstring). A sync usually finds few new items, so the first page
        is small (`FIRST_PAGE_SIZE`) and only a longer walk uses full pages."""
        if limit < 1:
            return []
        kept: deque[Any] = deque(maxlen=limit)
        size = FIRST_PAGE_SIZE if after is not None else PAGE_SIZE
        older_than: str | None = None
        with self._translated():
            while True:
                page: _Page = await page_of(size, older_than)
                for item in page.data:
                    if cast(_Identified, item).id == after:
                        return list(reversed(kept))
                    kept.append(item)
                if not page.data or not page.has_next_page():
                    return list(reversed(kept))
                older_than = cast(_Identified, page.data[-1]).id
                size = PAGE_SIZE

    # Models

    async def delete_model(self, model_id: str) -> None:
        with self._translated():
            await self._client.models.delete(model_id)

    async def list_base_models(self) -> list[BaseModelInfo]:
        shutdown: dict[str, str] = {}
        try:
            with self._translated():
                async for model in self._client.models.list():
                    date = _shutdown_date(model.to_dict(mode="json").get("shutdown_date"))
                    if date is not None:
                        shutdown[model.id] = date
        except ProviderError:
            pass  # the static table stands on its own; retirement dates are a bonus
        return [replace(info, shutdown_date=shutdown.get(info.id)) for info in OPENAI_BASE_MODELS]

    # Chat

    async def chat_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> dict[str, Any]:
        return await self._answer("/chat/completions", body, wait_seconds)

    def stream_chat_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/chat/completions", body, wait_seconds)

    async def completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> dict[str, Any]:
        return await self._answer("/completions", body, wait_seconds)

    def stream_completion(
        self, body: dict[str, Any], *, wait_seconds: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        return self._stream("/completions", body, wait_seconds)

    async def _answer(
        self, path: str, body: dict[str, Any], wait_seconds: float | None
    ) -> dict[str, Any]:
        # Which method was called decides streaming, not the body's `stream` flag.
        request = {key: value for key, value in body.items() if key != "stream"}
        with self._translated():
            answer = await self._client.post(
                path, body=request, cast_to=object, options=_chat_options(wait_seconds)
            )
        if not isinstance(answer, dict):
            raise ProviderServerError(f"OpenAI answered {path} with no JSON object.")
        return cast(dict[str, Any], answer)

    async def _stream(
        self, path: str, body: dict[str, Any], wait_seconds: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        with self._translated():
            stream = await self._client.post(
                path,
                body={**body, "stream": True},
                cast_to=object,
                options=_chat_options(wait_seconds),
                stream=True,
                stream_cls=AsyncStream[object],
            )
        try:
            with self._translated():
                async for chunk in stream:
                    if isinstance(chunk, dict):
                        yield cast(dict[str, Any], chunk)
        finally:
            # Also reached when our caller closes this iterator early: the upstream response
            # (and its connection) is released instead of being read to the end.
            await stream.close()


def _chat_options(timeout: float | None) -> Any:
    options: dict[str, Any] = {"security": {"bearer_auth": True}}
    if timeout is not None:
        options["timeout"] = timeout
    return options


def _job(raw: dict[str, Any]) -> ProviderJob:
    error = raw.get("error")
    # OpenAI sometimes sends `"error": {}` or all-null fields for a job that did not fail.
    if not isinstance(error, dict) or not any(v is not None for v in error.values()):
        error = None
    method = raw.get("method")
    metadata = raw.get("metadata")
    hyperparameters = raw.get("hyperparameters")
    return ProviderJob(
        id=str(raw["id"]),
        status=str(raw.get("status", "")),
        model=str(raw.get("model", "")),
        fine_tuned_model=_optional_str(raw.get("fine_tuned_model")),
        trained_tokens=_optional_int(raw.get("trained_tokens")),
        error=error,
        result_files=[str(file_id) for file_id in raw.get("result_files") or []],
        created_at=_optional_int(raw.get("created_at")) or 0,
        finished_at=_optional_int(raw.get("finished_at")),
        estimated_finish=_optional_int(raw.get("estimated_finish")),
        hyperparameters=hyperparameters if isinstance(hyperparameters, dict) else {},
        method=method if isinstance(method, dict) else None,
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, dict)
        else None,
        raw=raw,
    )


def _event(raw: dict[str, Any]) -> ProviderEvent:
    data = raw.get("data")
    return ProviderEvent(
        id=str(raw["id"]),
        created_at=_optional_int(raw.get("created_at")) or 0,
        level=str(raw.get("level", "info")),
        message=str(raw.get("message", "")),
        type=_optional_str(raw.get("type")),
        data=data if isinstance(data, dict) else None,
    )


def _checkpoint(raw: dict[str, Any]) -> ProviderCheckpoint:
    metrics = raw.get("metrics")
    return ProviderCheckpoint(
        id=str(raw["id"]),
        created_at=_optional_int(raw.get("created_at")) or 0,
        fine_tuned_model_checkpoint=str(raw.get("fine_tuned_model_checkpoint", "")),
        step_number=_optional_int(raw.get("step_number")) or 0,
        metrics=metrics if isinstance(metrics, dict) else {},
    )


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _optional_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _shutdown_date(value: object) -> str | None:
    """An ISO date from what `/v1/models` may carry: a date string or a Unix timestamp."""
    if isinstance(value, str) and value:
        return value
    timestamp = _optional_int(value)
    if timestamp is not None:
        return datetime.fromtimestamp(timestamp, UTC).date().isoformat()
    return None
