"""SQL of webhooks: endpoints and the delivery log per project, and the dispatcher's queue."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    and_,
    bindparam,
    delete,
    exists,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.base import Base
from app.db.repository import ProjectScopedRepository
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent


class EndpointRepository(ProjectScopedRepository[WebhookEndpoint]):
    model = WebhookEndpoint

    async def count(self) -> int:
        return int(
            await self.session.scalar(
                select(func.count())
                .select_from(WebhookEndpoint)
                .where(WebhookEndpoint.project_id == self.project_id)
            )
            or 0
        )


class DeliveryRepository(ProjectScopedRepository[WebhookDelivery]):
    model = WebhookDelivery

    async def hold(self, endpoint_id: str) -> None:
        """A disabled endpoint's pending deliveries wait, off the dispatchers' queue."""
        await self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.project_id == self.project_id,
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.status == "pending",
            )
            .values(next_attempt_at=None)
        )

    async def release(self, endpoint_id: str, now: datetime) -> None:
        """Re-enabled: what waited is due now."""
        await self.session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.project_id == self.project_id,
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at.is_(None),
            )
            .values(next_attempt_at=now)
        )

    async def requeue(self, delivery: WebhookDelivery, now: datetime) -> None:
        """Pending again now with a fresh schedule and no lease (a late outcome of an earlier
        attempt no longer applies). A settled delivery goes to the end of its subject's order
        (a new `seq`); a pending one keeps its place, so what waits behind it still waits."""
        values: dict[str, Any] = {
            "status": "pending",
            "failures": 0,
            "next_attempt_at": now,
            "lease_until": None,
            "delivered_at": None,
        }
        if delivery.status != "pending":
            values["seq"] = func.nextval(func.pg_get_serial_sequence("webhook_deliveries", "seq"))
        await self.session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(**values)
        )
        await self.session.refresh(delivery)

    async def attempts_of(self, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
        found: dict[str, list[WebhookAttempt]] = defaultdict(list)
        if delivery_ids:
            rows = await self.session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.delivery_id.in_(delivery_ids))
                .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number, WebhookAttempt.id)
            )
            for row in rows:
                found[row.delivery_id].append(row)
        return found

    async def body_of(self, event_id: str) -> str | None:
        body: str | None = await self.session.scalar(
            select(WebhookEvent.body).where(
                WebhookEvent.id == event_id, WebhookEvent.project_id == self.project_id
            )
        )
        return body


@dataclass(frozen=True)
class Claimed:
    """A delivery a dispatcher holds, with what it needs to send it."""

    delivery_id: str
    event_id: str
    endpoint_id: str
    project_id: str
    url: str
    secrets: tuple[str, ...]
    body: bytes
    attempt_number: int
    failures: int
    lease_until: datetime
    created_at: datetime


@dataclass(frozen=True)
class Outcome:
    claimed: Claimed
    started_at: datetime
    duration_ms: int
    status_code: int | None
    response_body: str | None
    error: str | None
    succeeded: bool
    gone: bool  # 410: the receiver says the endpoint is gone for good
    next_attempt_at: datetime | None  # None: the schedule is exhausted (or succeeded)
    dispatcher: str


_ATTEMPTS_INSERT = insert(WebhookAttempt)

# One statement for every outcome of a batch (executemany): succeeded, failed for good, or due
# again later; the lease is released either way.
_DELIVERIES = Base.metadata.tables["webhook_deliveries"]
_WHEN = DateTime(timezone=True)
_SETTLE = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        lease_until=None,
        last_attempt_at=bindparam("b_started_at"),
        last_status_code=bindparam("b_status_code"),
        last_error=bindparam("b_error"),
        delivered_at=func.coalesce(
            bindparam("b_delivered_at", type_=_WHEN), _DELIVERIES.c.delivered_at
        ),
        next_attempt_at=func.coalesce(
            bindparam("b_next_attempt_at", type_=_WHEN), _DELIVERIES.c.next_attempt_at
        ),
        failures=_DELIVERIES.c.failures + bindparam("b_failed", type_=Integer),
    )
)


def _settled(outcome: Outcome) -> dict[str, Any]:
    status = "pending"
    if outcome.succeeded:
        status = "succeeded"
    elif outcome.next_attempt_at is None:
        status = "failed"
    return {
        "b_id": outcome.claimed.delivery_id,
        "b_status": status,
        "b_started_at": outcome.started_at,
        "b_status_code": outcome.status_code,
        "b_error": _storable(outcome.error),
        "b_delivered_at": outcome.started_at if outcome.succeeded else None,
        "b_next_attempt_at": outcome.next_attempt_at,
        "b_failed": 0 if outcome.succeeded else 1,
    }


# One cached statement (built once, not per call). Per enabled endpoint (LATERAL, on the index
# of its pending deliveries by due time) the oldest claimable deliveries, numbered; keep those
# within the endpoint's room; take the first of every endpoint, then the second ...; lock what
# no other dispatcher has locked meanwhile (SKIP LOCKED, conditions checked again) and lease it.
_CLAIM = text(
    """
    WITH room AS (
        SELECT * FROM unnest(CAST(:busy_ids AS text[]), CAST(:busy_counts AS int[]))
            AS r(endpoint_id, in_flight)
    ), candidates AS (
        SELECT c.id, c.rank, c.next_attempt_at, c.seq
        FROM webhook_endpoints e
        CROSS JOIN LATERAL (
            SELECT d.id, d.next_attempt_at, d.seq,
                   row_number() OVER (ORDER BY d.next_attempt_at, d.seq) AS rank
            FROM webhook_deliveries d
            WHERE d.endpoint_id = e.id
              AND d.status = 'pending'
              AND d.next_attempt_at <= :now
              AND (d.lease_until IS NULL OR d.lease_until < :now)
              AND NOT EXISTS (
                  SELECT 1 FROM webhook_deliveries p
                  WHERE p.endpoint_id = d.endpoint_id AND p.subject = d.subject
                    AND p.status = 'pending' AND p.seq < d.seq
              )
            ORDER BY d.next_attempt_at, d.seq
            LIMIT :per_endpoint
        ) c
        LEFT JOIN room ON room.endpoint_id = e.id
        WHERE e.status = 'enabled' AND c.rank <= :per_endpoint - coalesce(room.in_flight, 0)
        ORDER BY c.rank, c.next_attempt_at, c.seq
        LIMIT :limit
    ), picked AS (
        SELECT w.id FROM webhook_deliveries w JOIN candidates ON candidates.id = w.id
        WHERE w.status = 'pending' AND (w.lease_until IS NULL OR w.lease_until < :now)
        FOR UPDATE OF w SKIP LOCKED
    )
    UPDATE webhook_deliveries d
    SET lease_until = :lease_until, attempt_count = d.attempt_count + 1
    FROM picked WHERE d.id = picked.id
    RETURNING d.id, d.event_id, d.endpoint_id, d.project_id, d.attempt_count, d.failures,
              d.seq, d.created_at
    """
)


class DispatchQueue:
    """The dispatcher's view of every project's deliveries."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(
        self,
        now: datetime,
        lease_until: datetime,
        limit: int,
        per_endpoint: int,
        in_flight: Mapping[str, int],
    ) -> list[Claimed]:
        """Lease up to `limit` due deliveries of enabled endpoints: per endpoint its oldest, at
        most `per_endpoint` minus what this dispatcher already has in flight there, endpoints
        taken in turn so one endpoint's backlog cannot starve the others. A delivery waits while
        an earlier one to the same endpoint about the same subject is still pending (so a
        consumer sees a job's events in order)."""
        busy = sorted(in_flight)
        leased = (
            await self.session.execute(
                _CLAIM,
                {
                    "now": now,
                    "lease_until": lease_until,
                    "limit": limit,
                    "per_endpoint": per_endpoint,
                    "busy_ids": busy,
                    "busy_counts": [in_flight[endpoint] for endpoint in busy],
                },
            )
        ).all()
        if not leased:
            return []
        endpoint_ids = {row.endpoint_id for row in leased}
        event_ids = {row.event_id for row in leased}
        endpoints = {
            row.id: row
            for row in (
                await self.session.execute(
                    select(
                        WebhookEndpoint.id,
                        WebhookEndpoint.url,
                        WebhookEndpoint.secret,
                        WebhookEndpoint.previous_secret,
                        WebhookEndpoint.previous_secret_expires_at,
                    ).where(WebhookEndpoint.id.in_(endpoint_ids))
                )
            ).all()
        }
        bodies = dict(
            (
                await self.session.execute(
                    select(WebhookEvent.id, WebhookEvent.body).where(WebhookEvent.id.in_(event_ids))
                )
            )
            .tuples()
            .all()
        )
        claimed = []
        for row in sorted(leased, key=lambda r: r.seq):
            endpoint = endpoints[row.endpoint_id]
            secrets = [endpoint.secret]
            if endpoint.previous_secret and (
                endpoint.previous_secret_expires_at is not None
                and endpoint.previous_secret_expires_at > now
            ):
                secrets.append(endpoint.previous_secret)
            claimed.append(
                Claimed(
                    delivery_id=row.id,
                    event_id=row.event_id,
                    endpoint_id=row.endpoint_id,
                    project_id=row.project_id,
                    url=endpoint.url,
                    secrets=tuple(secrets),
                    body=bodies[row.event_id].encode(),
                    attempt_number=row.attempt_count,
                    failures=row.failures,
                    lease_until=lease_until,
                    created_at=row.created_at,
                )
            )
        return claimed

    async def record(self, outcomes: Sequence[Outcome]) -> list[Outcome]:
        """Log every attempt of a delivery that still exists, and settle each delivery whose
        lease is still ours; the outcomes that were applied (a lost lease means another
        dispatcher owns the delivery now; a deleted endpoint took its deliveries with it).

        Locks endpoints before deliveries, in id order, as deleting an endpoint does."""
        endpoint_ids = sorted({o.claimed.endpoint_id for o in outcomes})
        await self.session.execute(
            select(WebhookEndpoint.id)
            .where(WebhookEndpoint.id.in_(endpoint_ids))
            .order_by(WebhookEndpoint.id)
            .with_for_update(key_share=True)  # FOR NO KEY UPDATE: emit's KEY SHARE still goes
        )
        leases = dict(
            (
                await self.session.execute(
                    select(WebhookDelivery.id, WebhookDelivery.lease_until)
                    .where(WebhookDelivery.id.in_([o.claimed.delivery_id for o in outcomes]))
                    .order_by(WebhookDelivery.id)
                    .with_for_update()
                )
            )
            .tuples()
            .all()
        )
        outcomes = [o for o in outcomes if o.claimed.delivery_id in leases]
        if not outcomes:
            return []
        await self.session.execute(
            _ATTEMPTS_INSERT,
            [
                {
                    "delivery_id": o.claimed.delivery_id,
                    "number": o.claimed.attempt_number,
                    "started_at": o.started_at,
                    "duration_ms": o.duration_ms,
                    "status_code": o.status_code,
                    "response_body": _storable(o.response_body),
                    "error": _storable(o.error),
                    "dispatcher": o.dispatcher,
                }
                for o in outcomes
            ],
        )
        applied = [o for o in outcomes if leases[o.claimed.delivery_id] == o.claimed.lease_until]
        if applied:
            await self.session.execute(_SETTLE, [_settled(o) for o in applied])
        return applied

    async def mark_healthy(self, endpoint_ids: Sequence[str]) -> None:
        if endpoint_ids:
            await self.session.execute(
                update(WebhookEndpoint)
                .where(
                    WebhookEndpoint.id.in_(endpoint_ids), WebhookEndpoint.failing_since.is_not(None)
                )
                .values(failing_since=None)
            )

    async def mark_failing(self, endpoint_ids: Sequence[str], since: datetime) -> None:
        if endpoint_ids:
            await self.session.execute(
                update(WebhookEndpoint)
                .where(
                    WebhookEndpoint.id.in_(endpoint_ids), WebhookEndpoint.failing_since.is_(None)
                )
                .values(failing_since=since)
            )

    async def to_disable(
        self, gone: Sequence[str], failing: Sequence[str], failing_before: datetime
    ) -> Sequence[WebhookEndpoint]:
        """Enabled endpoints among `gone`, and among `failing` those failing since before
        `failing_before`; locked, for the caller to disable."""
        if not gone and not failing:
            return []
        rows = await self.session.scalars(
            select(WebhookEndpoint)
            .where(
                WebhookEndpoint.status == "enabled",
                WebhookEndpoint.id.in_(gone)
                | and_(
                    WebhookEndpoint.id.in_(failing),
                    WebhookEndpoint.failing_since <= failing_before,
                ),
            )
            .with_for_update()
        )
        return rows.all()

    async def purge(self, before: datetime, batch: int = 1000) -> int:
        """Delete up to `batch` deliveries settled (succeeded or failed) and made before
        `before`, their attempts with them, and up to `batch` events from before then that
        have no delivery left (theirs purged, or their endpoint deleted); how many deliveries
        went."""
        doomed = (
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status.in_(("succeeded", "failed")),
                WebhookDelivery.created_at < before,
            )
            .limit(batch)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        gone = (
            await self.session.scalars(
                delete(WebhookDelivery)
                .where(WebhookDelivery.id.in_(doomed))
                .returning(WebhookDelivery.id)
            )
        ).all()
        orphans = (
            select(WebhookEvent.id)
            .where(
                WebhookEvent.created_at < before,
                ~exists().where(WebhookDelivery.event_id == WebhookEvent.id),
            )
            .limit(batch)
            .scalar_subquery()
        )
        await self.session.execute(delete(WebhookEvent).where(WebhookEvent.id.in_(orphans)))
        return len(gone)


def _storable(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a receiver's answer may."""
    return None if text is None else text.replace("\x00", "\ufffd")
