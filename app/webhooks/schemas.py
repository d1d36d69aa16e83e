from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from app.kit.time import to_unix
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.webhooks.events import ALL_EVENTS, EVENT_TYPES

EventType = Annotated[str, Field(min_length=1, max_length=64)]
Url = Annotated[str, Field(min_length=1, max_length=2048, description="Where events are POSTed.")]
Description = Annotated[str, Field(max_length=512)]


def _all_as_list(value: Any) -> Any:
    """`"*"` alone means every type, as `["*"]` does."""
    return [ALL_EVENTS] if value == ALL_EVENTS else value


def _known_events(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if not value:
        raise ValueError('must name at least one event type, or ["*"] for all')
    unknown = [item for item in value if item != ALL_EVENTS and item not in EVENT_TYPES]
    if unknown:
        raise ValueError(
            f"unknown event type(s) {', '.join(repr(u) for u in unknown)}; "
            f"known: {', '.join(EVENT_TYPES)}, or '*'"
        )
    return list(dict.fromkeys(value))  # duplicates dropped, order kept


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    description: Description = ""
    enabled_events: list[EventType] = Field(
        default_factory=lambda: [ALL_EVENTS],
        max_length=64,
        description='Event types to send, or "*" / ["*"] (the default) for every type.',
    )
    disabled: StrictBool = Field(default=False, description="Create it disabled.")

    _events = field_validator("enabled_events")(_known_events)
    _star = field_validator("enabled_events", mode="before")(_all_as_list)


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    description: Description | None = None
    enabled_events: list[EventType] | None = Field(default=None, max_length=64)
    disabled: StrictBool | None = Field(
        default=None, description="true disables the endpoint, false enables it again."
    )

    _events = field_validator("enabled_events")(_known_events)
    _star = field_validator("enabled_events", mode="before")(_all_as_list)


class EndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    description: str
    enabled_events: list[str]
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None
    disabled_at: int | None
    failing_since: int | None = Field(
        description="When the current run of failed deliveries began; null while healthy."
    )
    secret_rotated_until: int | None = Field(
        description="While set, deliveries are also signed with the previous secret until then."
    )
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, row: WebhookEndpoint) -> EndpointObject:
        return cls(
            id=row.id,
            url=row.url,
            description=row.description,
            enabled_events=list(row.enabled_events),
            status="disabled" if row.status == "disabled" else "enabled",
            disabled_reason=row.disabled_reason,
            disabled_at=to_unix(row.disabled_at),
            failing_since=to_unix(row.failing_since),
            secret_rotated_until=to_unix(row.previous_secret_expires_at)
            if row.previous_secret is not None
            else None,
            created_at=to_unix(row.created_at) or 0,
            updated_at=to_unix(row.updated_at) or 0,
        )


class EndpointWithSecret(EndpointObject):
    secret: str = Field(
        description="The signing secret (`whsec_…`). Shown only here: store it now."
    )

    @classmethod
    def with_secret(cls, row: WebhookEndpoint) -> EndpointWithSecret:
        return cls(**EndpointObject.of(row).model_dump(), secret=row.secret)


class EndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool


class AttemptObject(BaseModel):
    number: int
    started_at: int
    duration_ms: int
    status_code: int | None = Field(description="The receiver's HTTP status; null if none came.")
    response_body: str | None = Field(description="The first 2 KB of the receiver's answer.")
    error: str | None = Field(description="Why the attempt failed, when it did.")

    @classmethod
    def of(cls, row: WebhookAttempt) -> AttemptObject:
        return cls(
            number=row.number,
            started_at=to_unix(row.started_at) or 0,
            duration_ms=row.duration_ms,
            status_code=row.status_code,
            response_body=row.response_body,
            error=row.error,
        )


class DeliveryObject(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str
    event_id: str = Field(description="Also the `webhook-id` header of every attempt.")
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempt_count: int
    next_attempt_at: int | None
    delivered_at: int | None
    last_status_code: int | None
    last_error: str | None
    created_at: int
    attempts: list[AttemptObject]
    payload: dict[str, Any] | None = Field(
        default=None, description="The event body, on the single-delivery view."
    )

    @classmethod
    def of(
        cls,
        row: WebhookDelivery,
        attempts: list[WebhookAttempt],
        payload: dict[str, Any] | None = None,
    ) -> DeliveryObject:
        return cls(
            id=row.id,
            endpoint_id=row.endpoint_id,
            event_id=row.event_id,
            event_type=row.event_type,
            status=row.status,
            attempt_count=row.attempt_count,
            next_attempt_at=to_unix(row.next_attempt_at) if row.status == "pending" else None,
            delivered_at=to_unix(row.delivered_at),
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=to_unix(row.created_at) or 0,
            attempts=[AttemptObject.of(a) for a in attempts],
            payload=payload,
        )
