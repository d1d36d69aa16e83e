"""HTTP client side of `tunegate jobs ...`: create, list, cancel and follow fine-tuning jobs on a
running tunegate through its OpenAI-compatible API (`/v1/fine_tuning/jobs`).

Reads are retried on connection errors, 408, 429 and 5xx with exponential backoff and jitter,
honouring `Retry-After`. A create is retried the same way under one `Idempotency-Key`, so a retry
never makes a second job, and waits while the server is still validating a large file (409
`validation_pending`). `watch` polls a job and its new events until the job ends.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2

from app.files.client import TunegateError
from app.providers.base import retry_after_seconds

JOBS = "/v1/fine_tuning/jobs"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_PAGE = 100
# Events up to this many seconds older than the newest one seen are read again on every poll:
# the syncer stores provider events with the provider's timestamps, up to one sync interval
# (2 minutes for a paused job) older than a local event (pause, resume) already shown. Longer
# catches later arrivals; shorter re-reads fewer events per poll.
EVENT_OVERLAP_SECONDS = 120
# How long `watch` keeps polling a server that does not answer before giving up.
OUTAGE_PATIENCE_SECONDS = 300.0
# How long a create waits for the server to finish validating a large training file.
VALIDATION_WAIT_SECONDS = 3600.0
VALIDATION_POLL_SECONDS = 2.0

Job = dict[str, Any]
Event = dict[str, Any]


class JobsError(TunegateError):
    """An error answer from tunegate, with the envelope's `code` and `param` as well."""

    def __init__(self, status: int, body: Any, retry_after: float | None = None) -> None:
        super().__init__(status, body)
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.code: str | None = error.get("code")
        self.param: str | None = error.get("param")
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 15.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        base = min(self.max_delay, self.base_delay * 2.0**attempt)
        return max(base, retry_after or 0.0) * random.uniform(1.0, 1.25)


