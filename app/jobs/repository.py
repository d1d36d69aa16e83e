from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select

from app.db.repository import ProjectScopedRepository, Repository
from app.jobs.state import ACTIVE
from app.models import Job, JobCheckpoint, JobEvent


class JobRepository(ProjectScopedRepository[Job]):
    model = Job

    async def get_for_update(self, job_id: str) -> Job | None:
        found: Job | None = await self.session.scalar(
            self.select().where(Job.id == job_id).with_for_update()
        )
        return found

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
