from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.base import Base
from app.db.repository import ProjectScopedRepository, Repository
from app.jobs.state import ACTIVE
from app.kit.time import utcnow
from app.models import (
    FineTunedModel,
    Job,
    JobCheckpoint,
    JobEvent,
    ProviderFile,
    ProviderWebhookReceipt,
)


class JobRepository(ProjectScopedRepository[Job]):
    model = Job

    async def active_jobs_using(self, file_id: str) -> Sequence[str]:
        rows = await self.session.scalars(
            select(Job.id).where(
                Job.project_id == self.project_id,
                Job.status.in_(ACTIVE),
                (Job.training_file == file_id) | (Job.validation_file == file_id),
            )
        )
        return rows.all()


class JobEventRepository(ProjectScopedRepository[JobEvent]):
    model = JobEvent


class JobCheckpointRepository(ProjectScopedRepository[JobCheckpoint]):
    model = JobCheckpoint


class SubmitQueue(Repository[Job]):
    """The submitter's view: stored jobs of every project not yet created at their provider."""

    model = Job

    async def claim(self, now: datetime, lease_until: datetime) -> Job | None:
        claimed: Job | None = await self.session.scalar(
            select(Job)
            .where(
                Job.submitted_at.is_(None),
                Job.status == "validating_files",
                Job.provider != "local",  # run by the trainer role, never submitted
                Job.next_attempt_at <= now,
                (Job.lease_until.is_(None)) | (Job.lease_until < now),
            )
            .order_by(Job.next_attempt_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if claimed is not None:
            claimed.lease_until = lease_until
            claimed.submit_attempts += 1
            await self.session.flush()
        return claimed

    async def get_leased(self, job_id: str, lease_until: datetime) -> Job | None:
        """The job, locked, only while the lease we took is still ours."""
        found: Job | None = await self.session.scalar(
            select(Job).where(Job.id == job_id, Job.lease_until == lease_until).with_for_update()
        )
        return found


class SyncQueue(Repository[Job]):
    """The syncer's view: submitted, unfinished jobs of every project, by due time."""

    model = Job

    async def claim(
        self, provider: str, now: datetime, lease_until: datetime, limit: int
    ) -> Sequence[Job]:
        claimed = (
            await self.session.scalars(
                select(Job)
                .where(
                    Job.provider == provider,
                    Job.sync_due_at <= now,
                    Job.provider_job_id.is_not(None),
                    Job.status.in_(ACTIVE),
                    (Job.sync_lease_until.is_(None)) | (Job.sync_lease_until < now),
                )
                .order_by(Job.sync_due_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        for job in claimed:
            job.sync_lease_until = lease_until
        await self.session.flush()
        return claimed

    async def release(self, job_ids: list[str], lease_until: datetime) -> None:
        """Give claimed jobs back untouched (still due), where the lease is still ours."""
        await self.session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.sync_lease_until == lease_until)
            .values(sync_lease_until=None)
        )

    async def get_leased(self, job_id: str, lease_until: datetime) -> Job | None:
        """The job, locked, only while the lease we took is still ours."""
        found: Job | None = await self.session.scalar(
            select(Job)
            .where(Job.id == job_id, Job.sync_lease_until == lease_until)
            .with_for_update()
        )
        return found

    async def request_sync(self, provider: str, provider_job_id: str, now: datetime) -> str | None:
        """Make the job with this provider id due now (an inbound webhook); its id, or None."""
        job: Job | None = await self.session.scalar(
            select(Job)
            .where(
                Job.provider == provider,
                Job.provider_job_id == provider_job_id,
                Job.status.in_(ACTIVE),
            )
            .with_for_update()
        )
        if job is None:
            return None
        schedule_now(job, now)
        await self.session.flush()
        return job.id


# A requested sync is due "long ago", so it goes before the backlog of overdue periodic syncs.
REQUESTED_HEAD_START = timedelta(days=1)


def schedule_now(job: Job, now: datetime) -> None:
    """Ask for a sync as soon as possible, ahead of periodic ones. A sync already running when
    this is asked runs once more after it (it sees `sync_requested_at` newer than its claim)."""
    job.sync_requested_at = now
    job.sync_due_at = now - REQUESTED_HEAD_START


# Core inserts executed with a list of rows: one cached statement, batched by SQLAlchemy's
# "insertmanyvalues" (a multi-row VALUES built per call is not cached and cost more CPU than the
# rest of a sync together).
_TABLES = Base.metadata.tables
_EVENTS_INSERT = insert(_TABLES["job_events"]).on_conflict_do_nothing(
    index_elements=["job_id", "provider_event_id"],
    index_where=_TABLES["job_events"].c.provider_event_id.is_not(None),
)
_CHECKPOINTS_INSERT = (
    insert(_TABLES["job_checkpoints"])
    .on_conflict_do_nothing()
    .returning(_TABLES["job_checkpoints"].c.id)
)
_METRICS_INSERT = insert(_TABLES["job_metrics"]).on_conflict_do_nothing()


class SyncWriter:
    """What the syncer writes for a job it holds: provider events, checkpoints and metrics,
    each stored once (conflicts on their unique keys are ignored), and the fine-tuned model."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def last_provider_event_at(self, job_id: str) -> datetime | None:
        found: datetime | None = await self.session.scalar(
            select(func.max(JobEvent.created_at)).where(
                JobEvent.job_id == job_id, JobEvent.provider_event_id.is_not(None)
            )
        )
        return found

    async def provider_file_ids(self, job: Job) -> dict[str, str]:
        """The provider's ids of the job's files, each mapped to tunegate's."""
        files = [f for f in (job.training_file, job.validation_file) if f]
        rows = await self.session.execute(
            select(ProviderFile.provider_file_id, ProviderFile.file_id).where(
                ProviderFile.provider == job.provider, ProviderFile.file_id.in_(files)
            )
        )
        return {provider_id: file_id for provider_id, file_id in rows.all()}

    async def add_events(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(_EVENTS_INSERT, rows)

    async def add_checkpoints(self, rows: list[dict[str, Any]]) -> set[str]:
        """Store the checkpoints not stored yet; the ids of those that were new."""
        if not rows:
            return set()
        return set((await self.session.scalars(_CHECKPOINTS_INSERT, rows)).all())

    async def add_metrics(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.session.execute(_METRICS_INSERT, rows)

    async def add_fine_tuned_model(self, job: Job, model_id: str) -> None:
        await self.session.execute(
            insert(FineTunedModel)
            .values(
                id=model_id,
                project_id=job.project_id,
                provider=job.provider,
                base_model=job.model,
                job_id=job.id,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing()
        )


class WebhookReceipts:
    """Inbound provider webhooks already handled, by `webhook-id`, kept a day."""

    KEPT = timedelta(days=1)

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def first_time(self, provider: str, webhook_id: str, now: datetime) -> bool:
        """Record the webhook; False when it was recorded before (a redelivery)."""
        inserted = await self.session.scalar(
            insert(ProviderWebhookReceipt)
            .values(provider=provider, webhook_id=webhook_id[:256], received_at=now)
            .on_conflict_do_nothing()
            .returning(ProviderWebhookReceipt.webhook_id)
        )
        return inserted is not None

    async def purge(self, now: datetime) -> int:
        result = await self.session.execute(
            delete(ProviderWebhookReceipt).where(
                ProviderWebhookReceipt.received_at < now - self.KEPT
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)
