"""Inference endpoints: the completion routes (documented here, served by `proxy.py`), usage
totals and model aliases (of one model, or split between several by weight). Feedback and the
A/B report of split aliases are in `ab.py`.

`POST /v1/chat/completions` and `POST /v1/completions` (legacy prompt/completion models) are
OpenAI-compatible, streamed or not, for every model the caller's project may use; how they work
is in `app/inference/proxy.py`. Requests reach the proxy before FastAPI's router (`HotPaths`);
the routes below give the OpenAPI document their request bodies and security, and answer
through the same proxy should a request come this way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Security
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from app.auth.dependencies import ReadPrincipal, WritePrincipal, bearer_doc
from app.db.session import SessionDep
from app.inference import service
from app.inference.proxy import CHAT, TEXT, CompletionProxy
from app.inference.repository import AliasRepository, UsageRepository
from app.kit.errors import Conflict, InvalidPayload, NotFound
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import ListPage, PageParams, page_params, to_page
from app.kit.time import to_unix, utcnow
from app.kit.types import JSON_INTEGER, fields_given
from app.models import ModelAlias

router = APIRouter(
    prefix="/v1", tags=["inference"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z
UnixStart = Annotated[
    int | None, Query(ge=0, le=MAX_UNIX, description="Unix seconds; default: 30 days before `end`.")
]
UnixEnd = Annotated[int | None, Query(ge=0, le=MAX_UNIX, description="Unix seconds; default: now.")]


def report_window(start: int | None, end: int | None) -> tuple[datetime, datetime]:
    """[since, until) of a report: `start` (default 30 days before `end`) to `end` (default
    now)."""
    until = datetime.fromtimestamp(end, UTC) if end is not None else utcnow()
    since = datetime.fromtimestamp(start, UTC) if start is not None else until - timedelta(days=30)
    if since >= until:
        raise InvalidPayload("`start` must be before `end`.", param="start")
    return since, until


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


class _Delegate(Response):
    """Hands the exchange to a `CompletionProxy`, replaying the body FastAPI has read."""

    def __init__(self, proxy: CompletionProxy, body: bytes) -> None:
        super().__init__()
        self.proxy = proxy
        self.request_body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, while a stream is being sent
            replayed = True
            return {"type": "http.request", "body": self.request_body, "more_body": False}

        await self.proxy(scope, replay, send)


_CHAT_PROXY = CompletionProxy(CHAT)
_TEXT_PROXY = CompletionProxy(TEXT)
_STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


# The proxy authenticates (once); the dependency only documents the bearer key.
_AUTH_DOC = [Security(bearer_doc)]


@router.post(
    "/chat/completions", response_model=dict[str, Any], responses=_STREAMED, dependencies=_AUTH_DOC
)
async def create_chat_completion(body: ChatCompletionCreate, request: Request) -> Response:
    """A chat completion from a base model, a fine-tuned model of this project, one of its
    checkpoints, or an alias of one. `stream: true` answers server-sent events."""
    return _Delegate(_CHAT_PROXY, await request.body())


@router.post(
    "/completions", response_model=dict[str, Any], responses=_STREAMED, dependencies=_AUTH_DOC
)
async def create_completion(body: CompletionCreate, request: Request) -> Response:
    """A legacy completion (`prompt` in, `text` out) from a prompt/completion-style model
    (`babbage-002`, `davinci-002`, `gpt-3.5-turbo-instruct`, fine-tunes of them), or an alias
    of one. `stream: true` answers server-sent events."""
    return _Delegate(_TEXT_PROXY, await request.body())


@router.get("/usage", response_model=UsageReport)
async def usage_report(
    principal: ReadPrincipal,
    session: SessionDep,
    start: UnixStart = None,
    end: UnixEnd = None,
    group_by: Annotated[Literal["model", "day"], Query()] = "model",
) -> UsageReport:
    """Inference totals of this project between `start` (default: 30 days ago) and `end`
    (default: now), per model or per UTC day. Records reach it within about a second."""
    since, until = report_window(start, end)
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


ModelId = Annotated[str, Field(min_length=1, max_length=256)]
Weight = Annotated[int, Field(ge=1, le=1000), JSON_INTEGER]
MAX_ARMS = 10


class AliasTarget(BaseModel):
    """What an alias routes to: `model`, or `models` with a weight each (an A/B split)."""

    # Exactly one of `model` and `models`: stated here for the OpenAPI document, and enforced
    # by `arms()` (a JSON null counts as absent).
    model_config = ConfigDict(
        extra="forbid", json_schema_extra=fields_given("oneOf", model="string", models="object")
    )

    model: ModelId | None = Field(default=None, description="A model this project may use.")
    models: dict[ModelId, Weight] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ARMS,
        description="Models this project may use, each with an integer weight (1-1000): each "
        'gets its share of the weights\' sum of the requests, e.g. `{"ft:…A": 90, "ft:…B": 10}`.',
    )

    def arms(self) -> dict[str, int]:
        if self.model is not None and self.models is not None:
            raise InvalidPayload("Give either `model` or `models`, not both.", param="models")
        if self.models is not None:
            return dict(self.models)
        if self.model is None:
            raise InvalidPayload("Give `model`, or `models` with a weight for each.", param="model")
        return {self.model: service.SINGLE_ARM_WEIGHT}


class AliasCreate(AliasTarget):
    name: str = Field(pattern=service.ALIAS_PATTERN, description="e.g. `support-bot`.")


class AliasObject(BaseModel):
    object: Literal["model_alias"] = "model_alias"
    name: str
    model: str = Field(description="The model, or the split's heaviest arm.")
    models: dict[str, int] = Field(
        description="Each arm's weight; an alias of one model has one arm, weight 100."
    )
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, row: ModelAlias) -> AliasObject:
        return cls(
            name=row.name,
            model=row.model,
            models=service.weights_of(row),
            created_at=to_unix(row.created_at) or 0,
            updated_at=to_unix(row.updated_at) or 0,
        )


class AliasDeleted(BaseModel):
    name: str
    object: Literal["model_alias.deleted"] = "model_alias.deleted"
    deleted: bool


def alias_not_found(name: str, param: str = "name") -> NotFound:
    return NotFound(f"No model alias named '{name}'.", param=param, code="alias_not_found")


async def _checked_arms(
    body: AliasTarget, request: Request, project_id: str, session: SessionDep
) -> dict[str, int]:
    arms = body.arms()
    configured = set(request.app.state.providers or {})
    for model in arms:
        await service.check_target(session, configured, project_id, model)
    return arms


def _route_to(row: ModelAlias, arms: dict[str, int]) -> None:
    row.model = service.heaviest_arm(arms)
    row.weights = arms if len(arms) > 1 else None


@router.post("/model_aliases", response_model=AliasObject, tags=["inference"])
async def create_alias(
    body: AliasCreate, request: Request, principal: WritePrincipal, session: SessionDep
) -> AliasObject:
    """A stable name for a model of this project, or for several that split its requests by
    weight (`models`); chat completions accept it as `model`."""
    configured = set(request.app.state.providers or {})
    await service.check_alias_name(session, configured, body.name)
    arms = await _checked_arms(body, request, principal.project_id, session)
    repository = AliasRepository(session, principal.project_id)
    if await repository.get(body.name) is not None:
        raise Conflict(
            f"A model alias named '{body.name}' exists; PATCH it to switch its model.",
            param="name",
            code="alias_exists",
        )
    now = utcnow()
    row = ModelAlias(name=body.name, created_at=now, updated_at=now)
    _route_to(row, arms)
    repository.add(row)
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
        raise alias_not_found(name)
    return AliasObject.of(row)


@router.patch("/model_aliases/{name}", response_model=AliasObject, tags=["inference"])
async def switch_alias(
    name: AliasName,
    body: AliasTarget,
    request: Request,
    principal: WritePrincipal,
    session: SessionDep,
) -> AliasObject:
    """Point the alias at another model, or at other arms and weights, atomically: every
    request after this answer uses them (blue/green after an evaluation, an A/B ramp)."""
    arms = await _checked_arms(body, request, principal.project_id, session)
    row = await AliasRepository(session, principal.project_id).get(name, for_update=True)
    if row is None:
        raise alias_not_found(name)
    _route_to(row, arms)
    row.updated_at = utcnow()
    await session.flush()
    return AliasObject.of(row)


@router.delete("/model_aliases/{name}", response_model=AliasDeleted, tags=["inference"])
async def delete_alias(
    name: AliasName, principal: WritePrincipal, session: SessionDep
) -> AliasDeleted:
    row = await AliasRepository(session, principal.project_id).get(name, for_update=True)
    if row is None:
        raise alias_not_found(name)
    await session.delete(row)
    return AliasDeleted(name=name, deleted=True)
