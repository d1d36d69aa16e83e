"""The only place a job's status changes are decided.

The API (cancel, pause, resume), the submitter, the syncer and the local trainer all call
`transition`, which checks the move is allowed, stamps `finished_at` on terminal states, and
writes a job event in the same transaction, so a status and its event are never apart. The
webhooks it causes (`fine_tuning.job.status_changed`, then `.succeeded` / `.failed` /
`.cancelled`) are written in that transaction too.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.evals import service as evals
from app.jobs.schemas import JobObject
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import Job, JobEvent
from app.models.job import ACTIVE_JOB_STATUSES
from app.webhooks.events import emit

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = ACTIVE_JOB_STATUSES

# Which moves are allowed. Providers may skip steps (queued -> succeeded when a job is fast),
# so forward jumps are allowed; nothing leaves a terminal state.
ALLOWED: dict[str, frozenset[str]] = {
    "validating_files": frozenset(
        {"queued", "running", "succeeded", "failed", "cancelled", "paused"}
    ),
    "queued": frozenset({"running", "succeeded", "failed", "cancelled", "paused"}),
    "running": frozenset({"queued", "succeeded", "failed", "cancelled", "paused"}),
    "paused": frozenset({"queued", "running", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class TransitionRefused(Exception):
    def __init__(self, job: Job, target: str) -> None:
        super().__init__(f"job {job.id} cannot go from {job.status} to {target}")
        self.current = job.status
        self.target = target


def can_transition(current: str, target: str) -> bool:
    return target in ALLOWED.get(current, frozenset())


def is_terminal(status: str) -> bool:
    return status in TERMINAL


async def transition(
    session: AsyncSession,
    job: Job,
    target: str,
    *,
    message: str | None = None,
    error: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> bool:
    """Move `job` to `target` and record the event. Same status: nothing happens (False).
    A move the state machine forbids raises TransitionRefused."""
    if job.status == target:
        return False
    if not can_transition(job.status, target):
        raise TransitionRefused(job, target)
    moment = at or utcnow()
    previous = job.status
    job.status = target
    if target in TERMINAL:
        job.finished_at = job.finished_at or moment
    if target == "failed" and error is not None:
        job.error = error
    add_event(
        session,
        job,
        message or _default_message(previous, target, error),
        level="error" if target == "failed" else "info",
        data={"status": target, "previous_status": previous},
        at=moment,
    )
    if target == "succeeded" and job.evaluate:
        queued = await evals.queue_job_eval(session, job)
        if queued is None and not job.eval_id and not job.fine_tuned_model:
            add_event(
                session,
                job,
                "Not evaluated: the provider reported no fine-tuned model for this job.",
                level="warn",
                at=moment + timedelta(microseconds=1),
            )
        if queued is not None:
            add_event(
                session,
                job,
                f"Evaluation {queued.id} queued: {job.model} against {job.fine_tuned_model} on "
                f"the validation file {job.validation_file}.",
                data={"eval_id": queued.id},
                at=moment + timedelta(microseconds=1),
            )
    await session.flush()
    await announce(session, job, "fine_tuning.job.status_changed")
    if target in TERMINAL:
        await announce(session, job, f"fine_tuning.job.{target}")
    return True


async def announce(session: AsyncSession, job: Job, event_type: str) -> None:
    """A webhook event about `job`, carrying the job as the API returns it."""
    await emit(
        session, job.project_id, event_type, job.id, JobObject.of(job).model_dump(mode="json")
    )


def add_event(
    session: AsyncSession,
    job: Job,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> JobEvent:
    """A tunegate event of the job (a provider's own events come through the syncer)."""
    event = JobEvent(
        id=new_id("ftevent-"),
        job_id=job.id,
        project_id=job.project_id,
        level=level,
        message=message,
        type="message",
        data=data,
        created_at=at or utcnow(),
    )
    session.add(event)
    return event


def _default_message(previous: str, target: str, error: dict[str, Any] | None) -> str:
    if target == "failed" and error:
        return f"The job failed: {error.get('message') or error.get('code')}"
    return {
        "queued": "Job queued at the provider.",
        "running": "Fine-tuning job started.",
        "succeeded": "The job has successfully completed.",
        "cancelled": "The job was cancelled.",
        "paused": "The job was paused.",
    }.get(target, f"Job status changed from {previous} to {target}.")
