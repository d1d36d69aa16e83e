"""`/v1/webhook_endpoints` and `/v1/webhook_deliveries` (tunegate extensions), and the
`webhooks` section of the OpenAPI document: one entry per event type consumers receive."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request
from pydantic import BaseModel, Field

from app.auth.dependencies import ReadPrincipal, WritePrincipal
from app.config import Settings
from app.db.session import SessionDep
from app.kit.http import ERROR_RESPONSES, JSONRoute
from app.kit.pagination import ListPage, PageParams, page_params, to_page
from app.models import WebhookDelivery
from app.webhooks import service
from app.webhooks.events import EVENT_TYPES, TEST_EVENT
from app.webhooks.repository import DeliveryRepository, EndpointRepository
from app.webhooks.schemas import (
    DeliveryObject,
    EndpointCreate,
    EndpointDeleted,
    EndpointObject,
    EndpointUpdate,
    EndpointWithSecret,
)

router = APIRouter(
    prefix="/v1/webhook_endpoints",
    tags=["webhooks"],
    route_class=JSONRoute,
    responses=ERROR_RESPONSES,
)
deliveries_router = APIRouter(
    prefix="/v1/webhook_deliveries",
    tags=["webhooks"],
    route_class=JSONRoute,
    responses=ERROR_RESPONSES,
)

EndpointId = Annotated[str, Path(max_length=64, description="The endpoint's id (`ep_…`).")]
DeliveryId = Annotated[str, Path(max_length=64, description="The delivery's id (`dlv_…`).")]
Page = Annotated[PageParams, Depends(page_params)]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]


@router.post("", response_model=EndpointWithSecret)
async def create_endpoint(
    body: EndpointCreate, principal: WritePrincipal, session: SessionDep, settings: SettingsDep
) -> EndpointWithSecret:
    """Subscribe a URL to events. The answer holds the signing secret: it is not shown again."""
    row = await service.create_endpoint(session, settings, principal.project_id, body)
    return EndpointWithSecret.with_secret(row)


@router.get("", response_model=ListPage[EndpointObject])
async def list_endpoints(
    principal: ReadPrincipal, session: SessionDep, page: Page
) -> ListPage[EndpointObject]:
    repository = EndpointRepository(session, principal.project_id)
    rows, has_more = await repository.paginate(repository.select(), page)
    return to_page([EndpointObject.of(row) for row in rows], has_more, lambda e: e.id)


@router.get("/{endpoint_id}", response_model=EndpointObject)
async def retrieve_endpoint(
    endpoint_id: EndpointId, principal: ReadPrincipal, session: SessionDep
) -> EndpointObject:
    return EndpointObject.of(await service.get_endpoint(session, principal.project_id, endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointObject)
async def update_endpoint(
    endpoint_id: EndpointId,
    body: EndpointUpdate,
    principal: WritePrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> EndpointObject:
    """Change the URL, description or events; `disabled: true|false` pauses or resumes it."""
    row = await service.update_endpoint(session, settings, principal.project_id, endpoint_id, body)
    return EndpointObject.of(row)


@router.delete("/{endpoint_id}", response_model=EndpointDeleted)
async def delete_endpoint(
    endpoint_id: EndpointId, principal: WritePrincipal, session: SessionDep
) -> EndpointDeleted:
    """Delete the endpoint with its pending deliveries and delivery log."""
    await service.delete_endpoint(session, principal.project_id, endpoint_id)
    return EndpointDeleted(id=endpoint_id, deleted=True)


@router.post("/{endpoint_id}/rotate_secret", response_model=EndpointWithSecret)
async def rotate_secret(
    endpoint_id: EndpointId, principal: WritePrincipal, session: SessionDep, settings: SettingsDep
) -> EndpointWithSecret:
    """A new signing secret (shown once). The old one keeps signing too, for 24 h by default,
    so a receiver can switch without missing a delivery."""
    row = await service.rotate_secret(session, settings, principal.project_id, endpoint_id)
    return EndpointWithSecret.with_secret(row)


@router.post("/{endpoint_id}/test", response_model=DeliveryObject, status_code=202)
async def send_test_event(
    endpoint_id: EndpointId, principal: WritePrincipal, session: SessionDep
) -> DeliveryObject:
    """Queue a `webhook_endpoint.test` event to this endpoint; follow it in the delivery log."""
    delivery = await service.send_test(session, principal.project_id, endpoint_id)
    return DeliveryObject.of(delivery, [])


@router.get("/{endpoint_id}/deliveries", response_model=ListPage[DeliveryObject])
async def list_deliveries(
    endpoint_id: EndpointId,
    principal: ReadPrincipal,
    session: SessionDep,
    page: Page,
    status: Annotated[
        Literal["pending", "succeeded", "failed"] | None,
        Query(description="Only deliveries in this status."),
    ] = None,
) -> ListPage[DeliveryObject]:
    """The endpoint's deliveries, newest first, each with its attempts."""
    await service.get_endpoint(session, principal.project_id, endpoint_id)
    repository = DeliveryRepository(session, principal.project_id)
    statement = repository.select().where(WebhookDelivery.endpoint_id == endpoint_id)
    if status is not None:
        statement = statement.where(WebhookDelivery.status == status)
    rows, has_more = await repository.paginate(statement, page)
    attempts = await repository.attempts_of([row.id for row in rows])
    return to_page(
        [DeliveryObject.of(row, attempts.get(row.id, [])) for row in rows],
        has_more,
        lambda d: d.id,
    )


