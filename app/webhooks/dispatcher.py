"""The `dispatcher` worker role: sends pending webhook deliveries, logs every attempt.

Loop: claim due deliveries (`FOR UPDATE SKIP LOCKED` plus a lease, `TUNEGATE_WEBHOOKS__LEASE`)
in a short transaction, at most `endpoint_concurrency` per endpoint so a slow receiver cannot
hold every slot; POST each one with no transaction open (Standard Webhooks headers, the same
`webhook-id` on every attempt, one signature per live secret, `TUNEGATE_WEBHOOKS__TIMEOUT` for
the whole attempt, redirects not followed); then write the outcomes in batches, each only while
its lease is still ours. 2xx is success; anything else, a timeout or a refused address is a
failure retried on `TUNEGATE_WEBHOOKS__RETRY_SCHEDULE` (jitter +-10 %, a longer Retry-After
honoured) until it runs out. `410 Gone` disables the endpoint at once; an endpoint with no
success for `TUNEGATE_WEBHOOKS__DISABLE_AFTER` is disabled; both record a
`webhook_endpoint.disabled` event.

A dispatcher killed mid-send loses nothing: its leases expire and another dispatcher (or the
same one, restarted) sends those deliveries again, with the same `webhook-id`, so consumers
deduplicate. A delivery waits while an earlier one to the same endpoint about the same object
is pending, so a consumer sees a job's events in the order they happened.

New events wake dispatchers through PostgreSQL LISTEN/NOTIFY; they also poll
(`TUNEGATE_WEBHOOKS__POLL_INTERVAL`), for retries that come due and in case a notice is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx2

from app import __version__
from app.config import Settings
from app.kit import signing
from app.kit.logging import get_logger
from app.kit.time import utcnow
from app.providers.base import retry_after_seconds
from app.webhooks.events import NOTIFY_CHANNEL, emit
from app.webhooks.repository import Claimed, DeliveryRepository, DispatchQueue, Outcome
from app.webhooks.schemas import EndpointObject
from app.webhooks.service import policy_of
from app.webhooks.targets import UnsafeTarget, is_refusal, safe_transport
from app.workers.runner import WorkerContext, register_role

log = get_logger("tunegate.webhooks.dispatcher")

RESPONSE_BODY_LIMIT = 2048
USER_AGENT = f"tunegate-webhooks/{__version__}"
WRITE_RETRIES = 3
COALESCE_SECONDS = 0.005
PURGE_EVERY_SECONDS = 3600.0
LISTEN_RETRY_SECONDS = 30.0
PURGE_BATCH = 1000
PURGE_BATCHES = 50


def next_attempt(
    settings: Settings, failures: int, retry_after: float | None, now: datetime
) -> datetime | None:
    """When to try again after the `failures`-th failed attempt in a row (1 = the first), or
    None when the schedule has run out."""
    schedule = settings.webhooks.retry_schedule
    if failures > len(schedule):
        return None
    delay = schedule[failures - 1].total_seconds() * random.uniform(0.9, 1.1)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return now + timedelta(seconds=delay)


class Dispatcher:
    def __init__(
        self,
        worker: WorkerContext,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        listen: bool = True,
    ) -> None:
        self.worker = worker
        self.settings = worker.settings
        config = worker.settings.webhooks
        self.concurrency = config.concurrency
        self.per_endpoint = config.endpoint_concurrency
        self.timeout = config.timeout.total_seconds()
        self.policy = policy_of(worker.settings)
        limits = httpx2.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        self.client = httpx2.AsyncClient(
            transport=transport or safe_transport(self.policy, limits=limits),
            timeout=self.timeout,
            follow_redirects=False,
            trust_env=False,
            headers={
                "user-agent": USER_AGENT,
                "content-type": "application/json",
                "accept-encoding": "identity",
            },
        )
        self.listen = listen
        self.name = f"{socket.gethostname()}:{os.getpid()}"[:128]
        self.sending: set[asyncio.Task[None]] = set()
        # Sends under way per endpoint (this process), for TUNEGATE_WEBHOOKS__ENDPOINT_CONCURRENCY.
        self.in_flight: Counter[str] = Counter()
        self.outcomes: list[Outcome] = []
        self.wake = asyncio.Event()
        self.written = asyncio.Event()
        self.closing = False
        self.next_purge = 0.0  # at start, then hourly
        self.listener: Any = None
        self.next_listen = 0.0
        self.metrics = worker.webhook_metrics

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self._keep_listening()
        writer = asyncio.create_task(self._write_loop(), name="webhooks:writer")
        try:
            while not stop.is_set():
                await self._purge_when_due()
                await self._keep_listening()
                self.wake.clear()
                if await self.claim_and_send() == 0:
                    await self._idle(stop)
                elif self.sending:
                    # Let a few more slots free up before the next claim: one claim for several.
                    await asyncio.sleep(COALESCE_SECONDS)
        finally:
            await self._drain()
            self.closing = True
            self.written.set()
            await writer
            if self.listener is not None:
                with contextlib.suppress(Exception):
                    await self.listener.close(timeout=2)
            await self.client.aclose()

    async def _purge_when_due(self) -> None:
        """Hourly: settled deliveries and their events older than TUNEGATE_WEBHOOKS__RETENTION
        go, a batch per short transaction."""
        if time.monotonic() < self.next_purge:
            return
        self.next_purge = time.monotonic() + PURGE_EVERY_SECONDS
        before = utcnow() - self.settings.webhooks.retention
        purged = 0
        for _ in range(PURGE_BATCHES):
            async with self.worker.database.sessionmaker() as session, session.begin():
                count = await DispatchQueue(session).purge(before, PURGE_BATCH)
            purged += count
            if count < PURGE_BATCH:
                break
        if purged:
            log.info("webhook deliveries purged", count=purged, before=before.isoformat())

    async def claim_and_send(self) -> int:
        """Claim what free slots allow and start sending it; how many were claimed."""
        free = self.concurrency - len(self.sending)
        if free <= 0:
            return 0
        now = utcnow()
        async with self.worker.database.sessionmaker() as session, session.begin():
            claimed = await DispatchQueue(session).claim(
                now, now + self.settings.webhooks.lease, free, self.per_endpoint, self.in_flight
            )
        for delivery in claimed:
            self.in_flight[delivery.endpoint_id] += 1
            task = asyncio.create_task(
                self._send(delivery), name=f"webhooks:{delivery.delivery_id}"
            )
            self.sending.add(task)
            task.add_done_callback(self._sent)
        return len(claimed)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.sending.discard(task)
        self.wake.set()  # a slot is free

    async def _idle(self, stop: asyncio.Event) -> None:
        interval = self.settings.webhooks.poll_interval.total_seconds()
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _drain(self) -> None:
        """On shutdown: let the attempts under way finish (each is bounded by the timeout)."""
        if self.sending:
            await asyncio.wait(set(self.sending), timeout=self.timeout + 1)

    # -- one attempt ------------------------------------------------------------------------

    async def _send(self, delivery: Claimed) -> None:
        try:
            outcome = await self._attempt(delivery)
        except Exception as exc:  # never lose the outcome of an attempt to a bug here
            log.exception("webhook attempt crashed", delivery_id=delivery.delivery_id)
            outcome = self._outcome(
                delivery, utcnow(), 0, None, None, f"internal error ({type(exc).__name__})", None
            )
        finally:
            self.in_flight[delivery.endpoint_id] -= 1
            if self.in_flight[delivery.endpoint_id] <= 0:
                del self.in_flight[delivery.endpoint_id]
        self.outcomes.append(outcome)
        self.written.set()

    async def _attempt(self, delivery: Claimed) -> Outcome:
        started_at = utcnow()
        if delivery.attempt_number == 1:
            self.metrics.lag.observe(max(0.0, (started_at - delivery.created_at).total_seconds()))
        headers = signing.headers(
            delivery.secrets, delivery.event_id, int(time.time()), delivery.body
        )
        clock = time.perf_counter()
        status: int | None = None
        body: str | None = None
        error: str | None = None
        retry_after: float | None = None
        outcome_label = "failed"
        try:
            # The URL was checked when it was saved; the policy may have changed since.
            self.policy.check_url(delivery.url)
            async with asyncio.timeout(self.timeout):
                async with self.client.stream(
                    "POST", delivery.url, content=delivery.body, headers=headers
                ) as response:
                    status = response.status_code
                    body = await _read_prefix(response)
                    retry_after = retry_after_seconds(response.headers)
            if 200 <= status < 300:
                outcome_label = "succeeded"
            elif 300 <= status < 400:
                error = f"the receiver answered {status} (a redirect); redirects are not followed"
            else:
                error = f"the receiver answered {status}"
        except TimeoutError:
            outcome_label, error = "timeout", f"no answer within {self.timeout:g} s"
        except UnsafeTarget as exc:
            outcome_label, error = "refused", f"refused by policy: {exc}"
        except httpx2.HTTPError as exc:
            if is_refusal(exc):
                outcome_label, error = "refused", f"refused by policy: {exc}"
            elif status is not None and 200 <= status < 300:
                outcome_label = "succeeded"  # the answer came; reading its body failed
            else:
                outcome_label = "error"
                error = f"could not deliver ({type(exc).__name__}): {exc}"[:500]
        duration = time.perf_counter() - clock
        self.metrics.attempts.labels(outcome_label).inc()
        self.metrics.duration.observe(duration)
        return self._outcome(
            delivery, started_at, int(duration * 1000), status, body, error, retry_after
        )

    def _outcome(
        self,
        delivery: Claimed,
        started_at: datetime,
        duration_ms: int,
        status: int | None,
        body: str | None,
        error: str | None,
        retry_after: float | None,
    ) -> Outcome:
        succeeded = error is None and status is not None
        gone = status == 410
        next_at = None
        if not succeeded and not gone:
            next_at = next_attempt(self.settings, delivery.failures + 1, retry_after, utcnow())
        return Outcome(
            claimed=delivery,
            started_at=started_at,
            duration_ms=duration_ms,
            status_code=status,
            response_body=body,
            error=error,
            succeeded=succeeded,
            gone=gone,
            next_attempt_at=next_at,
            dispatcher=self.name,
        )

    # -- writing outcomes -------------------------------------------------------------------

    def _take_outcomes(self) -> list[Outcome]:
        taken, self.outcomes = self.outcomes, []
        self.written.clear()
        return taken

    async def _write_loop(self) -> None:
        while True:
            await self.written.wait()
            batch = self._take_outcomes()
            if not batch and self.closing:
                return
            await self._write_batch(batch)
            self.wake.set()  # the next delivery of an ordered chain may go now
            if self.closing:
                self.written.set()  # one more round: write what came meanwhile, then stop

    async def _write_batch(self, batch: list[Outcome]) -> None:
        """Write the batch; if it fails, each outcome alone, so one bad row cannot take the
        others down. What still fails is sent again when its lease ends: at least once."""
        for attempt in range(1, WRITE_RETRIES + 1):
            try:
                await self._write(batch)
                return
            except Exception:
                log.exception("could not record webhook outcomes", attempt=attempt)
                if len(batch) > 1:
                    break
                await asyncio.sleep(attempt)
        if len(batch) > 1:
            for outcome in batch:
                await self._write_batch([outcome])

    async def _write(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        now = utcnow()
        async with self.worker.database.sessionmaker() as session, session.begin():
            queue = DispatchQueue(session)
            applied = await queue.record(outcomes)
            healthy = sorted({o.claimed.endpoint_id for o in applied if o.succeeded})
            failing = sorted({o.claimed.endpoint_id for o in applied if not o.succeeded})
            await queue.mark_healthy(healthy)
            failing = [endpoint for endpoint in failing if endpoint not in healthy]
            await queue.mark_failing(failing, now)
            gone = sorted({o.claimed.endpoint_id for o in applied if o.gone})
            disabled_before = now - self.settings.webhooks.disable_after
            for endpoint in await queue.to_disable(gone, failing, disabled_before):
                endpoint.status, endpoint.disabled_at = "disabled", now
                endpoint.updated_at = now
                endpoint.disabled_reason = (
                    "The receiver answered 410 Gone."
                    if endpoint.id in gone
                    else "Deliveries failed continuously since "
                    f"{endpoint.failing_since:%Y-%m-%d %H:%M} UTC."
                )
                await session.flush()
                await DeliveryRepository(session, endpoint.project_id).hold(endpoint.id)
                log.warning(
                    "webhook endpoint disabled",
                    endpoint_id=endpoint.id,
                    reason=endpoint.disabled_reason,
                )
                await emit(
                    session,
                    endpoint.project_id,
                    "webhook_endpoint.disabled",
                    endpoint.id,
                    EndpointObject.of(endpoint).model_dump(mode="json"),
                )

    # -- LISTEN/NOTIFY ----------------------------------------------------------------------

    async def _keep_listening(self) -> None:
        """(Re)open the LISTEN connection when it is missing or was lost, at most every 30 s;
        meanwhile the poll finds new work."""
        if not self.listen or (self.listener is not None and not self.listener.is_closed()):
            return
        if time.monotonic() < self.next_listen:
            return
        self.next_listen = time.monotonic() + LISTEN_RETRY_SECONDS
        self.listener = await self._listen()

    async def _listen(self) -> Any:
        """A connection of our own LISTENing for new events; None (polling only) on failure."""
        try:
            connection = await asyncpg.connect(self.worker.database.plain_dsn())
            await connection.add_listener(NOTIFY_CHANNEL, self._notified)
        except Exception as exc:
            log.warning("webhook dispatcher polls only: LISTEN failed", error=type(exc).__name__)
            return None
        return connection

    def _notified(self, *_: Any) -> None:
        self.wake.set()


async def _read_prefix(response: httpx2.Response) -> str:
    """The first 2 KB of the answer, as text; the rest is not read."""
    kept = bytearray()
    async for chunk in response.aiter_raw():
        kept += chunk
        if len(kept) >= RESPONSE_BODY_LIMIT:
            break
    return bytes(kept[:RESPONSE_BODY_LIMIT]).decode("utf-8", errors="replace")


async def dispatcher_loop(worker: WorkerContext, stop: asyncio.Event) -> None:
    await Dispatcher(worker).run(stop)


register_role("dispatcher", dispatcher_loop)
