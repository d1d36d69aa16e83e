"""The `validator` worker role: validates files too large to validate inside a request.

Loop: claim the oldest queued report (or a running one whose lease expired: its worker died)
with `FOR UPDATE SKIP LOCKED`, set a lease (`TUNEGATE_VALIDATION__LEASE`), commit; run the engine
with no transaction open; every progress report (at most one a second) writes bytes/lines done,
renews the lease and reads the cancel flag in one short transaction; the outcome is written
only while the lease is still ours. Idle workers poll every `TUNEGATE_VALIDATION__POLL_INTERVAL`.
A report whose engine keeps failing is marked failed after three attempts.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from app.files.storage import make_storage
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import File
from app.validation.engine import ValidationCancelled
from app.validation.repository import ValidationQueue
from app.validation.service import (
    ValidationContext,
    announce_finished,
    resolve_target,
    run_engine,
    succeeded_values,
)
from app.workers.runner import WorkerContext, register_role, take_work_until_stopped

log = get_logger("tunegate.validation.worker")

MAX_ATTEMPTS = 3
PROGRESS_EVERY_SECONDS = 1.0


class _LeaseLost(Exception):
    """Another worker took the report over; stop without writing anything."""


async def process_one(worker: WorkerContext, context: ValidationContext) -> bool:
    """Claim and validate one report; False when there was nothing to do."""
    settings = worker.settings.validation
    sessionmaker = worker.database.sessionmaker
    now = utcnow()
    lease = now + settings.lease
    async with sessionmaker() as session, session.begin():
        claimed = await ValidationQueue(session).claim(now, lease)
        if claimed is None:
            return False
        file = await session.get(File, claimed.file_id)
        report_id, attempts = claimed.id, claimed.attempts
        target_args = (claimed.model, claimed.method, claimed.n_epochs)
        if file is None or attempts > MAX_ATTEMPTS:
            claimed.status = "failed"
            claimed.error = (
                "The file was deleted." if file is None else "Validation failed three times."
            )
            claimed.finished_at = now
            await session.flush()
            await announce_finished(session, claimed)
            return True
        sha256, file_id = file.sha256, file.id

    loop = asyncio.get_running_loop()
    held = _Lease(lease, loop.time())

    async def report_progress(bytes_done: int, lines_done: int) -> bool:
        new_lease = utcnow() + settings.lease
        async with sessionmaker() as session, session.begin():
            row = await ValidationQueue(session).update_if_leased(
                report_id,
                held.until,
                bytes_done=bytes_done,
                lines_done=lines_done,
                lease_until=new_lease,
            )
        if row is None:
            raise _LeaseLost
        held.until = new_lease
        return not row.cancel_requested

    def progress(bytes_done: int, lines_done: int) -> bool:
        # Called from the engine's thread: hop onto the event loop for the database write.
        if loop.time() - held.reported_at < PROGRESS_EVERY_SECONDS:
            return True
        held.reported_at = loop.time()
        future = asyncio.run_coroutine_threadsafe(report_progress(bytes_done, lines_done), loop)
        return future.result()

    outcome: dict[str, object]
    try:
        target = resolve_target(worker.settings, *target_args)
        outcome = succeeded_values(await run_engine(context, sha256, target, progress), file_id)
    except ValidationCancelled:
        outcome = {"status": "cancelled", "finished_at": utcnow()}
    except _LeaseLost:
        log.warning("validation lease lost; another worker has it", report_id=report_id)
        return True
    except Exception as exc:
        log.exception("validation failed", report_id=report_id, attempt=attempts)
        if attempts < MAX_ATTEMPTS:
            outcome = {"status": "queued", "lease_until": None}
        else:
            outcome = {
                "status": "failed",
                "error": f"The validator failed ({type(exc).__name__}) three times.",
                "finished_at": utcnow(),
            }
    async with sessionmaker() as session, session.begin():
        written = await ValidationQueue(session).update_if_leased(report_id, held.until, **outcome)
        if written is not None:
            if outcome["status"] == "succeeded":
                written.bytes_done = written.bytes_total
                await session.flush()
            await announce_finished(session, written)
    return True


class _Lease:
    def __init__(self, until: datetime, reported_at: float) -> None:
        self.until = until
        self.reported_at = reported_at


async def validator_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    storage = make_storage(worker.settings)
    context = ValidationContext(worker.settings, storage, worker.database.sessionmaker)
    interval = worker.settings.validation.poll_interval.total_seconds()
    try:
        await take_work_until_stopped(stop, interval, lambda: process_one(worker, context))
    finally:
        await storage.close()


register_role("validator", validator_loop)
