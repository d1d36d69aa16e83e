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
import contextlib
import random
from datetime import datetime, timedelta

from sqlalchemy.dialects.postgresql import insert

from app.files.storage import BlobStorage, blob_key, make_storage
from app.jobs import state
from app.jobs.repository import SubmitQueue
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import File, ProviderFile
from app.providers.base import Provider, ProviderError, ProviderJob
from app.providers.registry import build_providers, close_providers
from app.workers.runner import WorkerContext, register_role

log = get_logger("tunegate.jobs.submitter")

TAG = "tunegate_job_id"


def backoff(attempt: int, retry_after: float | None) -> timedelta:
    base = min(300.0, 2.0 * 2 ** max(0, attempt - 1))
    delay = max(base, retry_after or 0.0)
    return timedelta(seconds=delay * random.uniform(1.0, 1.25))


async def submit_one(
    worker: WorkerContext, storage: BlobStorage, providers: dict[str, Provider]
) -> bool:
    """Claim and submit one job; False when there was nothing to do."""
    settings = worker.settings.jobs
    sessionmaker = worker.database.sessionmaker
    now = utcnow()
    lease = now + settings.submit_lease
    async with sessionmaker() as session, session.begin():
        job = await SubmitQueue(session).claim(now, lease)
        if job is None:
            return False
        job_id, attempts, provider_name = job.id, job.submit_attempts, job.provider
        file_ids = [f for f in (job.training_file, job.validation_file) if f is not None]
        files = {
            f.id: (f.sha256, f.filename)
            for f in [await session.get(File, i) for i in file_ids]
            if f
        }
        known = {
            row.file_id: row.provider_file_id
            for row in [await session.get(ProviderFile, (i, provider_name)) for i in file_ids]
            if row is not None
        }
        request = {
            "model": job.model,
            "method": job.method,
            "suffix": job.suffix,
            "seed": job.seed,
            "metadata": {**(job.job_metadata or {}), TAG: job.id},
        }
        training_file, validation_file = job.training_file, job.validation_file

    provider = providers.get(provider_name)
    try:
        if provider is None:
            raise _NotConfigured(provider_name)
        missing = [i for i in file_ids if i not in files]
        if missing:
            raise _FileGone(missing[0])
        for file_id in file_ids:
            if file_id not in known:
                known[file_id] = await _upload(worker, storage, provider, file_id, *files[file_id])
        found = await provider.find_job_by_metadata(TAG, job_id)
        upstream = found or await provider.create_job(
            model=str(request["model"]),
            training_file=known[training_file],
            validation_file=None if validation_file is None else known[validation_file],
            method=request["method"],  # type: ignore[arg-type]
            hyperparameters=None,
            suffix=request["suffix"],  # type: ignore[arg-type]
            seed=request["seed"],  # type: ignore[arg-type]
            metadata=request["metadata"],  # type: ignore[arg-type]
            idempotency_key=job_id,
        )
    except (ProviderError, _NotConfigured, _FileGone) as exc:
        await _record_failure(worker, job_id, lease, attempts, exc)
        return True
    await _record_submitted(worker, job_id, lease, upstream, adopted=found is not None)
    return True


class _NotConfigured(Exception):
    retryable = True
    retry_after = 60.0
    code = "provider_not_configured"
    param = None

    def __init__(self, name: str) -> None:
        super().__init__(f"the provider '{name}' is not configured on this worker")


class _FileGone(Exception):
    retryable = False
    retry_after = None
    code = "invalid_file"
    param = "training_file"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"file {file_id} was deleted before the job was submitted")


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
    worker: WorkerContext, job_id: str, lease: datetime, attempts: int, exc: Exception
) -> None:
    retryable = bool(getattr(exc, "retryable", False))
    async with worker.database.sessionmaker() as session, session.begin():
        job = await SubmitQueue(session).get_leased(job_id, lease)
        if job is None:  # another worker took over, or the job was cancelled meanwhile
            return
        job.lease_until = None
        job.last_submit_error = str(exc)
        if retryable and attempts < worker.settings.jobs.max_submit_attempts:
            job.next_attempt_at = utcnow() + backoff(attempts, getattr(exc, "retry_after", None))
            log.warning(
                "submission failed; will retry", job_id=job_id, attempt=attempts, error=str(exc)
            )
            return
        error = {
            "code": getattr(exc, "code", None) or "provider_error",
            "message": str(exc),
            "param": getattr(exc, "param", None),
        }
        log.warning("submission refused; job failed", job_id=job_id, error=error["code"])
        if not state.is_terminal(job.status):
            await state.transition(session, job, "failed", error=error)


async def _record_submitted(
    worker: WorkerContext, job_id: str, lease: datetime, upstream: ProviderJob, *, adopted: bool
) -> None:
    async with worker.database.sessionmaker() as session, session.begin():
        job = await SubmitQueue(session).get_leased(job_id, lease)
        if job is None:
            # Lost the lease (or the job was cancelled): the provider job is found by its tag
            # by whoever holds the job now, so nothing is created twice.
            return
        job.provider_job_id = upstream.id
        job.submitted_at = utcnow()
        job.lease_until = None
        job.last_submit_error = None
        log.info("job submitted", job_id=job_id, provider_job_id=upstream.id, adopted=adopted)
        if upstream.status != job.status and state.can_transition(job.status, upstream.status):
            await state.transition(session, job, upstream.status, error=upstream.error)


async def submitter_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    storage = make_storage(worker.settings)
    providers = build_providers(worker.settings)
    interval = worker.settings.jobs.poll_interval.total_seconds()
    try:
        while not stop.is_set():
            if await submit_one(worker, storage, providers):
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        await close_providers(providers)
        await storage.close()


register_role("submitter", submitter_loop)
