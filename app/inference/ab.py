"""A/B on live traffic: feedback about completions, and the report of a split alias's arms.

An alias may split its requests between models by weight (`endpoints.py`, routed by
`service.choose_arm`); every usage record names the alias and the model that answered.
`POST /v1/feedback` attaches a user's score and/or label to a completion by its request id
(the `x-request-id` tunegate answers with); `GET /v1/evals/ab/{alias}` reports, per arm,
requests, errors, latency, tokens and feedback over a time window. Its router is included
before any other `/v1/evals/...` route, so `/v1/evals/ab/...` is never taken for an eval's id.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth.dependencies import ReadPrincipal
from app.db.session import SessionDep
from app.inference import service
from app.inference.endpoints import AliasName, UnixEnd, UnixStart, alias_not_found, report_window
from app.inference.repository import AliasRepository, FeedbackRepository, UsageRepository
from app.kit.errors import InvalidPayload
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.ids import new_id
from app.kit.time import to_unix
from app.kit.types import fields_given
from app.models import Feedback

router = APIRouter(prefix="/v1", route_class=JSONRoute, responses=ERROR_RESPONSES)

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


# -- feedback ----------------------------------------------------------------------------------

Score = Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False, strict=True)]
Label = Annotated[str, Field(min_length=1, max_length=64)]


class FeedbackCreate(BaseModel):
    # The endpoint enforces the score or label (or both).
    model_config = ConfigDict(
        extra="forbid", json_schema_extra=fields_given("anyOf", score="number", label="string")
    )

    request_id: str = Field(
        min_length=1,
        max_length=128,
        description="The completion's request id: its `x-request-id` header "
        "(`completion._request_id` in the openai SDK).",
    )
    score: Score | None = Field(default=None, description="From -1 (bad) to 1 (good).")
    label: Label | None = Field(default=None, description="e.g. `helpful`, `wrong`.")
    comment: str | None = Field(default=None, max_length=4000)


class FeedbackObject(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    request_id: str
    model: str = Field(description="The model that answered the request.")
    alias: str | None = Field(description="The alias the request named, if any.")
    score: float | None
    label: str | None
    comment: str | None
    created_at: int

    @classmethod
    def of(cls, row: Feedback) -> FeedbackObject:
        return cls(
            id=row.id,
            request_id=row.request_id,
            model=row.model,
            alias=row.alias,
            score=row.score,
            label=row.label,
            comment=row.comment,
            created_at=to_unix(row.created_at) or 0,
        )


@router.post("/feedback", response_model=FeedbackObject, tags=["inference"])
async def create_feedback(
    body: FeedbackCreate, request: Request, principal: ReadPrincipal, session: SessionDep
) -> FeedbackObject:
    """What a user thought of a completion of this project: a score and/or a label, and a
    comment. Any key of the project may send it (`read` included: the service that asks for
    completions reports on them). Each call records one more piece of feedback."""
    if body.score is None and body.label is None:
        raise InvalidPayload("Give a `score`, a `label` or both.", param="score")
    served = await service.served_request(
        session, request.app.state.usage, principal.project_id, body.request_id
    )
    row = FeedbackRepository(session, principal.project_id).add(
        Feedback(
            id=new_id("fb_"),
            request_id=body.request_id,
            model=served.model,
            alias=served.alias,
            score=body.score,
            label=body.label,
            comment=body.comment,
        )
    )
    await session.flush()
    return FeedbackObject.of(row)


# -- the A/B report ----------------------------------------------------------------------------


class ArmLatency(BaseModel):
    p50: float | None
    p95: float | None
    mean: float | None


class ArmFeedback(BaseModel):
    count: int = Field(description="Feedback given in the window about this arm's answers.")
    scored: int = Field(description="How many of them have a score.")
    mean_score: float | None
    score_ci95: list[float] | None = Field(
        description="95% confidence interval of the mean score [low, high] (normal "
        "approximation); null with fewer than two scores."
    )
    labels: dict[str, int] = Field(description="How many times each label was given.")


class ArmReport(BaseModel):
    model: str
    weight: int = Field(description="Its weight now; 0 for a model that is no longer an arm.")
    expected_share: float = Field(description="Its share of the weights now.")
    share: float = Field(description="Its share of the alias's requests in the window.")
    requests: int
    errors: int = Field(description="Requests that ended with an error status.")
    latency_ms: ArmLatency = Field(description="Of the requests answered (status below 400).")
    prompt_tokens: int
    completion_tokens: int
    feedback: ArmFeedback


class ABReport(BaseModel):
    object: Literal["ab.report"] = "ab.report"
    alias: str
    start: int
    end: int
    weights: dict[str, int] = Field(description="The alias's arms and weights now.")
    requests: int = Field(description="Requests naming the alias in the window.")
    arms: list[ArmReport] = Field(
        description="Its arms by weight, then models that served it earlier in the window."
    )


@router.get("/evals/ab/{alias}", response_model=ABReport, tags=["evals"])
async def ab_report(
    alias: AliasName,
    principal: ReadPrincipal,
    session: SessionDep,
    start: UnixStart = None,
    end: UnixEnd = None,
) -> ABReport:
    """How the arms of an alias compare on the requests that named it between `start` and
    `end` (default: the last 30 days): requests and their share, errors, latency, tokens, and
    the feedback given meanwhile. Records reach it within about a second."""
    since, until = report_window(start, end)
    row = await AliasRepository(session, principal.project_id).get(alias)
    if row is None:
        raise alias_not_found(alias, param="alias")
    weights = service.weights_of(row)
    served = await UsageRepository(session, principal.project_id).arms_of_alias(alias, since, until)
    feedback = await FeedbackRepository(session, principal.project_id).arms_of_alias(
        alias, since, until
    )
    current = sorted(weights, key=lambda model: (-weights[model], model))
    former = sorted((set(served) | set(feedback)) - set(weights))
    requests = sum(arm["requests"] for arm in served.values())
    return ABReport(
        alias=alias,
        start=int(since.timestamp()),
        end=int(until.timestamp()),
        weights=weights,
        requests=requests,
        arms=[
            _arm(model, weights, requests, served.get(model), feedback.get(model))
            for model in current + former
        ],
    )


# An arm with no requests, or no feedback, in the window.
_NOT_SERVED: dict[str, Any] = {
    "requests": 0,
    "errors": 0,
    "latency_ms": {"p50": None, "p95": None, "mean": None},
    "prompt_tokens": 0,
    "completion_tokens": 0,
}
_NO_FEEDBACK: dict[str, Any] = {
    "count": 0,
    "scored": 0,
    "mean_score": None,
    "stddev": None,
    "labels": {},
}


def _arm(
    model: str,
    weights: dict[str, int],
    requests: int,
    served: dict[str, Any] | None,
    feedback: dict[str, Any] | None,
) -> ArmReport:
    served = served or _NOT_SERVED
    feedback = feedback or _NO_FEEDBACK
    weight = weights.get(model, 0)
    return ArmReport(
        model=model,
        weight=weight,
        expected_share=weight / sum(weights.values()),
        share=served["requests"] / requests if requests else 0.0,
        requests=served["requests"],
        errors=served["errors"],
        latency_ms=ArmLatency(**served["latency_ms"]),
        prompt_tokens=served["prompt_tokens"],
        completion_tokens=served["completion_tokens"],
        feedback=ArmFeedback(
            count=feedback["count"],
            scored=feedback["scored"],
            mean_score=feedback["mean_score"],
            score_ci95=_interval(feedback["mean_score"], feedback["stddev"], feedback["scored"]),
            labels=feedback["labels"],
        ),
    )


def _interval(mean: float | None, stddev: float | None, count: int) -> list[float] | None:
    """mean ± 1.96 standard errors, within the scores' range. A normal approximation rather
    than a bootstrap: computed from three aggregates, whatever the number of scores."""
    if mean is None or stddev is None or count < 2:
        return None
    half = Z_95 * stddev / math.sqrt(count)
    return [max(-1.0, mean - half), min(1.0, mean + half)]
