"""Webhook endpoints of a project: create (the secret shown once), change, rotate the secret,
send a test event, delete; the delivery log and redelivery."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.kit import signing
from app.kit.errors import Conflict, InvalidPayload, NotFound
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import WebhookDelivery, WebhookEndpoint
from app.webhooks.events import TEST_EVENT, emit, notify
from app.webhooks.repository import DeliveryRepository, EndpointRepository
from app.webhooks.schemas import EndpointCreate, EndpointObject, EndpointUpdate
from app.webhooks.targets import TargetPolicy, UnsafeTarget

DNS_TIMEOUT_SECONDS = 5.0


def policy_of(settings: Settings) -> TargetPolicy:
    return TargetPolicy.of(settings.is_production, settings.webhooks.allowed_networks)


async def _check_url(settings: Settings, url: str) -> None:
    policy = policy_of(settings)
    try:
        try:
            async with asyncio.timeout(DNS_TIMEOUT_SECONDS):
                await policy.check_host(url)
        except TimeoutError:
            # A name that does not answer in time is checked at delivery time, like one that
            # does not resolve yet; its syntax is checked now.
            policy.check_url(url)
    except UnsafeTarget as exc:
        raise InvalidPayload(
            f"The webhook URL is refused: {exc}", param="url", code="unsafe_url"
        ) from None


def _not_found(endpoint_id: str) -> NotFound:
    return NotFound(f"No webhook endpoint with id '{endpoint_id}'.", param="endpoint_id")


async def get_endpoint(
    session: AsyncSession, project_id: str, endpoint_id: str, *, for_update: bool = False
) -> WebhookEndpoint:
    row = await EndpointRepository(session, project_id).get(endpoint_id, for_update=for_update)
    if row is None:
        raise _not_found(endpoint_id)
    return row


async def create_endpoint(
    session: AsyncSession, settings: Settings, project_id: str, body: EndpointCreate
) -> WebhookEndpoint:
    await _check_url(settings, body.url)
    repository = EndpointRepository(session, project_id)
    limit = settings.webhooks.max_endpoints
    if await repository.count() >= limit:
        raise Conflict(
            f"This project already has {limit} webhook endpoints, the most allowed; delete one "
            "or raise TUNEGATE_WEBHOOKS__MAX_ENDPOINTS.",
            code="too_many_endpoints",
        )
    now = utcnow()
    row = WebhookEndpoint(
        id=new_id("ep_"),
        url=body.url,
        description=body.description,
        enabled_events=body.enabled_events,
        status="disabled" if body.disabled else "enabled",
        disabled_reason="Created disabled." if body.disabled else None,
        disabled_at=now if body.disabled else None,
        secret=signing.new_secret(),
        created_at=now,
        updated_at=now,
    )
    repository.add(row)
    await session.flush()
    return row


async def update_endpoint(
    session: AsyncSession,
    settings: Settings,
    project_id: str,
    endpoint_id: str,
    body: EndpointUpdate,
) -> WebhookEndpoint:
    changes = body.model_dump(exclude_unset=True)
    for field in ("url", "enabled_events", "disabled"):
        if field in changes and changes[field] is None:
            raise InvalidPayload(f"'{field}' cannot be null.", param=field)
    if "url" in changes:
        await _check_url(settings, changes["url"])
    row = await get_endpoint(session, project_id, endpoint_id, for_update=True)
    now = utcnow()
    deliveries = DeliveryRepository(session, project_id)
    if "url" in changes and changes["url"] != row.url:
        row.url = changes["url"]
        row.failing_since = None  # a new receiver starts with a clean record
    if "description" in changes:
        row.description = changes["description"] or ""
    if "enabled_events" in changes:
        row.enabled_events = changes["enabled_events"]
    if changes.get("disabled") is True and row.status == "enabled":
        row.status, row.disabled_reason, row.disabled_at = "disabled", "Disabled by a user.", now
        await deliveries.hold(row.id)
    elif changes.get("disabled") is False and row.status == "disabled":
        # A fresh start: the failure clock restarts and pending deliveries go out again.
        row.status, row.disabled_reason, row.disabled_at = "enabled", None, None
        row.failing_since = None
        await deliveries.release(row.id, now)
        await notify(session)
    row.updated_at = now
    await session.flush()
    return row


async def delete_endpoint(session: AsyncSession, project_id: str, endpoint_id: str) -> None:
    row = await get_endpoint(session, project_id, endpoint_id, for_update=True)
    await session.delete(row)  # its deliveries and their attempts go with it
    await session.flush()


async def rotate_secret(
    session: AsyncSession, settings: Settings, project_id: str, endpoint_id: str
) -> WebhookEndpoint:
    """A new secret; the current one keeps signing (next to it) for the overlap period."""
    row = await get_endpoint(session, project_id, endpoint_id, for_update=True)
    now = utcnow()
    row.previous_secret = row.secret
    row.previous_secret_expires_at = now + settings.webhooks.secret_overlap
    row.secret = signing.new_secret()
    row.updated_at = now
    await session.flush()
    return row


async def send_test(session: AsyncSession, project_id: str, endpoint_id: str) -> WebhookDelivery:
    row = await get_endpoint(session, project_id, endpoint_id)
    if row.status != "enabled":
        raise Conflict(
            f"Webhook endpoint {endpoint_id} is disabled; enable it (PATCH disabled=false) to "
            "send a test event.",
            code="endpoint_disabled",
        )
    data = {"endpoint": EndpointObject.of(row).model_dump(mode="json"), "test": True}
    event = await emit(session, project_id, TEST_EVENT, new_id("test_"), data, endpoint_id=row.id)
    if event is None:  # the endpoint was disabled meanwhile
        raise Conflict(f"Webhook endpoint {endpoint_id} is disabled.", code="endpoint_disabled")
    deliveries = DeliveryRepository(session, project_id)
    delivery: WebhookDelivery | None = await session.scalar(
        deliveries.select().where(WebhookDelivery.event_id == event.id)
    )
    assert delivery is not None
    return delivery


async def get_delivery(session: AsyncSession, project_id: str, delivery_id: str) -> WebhookDelivery:
    row = await DeliveryRepository(session, project_id).get(delivery_id)
    if row is None:
        raise NotFound(f"No webhook delivery with id '{delivery_id}'.", param="delivery_id")
    return row


async def payload_of(
    session: AsyncSession, project_id: str, event_id: str
) -> dict[str, Any] | None:
    body = await DeliveryRepository(session, project_id).body_of(event_id)
    return None if body is None else orjson.loads(body)


async def redeliver(session: AsyncSession, project_id: str, delivery_id: str) -> WebhookDelivery:
    """Send a delivery again now, with a fresh retry schedule (same event, same webhook-id)."""
    deliveries = DeliveryRepository(session, project_id)
    row = await deliveries.get(delivery_id, for_update=True)
    if row is None:
        raise NotFound(f"No webhook delivery with id '{delivery_id}'.", param="delivery_id")
    now = utcnow()
    if row.status == "pending" and row.lease_until is not None and row.lease_until > now:
        raise Conflict(
            f"Webhook delivery {delivery_id} is being sent right now; try again in a moment.",
            code="delivery_in_progress",
        )
    endpoint = await get_endpoint(session, project_id, row.endpoint_id)
    if endpoint.status != "enabled":
        raise Conflict(
            f"Webhook endpoint {endpoint.id} is disabled; enable it (PATCH disabled=false) to "
            "redeliver.",
            code="endpoint_disabled",
        )
    await deliveries.requeue(row, now)
    await notify(session)
    return row
