"""The `submitter` worker role: creates stored jobs at their provider, exactly once.

Loop: claim the oldest job that is stored but not submitted and due (`FOR UPDATE SKIP LOCKED`
plus a lease, `TUNEGATE_JOBS__SUBMIT_LEASE`), commit; with no transaction open, upload its files
to the provider (once per file and provider: remembered in `provider_files`), then look for a
provider job tagged with tunegate's job id (`metadata.tunegate_job_id`) and create one only if
there is none — so a retry after a timeout, a 5xx or a killed worker adopts the job the first
attempt created instead of making a second. The outcome is written only while the lease is
ours. Passing failures back off (2 s doubling to 5 min, Retry-After honoured, jitter) up to
`TUNEGATE_JOBS__MAX_SUBMIT_ATTEMPTS`; permanent refusals (400s, 403 training_not_available) fail
the job with the provider's message.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.dialects.postgresql import insert

from app.files.storage import BlobStorage, blob_key, make_storage
from app.jobs import state
from app.jobs.repository import SubmitQueue
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import File, Job, ProviderFile
from app.providers.base import Provider, ProviderError, ProviderJob
from app.providers.registry import build_providers, close_providers
from app.workers.runner import WorkerContext, register_role, take_work_until_stopped

log = get_logger("tunegate.jobs.submitter")

TAG = "tunegate_job_id"


def backoff(attempt: int, retry_after: float | None) -> timedelta:
    base = min(300.0, 2.0 * 2 ** max(0, attempt - 1))
    delay = max(base, retry_after or 0.0)
    return timedelta(seconds=delay * random.uniform(1.0, 1.25))


@dataclass(frozen=True)
class _Submission:
    """What the submitter needs of a claimed job, read before its transaction closes."""

    job_id: str
    attempts: int
    provider: str
    model: str
    method: dict[str, Any]
    suffix: str | None
    seed: int | None
    metadata: dict[str, str]
    training_file: str
    validation_file: str | None
    file_ids: tuple[str, ...]  # training, then validation
    files: dict[str, tuple[str, str]]  # file id -> (sha256, filename), for files still there
    known: dict[str, str]  # file id -> provider file id, for files uploaded before


async def _claim(worker: WorkerContext, lease: datetime) -> _Submission | None:
    async with worker.database.sessionmaker() as session, session.begin():
        job = await SubmitQueue(session).claim(utcnow(), lease)
        if job is None:
            return None
        files = [await session.get(File, file_id) for file_id in job.file_ids]
        uploaded = [await session.get(ProviderFile, (i, job.provider)) for i in job.file_ids]
        return _Submission(
            job_id=job.id,
            attempts=job.submit_attempts,
            provider=job.provider,
            model=job.model,
            method=job.method,
            suffix=job.suffix,
            seed=job.seed,
            metadata={**(job.job_metadata or {}), TAG: job.id},
            training_file=job.training_file,
            validation_file=job.validation_file,
            file_ids=tuple(job.file_ids),
            files={f.id: (f.sha256, f.filename) for f in files if f is not None},
            known={u.file_id: u.provider_file_id for u in uploaded if u is not None},
        )


async def submit_one(
    worker: WorkerContext, storage: BlobStorage, providers: dict[str, Provider]
) -> bool:
    """Claim and submit one job; False when there was nothing to do."""
    lease = utcnow() + worker.settings.jobs.submit_lease
    job = await _claim(worker, lease)
    if job is None:
        return False
    provider = providers.get(job.provider)
    known = dict(job.known)
    try:
        if provider is None:
            raise _NotConfigured(f"the provider '{job.provider}' is not configured on this worker")
        missing = [i for i in job.file_ids if i not in job.files]
        if missing:
            raise _FileGone(f"file {missing[0]} was deleted before the job was submitted")
        for file_id in job.file_ids:
            if file_id not in known:
                sha256, filename = job.files[file_id]
                known[file_id] = await _upload(worker, storage, provider, file_id, sha256, filename)
        found = await provider.find_job_by_metadata(TAG, job.job_id)
        upstream = found or await provider.create_job(
            model=job.model,
            training_file=known[job.training_file],
            validation_file=None if job.validation_file is None else known[job.validation_file],
            method=job.method,
            hyperparameters=None,
            suffix=job.suffix,
            seed=job.seed,
            metadata=job.metadata,
            idempotency_key=job.job_id,
        )
    except ProviderError as exc:
        await _record_failure(worker, job.job_id, lease, job.attempts, exc)
        return True
    if await _record_submitted(worker, job.job_id, lease, upstream, adopted=found is not None):
        await _cancel_upstream(worker, provider, job.job_id, upstream.id)
    return True


async def _cancel_upstream(
    worker: WorkerContext, provider: Provider, job_id: str, provider_job_id: str
) -> None:
    """The job was cancelled here while it was being created at the provider: cancel it there
    too, or say on the job that it could not be (the provider would go on training, and bill)."""
    try:
        await provider.cancel_job(provider_job_id)
        message, level = f"Cancelled at the provider too ({provider_job_id}).", "info"
    except ProviderError as exc:
        log.warning("could not cancel the provider's job", job_id=job_id, error=str(exc))
        message = (
            f"The job was cancelled while the provider was creating it, and cancelling it at "
            f"the provider ({provider_job_id}) failed: {exc}. Cancel it there by hand."
        )
        level = "error"
    async with worker.database.sessionmaker() as session, session.begin():
        job = await session.get(Job, job_id)
        if job is not None:
            state.add_event(session, job, message, level=level)


class _NotConfigured(ProviderError):
    """This worker has no such provider (its settings differ from the API's): retry later."""

    retryable = True

    def __init__(self, message: str) -> None:
        super().__init__(message, code="provider_not_configured", retry_after=60.0)


class _FileGone(ProviderError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_file", param="training_file")


async def _upload(
    worker: WorkerContext,
    storage: BlobStorage,
    provider: Provider,
    file_id: str,
    sha256: str,
    filename: str,
) -> str:
    async with storage.materialize(blob_key(sha256)) as path:
        provider_file_id = await provider.upload_file(filename, path, "fine-tune")
    async with worker.database.sessionmaker() as session, session.begin():
        await session.execute(
            insert(ProviderFile)
            .values(file_id=file_id, provider=provider.name, provider_file_id=provider_file_id)
            .on_conflict_do_nothing()
        )
    return provider_file_id


async def _record_failure(
    worker: WorkerContext, job_id: str, lease: datetime, attempts: int, exc: ProviderError
) -> None:
    retryable = exc.retryable
    async with worker.database.sessionmaker() as session, session.begin():
        job = await SubmitQueue(session).get_leased(job_id, lease)
        if job is None:  # another worker took over, or the job was cancelled meanwhile
            return
        job.lease_until = None
        job.last_submit_error = str(exc)
        if retryable and attempts < worker.settings.jobs.max_submit_attempts:
            job.next_attempt_at = utcnow() + backoff(attempts, exc.retry_after)
            log.warning(
                "submission failed; will retry", job_id=job_id, attempt=attempts, error=str(exc)
            )
            return
        error = {
            "code": exc.code or "provider_error",
            "message": exc.message,
            "param": exc.param,
        }
        log.warning("submission refused; job failed", job_id=job_id, error=error["code"])
        if not state.is_terminal(job.status):
            await state.transition(session, job, "failed", error=error)


async def _record_submitted(
    worker: WorkerContext, job_id: str, lease: datetime, upstream: ProviderJob, *, adopted: bool
) -> bool:
    """Store the provider's job; True when the job was cancelled here meanwhile (the caller
    then cancels it at the provider, with no transaction open)."""
    async with worker.database.sessionmaker() as session, session.begin():
        job = await SubmitQueue(session).get_leased(job_id, lease)
        if job is None:
            # Lost the lease: the provider job is found by its tag by whoever holds the job
            # now, so nothing is created twice.
            return False
        job.provider_job_id = upstream.id
        job.submitted_at = utcnow()
        job.lease_until = None
        job.last_submit_error = None
        job.sync_due_at = utcnow()  # the syncer follows it from now on
        log.info("job submitted", job_id=job_id, provider_job_id=upstream.id, adopted=adopted)
        if state.is_terminal(job.status):
            job.sync_due_at = None
            return job.status == "cancelled"
        if upstream.status != job.status and state.can_transition(job.status, upstream.status):
            await state.transition(session, job, upstream.status, error=upstream.error)
    return False


async def submitter_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    storage = make_storage(worker.settings)
    providers = build_providers(worker.settings)
    interval = worker.settings.jobs.poll_interval.total_seconds()
    try:
        await take_work_until_stopped(
            stop, interval, lambda: submit_one(worker, storage, providers)
        )
    finally:
        await close_providers(providers)
        await storage.close()


register_role("submitter", submitter_loop)
