"""SQL of webhooks: endpoints and the delivery log per project, and the dispatcher's queue."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, exists, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

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
        """Pending again now, at the end of its subject's order (a new `seq`), with a fresh
        schedule and no lease (a late outcome of an earlier attempt no longer applies)."""
        await self.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery.id)
            .values(
                status="pending",
                failures=0,
                next_attempt_at=now,
                lease_until=None,
                delivered_at=None,
                seq=func.nextval(func.pg_get_serial_sequence("webhook_deliveries", "seq")),
            )
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


class DispatchQueue:
    """The dispatcher's view of every project's deliveries."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(
        self, now: datetime, lease_until: datetime, limit: int, per_endpoint: int
    ) -> list[Claimed]:
        """Lease up to `limit` due deliveries of enabled endpoints, so that no endpoint has more
        than `per_endpoint` leased at once (across every dispatcher), taking endpoints in turn
        (each one's oldest first) so one endpoint's backlog cannot starve the others. A delivery
        waits while an earlier one to the same endpoint about the same subject is still pending
        (so a consumer sees a job's events in order)."""
        earlier = aliased(WebhookDelivery)
        delivery = WebhookDelivery
        in_flight = and_(delivery.lease_until.is_not(None), delivery.lease_until >= now)
        free = (delivery.lease_until.is_(None)) | (delivery.lease_until < now)
        claimable = and_(
            delivery.next_attempt_at <= now,
            free,
            ~exists().where(
                earlier.endpoint_id == delivery.endpoint_id,
                earlier.subject == delivery.subject,
                earlier.status == "pending",
                earlier.seq < delivery.seq,
            ),
        )
        # Per endpoint: the deliveries in flight first, then the claimable ones by due time.
        ranked = (
            select(
                delivery.id,
                claimable.label("claimable"),
                func.row_number()
                .over(
                    partition_by=delivery.endpoint_id,
                    order_by=(
                        case((in_flight, 0), else_=1),
                        delivery.next_attempt_at,
                        delivery.seq,
                    ),
                )
                .label("rank"),
            )
            .join(WebhookEndpoint, WebhookEndpoint.id == delivery.endpoint_id)
            .where(
                delivery.status == "pending",
                WebhookEndpoint.status == "enabled",
                in_flight | claimable,
            )
            .subquery()
        )
        picked = (
            select(delivery.id)
            .join(ranked, ranked.c.id == delivery.id)
            .where(
                ranked.c.claimable,
                ranked.c.rank <= per_endpoint,
                # Checked again on the locked row: another dispatcher may have just leased it.
                delivery.status == "pending",
                delivery.next_attempt_at <= now,
                free,
            )
            .order_by(ranked.c.rank, delivery.next_attempt_at, delivery.seq)
            .limit(limit)
            .with_for_update(of=delivery, skip_locked=True)
        )
        leased = (
            await self.session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(picked.scalar_subquery()))
                .values(
                    lease_until=lease_until,
                    attempt_count=WebhookDelivery.attempt_count + 1,
                )
                .returning(
                    WebhookDelivery.id,
                    WebhookDelivery.event_id,
                    WebhookDelivery.endpoint_id,
                    WebhookDelivery.project_id,
                    WebhookDelivery.attempt_count,
                    WebhookDelivery.failures,
                    WebhookDelivery.seq,
                    WebhookDelivery.created_at,
                )
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
        existing = set(
            await self.session.scalars(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.id.in_([o.claimed.delivery_id for o in outcomes]))
                .order_by(WebhookDelivery.id)
                .with_for_update()
            )
        )
        outcomes = [o for o in outcomes if o.claimed.delivery_id in existing]
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
        applied: list[Outcome] = []
        for outcome in outcomes:
            values: dict[str, Any] = {
                "lease_until": None,
                "last_attempt_at": outcome.started_at,
                "last_status_code": outcome.status_code,
                "last_error": _storable(outcome.error),
            }
            if outcome.succeeded:
                values |= {"status": "succeeded", "delivered_at": outcome.started_at}
            elif outcome.next_attempt_at is None:
                values |= {"status": "failed", "failures": WebhookDelivery.failures + 1}
            else:
                values |= {
                    "next_attempt_at": outcome.next_attempt_at,
                    "failures": WebhookDelivery.failures + 1,
                }
            written = await self.session.scalar(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == outcome.claimed.delivery_id,
                    WebhookDelivery.lease_until == outcome.claimed.lease_until,
                )
                .values(**values)
                .returning(WebhookDelivery.id)
            )
            if written is not None:
                applied.append(outcome)
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


def _storable(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a receiver's answer may."""
    return None if text is None else text.replace("\x00", "\ufffd")
