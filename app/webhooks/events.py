"""The events consumers can subscribe to, and `emit`, the outbox write.

`emit` runs in the transaction of the change that causes the event: it stores the event (its
exact body, so every retry sends the same bytes) and one pending delivery per enabled endpoint
of the project that subscribes to the type, then NOTIFYs the dispatchers, which PostgreSQL
delivers only when that transaction commits. Nothing is stored when no endpoint subscribes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.kit.ids import new_id
from app.kit.time import to_unix, utcnow
from app.models import WebhookDelivery, WebhookEndpoint, WebhookEvent

NOTIFY_CHANNEL = "tunegate_webhooks"
ALL_EVENTS = "*"
TEST_EVENT = "webhook_endpoint.test"

# Every type a consumer can subscribe to, with what its `data` holds.
EVENT_TYPES: dict[str, str] = {
    "file.validated": "A validation report of a file finished (`data`: the validation report).",
    "fine_tuning.job.created": "A fine-tuning job was created (`data`: the job).",
    "fine_tuning.job.status_changed": "A job's status changed (`data`: the job, new status).",
    "fine_tuning.job.succeeded": "A job succeeded; its fine-tuned model is ready (`data`: job).",
    "fine_tuning.job.failed": "A job failed (`data`: the job, with `error`).",
    "fine_tuning.job.cancelled": "A job was cancelled (`data`: the job).",
    "fine_tuning.job.checkpoint.created": "A job saved a checkpoint (`data`: the checkpoint).",
    "model.deleted": "A fine-tuned model was deleted (`data`: the deletion status).",
    "eval.completed": "An eval finished; its results are in (`data`: the eval).",
    "eval.failed": "An eval could not run to its end (`data`: the eval, with `error`).",
    "webhook_endpoint.disabled": (
        "An endpoint was disabled after failing continuously or answering 410 Gone "
        "(`data`: the endpoint)."
    ),
}


def subscribes(enabled_events: list[str], event_type: str) -> bool:
    return event_type == TEST_EVENT or ALL_EVENTS in enabled_events or event_type in enabled_events


def event_body(event_id: str, event_type: str, created_at: datetime, data: Any) -> str:
    return orjson.dumps(
        {"id": event_id, "type": event_type, "created_at": to_unix(created_at), "data": data}
    ).decode()


async def emit(
    session: AsyncSession,
    project_id: str,
    event_type: str,
    subject: str,
    data: Any,
    *,
    endpoint_id: str | None = None,
) -> WebhookEvent | None:
    """Record `event_type` about `subject` (a job id, a file id ...) for every subscribed,
    enabled endpoint of the project, or only for `endpoint_id` (a test event)."""
    query = select(WebhookEndpoint.id, WebhookEndpoint.enabled_events).where(
        WebhookEndpoint.project_id == project_id, WebhookEndpoint.status == "enabled"
    )
    if endpoint_id is not None:
        query = query.where(WebhookEndpoint.id == endpoint_id)
    # KEY SHARE: an endpoint being deleted meanwhile waits for this transaction (its deliveries
    # would otherwise point at nothing); changing an endpoint does not.
    query = query.with_for_update(read=True, key_share=True)
    targets = [
        found_id
        for found_id, enabled in (await session.execute(query)).all()
        if subscribes(enabled, event_type)
    ]
    if not targets:
        return None
    now = utcnow()
    event = WebhookEvent(
        id=new_id("evt_"),
        project_id=project_id,
        type=event_type,
        subject=subject,
        created_at=now,
        body="",
    )
    event.body = event_body(event.id, event_type, now, data)
    session.add(event)
    await session.flush()  # the event before its deliveries (foreign key)
    session.add_all(
        WebhookDelivery(
            id=new_id("dlv_"),
            project_id=project_id,
            endpoint_id=target,
            event_id=event.id,
            event_type=event_type,
            subject=subject,
            status="pending",
            attempt_count=0,
            failures=0,
            next_attempt_at=now,
            created_at=now,
        )
        for target in targets
    )
    await session.flush()
    await notify(session)
    return event


async def notify(session: AsyncSession) -> None:
    """Wake the dispatchers when this transaction commits (PostgreSQL holds NOTIFY till then)."""
    await session.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
