"""Evals (tunegate extension): base versus fine-tuned models on held-out data.

`POST /v1/evals` queues an eval that the `evaluator` worker runs; `GET /v1/evals/{id}` shows
its progress, then the aggregates per model with 95 % intervals, the comparisons with the
baseline and the verdict; `GET /v1/evals/{id}/results` every example with every model's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final

from fastapi import APIRouter, Depends, Path, Query, Request

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.db.session import SessionDep
from app.evals import metrics, service
from app.evals.repository import EvalRepository
from app.evals.schemas import (
    EvalAnswer,
    EvalCreate,
    EvalDeleted,
    EvalObject,
    EvalResultObject,
)
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import MAX_LIMIT, ListPage, PageParams, page_params, to_page
from app.models import Eval, EvalExample, EvalResult

router = APIRouter(
    prefix="/v1/evals", tags=["evals"], route_class=JSONRoute, responses=ERROR_RESPONSES
)

EvalId = Annotated[str, Path(max_length=64, description="The eval's id (`eval_…`).")]


@router.post("", response_model=EvalObject)
async def create_eval(
    body: EvalCreate, request: Request, principal: WritePrincipal, session: SessionDep
) -> EvalObject:
    """Compare two or more models (the first is the baseline) on a held-out chat JSONL file.
    The eval is queued; follow it with GET until `succeeded`."""
    configured = set(request.app.state.providers or {})
    row = await service.create_eval(session, configured, principal.project_id, body)
    return EvalObject.of(row)


@router.get("", response_model=ListPage[EvalObject])
async def list_evals(
    principal: ReadPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(page_params)],
) -> ListPage[EvalObject]:
    repository = EvalRepository(session, principal.project_id)
    rows, has_more = await repository.paginate(repository.select(), page)
    return to_page([EvalObject.of(row) for row in rows], has_more, lambda e: e.id)


@router.get("/{eval_id}", response_model=EvalObject)
async def retrieve_eval(
    eval_id: EvalId, principal: ReadPrincipal, session: SessionDep
) -> EvalObject:
    return EvalObject.of(await service.get_eval(session, principal.project_id, eval_id))


@router.get("/{eval_id}/results", response_model=ListPage[EvalResultObject])
async def list_eval_results(
    eval_id: EvalId,
    principal: ReadPrincipal,
    session: SessionDep,
    after: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9]{1,9}$",
            description="An example index from a previous page (its `id`).",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
) -> ListPage[EvalResultObject]:
    """Every example in file order: prompt, expected answer, each model's answer and scores,
    and the judge's verdicts."""
    row = await service.get_eval(session, principal.project_id, eval_id)
    repository = EvalRepository(session, principal.project_id)
    examples, has_more = await repository.examples_page(
        eval_id, int(after) if after is not None else None, limit
    )
    results = await repository.results_for(eval_id, [e.example for e in examples])
    items = _result_objects(row, examples, results)
    return to_page(items, has_more, lambda item: item.id)


def _result_objects(
    row: Eval, examples: Sequence[EvalExample], results: Sequence[EvalResult]
) -> list[EvalResultObject]:
    labels = (row.results or {}).get("labels")
    normalize = metrics.Normalization(**row.config.get("normalize", {}))
    answers: dict[int, dict[str, EvalResult]] = {}
    for result in results:
        answers.setdefault(result.example, {})[result.model] = result
    items = []
    for example in examples:
        by_model = answers.get(example.example, {})
        items.append(
            EvalResultObject(
                id=str(example.example),
                example=example.example,
                line=example.line,
                prompt=example.prompt,
                expected=example.expected,
                answers=[
                    _answer_object(model, by_model.get(model), labels, normalize)
                    for model in row.models
                ],
                judge=example.judge,
            )
        )
    return items


# What an answer shows as stored (all null for an answer not written yet).
_STORED: Final = (
    "output",
    "error",
    "exact_match",
    "f1",
    "valid_json",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
)


def _answer_object(
    model: str,
    result: EvalResult | None,
    labels: list[str] | None,
    normalize: metrics.Normalization,
) -> EvalAnswer:
    label = None
    if result is not None and labels:
        label = metrics.predicted_label(result.output, labels, normalize)
    return EvalAnswer(
        model=model, label=label, **{name: getattr(result, name, None) for name in _STORED}
    )


@router.post("/{eval_id}/cancel", response_model=EvalObject)
async def cancel_eval(
    eval_id: EvalId, principal: WritePrincipal, session: SessionDep
) -> EvalObject:
    """A queued eval is cancelled at once; a running one within about a second."""
    return EvalObject.of(await service.cancel_eval(session, principal.project_id, eval_id))


@router.delete("/{eval_id}", response_model=EvalDeleted)
async def delete_eval(
    eval_id: EvalId, principal: WritePrincipal, session: SessionDep
) -> EvalDeleted:
    """Delete a finished eval with its answers."""
    await service.delete_eval(session, principal.project_id, eval_id)
    return EvalDeleted(id=eval_id, deleted=True)
