"""`/healthz` (the process is up), `/readyz` (database reachable, schema at head), `/metrics`."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from app.db.engine import Database
from app.db.migrate import is_at_head
from app.kit.errors import ServiceUnavailable
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.logging import get_logger
from app.models import Job
from app.models.job import JOB_STATUSES

log = get_logger("tunegate.health")
router = APIRouter(tags=["health"], route_class=JSONRoute)

READINESS_TIMEOUT_SECONDS = 3.0


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    database: Literal["ok"] = "ok"
    migrations: Literal["at_head"] = "at_head"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: ERROR_RESPONSES[500]})
async def readyz(request: Request) -> Readiness:
    database: Database = request.app.state.database
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS), database.engine.connect() as conn:
            at_head = await is_at_head(conn)
    except Exception as exc:
        log.warning("readiness check failed", error=type(exc).__name__)
        raise ServiceUnavailable(
            "The database is not reachable.", code="database_unavailable"
        ) from None
    if not at_head:
        raise ServiceUnavailable(
            "The database schema is not at the latest migration: run `tunegate migrate`.",
            code="migrations_pending",
        )
    return Readiness()


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format. Job counts by status are read from the database at scrape time,
    so they are right whichever process runs the workers."""
    gauge = request.app.state.job_gauge
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            async with request.app.state.database.sessionmaker() as session:
                rows = await session.execute(select(Job.status, func.count()).group_by(Job.status))
                counts = {status: count for status, count in rows}
        for status in JOB_STATUSES:
            gauge.labels(status).set(counts.get(status, 0))
    except (TimeoutError, SQLAlchemyError, OSError):
        log.warning("job counts unavailable for /metrics")
    return Response(
        generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST
    )
