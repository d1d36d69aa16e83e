"""The `maintenance` worker role: expires Uploads and Files and collects garbage.

Every `TUNEGATE_FILES__MAINTENANCE_INTERVAL` one replica (a PostgreSQL advisory lock decides
which) runs a round:
- pending Uploads past `expires_at` become `expired`;
- parts of Uploads that are no longer pending are removed from storage, then from the database;
- Files past their `expires_after` are deleted;
- blobs no File references and not seen for `TUNEGATE_FILES__BLOB_GC_GRACE` are removed;
- spool files left by processes that died mid-upload are removed;
- Idempotency-Keys and inbound provider webhook ids older than 24 hours are forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from sqlalchemy import text

from app.files.repository import BlobRepository, MaintenanceRepository
from app.files.storage import BlobStorage
from app.jobs.repository import WebhookReceipts
from app.kit import idempotency
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.workers.runner import WorkerContext, register_role

log = get_logger("tunegate.files.maintenance")

# Any fixed 64-bit number, the same on every replica.
MAINTENANCE_LOCK_KEY = 0x7475_6E65_6761_7465 & 0x7FFF_FFFF_FFFF_FFFF
BATCH = 100


@dataclass
class RoundReport:
    idempotency_keys_purged: int = 0
    webhook_receipts_purged: int = 0
    uploads_expired: int = 0
    uploads_purged: int = 0
    files_expired: int = 0
    blobs_collected: int = 0
    spool_files_removed: int = 0

    def did_work(self) -> bool:
        return any(vars(self).values())


async def run_round(context: WorkerContext, storage: BlobStorage) -> RoundReport | None:
    """One maintenance round, unless another replica holds the lock (then None)."""
    async with context.database.engine.connect() as lock_connection:
        await lock_connection.execution_options(isolation_level="AUTOCOMMIT")
        got = await lock_connection.scalar(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": MAINTENANCE_LOCK_KEY}
        )
        if not got:
            return None
        try:
            return await _round(context, storage)
        finally:
            await lock_connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": MAINTENANCE_LOCK_KEY}
            )


async def _round(context: WorkerContext, storage: BlobStorage) -> RoundReport:
    report = RoundReport()
    settings = context.settings.files
    sessionmaker = context.database.sessionmaker
    now = utcnow()
    async with sessionmaker() as session, session.begin():
        maintenance = MaintenanceRepository(session)
        report.uploads_expired = await maintenance.expire_uploads(now)
        report.files_expired = await maintenance.delete_expired_files(now, BATCH)
        report.idempotency_keys_purged = await idempotency.purge_expired(session)
        report.webhook_receipts_purged = await WebhookReceipts(session).purge(now)

    async with sessionmaker() as session:
        finished = await MaintenanceRepository(session).finished_uploads_to_purge(BATCH)
    for upload_id in finished:
        # Storage first, rows after: a crash in between only repeats the deletion next round.
        keys = [key async for key, _ in storage.list_keys(f"uploads/{upload_id}/")]
        for key in keys:
            await storage.delete(key)
        async with sessionmaker() as session, session.begin():
            maintenance = MaintenanceRepository(session)
            await maintenance.delete_parts(upload_id)
            await maintenance.mark_purged(upload_id, utcnow())
        report.uploads_purged += 1

    seen_before = now - settings.blob_gc_grace
    while True:
        async with sessionmaker() as session, session.begin():
            blobs = await BlobRepository(session).claim_unreferenced(seen_before, BATCH)
            # The row stays locked while its content is deleted: an upload of the same content
            # waits on the lock (BlobRepository.touch), then finds the blob gone and stores it
            # again. This is the one place a storage call runs inside a transaction.
            for blob in blobs:
                await storage.delete(blob.storage_key)
                await BlobRepository(session).remove(blob.sha256)
        report.blobs_collected += len(blobs)
        if len(blobs) < BATCH:
            break

    report.spool_files_removed = await asyncio.to_thread(
        storage.sweep_spool, now - settings.upload_ttl
    )
    return report


async def maintenance_loop(context: WorkerContext, stop: asyncio.Event) -> None:
    from app.files.storage import make_storage

    storage = make_storage(context.settings)
    interval = context.settings.files.maintenance_interval.total_seconds()
    try:
        while not stop.is_set():
            report = await run_round(context, storage)
            if report is not None and report.did_work():
                log.info("maintenance round", **vars(report))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        await storage.close()


register_role("maintenance", maintenance_loop)
