"""OpenAI's fine-tuning jobs API: `/v1/fine_tuning/jobs`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy import select
from starlette.responses import Response

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.db.session import SessionDep
from app.jobs import service
from app.jobs.chart import loss_chart_svg
from app.jobs.repository import JobCheckpointRepository, JobEventRepository, JobRepository
from app.jobs.schemas import (
    JobCheckpointObject,
    JobCreate,
    JobEventObject,
    JobMetricsObject,
    JobMetricsPoint,
    JobObject,
)
from app.jobs.service import JobsContext
from app.kit import idempotency
from app.kit.errors import InvalidPayload
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import AfterQuery, ListPage, Order, PageParams, to_page
from app.models import Job, JobCheckpoint, JobEvent, JobMetric

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["fine_tuning"],
    route_class=JSONRoute,
    responses=ERROR_RESPONSES,
)

JobId = Annotated[str, Path(max_length=64, description="The job's id (`ftjob-…`).")]


def jobs_context(request: Request) -> JobsContext:
    state = request.app.state
    return JobsContext(
        settings=state.settings,
        storage=state.storage,
        sessionmaker=state.database.sessionmaker,
        providers=state.providers,
    )


Context = Annotated[JobsContext, Depends(jobs_context)]


def list_params(
    after: AfterQuery = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> PageParams:
    return PageParams(after=after, limit=limit, order=Order.desc)


@router.post("", response_model=JobObject, openapi_extra=idempotency.OPENAPI_HEADER)
async def create_fine_tuning_job(
    request: Request,
    body: JobCreate,
    principal: WritePrincipal,
    session: SessionDep,
    context: Context,
) -> JobObject | Response:
    """Check everything, store the job (`validating_files`); the submitter creates it at the
    provider. With an `Idempotency-Key`, a retried create answers the same job."""

    async def work() -> JobObject:
        return JobObject.of(await service.create_job(session, context, principal.project_id, body))

    return await idempotency.run(
        request, session, context.sessionmaker, principal.project_id, [await request.body()], work
    )


@router.get(
    "",
    response_model=ListPage[JobObject],
    openapi_extra={"x-dynamic-query": ["metadata"]},
)
async def list_fine_tuning_jobs(
    request: Request,
    principal: ReadPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(list_params)],
) -> ListPage[JobObject]:
    """Newest first; `metadata[key]=value` filters (several are combined)."""
    repository = JobRepository(session, principal.project_id)
    statement = repository.select()
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata[") : -1]
            if not key or len(key) > 64:
                raise InvalidPayload(f"Invalid metadata filter '{name}'.", param=name)
            statement = statement.where(Job.job_metadata[key].astext == value)
    rows, has_more = await repository.paginate(statement, page)
    return to_page([JobObject.of(row) for row in rows], has_more, lambda j: j.id)


@router.get("/{fine_tuning_job_id}", response_model=JobObject)
async def retrieve_fine_tuning_job(
    fine_tuning_job_id: JobId, principal: ReadPrincipal, session: SessionDep
) -> JobObject:
    return JobObject.of(await service.get_job(session, principal.project_id, fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobObject)
async def cancel_fine_tuning_job(
    fine_tuning_job_id: JobId, principal: WritePrincipal, session: SessionDep, context: Context
) -> JobObject:
    job = await service.cancel_job(session, context, principal.project_id, fine_tuning_job_id)
    return JobObject.of(job)


@router.post("/{fine_tuning_job_id}/pause", response_model=JobObject)
async def pause_fine_tuning_job(
    fine_tuning_job_id: JobId, principal: WritePrincipal, session: SessionDep, context: Context
) -> JobObject:
    job = await service.pause_or_resume(
        session, context, principal.project_id, fine_tuning_job_id, "pause"
    )
    return JobObject.of(job)


@router.post("/{fine_tuning_job_id}/resume", response_model=JobObject)
async def resume_fine_tuning_job(
    fine_tuning_job_id: JobId, principal: WritePrincipal, session: SessionDep, context: Context
) -> JobObject:
    job = await service.pause_or_resume(
        session, context, principal.project_id, fine_tuning_job_id, "resume"
    )
    return JobObject.of(job)


@router.get("/{fine_tuning_job_id}/events", response_model=ListPage[JobEventObject])
async def list_fine_tuning_events(
    fine_tuning_job_id: JobId,
    principal: ReadPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(list_params)],
) -> ListPage[JobEventObject]:
    """Newest first, as OpenAI lists them; `after` is an event id."""
    await service.get_job(session, principal.project_id, fine_tuning_job_id)
    repository = JobEventRepository(session, principal.project_id)
    statement = repository.select().where(JobEvent.job_id == fine_tuning_job_id)
    rows, has_more = await repository.paginate(statement, page)
    items = [JobEventObject.of(row) for row in rows]
    return to_page(items, has_more, lambda e: e.id)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=ListPage[JobCheckpointObject])
async def list_fine_tuning_checkpoints(
    fine_tuning_job_id: JobId,
    principal: ReadPrincipal,
    session: SessionDep,
    page: Annotated[PageParams, Depends(list_params)],
) -> ListPage[JobCheckpointObject]:
    await service.get_job(session, principal.project_id, fine_tuning_job_id)
    repository = JobCheckpointRepository(session, principal.project_id)
    statement = repository.select().where(JobCheckpoint.job_id == fine_tuning_job_id)
    rows, has_more = await repository.paginate(statement, page)
    items = [JobCheckpointObject.of(row) for row in rows]
    return to_page(items, has_more, lambda c: c.id)


@router.post("/{fine_tuning_job_id}/sync", response_model=JobObject)
async def sync_fine_tuning_job(
    fine_tuning_job_id: JobId, principal: WritePrincipal, session: SessionDep
) -> JobObject:
    """Ask for the job to be synced with its provider now (tunegate extension). The answer is
    the job as stored; the sync follows within a second or two."""
    return JobObject.of(
        await service.request_sync(session, principal.project_id, fine_tuning_job_id)
    )


async def _metric_points(
    session: SessionDep, project_id: str, job_id: str
) -> list[JobMetricsPoint]:
    await service.get_job(session, project_id, job_id)
    rows = await session.execute(
        select(JobMetric.step, JobMetric.values)
        .where(JobMetric.job_id == job_id)
        .order_by(JobMetric.step)
    )
    return [JobMetricsPoint(step=step, **values) for step, values in rows]


@router.get("/{fine_tuning_job_id}/metrics", response_model=JobMetricsObject)
async def get_fine_tuning_job_metrics(
    fine_tuning_job_id: JobId, principal: ReadPrincipal, session: SessionDep
) -> JobMetricsObject:
    """Per-step metrics (tunegate extension): `train_loss`, `train_mean_token_accuracy`,
    `valid_loss`, `valid_mean_token_accuracy`, `full_valid_*` as the provider reports them."""
    points = await _metric_points(session, principal.project_id, fine_tuning_job_id)
    return JobMetricsObject(fine_tuning_job_id=fine_tuning_job_id, data=points)


@router.get(
    "/{fine_tuning_job_id}/metrics.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}, "description": "The loss chart."}},
)
async def get_fine_tuning_job_metrics_chart(
    fine_tuning_job_id: JobId, principal: ReadPrincipal, session: SessionDep
) -> Response:
    """The training and validation loss curves as an SVG chart (tunegate extension)."""
    job = await service.get_job(session, principal.project_id, fine_tuning_job_id)
    points = await _metric_points(session, principal.project_id, fine_tuning_job_id)
    title = f"{job.id} · {job.fine_tuned_model or job.model} · {job.status}"
    svg = loss_chart_svg([point.model_dump() for point in points], title=title)
    return Response(svg, media_type="image/svg+xml")
