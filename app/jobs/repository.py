from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

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
