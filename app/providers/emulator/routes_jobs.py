"""`/v1/fine_tuning/jobs`: create, list (with `metadata[k]=v`), retrieve, cancel, pause, resume,
events and checkpoints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.providers.emulator.errors import bad_request, job_not_found, training_not_available
from app.providers.emulator.job_requests import create_job
from app.providers.emulator.lifecycle import Pause
from app.providers.emulator.params import json_object, list_body, page, query_limit
from app.providers.emulator.state import EmulatorState, StoredJob
from app.providers.emulator.timeline import (
    ACTIVE_STATUSES,
    job_checkpoints,
    job_events,
    job_json,
    job_status,
)


def _metadata_filter(request: Request) -> tuple[bool, dict[str, str]]:
    """(only jobs without metadata, key → value every listed job must have)."""
    wanted: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            wanted[key[len("metadata[") : -1]] = value
    return request.query_params.get("metadata") == "null", wanted


def jobs_router(state: EmulatorState) -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs")
    organization = state.organization

    def get_job(job_id: str) -> StoredJob:
        job = state.jobs.get(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job

    @router.post("")
    async def create(request: Request) -> dict[str, Any]:
        body = await json_object(request)
        now = state.tick()
        if state.faults.training_not_available():
            raise training_not_available()
        job = create_job(state, body, now)
        state.add_job(job)
        return job_json(job, now, organization)

    @router.get("")
    async def list_jobs(request: Request) -> dict[str, Any]:
        now = state.tick()
        limit = query_limit(request, default=20, maximum=100)
        only_null, wanted = _metadata_filter(request)
        listed = [
            job
            for job in reversed(state.jobs.values())
            if (job.metadata is None if only_null else True)
            and all((job.metadata or {}).get(k) == v for k, v in wanted.items())
        ]
        chosen, has_more = page(listed, request.query_params.get("after"), limit, lambda j: j.id)
        return list_body([job_json(j, now, organization) for j in chosen], has_more, ids=False)

    @router.get("/{fine_tuning_job_id}")
    async def retrieve(fine_tuning_job_id: str) -> dict[str, Any]:
        now = state.tick()
        return job_json(get_job(fine_tuning_job_id), now, organization)

    @router.post("/{fine_tuning_job_id}/cancel")
    async def cancel(fine_tuning_job_id: str) -> dict[str, Any]:
        now = state.tick()
        job = get_job(fine_tuning_job_id)
        status = job_status(job, now)
        if status not in ACTIVE_STATUSES:
            raise bad_request(f"Cannot cancel job {job.id}: the job has already {status}.")
        job.add_event("Fine-tuning job cancelled", now)
        if job.clock.paused:
            job.clock.pauses[-1].ended = now
        job.clock.stopped = now
        state.job_ended(job, now)
        return job_json(job, now, organization)

    def job_to(action: str, job_id: str, now: float, only: str) -> StoredJob:
        """The job, if its status is `only` (the one status in which `action` is allowed)."""
        job = get_job(job_id)
        status = job_status(job, now)
        if status != only:
            raise bad_request(
                f"Cannot {action} job {job.id} with status {status}: only {only} jobs can be "
                f"{action}d."
            )
        return job

    @router.post("/{fine_tuning_job_id}/pause")
    async def pause(fine_tuning_job_id: str) -> dict[str, Any]:
        now = state.tick()
        job = job_to("pause", fine_tuning_job_id, now, only="running")
        job.add_event("Fine-tuning job paused", now)
        job.clock.pauses.append(Pause(started=now, progress=job.clock.progress(now)))
        return job_json(job, now, organization)

    @router.post("/{fine_tuning_job_id}/resume")
    async def resume(fine_tuning_job_id: str) -> dict[str, Any]:
        now = state.tick()
        job = job_to("resume", fine_tuning_job_id, now, only="paused")
        job.clock.pauses[-1].ended = now
        job.add_event("Fine-tuning job resumed", now)
        return job_json(job, now, organization)

    @router.get("/{fine_tuning_job_id}/events")
    async def events(fine_tuning_job_id: str, request: Request) -> dict[str, Any]:
        now = state.tick()
        job = get_job(fine_tuning_job_id)
        limit = query_limit(request, default=20, maximum=100)
        newest_first = list(reversed(job_events(job, now)))
        chosen, has_more = page(newest_first, request.query_params.get("after"), limit, _id)
        return list_body(chosen, has_more, ids=False)

    @router.get("/{fine_tuning_job_id}/checkpoints")
    async def checkpoints(fine_tuning_job_id: str, request: Request) -> dict[str, Any]:
        now = state.tick()
        job = get_job(fine_tuning_job_id)
        limit = query_limit(request, default=10, maximum=100)
        made = job_checkpoints(job, now, organization)
        chosen, has_more = page(made, request.query_params.get("after"), limit, _id)
        return list_body(chosen, has_more, ids=True)

    return router


def _id(item: dict[str, Any]) -> str:
    return str(item["id"])
