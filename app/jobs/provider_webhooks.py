"""Inbound provider webhooks: `POST /v1/provider_webhooks/openai`.

OpenAI announces `fine_tuning.job.succeeded|failed|cancelled` with Standard Webhooks headers
(`webhook-id`, `webhook-timestamp`, `webhook-signature`) signed with the secret from
`OPENAI_WEBHOOK_SECRET`. A valid one makes the named job due for a sync at once; the sync, not
the webhook, changes the job (polling stays the source of truth). A `webhook-id` seen before is
acknowledged and ignored; a job tunegate does not know is acknowledged and ignored (200), so the
provider does not retry it; a bad or stale signature is a 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel

from app.jobs.repository import SyncQueue, WebhookReceipts
from app.kit import signing
from app.kit.errors import BadRequest
from app.kit.http import ERROR_RESPONSES, parse_json_body
from app.kit.logging import get_logger
from app.kit.time import utcnow

log = get_logger("tunegate.jobs.provider_webhooks")

router = APIRouter(
    prefix="/v1/provider_webhooks", tags=["provider_webhooks"], responses=ERROR_RESPONSES
)

JOB_EVENT_PREFIX = "fine_tuning.job."


# Documents the scheme in OpenAPI; the signature itself is checked against the raw body below.
_signature_doc = APIKeyHeader(
    name="webhook-signature",
    scheme_name="StandardWebhooksSignature",
    description="Standard Webhooks signature (with `webhook-id` and `webhook-timestamp`), "
    "made with the secret in OPENAI_WEBHOOK_SECRET.",
    auto_error=False,
)


class WebhookAck(BaseModel):
    received: bool = True
    outcome: str
    fine_tuning_job_id: str | None = None


@router.post("/openai", response_model=WebhookAck, dependencies=[Depends(_signature_doc)])
async def openai_webhook(request: Request) -> WebhookAck:
    """Receives OpenAI's webhooks (configure this URL and `OPENAI_WEBHOOK_SECRET`)."""
    secret = request.app.state.settings.openai_webhook_secret
    if secret is None or not secret.get_secret_value():
        raise BadRequest(
            "OpenAI webhooks are not configured on this tunegate: set OPENAI_WEBHOOK_SECRET.",
            code="webhook_secret_not_configured",
        )
    body = await request.body()
    try:
        webhook_id = signing.verify(
            secret.get_secret_value(),
            request.headers,
            body,
        )
    except signing.SignatureError as exc:
        raise BadRequest(f"Invalid webhook signature: {exc}", code="invalid_signature") from None
    event: Any = parse_json_body(body)
    if not isinstance(event, dict):
        raise BadRequest("The webhook body is not a JSON object.", code="invalid_payload")
    kind = event.get("type")
    data = event.get("data")
    job_ref = data.get("id") if isinstance(data, dict) else None

    sessionmaker = request.app.state.database.sessionmaker
    async with sessionmaker() as session, session.begin():
        first = await WebhookReceipts(session).first_time("openai", webhook_id, utcnow())
        if not first:
            return WebhookAck(outcome="duplicate")
        if not isinstance(kind, str) or not kind.startswith(JOB_EVENT_PREFIX):
            return WebhookAck(outcome="ignored_event_type")
        if not isinstance(job_ref, str) or not job_ref:
            return WebhookAck(outcome="ignored_no_job")
        job_id = await SyncQueue(session).request_sync("openai", job_ref, utcnow())
    if job_id is None:
        log.info("provider webhook for an unknown or finished job", provider_job_id=job_ref)
        return WebhookAck(outcome="ignored_unknown_job")
    log.info("provider webhook: sync requested", job_id=job_id, type=kind)
    return WebhookAck(outcome="sync_requested", fine_tuning_job_id=job_id)
