"""The `syncer` worker role: keeps every submitted, unfinished job current with its provider.

Loop, per configured provider: take request tokens from the provider's shared rate budget
(`app/providers/budget.py`), claim that many due jobs (`FOR UPDATE SKIP LOCKED` plus a lease,
`TUNEGATE_JOBS__SYNC_LEASE`) and commit; then, with no transaction open, fetch each job, its new
events after the stored cursor, new checkpoints and, when it has just succeeded, its result
files; finally write everything in one transaction, only while the lease is still ours:
provider events (stored once: unique per job and provider event id), per-step metrics (from
metrics events, else from the result CSV), checkpoints, the job's fields, and any status change
through `jobs/state.py`. A syncer that dies mid-sync loses nothing: its lease expires and
another syncer repeats the sync, and every write is idempotent.

Scheduling: the next sync is due after the interval of the job's status (running, queued,
paused: settings) with ±10 % jitter; at once when a page of events was full or a sync was asked
for meanwhile (`POST …/sync`, an inbound provider webhook); failures back off exponentially
(5 s doubling up to `TUNEGATE_JOBS__SYNC_MAX_BACKOFF`, Retry-After honoured). A job the provider
no longer knows is failed after `TUNEGATE_JOBS__SYNC_NOT_FOUND_LIMIT` consecutive 404s.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import math
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.files.service import FilesContext, file_from_bytes
from app.files.storage import BlobStorage, make_storage
from app.jobs import state
from app.jobs.repository import SyncQueue, SyncWriter
from app.jobs.schemas import JobCheckpointObject
from app.kit.ids import new_id
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.models import Job, JobCheckpoint
from app.providers import budget
from app.providers.base import (
    Provider,
    ProviderCheckpoint,
    ProviderError,
    ProviderEvent,
    ProviderJob,
    ProviderNotFound,
)
from app.providers.registry import build_providers, close_providers
from app.registry.service import REFRESH_EVERY, refresh_base_models
from app.webhooks.events import emit
from app.workers.runner import WorkerContext, register_role

log = get_logger("tunegate.jobs.syncer")
T = TypeVar("T")

EVENT_PAGE = 1000
CHECKPOINT_PAGE = 100
REQUESTS_PER_SYNC = 3  # retrieve, events, checkpoints
RESULT_FILE_LIMIT = 64 * 1024 * 1024
RESULT_PURPOSE = "fine-tune-results"


def interval_for(settings: Settings, status: str) -> timedelta:
    jobs = settings.jobs
    if status == "running":
        return jobs.sync_interval_running
    if status == "paused":
        return jobs.sync_interval_paused
    return jobs.sync_interval_queued


def sync_backoff(settings: Settings, failures: int, retry_after: float | None) -> timedelta:
    ceiling = settings.jobs.sync_max_backoff.total_seconds()
    base = min(ceiling, 5.0 * 2 ** max(0, failures - 1))
    return timedelta(seconds=max(base, retry_after or 0.0) * random.uniform(1.0, 1.2))


@dataclass(frozen=True)
class _Claim:
    job_id: str
    project_id: str
    provider_job_id: str
    status: str
    event_cursor: str | None
    checkpoint_cursor: str | None
    failures: int
    lease: datetime
    claimed_at: datetime


@dataclass
class _Fetched:
    job: ProviderJob
    events: list[ProviderEvent]
    checkpoints: list[ProviderCheckpoint]
    results: list[tuple[str, bytes]]


class Syncer:
    """One process's syncer: claims due jobs of each provider and syncs them concurrently."""

    def __init__(
        self, worker: WorkerContext, providers: dict[str, Provider], storage: BlobStorage
    ) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.providers = providers
        self.files = FilesContext(worker.settings, storage, worker.database.sessionmaker)
        self.metrics = worker.sync_metrics
        self.running: set[asyncio.Task[None]] = set()
        self.registry_refreshed: float | None = None

    # Claiming

    async def claim(self, provider: str, limit: int) -> list[_Claim]:
        began = time.perf_counter()
        claims = await self._claim(provider, limit)
        for _ in claims:
            self.metrics.database.labels(provider).observe(
                (time.perf_counter() - began) / len(claims)
            )
        return claims

    async def _claim(self, provider: str, limit: int) -> list[_Claim]:
        now = utcnow()
        lease = now + self.settings.jobs.sync_lease
        async with self.worker.database.sessionmaker() as session, session.begin():
            jobs = await SyncQueue(session).claim(provider, now, lease, limit)
            return [
                _Claim(
                    job_id=job.id,
                    project_id=job.project_id,
                    provider_job_id=job.provider_job_id or "",
                    status=job.status,
                    event_cursor=job.event_cursor,
                    checkpoint_cursor=job.checkpoint_cursor,
                    failures=job.sync_failures,
                    lease=lease,
                    claimed_at=now,
                )
                for job in jobs
            ]

    async def refresh_registry(self) -> None:
        """Base models (shutdown dates …) from each provider, every `REFRESH_EVERY`."""
        now = time.monotonic()
        if self.registry_refreshed is not None and (
            now - self.registry_refreshed < REFRESH_EVERY.total_seconds()
        ):
            return
        self.registry_refreshed = now
        await refresh_base_models(self.worker.database.sessionmaker, self.providers)

    async def sweep(self) -> int:
        """Claim as many due jobs as there are free slots, keep those the provider's rate
        budget allows (the rest go back, due as they were), and start syncing them. An idle
        sweep is one query: the budget is only drawn on when there is work."""
        started = 0
        rate = self.settings.jobs.provider_requests_per_second
        sessionmaker = self.worker.database.sessionmaker
        for name, provider in self.providers.items():
            free = self.settings.jobs.sync_concurrency - len(self.running)
            if free <= 0:
                break
            claims = await self.claim(name, free)
            if not claims:
                continue
            granted = await budget.take(sessionmaker, name, len(claims) * REQUESTS_PER_SYNC, rate)
            kept, returned = (
                claims[: granted // REQUESTS_PER_SYNC],
                claims[granted // REQUESTS_PER_SYNC :],
            )
            if returned:
                async with sessionmaker() as session, session.begin():
                    await SyncQueue(session).release([c.job_id for c in returned], claims[0].lease)
            await budget.refund(sessionmaker, name, granted % REQUESTS_PER_SYNC, rate)
            for claim in kept:
                task = asyncio.create_task(self.sync(provider, claim))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
            started += len(kept)
        return started

    # One job

    async def sync(self, provider: Provider, claim: _Claim) -> None:
        began, wall = time.perf_counter(), time.time()
        try:
            await self._sync(provider, claim, began)
        finally:
            # Wall-clock bounds of each sync, for whoever checks that syncs never overlap.
            log.debug("job sync", job_id=claim.job_id, began=wall, ended=time.time())

    async def _sync(self, provider: Provider, claim: _Claim, began: float) -> None:
        written = 0.0
        try:
            fetched = await self._fetch(provider, claim)
            written = time.perf_counter()
            changed = await self._write(provider, claim, fetched)
        except ProviderError as exc:
            self.metrics.syncs.labels(provider.name, "error").inc()
            await self._record_failure(provider, claim, exc)
            return
        except Exception:
            # Fetching or writing (a result file that cannot be stored, a database error): the
            # job backs off with the failure on record instead of retrying unseen every lease.
            log.exception("sync failed unexpectedly", job_id=claim.job_id)
            self.metrics.syncs.labels(provider.name, "error").inc()
            await self._record_failure(
                provider, claim, ProviderError("tunegate failed to sync the job; see its logs")
            )
            return
        self.metrics.database.labels(provider.name).observe(time.perf_counter() - written)
        self.metrics.syncs.labels(provider.name, "changed" if changed else "ok").inc()
        self.metrics.duration.labels(provider.name).observe(time.perf_counter() - began)

    async def _call(self, provider: Provider, operation: str, call: Awaitable[T]) -> T:
        try:
            result = await call
        except ProviderError as exc:
            self.metrics.provider_calls.labels(provider.name, operation, type(exc).__name__).inc()
            raise
        self.metrics.provider_calls.labels(provider.name, operation, "ok").inc()
        return result

    async def _fetch(self, provider: Provider, claim: _Claim) -> _Fetched:
        upstream = await self._call(
            provider, "retrieve_job", provider.retrieve_job(claim.provider_job_id)
        )
        events = await self._call(
            provider,
            "list_events",
            provider.list_events(claim.provider_job_id, claim.event_cursor, EVENT_PAGE),
        )
        checkpoints: list[ProviderCheckpoint] = []
        if upstream.status not in {"validating_files", "queued"}:
            checkpoints = await self._call(
                provider,
                "list_checkpoints",
                provider.list_checkpoints(
                    claim.provider_job_id, claim.checkpoint_cursor, CHECKPOINT_PAGE
                ),
            )
        results: list[tuple[str, bytes]] = []
        if upstream.status == "succeeded" and claim.status != "succeeded":
            for file_id in upstream.result_files:
                results.append(
                    await self._call(
                        provider,
                        "download_file",
                        provider.download_file(file_id, RESULT_FILE_LIMIT),
                    )
                )
        return _Fetched(upstream, events, checkpoints, results)

    async def _write(self, provider: Provider, claim: _Claim, fetched: _Fetched) -> bool:
        upstream = fetched.job
        now = utcnow()
        async with self.worker.database.sessionmaker() as session, session.begin():
            job = await SyncQueue(session).get_leased(claim.job_id, claim.lease)
            if job is None:  # our lease ran out and another syncer has the job now
                return False
            writer = SyncWriter(session)
            if fetched.events:
                previous = await writer.last_provider_event_at(job.id)
                renames = await writer.provider_file_ids(job)
                if job.provider_job_id:
                    renames[job.provider_job_id] = job.id
                await writer.add_events(_event_rows(job, fetched.events, previous, renames))
            checkpoints = _checkpoint_rows(job, fetched.checkpoints)
            for new_checkpoint in _new(checkpoints, await writer.add_checkpoints(checkpoints)):
                await emit(
                    session,
                    job.project_id,
                    "fine_tuning.job.checkpoint.created",
                    job.id,
                    JobCheckpointObject.of(JobCheckpoint(**new_checkpoint)).model_dump(mode="json"),
                )
            await writer.add_metrics(_metric_rows(job.id, fetched.events))
            if fetched.events:
                job.event_cursor = fetched.events[-1].id
            if fetched.checkpoints:
                job.checkpoint_cursor = fetched.checkpoints[-1].id
            job.estimated_finish = _from_unix(upstream.estimated_finish)
            if upstream.trained_tokens is not None:
                job.trained_tokens = upstream.trained_tokens
            _adopt_hyperparameters(job, upstream)

            changed = False
            if upstream.status != job.status and not state.is_terminal(job.status):
                if upstream.status == "succeeded":
                    await self._finish(session, writer, job, upstream, fetched.results)
                if state.can_transition(job.status, upstream.status):
                    if state.is_terminal(upstream.status) and upstream.finished_at is not None:
                        # The provider's finishing time, already in the webhooks' job object.
                        job.finished_at = _from_unix(upstream.finished_at)
                    await state.transition(session, job, upstream.status, error=upstream.error)
                    changed = True
                    self._observe_lag(provider, upstream, fetched.events, now)
                else:
                    log.warning(
                        "provider status not applied",
                        job_id=job.id,
                        status=job.status,
                        provider_status=upstream.status,
                    )
            if state.is_terminal(job.status):
                job.sync_due_at = None
            elif len(fetched.events) >= EVENT_PAGE or (
                job.sync_requested_at is not None and job.sync_requested_at > claim.claimed_at
            ):
                job.sync_due_at = now
            else:
                jitter = random.uniform(0.9, 1.1)
                job.sync_due_at = now + interval_for(self.settings, job.status) * jitter
            job.sync_lease_until = None
            job.sync_failures = 0
            job.last_synced_at = now
            job.last_sync_error = None
            return changed

    async def _finish(
        self,
        session: AsyncSession,
        writer: SyncWriter,
        job: Job,
        upstream: ProviderJob,
        results: list[tuple[str, bytes]],
    ) -> None:
        job.fine_tuned_model = upstream.fine_tuned_model
        stored = []
        for filename, content in results:
            row = await file_from_bytes(
                session, self.files, job.project_id, filename, content, RESULT_PURPOSE
            )
            stored.append(row.id)
            await writer.add_metrics(_metric_rows_from_csv(job.id, content))
        job.result_files = stored
        if upstream.fine_tuned_model:
            await writer.add_fine_tuned_model(job, upstream.fine_tuned_model)

    def _observe_lag(
        self, provider: Provider, upstream: ProviderJob, events: list[ProviderEvent], now: datetime
    ) -> None:
        moments = [e.created_at for e in events if e.created_at]
        if upstream.finished_at:
            moments.append(upstream.finished_at)
        if moments:
            lag = max(0.0, now.timestamp() - max(moments))
            self.metrics.lag.labels(provider.name).observe(lag)

    async def _record_failure(self, provider: Provider, claim: _Claim, exc: ProviderError) -> None:
        failures = claim.failures + 1
        async with self.worker.database.sessionmaker() as session, session.begin():
            job = await SyncQueue(session).get_leased(claim.job_id, claim.lease)
            if job is None:
                return
            job.sync_lease_until = None
            job.sync_failures = failures
            job.last_sync_error = str(exc)[:2000]
            gone = isinstance(exc, ProviderNotFound)
            if gone and failures >= self.settings.jobs.sync_not_found_limit:
                error = {
                    "code": "provider_job_not_found",
                    "message": f"The provider no longer knows job {claim.provider_job_id}.",
                    "param": None,
                }
                if not state.is_terminal(job.status):
                    await state.transition(session, job, "failed", error=error)
                job.sync_due_at = None
                return
            job.sync_due_at = utcnow() + sync_backoff(self.settings, failures, exc.retry_after)
        log.warning(
            "sync failed; backing off",
            job_id=claim.job_id,
            provider=provider.name,
            failures=failures,
            error=str(exc),
        )

    async def drain(self) -> None:
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)


def _event_rows(
    job: Job,
    events: list[ProviderEvent],
    previous: datetime | None,
    renames: dict[str, str],
) -> list[dict[str, Any]]:
    """New provider events as rows, in the provider's order. Providers stamp events in whole
    seconds; each is stored at least a microsecond after the one before it (this batch's or an
    earlier one's, `previous`), so listings sort them exactly as the provider sent them.

    Messages name the job and its files by tunegate's ids (`renames`: the provider's id ->
    tunegate's), as the caller knows them."""
    rows = []
    for event in events:
        message = event.message
        for provider_id, ours in renames.items():
            message = message.replace(provider_id, ours)
        moment = _from_unix(event.created_at) or utcnow()
        if previous is not None and moment <= previous:
            moment = previous + timedelta(microseconds=1)
        previous = moment
        rows.append(
            {
                "id": new_id("ftevent-"),
                "job_id": job.id,
                "project_id": job.project_id,
                "level": event.level if event.level in {"info", "warn", "error"} else "info",
                "message": message,
                "type": event.type or "message",
                "data": event.data,
                "provider_event_id": event.id,
                "created_at": moment,
            }
        )
    return rows


def _new(rows: list[dict[str, Any]], inserted: set[str]) -> list[dict[str, Any]]:
    return [row for row in rows if row["id"] in inserted]


def _checkpoint_rows(job: Job, checkpoints: list[ProviderCheckpoint]) -> list[dict[str, Any]]:
    return [
        {
            "id": checkpoint.id,
            "job_id": job.id,
            "project_id": job.project_id,
            "fine_tuned_model_checkpoint": checkpoint.fine_tuned_model_checkpoint,
            "step_number": checkpoint.step_number,
            "metrics": checkpoint.metrics,
            "created_at": _from_unix(checkpoint.created_at) or utcnow(),
        }
        for checkpoint in checkpoints
    ]


def _number(value: object) -> float | None:
    """A finite number (JSON, and so PostgreSQL's jsonb, has no NaN or infinity), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _metric_values(record: dict[str, Any]) -> dict[str, float]:
    values = {}
    for key, raw in record.items():
        number = _number(raw)
        if key and key.strip() not in {"step", "total_steps"} and number is not None:
            values[key.strip()] = number
    return values


def _metric_rows(job_id: str, events: list[ProviderEvent]) -> list[dict[str, Any]]:
    """Per-step metrics from the provider's metrics events, one row per step."""
    rows = []
    for event in events:
        data = event.data or {}
        step = data.get("step")
        if event.type != "metrics" or not isinstance(step, int) or isinstance(step, bool):
            continue
        values = _metric_values(data)
        if values:
            created = _from_unix(event.created_at) or utcnow()
            rows.append({"job_id": job_id, "step": step, "values": values, "created_at": created})
    return rows


def _metric_rows_from_csv(job_id: str, content: bytes) -> list[dict[str, Any]]:
    """Steps of a result file (`step,train_loss,…`); those already known from metrics events
    are kept as they are (the insert ignores conflicts)."""
    now = utcnow()
    rows = []
    try:
        for record in csv.DictReader(io.StringIO(content.decode("utf-8-sig"))):
            try:
                step = int(record.get("step") or "")
            except ValueError:
                continue
            values = _metric_values(record)
            if values:
                rows.append({"job_id": job_id, "step": step, "values": values, "created_at": now})
    except (UnicodeDecodeError, csv.Error):
        return []
    return rows


def _adopt_hyperparameters(job: Job, upstream: ProviderJob) -> None:
    """The provider resolves "auto" hyperparameters once it starts; show the values it chose."""
    resolved = {
        key: value
        for key, value in (upstream.hyperparameters or {}).items()
        if value != "auto" and value is not None
    }
    if resolved and resolved != {k: job.hyperparameters.get(k) for k in resolved}:
        job.hyperparameters = {**job.hyperparameters, **resolved}
        method_type = job.method.get("type")
        if isinstance(method_type, str) and isinstance(job.method.get(method_type), dict):
            section = dict(job.method[method_type])
            section["hyperparameters"] = {**section.get("hyperparameters", {}), **resolved}
            job.method = {**job.method, method_type: section}


def _from_unix(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


async def syncer_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    storage = make_storage(worker.settings)
    providers = build_providers(worker.settings)
    syncer = Syncer(worker, providers, storage)
    idle = worker.settings.jobs.poll_interval.total_seconds()
    try:
        while not stop.is_set():
            await syncer.refresh_registry()
            started = await syncer.sweep()
            if started and len(syncer.running) < worker.settings.jobs.sync_concurrency:
                continue  # more jobs may be due
            # Nothing due, no budget left, or every slot busy: wait for a free slot, the poll
            # interval or the stop signal, whichever comes first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_slot_or_stop(stop, syncer), timeout=idle)
    finally:
        await syncer.drain()
        await close_providers(providers)
        await storage.close()


async def _slot_or_stop(stop: asyncio.Event, syncer: Syncer) -> None:
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    if syncer.running:
        waiters |= set(syncer.running)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            if waiter not in syncer.running:
                waiter.cancel()


register_role("syncer", syncer_loop)
