from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.repository import ProjectScopedRepository, Repository
from app.models import Blob, File, Job, Upload, UploadPart
from app.models.job import ACTIVE_JOB_STATUSES


class FileRepository(ProjectScopedRepository[File]):
    model = File


class UploadRepository(ProjectScopedRepository[Upload]):
    model = Upload

    async def parts(self, upload_id: str, part_ids: Sequence[str]) -> Sequence[UploadPart]:
        rows = await self.session.scalars(
            select(UploadPart).where(
                UploadPart.upload_id == upload_id,
                UploadPart.project_id == self.project_id,
                UploadPart.id.in_(part_ids),
            )
        )
        return rows.all()

    async def received_bytes(self, upload_id: str) -> int:
        total = await self.session.scalar(
            select(func.coalesce(func.sum(UploadPart.bytes), 0)).where(
                UploadPart.upload_id == upload_id, UploadPart.project_id == self.project_id
            )
        )
        return int(total or 0)

    async def complete_if_pending(self, upload_id: str, file_id: str) -> Upload | None:
        """Mark a still-pending upload completed; None when a concurrent complete or cancel won."""
        completed: Upload | None = await self.session.scalar(
            update(Upload)
            .where(
                Upload.id == upload_id,
                Upload.project_id == self.project_id,
                Upload.status == "pending",
            )
            .values(status="completed", file_id=file_id)
            .returning(Upload)
        )
        return completed


class BlobRepository(Repository[Blob]):
    """Blobs are shared by every project (content-addressed): no project filter applies, and
    no API ever reads a blob except through a File of the caller's project."""

    model = Blob

    def _id_column(self) -> object:
        return Blob.sha256

    async def touch(self, sha256: str, size: int, storage_key: str, moment: datetime) -> None:
        """Insert or mark as seen now; GC leaves blobs seen within the grace period alone."""
        statement = insert(Blob).values(
            sha256=sha256, bytes=size, storage_key=storage_key, last_seen_at=moment
        )
        await self.session.execute(
            statement.on_conflict_do_update(
                index_elements=[Blob.sha256], set_={"last_seen_at": moment}
            )
        )

    async def mark_seen(self, sha256s: Sequence[str], moment: datetime) -> None:
        """A blob that just lost a reference starts its grace period now."""
        if sha256s:
            await self.session.execute(
                update(Blob).where(Blob.sha256.in_(sha256s)).values(last_seen_at=moment)
            )

    async def claim_unreferenced(self, seen_before: datetime, limit: int) -> Sequence[Blob]:
        """Blobs no file points at and not seen since `seen_before`, locked (SKIP LOCKED)."""
        referenced = exists().where(File.sha256 == Blob.sha256)
        rows = await self.session.scalars(
            select(Blob)
            .where(Blob.last_seen_at < seen_before, ~referenced)
            .order_by(Blob.last_seen_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return rows.all()

    async def remove(self, sha256: str) -> None:
        await self.session.execute(delete(Blob).where(Blob.sha256 == sha256))


class MaintenanceRepository:
    """Unscoped housekeeping queries for the maintenance worker."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def expire_uploads(self, now: datetime) -> int:
        result = await self.session.execute(
            update(Upload)
            .where(Upload.status == "pending", Upload.expires_at < now)
            .values(status="expired")
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    async def finished_uploads_to_purge(self, limit: int) -> Sequence[str]:
        """Finished uploads whose parts' content has not been removed yet (with or without
        part rows: a part stored by a process that died before writing its row counts too)."""
        rows = await self.session.scalars(
            select(Upload.id)
            .where(Upload.status != "pending", Upload.parts_purged_at.is_(None))
            .order_by(Upload.created_at)
            .limit(limit)
        )
        return rows.all()

    async def mark_purged(self, upload_id: str, moment: datetime) -> None:
        await self.session.execute(
            update(Upload).where(Upload.id == upload_id).values(parts_purged_at=moment)
        )

    async def delete_parts(self, upload_id: str) -> None:
        await self.session.execute(delete(UploadPart).where(UploadPart.upload_id == upload_id))

    async def delete_expired_files(self, now: datetime, limit: int) -> int:
        """Expired files go, except those an unfinished job still uses (they go once it ends):
        the same rule DELETE /v1/files/{id} follows."""
        in_use = exists().where(
            Job.status.in_(ACTIVE_JOB_STATUSES),
            (Job.training_file == File.id) | (Job.validation_file == File.id),
        )
        ids = select(File.id).where(File.expires_at < now, ~in_use).limit(limit).scalar_subquery()
        deleted = (
            await self.session.scalars(delete(File).where(File.id.in_(ids)).returning(File.sha256))
        ).all()
        await BlobRepository(self.session).mark_seen(list(set(deleted)), now)
        return len(deleted)