@deliveries_router.get("/{delivery_id}", response_model=DeliveryObject)
async def retrieve_delivery(
    delivery_id: DeliveryId, principal: ReadPrincipal, session: SessionDep
) -> DeliveryObject:
    """One delivery with its attempts and the event body it sends."""
    row = await service.get_delivery(session, principal.project_id, delivery_id)
    attempts = await DeliveryRepository(session, principal.project_id).attempts_of([row.id])
    payload = await service.payload_of(session, principal.project_id, row.event_id)
    return DeliveryObject.of(row, attempts.get(row.id, []), payload)


@deliveries_router.post("/{delivery_id}/redeliver", response_model=DeliveryObject, status_code=202)
async def redeliver(
    delivery_id: DeliveryId, principal: WritePrincipal, session: SessionDep
) -> DeliveryObject:
    """Send the delivery again now (same event, same `webhook-id`) with a fresh retry schedule."""
    row = await service.redeliver(session, principal.project_id, delivery_id)
    attempts = await DeliveryRepository(session, principal.project_id).attempts_of([row.id])
    return DeliveryObject.of(row, attempts.get(row.id, []))


class WebhookEventBody(BaseModel):
    id: str = Field(description="`evt_…`; also the `webhook-id` header, the same on every retry.")
    type: str
    created_at: int = Field(description="Unix seconds.")
    data: dict[str, Any] = Field(description="The object as the API returns it.")


def document_webhooks(app: FastAPI) -> None:
    """One `webhooks` entry per event type in the OpenAPI document."""
    headers = (
        "Signed as Standard Webhooks: headers `webhook-id`, `webhook-timestamp` (Unix seconds) "
        'and `webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per '
        "secret in use). Answer 2xx within the timeout; anything else is retried."
    )
    types = {**EVENT_TYPES, TEST_EVENT: "Sent by POST /v1/webhook_endpoints/{id}/test."}
    for event_type, summary in types.items():

        async def receiver(body: Annotated[WebhookEventBody, Body()]) -> None:
            """Placeholder: documents the webhook, never routed."""

        receiver.__name__ = "webhook_" + event_type.replace(".", "_")
        app.webhooks.add_api_route(
            event_type,
            receiver,
            methods=["POST"],
            summary=summary,
            description=headers,
            status_code=200,
            tags=["webhooks"],
        )
