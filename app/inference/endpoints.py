"""`POST /v1/chat/completions` and `POST /v1/completions` (legacy prompt/completion models),
OpenAI-compatible, streamed or not, for every model the caller's project may use. The request
body passes through to the provider unchanged (every OpenAI parameter); the provider's answer
comes back in OpenAI's shape.

Streaming: `text/event-stream`, each chunk forwarded as it arrives (`data: {…}`), ending with
`data: [DONE]`. An error before the first chunk is an ordinary error response; one after it is a
`data: {"error": {…}}` event, then the stream ends. A client that goes away closes the
upstream request at once (the provider's stream is closed when ours is).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.responses import Response, StreamingResponse

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.auth.service import Principal
from app.db.session import SessionDep
from app.inference import service
from app.inference.repository import AliasRepository, UsageRepository
from app.inference.usage import UsageRecorder
from app.kit.errors import BadGateway, Conflict, InvalidPayload, NotFound
from app.kit.http import ERROR_RESPONSES, JSONRoute, request_id_of
from app.kit.logging import get_logger
from app.kit.pagination import ListPage, PageParams, page_params, to_page
from app.kit.time import to_unix, utcnow
from app.models import ModelAlias
from app.providers.base import Provider, ProviderError

router = APIRouter(
    prefix="/v1", tags=["inference"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

log = get_logger("tunegate.inference")

DONE = b"data: [DONE]\n\n"
MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z
CLIENT_CLOSED = 499  # the client went away mid-stream (nginx's convention)


class ChatCompletionCreate(BaseModel):
    """OpenAI's request body; fields not named here pass through to the provider as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=100_000)
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class CompletionCreate(BaseModel):
    """OpenAI's legacy completion body; fields not named here pass through as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] | None = Field(
        description="A string, an array of strings, an array of tokens or of token arrays."
    )
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class _Kind:
    """What differs between the two completion endpoints."""

    what: str  # for error messages
    answer: Callable[[Provider], Callable[..., Awaitable[dict[str, Any]]]]
    stream: Callable[[Provider], Callable[..., AsyncIterator[dict[str, Any]]]]


_CHAT = _Kind("chat completion", lambda p: p.chat_completion, lambda p: p.stream_chat_completion)
_TEXT = _Kind("completion", lambda p: p.completion, lambda p: p.stream_completion)


class UsageTotals(BaseModel):
    key: str = Field(description="The model, or the day (YYYY-MM-DD, UTC).")
    requests: int
    errors: int = Field(description="Requests that ended with an error status.")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    object: Literal["usage.report"] = "usage.report"
    start: int
    end: int
    group_by: str
    data: list[UsageTotals]
    totals: UsageTotals


@router.post(
    "/chat/completions",
    response_model=dict[str, Any],
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, principal: ReadPrincipal
) -> Response:
    """A chat completion from a base model, a fine-tuned model of this project, one of its
    checkpoints, or an alias of one. `stream: true` answers server-sent events."""
    return await _complete(_CHAT, body, request, principal)


@router.post(
    "/completions",
    response_model=dict[str, Any],
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def create_completion(
    body: CompletionCreate, request: Request, principal: ReadPrincipal
) -> Response:
    """A legacy completion (`prompt` in, `text` out) from a prompt/completion-style model
    (`babbage-002`, `davinci-002`, `gpt-3.5-turbo-instruct`, fine-tunes of them), or an alias
    of one. `stream: true` answers server-sent events."""
    return await _complete(_TEXT, body, request, principal)


async def _complete(
    kind: _Kind,
    body: ChatCompletionCreate | CompletionCreate,
    request: Request,
    principal: Principal,
) -> Response:
    state = request.app.state
    state.inference_limiter.check(principal.key_id)
    route = await service.resolve(
        state.database.sessionmaker, state.providers or {}, principal.project_id, body.model
    )
    # An alias is asked of the provider (and recorded) as the model it names.
    usage = _Usage(state.usage, principal, request_id_of(request), route.model, route.provider.name)
    payload = body.model_dump(exclude_none=True) | {"model": route.model}
    if isinstance(body, CompletionCreate) and body.prompt is None:
        payload["prompt"] = None  # OpenAI's default document start; null passes through
    timeout = state.settings.inference.timeout.total_seconds()
    if body.stream:
        chunks = kind.stream(route.provider)
        return await _stream(chunks, kind, payload, body.model, timeout, usage)
    try:
        answer = await kind.answer(route.provider)(payload, wait_seconds=timeout)
    except ProviderError as exc:
        failure = service.upstream_error(exc, body.model, kind.what)
        usage.done(failure.status_code, stream=False)
        raise failure from None
    usage.done(200, stream=False, reported=answer.get("usage"))
    return Response(orjson.dumps(answer), media_type="application/json")


class _Usage:
    """The usage record of one request, handed to the recorder when the request ends."""

    def __init__(
        self,
        recorder: UsageRecorder,
        principal: Principal,
        request_id: str,
        model: str,
        provider: str,
    ) -> None:
        self.recorder = recorder
        self.fields = {
            "project_id": principal.project_id,
            "api_key_id": principal.key_id,
            "request_id": request_id or None,
            "model": model,
            "provider": provider,
        }
        self.started = time.perf_counter()
        self.created_at = utcnow()

    def done(self, status: int, *, stream: bool, reported: Any = None) -> None:
        tokens = reported if isinstance(reported, dict) else {}
        self.recorder.record(
            **self.fields,
            stream=stream,
            status=status,
            prompt_tokens=_count(tokens.get("prompt_tokens")),
            completion_tokens=_count(tokens.get("completion_tokens")),
            latency_ms=int((time.perf_counter() - self.started) * 1000),
            created_at=self.created_at,
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


async def _stream(
    open_stream: Callable[..., AsyncIterator[dict[str, Any]]],
    kind: _Kind,
    payload: dict[str, Any],
    model: str,
    wait_seconds: float,
    usage: _Usage,
) -> Response:
    # Usage is always asked of the provider (it is recorded); the caller gets the final usage
    # chunk only when it asked for it.
    options = payload.get("stream_options") or {}
    wants_usage = options.get("include_usage") is True
    payload = {**payload, "stream_options": {**options, "include_usage": True}}
    chunks = open_stream(payload, wait_seconds=wait_seconds)
    try:
        first = await anext(chunks)  # errors before any chunk: a plain error response
    except StopAsyncIteration:
        await chunks.aclose()  # type: ignore[attr-defined]
        empty = BadGateway(f"The provider's stream for `{model}` ended before any chunk.")
        usage.done(empty.status_code, stream=True)
        raise empty from None
    except ProviderError as exc:
        await chunks.aclose()  # type: ignore[attr-defined]
        failure = service.upstream_error(exc, model, kind.what)
        usage.done(failure.status_code, stream=True)
        raise failure from None
    return StreamingResponse(
        _events(first, chunks, kind, model, usage, wants_usage),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _events(
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
    kind: _Kind,
    model: str,
    usage: _Usage,
    wants_usage: bool,
) -> AsyncIterator[bytes]:
    status = CLIENT_CLOSED
    reported: Any = None
    try:
        async for chunk in _prepend(first, chunks):
            if chunk.get("usage"):
                reported = chunk["usage"]
                if not wants_usage and not chunk.get("choices"):
                    continue  # the usage-only chunk the caller did not ask for
            if not wants_usage:
                chunk.pop("usage", None)
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield DONE
        status = 200
    except ProviderError as exc:
        failure = service.upstream_error(exc, model, kind.what)
        status = failure.status_code
        yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
    except Exception:  # a bug here must still end the stream with an error event
        log.exception("completion stream failed", model=model, kind=kind.what)
        failure = BadGateway("The stream failed inside tunegate; see its logs.")
        status = failure.status_code
        yield b"data: " + orjson.dumps(failure.body()) + b"\n\n"
    finally:
        # Also when the client went away (the response task is cancelled): the provider's
        # stream, and its upstream connection, close now.
        await chunks.aclose()  # type: ignore[attr-defined]
        usage.done(status, stream=True, reported=reported)


async def _prepend(
    first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for chunk in rest:
        yield chunk


@router.get("/usage", response_model=UsageReport)
async def usage_report(
    principal: ReadPrincipal,
    session: SessionDep,
    start: Annotated[int | None, Query(ge=0, le=MAX_UNIX, description="Unix seconds.")] = None,
    end: Annotated[int | None, Query(ge=0, le=MAX_UNIX, description="Unix seconds.")] = None,
    group_by: Annotated[Literal["model", "day"], Query()] = "model",
) -> UsageReport:
    """Inference totals of this project between `start` (default: 30 days ago) and `end`
    (default: now), per model or per UTC day. Records reach it within about a second."""
    until = datetime.fromtimestamp(end, UTC) if end is not None else utcnow()
    since = datetime.fromtimestamp(start, UTC) if start is not None else until - timedelta(days=30)
    if since >= until:
        raise InvalidPayload("`start` must be before `end`.", param="start")
    rows = await UsageRepository(session, principal.project_id).totals(since, until, group_by)
    data = [UsageTotals(key=str(key), **values) for key, values in rows]
    overall = {
        field: sum(getattr(row, field) for row in data)
        for field in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
    }
    return UsageReport(
        start=int(since.timestamp()),
        end=int(until.timestamp()),
        group_by=group_by,
        data=data,
        totals=UsageTotals(key="all", **overall),
    )


# -- aliases -----------------------------------------------------------------------------------

AliasName = Annotated[str, Path(pattern=service.ALIAS_PATTERN, description="The alias.")]


class AliasCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=service.ALIAS_PATTERN, description="e.g. `support-bot`.")
    model: str = Field(min_length=1, max_length=256, description="A model this project may use.")


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)


class AliasObject(BaseModel):
    object: Literal["model_alias"] = "model_alias"
    name: str
    model: str
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, row: ModelAlias) -> AliasObject:
        return cls(
            name=row.name,
            model=row.model,
            created_at=to_unix(row.created_at) or 0,
            updated_at=to_unix(row.updated_at) or 0,
        )


class AliasDeleted(BaseModel):
    name: str
    object: Literal["model_alias.deleted"] = "model_alias.deleted"
    deleted: bool


def _alias_not_found(name: str) -> NotFound:
    return NotFound(f"No model alias named '{name}'.", param="name", code="alias_not_found")


@router.post("/model_aliases", response_model=AliasObject, tags=["inference"])
async def create_alias(
    body: AliasCreate, request: Request, principal: WritePrincipal, session: SessionDep
) -> AliasObject:
    """A stable name for a model of this project; chat completions accept it as `model`."""
    configured = set(request.app.state.providers or {})
    await service.check_alias_name(session, configured, body.name)
    await service.check_target(session, configured, principal.project_id, body.model)
    repository = AliasRepository(session, principal.project_id)
    if await repository.get(body.name) is not None:
        raise Conflict(
            f"A model alias named '{body.name}' exists; PATCH it to switch its model.",
            param="name",
            code="alias_exists",
        )
    now = utcnow()
    row = repository.add(
        ModelAlias(name=body.name, model=body.model, created_at=now, updated_at=now)
    )
    await session.flush()
    return AliasObject.of(row)


@router.get("/model_aliases", response_model=ListPage[AliasObject], tags=["inference"])
async def list_aliases(
    principal: ReadPrincipal, session: SessionDep, page: Annotated[PageParams, Depends(page_params)]
) -> ListPage[AliasObject]:
    repository = AliasRepository(session, principal.project_id)
    rows, has_more = await repository.paginate(repository.select(), page)
    return to_page([AliasObject.of(row) for row in rows], has_more, lambda a: a.name)


@router.get("/model_aliases/{name}", response_model=AliasObject, tags=["inference"])
async def retrieve_alias(
    name: AliasName, principal: ReadPrincipal, session: SessionDep
) -> AliasObject:
    row = await AliasRepository(session, principal.project_id).get(name)
    if row is None:
        raise _alias_not_found(name)
    return AliasObject.of(row)


@router.patch("/model_aliases/{name}", response_model=AliasObject, tags=["inference"])
async def switch_alias(
    name: AliasName,
    body: AliasUpdate,
    request: Request,
    principal: WritePrincipal,
    session: SessionDep,
) -> AliasObject:
    """Point the alias at another model, atomically: every request after this answer uses it
    (blue/green after an evaluation)."""
    configured = set(request.app.state.providers or {})
    await service.check_target(session, configured, principal.project_id, body.model)
    row = await AliasRepository(session, principal.project_id).get(name, for_update=True)
    if row is None:
        raise _alias_not_found(name)
    row.model, row.updated_at = body.model, utcnow()
    await session.flush()
    return AliasObject.of(row)


@router.delete("/model_aliases/{name}", response_model=AliasDeleted, tags=["inference"])
async def delete_alias(
    name: AliasName, principal: WritePrincipal, session: SessionDep
) -> AliasDeleted:
    row = await AliasRepository(session, principal.project_id).get(name, for_update=True)
    if row is None:
        raise _alias_not_found(name)
    await session.delete(row)
    return AliasDeleted(name=name, deleted=True)