def _answer(response: httpx2.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        raise JobsError(response.status_code, body, retry_after_seconds(response.headers))
    return body


def _transient_read(error: Exception) -> bool:
    if isinstance(error, httpx2.TransportError):
        return True
    return isinstance(error, JobsError) and (error.status in {408, 429} or error.status >= 500)


def _transient_create(error: Exception) -> bool:
    # Under an Idempotency-Key a failed create released its key and a finished one answers the
    # same job again, so anything transient may be retried; 409 from the key itself too.
    if isinstance(error, JobsError) and error.status == 409:
        return error.param == "Idempotency-Key" or error.code == "idempotency_key_in_progress"
    return _transient_read(error)


def surely_unsent(error: Exception) -> bool:
    """Retry a call that is not safe twice (cancel, create without Idempotency-Key) only when
    it surely did nothing: never sent, or refused before any work."""
    if isinstance(error, httpx2.ConnectError | httpx2.ConnectTimeout):
        return True
    return isinstance(error, JobsError) and error.status in {429, 502, 503, 504}


def method_object(method: str | None, hyperparameters: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's `method` object; None when nothing about the method was asked for."""
    if method is None and not hyperparameters:
        return None
    kind = method or "supervised"
    details = {"hyperparameters": hyperparameters} if hyperparameters else {}
    return {"type": kind, kind: details}


def steps_of(data: Any) -> tuple[int, int] | None:
    """(step, total_steps) of a metrics event's data, when it has them."""
    if not isinstance(data, dict):
        return None
    step, total = data.get("step"), data.get("total_steps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return min(step, total), total
    return None


def steps_of_event(event: Event) -> tuple[int, int] | None:
    return steps_of(event.get("data")) if event.get("type") == "metrics" else None


def _metrics_order(event: Event) -> tuple[int, int]:
    steps = steps_of(event.get("data"))
    return (steps[0] if steps else -1, int(event["created_at"]))


def oldest_first(newest_first: list[Event]) -> list[Event]:
    """Reverse the API's order. Events of the same second come in no useful order (providers
    stamp whole seconds), so within a second the metrics events are put in step order, in the
    places metrics events held; other events keep theirs."""
    events = list(reversed(newest_first))
    start = 0
    while start < len(events):
        end = start
        while end < len(events) and events[end]["created_at"] == events[start]["created_at"]:
            end += 1
        places = [i for i in range(start, end) if steps_of_event(events[i]) is not None]
        in_order = sorted((events[i] for i in places), key=_metrics_order)
        for place, event in zip(places, in_order, strict=True):
            events[place] = event
        start = end
    return events


@dataclass
class EventLog:
    """The events of one job printed so far, to hand out each new one exactly once."""

    seen: set[str] = field(default_factory=set)
    newest: int | None = None
    latest_metrics: Event | None = None

    def is_old(self, event: Event) -> bool:
        """Seen, and far enough below the newest seen event that nothing new is under it."""
        return (
            event["id"] in self.seen
            and self.newest is not None
            and int(event["created_at"]) < self.newest - EVENT_OVERLAP_SECONDS
        )

    def add(self, events: list[Event]) -> None:
        for event in events:
            self.seen.add(event["id"])
            self.newest = max(self.newest or 0, int(event["created_at"]))
            if event.get("type") == "metrics" and isinstance(event.get("data"), dict):
                if self.latest_metrics is None or _metrics_order(event) >= _metrics_order(
                    self.latest_metrics
                ):
                    self.latest_metrics = event


@dataclass(frozen=True)
class Update:
    """One poll of `watch`: the job as it is now and its events not handed out before."""

    job: Job
    events: list[Event]
    log: EventLog

    @property
    def finished(self) -> bool:
        return self.job["status"] in TERMINAL

    @property
    def metrics(self) -> dict[str, Any]:
        """The data of the latest metrics event (step, total_steps, train_loss, ...)."""
        latest = self.log.latest_metrics
        return dict(latest["data"]) if latest is not None else {}

    @property
    def steps(self) -> tuple[int, int] | None:
        """(step, total_steps) from the latest metrics event, when there is one."""
        return steps_of(self.metrics)


class JobsClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        events_page_size: int = MAX_PAGE,
    ) -> None:
        self.http = httpx2.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx2.Timeout(timeout, connect=10.0),
        )
        self.retry = retry or RetryPolicy()
        self.events_page_size = events_page_size

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        path: str,
        transient: Callable[[Exception], bool] = _transient_read,
        **kwargs: Any,
    ) -> Any:
        """Any call to tunegate's API with this client's retries: `transient` says which
        failures may be tried again (reads: connection errors, 408, 429, 5xx)."""
        attempt = 0
        while True:
            try:
                return _answer(self.http.request(method, path, **kwargs))
            except (httpx2.TransportError, JobsError) as exc:
                attempt += 1
                if attempt >= self.retry.attempts or not transient(exc):
                    raise
                retry_after = exc.retry_after if isinstance(exc, JobsError) else None
                time.sleep(self.retry.delay(attempt - 1, retry_after))

    def create(
        self,
        body: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        on_validation_pending: Callable[[JobsError], None] | None = None,
    ) -> Job:
        """POST a job. While the server is still validating a file (409 `validation_pending`)
        ask again every few seconds, telling `on_validation_pending` each time."""
        headers = {"Idempotency-Key": idempotency_key or f"tunegate-cli-{uuid.uuid4()}"}
        deadline = time.monotonic() + VALIDATION_WAIT_SECONDS
        while True:
            try:
                return dict(self.call("POST", JOBS, _transient_create, json=body, headers=headers))
            except JobsError as exc:
                if exc.code != "validation_pending" or time.monotonic() > deadline:
                    raise
                if on_validation_pending is not None:
                    on_validation_pending(exc)
                time.sleep(max(VALIDATION_POLL_SECONDS, exc.retry_after or 0.0))

    def retrieve(self, job_id: str) -> Job:
        return dict(self.call("GET", f"{JOBS}/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return dict(self.call("POST", f"{JOBS}/{job_id}/cancel", surely_unsent))

    def list_jobs(self, limit: int | None) -> tuple[list[Job], bool]:
        """The newest `limit` jobs (all of them when None), newest first, and whether there
        are more."""
        jobs: list[Job] = []
        after: str | None = None
        while True:
            wanted = MAX_PAGE if limit is None else min(MAX_PAGE, limit - len(jobs))
            params: dict[str, Any] = {"limit": wanted} | ({"after": after} if after else {})
            page = self.call("GET", JOBS, params=params)
            jobs += page["data"]
            more = bool(page["has_more"]) and bool(page["data"])
            if not more or (limit is not None and len(jobs) >= limit):
                return jobs, more
            after = page["data"][-1]["id"]

    def new_events(self, job_id: str, log: EventLog) -> list[Event]:
        """Events of the job not in `log`, oldest first, however many pages they fill; `log`
        then holds them too. The API lists newest first and pages toward older events, so read
        down until the events are ones seen well before."""
        fresh: list[Event] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": self.events_page_size}
            page = self.call(
                "GET",
                f"{JOBS}/{job_id}/events",
                params=params | ({"after": after} if after else {}),
            )
            events: list[Event] = page["data"]
            fresh += [event for event in events if event["id"] not in log.seen]
            if not page["has_more"] or not events or any(log.is_old(e) for e in events):
                break
            after = events[-1]["id"]
        fresh = oldest_first(fresh)
        log.add(fresh)
        return fresh

    def watch(
        self,
        job_id: str,
        interval: float,
        *,
        patience: float = OUTAGE_PATIENCE_SECONDS,
        on_outage: Callable[[Exception], None] | None = None,
    ) -> Iterator[Update]:
        """Poll the job and its events every `interval` seconds until the job has ended. The
        job is read before its events, so the last update holds the events of its ending.

        A server that stops answering (a restart, a deploy) is waited for up to `patience`
        seconds; `on_outage` hears of the first failure of each outage."""
        log = EventLog()
        failing_since: float | None = None
        while True:
            try:
                job = self.retrieve(job_id)
                events = self.new_events(job_id, log)
            except (httpx2.TransportError, JobsError) as exc:
                now = time.monotonic()
                if not _transient_read(exc) or now - (failing_since or now) > patience:
                    raise
                if failing_since is None and on_outage is not None:
                    on_outage(exc)
                failing_since = failing_since or now
                time.sleep(interval)
                continue
            failing_since = None
            update = Update(job, events, log)
            yield update
            if update.finished:
                return
            time.sleep(interval)
