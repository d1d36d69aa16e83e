"""Outbound webhooks, sent as OpenAI sends them when a fine-tuning job finishes.

A background task, started and stopped by the app's lifespan, lets the state notice jobs that
have ended every `CHECK_INTERVAL_SECONDS` (`EmulatorState.refresh`, which only looks at jobs whose
end has come; every API request does the same, and `POST .../cancel` announces at once): each
job that becomes `succeeded`, `failed` or `cancelled` yields one event, `fine_tuning.job.<status>`,
POSTed to the configured URL with Standard Webhooks headers (`app.kit.signing`): signed when a
secret is set, only `webhook-id` and `webhook-timestamp` when not. Each job is noticed once,
whether or not a URL is set at that moment, so setting a URL later does not replay jobs that
finished before it.

A delivery that fails (connection error, timeout or non-2xx answer) is tried `ATTEMPTS` times in
all, the wait doubling from `FIRST_BACKOFF_SECONDS`, then dropped and logged. Retries keep the
event's `webhook-id` and are signed afresh. The outcome of the last `SENT_KEPT` deliveries is
kept for `GET /_emulator/webhooks`.

Configured by `create_emulator_app(webhook_url=..., webhook_secret=...)`, `tunegate emulator
--webhook-url ... --webhook-secret ...`, or at run time with `POST /_emulator/webhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

import httpx2

from app.kit import signing
from app.providers.emulator.state import EmulatorState, StoredJob
from app.providers.emulator.timeline import finished_at, job_status

CHECK_INTERVAL_SECONDS = 0.2
TIMEOUT_SECONDS = 5.0
ATTEMPTS = 4
FIRST_BACKOFF_SECONDS = 0.5
SENT_KEPT = 1000
USER_AGENT = "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)"
EVENT_TYPES = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}

log = logging.getLogger("tunegate.emulator.webhooks")


class InvalidWebhookTarget(ValueError):
    """A webhook URL or secret that cannot be used; `param` names which."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class WebhookTarget:
    """Where events go and the secret they are signed with (None: sent unsigned)."""

    url: str
    secret: str | None = None

    @classmethod
    def parse(cls, url: object, secret: object = None) -> WebhookTarget:
        """Check a URL (absolute http/https) and a secret (`whsec_<base64>` or a plain string)."""
        if not isinstance(url, str) or not url:
            raise InvalidWebhookTarget("'url' must be an http or https URL.", "url")
        try:
            parsed = httpx2.URL(url)
        except httpx2.InvalidURL:
            parsed = None
        if parsed is None or parsed.scheme not in {"http", "https"} or not parsed.host:
            raise InvalidWebhookTarget(f"'url' must be an http or https URL, not {url!r}.", "url")
        if secret is not None:
            if not isinstance(secret, str):
                raise InvalidWebhookTarget("'secret' must be a string.", "secret")
            try:
                signing.secret_bytes(secret)
            except signing.SignatureError as exc:  # its message never holds the secret
                raise InvalidWebhookTarget(f"Invalid 'secret': {exc}.", "secret") from None
        return cls(url, secret)


class WebhookSender:
    """Notices jobs that finish and delivers one event for each to the current target."""

    def __init__(self, state: EmulatorState, target: WebhookTarget | None = None) -> None:
        self.state = state
        self.target = target
        self.sent: deque[dict[str, Any]] = deque(maxlen=SENT_KEPT)
        self._deliveries: set[asyncio.Task[None]] = set()
        self._client: httpx2.AsyncClient | None = None
        state.end_listeners.append(self._job_ended)

    def as_json(self) -> dict[str, Any]:
        """What `GET /_emulator/webhooks` shows: never the secret, only whether one is set."""
        target = self.target
        return {
            "url": target.url if target else None,
            "secret_set": bool(target and target.secret),
            "sent": list(self.sent),
        }

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the checking loop (and its HTTP client) for as long as the context is open."""
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(TIMEOUT_SECONDS)) as client:
            self._client = client
            loop = asyncio.create_task(self._check_forever(), name="emulator-webhooks")
            try:
                yield
            finally:
                pending = [loop, *self._deliveries]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                self._client = None

    async def _check_forever(self) -> None:
        while True:
            try:
                # Also when no URL is set: a job must be noticed when it ends, not replayed later.
                self.state.tick()
            except Exception:
                # One bad look must not end webhooks for the life of the emulator.
                log.exception("emulator webhook check failed")
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)

    def _job_ended(self, job: StoredJob, now: float) -> None:
        """Start the delivery of a job's event, to the target in force at this moment."""
        if self.target is None or self._client is None:
            return
        event = _event(job, EVENT_TYPES[job_status(job, now)], now)
        task = asyncio.create_task(self._deliver(self._client, self.target, event, job.id))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(
        self,
        client: httpx2.AsyncClient,
        target: WebhookTarget,
        event: dict[str, Any],
        job_id: str,
    ) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        webhook_id = f"wh_{token_hex(16)}"
        record = {
            "id": event["id"],
            "webhook_id": webhook_id,
            "type": event["type"],
            "job_id": job_id,
        }
        outcome: dict[str, Any] = {}
        for attempt in range(1, ATTEMPTS + 1):
            if attempt > 1:
                await asyncio.sleep(FIRST_BACKOFF_SECONDS * 2 ** (attempt - 2))
            headers = {"content-type": "application/json", "user-agent": USER_AGENT}
            headers |= _signature_headers(target.secret, webhook_id, body)
            try:
                response = await client.post(target.url, content=body, headers=headers)
            except Exception as exc:  # whatever it was, the receiver did not get the event
                name = type(exc).__name__
                outcome = {"error": f"{name}: {exc}" if str(exc) else name}
                continue
            outcome = {"status_code": response.status_code}
            if response.is_success:
                self.sent.append(record | outcome | {"attempts": attempt})
                return
        self.sent.append(record | outcome | {"attempts": ATTEMPTS})
        log.warning(
            "emulator webhook %s (%s for %s) dropped after %d attempts: %s",
            event["id"],
            event["type"],
            job_id,
            ATTEMPTS,
            outcome,
        )


def _event(job: StoredJob, event_type: str, now: float) -> dict[str, Any]:
    """OpenAI's event body: `created_at` is when the job finished, `data` only names it."""
    return {
        "object": "event",
        "id": f"evt_{token_hex(16)}",
        "type": event_type,
        "created_at": int(finished_at(job, now) or now),
        "data": {"id": job.id},
    }


def _signature_headers(secret: str | None, webhook_id: str, body: bytes) -> dict[str, str]:
    # The real clock, not the emulator's: receivers check the timestamp against theirs.
    timestamp = int(time.time())
    if secret is None:
        return {signing.ID_HEADER: webhook_id, signing.TIMESTAMP_HEADER: str(timestamp)}
    return signing.headers([secret], webhook_id, timestamp, body)
