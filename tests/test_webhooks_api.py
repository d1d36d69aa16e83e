"""`/v1/webhook_endpoints` and `/v1/webhook_deliveries` over HTTP (in-process app, real
PostgreSQL): CRUD, the secret shown once, URL policy, project scoping, and the outbox (a change
and the deliveries it causes are written together)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.kit.time import utcnow
from app.models import Scope, WebhookDelivery, WebhookEvent
from app.webhooks.repository import DispatchQueue
from tests.datasets import adder_jsonl
from tests.test_auth import assert_envelope

ENDPOINTS = "/v1/webhook_endpoints"


@pytest.fixture
async def api(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


async def create(api, **body):
    body.setdefault("url", "http://127.0.0.1:9/hook")
    response = await api.post(ENDPOINTS, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_an_endpoint_is_created_with_a_secret_shown_once(api) -> None:
    created = await create(api, description="billing", enabled_events=["fine_tuning.job.failed"])
    assert created["id"].startswith("ep_") and created["object"] == "webhook_endpoint"
    assert created["status"] == "enabled" and created["description"] == "billing"
    assert created["enabled_events"] == ["fine_tuning.job.failed"]
    assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) == 32

    fetched = (await api.get(f"{ENDPOINTS}/{created['id']}")).json()
    assert "secret" not in fetched
    assert fetched == {k: v for k, v in created.items() if k != "secret"}
    listed = (await api.get(ENDPOINTS)).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert "secret" not in listed["data"][0]
    assert (await create(api))["enabled_events"] == ["*"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "http://127.0.0.1/x", "enabled_events": ["job.done"]}, "enabled_events"),
        ({"url": "http://127.0.0.1/x", "enabled_events": []}, "enabled_events"),
        ({"url": "not a url"}, "url"),
        ({"url": "ftp://127.0.0.1/x"}, "url"),
        ({"url": "http://user:pw@127.0.0.1/x"}, "url"),
        ({"url": "http://169.254.169.254/latest/meta-data"}, "url"),
        ({"url": "http://127.0.0.1/x", "colour": "red"}, "colour"),
        ({"url": 5}, "url"),
        ({}, "url"),
    ],
)
async def test_bad_endpoints_are_refused_in_openais_envelope(api, body, param) -> None:
    response = await api.post(ENDPOINTS, json=body)
    error = assert_envelope(response, response.status_code)
    assert response.status_code in {400, 422}
    assert param in (error["param"] or ""), error
    assert "pw" not in error["message"]
    assert (await api.get(ENDPOINTS)).json()["data"] == []


async def test_production_wants_https_and_public_addresses(app_factory, client_for, factories):
    app = app_factory(env="production", webhooks={"allowed_networks": ["10.9.0.0/16"]})
    api = client_for((await factories.key(scope=Scope.write)).key, target=app)
    for url in ("http://8.8.8.8/hook", "https://127.0.0.1/hook", "https://10.0.0.1/hook"):
        response = await api.post(ENDPOINTS, json={"url": url})
        assert assert_envelope(response, 422, "unsafe_url")["param"] == "url", url
    for url in ("https://8.8.8.8/hook", "https://10.9.1.2/hook"):
        assert (await api.post(ENDPOINTS, json={"url": url})).status_code == 200, url


async def test_update_rotate_and_delete(api) -> None:
    created = await create(api)
    path = f"{ENDPOINTS}/{created['id']}"
    changed = await api.patch(
        path, json={"url": "http://127.0.0.1:8/new", "enabled_events": ["model.deleted"]}
    )
    assert changed.status_code == 200
    assert changed.json()["url"] == "http://127.0.0.1:8/new"
    assert changed.json()["enabled_events"] == ["model.deleted"]
    disabled = (await api.patch(path, json={"disabled": True})).json()
    assert disabled["status"] == "disabled" and disabled["disabled_reason"]
    enabled = (await api.patch(path, json={"disabled": False})).json()
    assert enabled["status"] == "enabled" and enabled["disabled_reason"] is None
    assert_envelope(await api.patch(path, json={"url": None}), 422)
    assert_envelope(await api.patch(path, json={"secret": "x"}), 422)

    rotated = (await api.post(f"{path}/rotate_secret")).json()
    assert rotated["secret"] != created["secret"] and rotated["secret_rotated_until"]

    assert (await api.delete(path)).json() == {
        "id": created["id"],
        "object": "webhook_endpoint.deleted",
        "deleted": True,
    }
    assert_envelope(await api.get(path), 404)
    assert_envelope(await api.delete(path), 404)


async def test_another_projects_endpoint_is_not_found(api, client_for, factories) -> None:
    created = await create(api)
    other = client_for((await factories.key(scope=Scope.write)).key)
    path = f"{ENDPOINTS}/{created['id']}"
    assert_envelope(await other.get(path), 404)
    assert_envelope(await other.patch(path, json={"description": "mine"}), 404)
    assert_envelope(await other.post(f"{path}/rotate_secret"), 404)
    assert_envelope(await other.post(f"{path}/test"), 404)
    assert_envelope(await other.get(f"{path}/deliveries"), 404)
    assert_envelope(await other.delete(path), 404)
    assert (await other.get(ENDPOINTS)).json()["data"] == []
    test = (await api.post(f"{path}/test")).json()
    assert_envelope(await other.get(f"/v1/webhook_deliveries/{test['id']}"), 404)
    assert_envelope(await other.post(f"/v1/webhook_deliveries/{test['id']}/redeliver"), 404)
    assert (await api.get(path)).json()["description"] == ""


async def test_a_read_only_key_cannot_change_endpoints(client_for, factories) -> None:
    project = await factories.project()
    api = client_for((await factories.key(project, scope=Scope.write)).key)
    created = await create(api)
    reader = client_for((await factories.key(project, scope=Scope.read)).key)
    assert (await reader.get(f"{ENDPOINTS}/{created['id']}")).status_code == 200
    assert_envelope(await reader.post(ENDPOINTS, json={"url": "http://127.0.0.1/x"}), 403)
    assert_envelope(await reader.delete(f"{ENDPOINTS}/{created['id']}"), 403)


async def test_a_change_and_its_deliveries_are_written_together(api) -> None:
    """A fine-tune upload is validated inline: its `file.validated` event and one delivery per
    subscribed endpoint exist as soon as the upload has answered."""
    everything = await create(api)
    validated = await create(api, enabled_events=["file.validated"])
    jobs_only = await create(api, enabled_events=["fine_tuning.job.succeeded"])
    paused = await create(api)
    await api.patch(f"{ENDPOINTS}/{paused['id']}", json={"disabled": True})
    upload = await api.post(
        "/v1/files", files={"file": ("adder.jsonl", adder_jsonl(12))}, data={"purpose": "fine-tune"}
    )
    assert upload.status_code == 200, upload.text
    file_id = upload.json()["id"]

    for endpoint in (everything, validated):
        log = (await api.get(f"{ENDPOINTS}/{endpoint['id']}/deliveries")).json()
        (delivery,) = log["data"]
        assert delivery["event_type"] == "file.validated" and delivery["status"] == "pending"
        assert delivery["attempts"] == [] and delivery["next_attempt_at"]
        full = (await api.get(f"/v1/webhook_deliveries/{delivery['id']}")).json()
        payload = full["payload"]
        assert payload["id"] == delivery["event_id"] and payload["type"] == "file.validated"
        assert payload["data"]["file_id"] == file_id and payload["data"]["status"] == "succeeded"
    for endpoint in (jobs_only, paused):
        log = (await api.get(f"{ENDPOINTS}/{endpoint['id']}/deliveries")).json()
        assert log["data"] == []


async def test_test_events_redelivery_and_the_log_filters(api) -> None:
    created = await create(api, enabled_events=["model.deleted"])
    path = f"{ENDPOINTS}/{created['id']}"
    sent = await api.post(f"{path}/test")
    assert sent.status_code == 202
    delivery = sent.json()
    assert delivery["event_type"] == "webhook_endpoint.test" and delivery["status"] == "pending"
    again = await api.post(f"/v1/webhook_deliveries/{delivery['id']}/redeliver")
    assert again.status_code == 202 and again.json()["status"] == "pending"
    assert (await api.get(f"{path}/deliveries", params={"status": "pending"})).json()["data"]
    assert (await api.get(f"{path}/deliveries", params={"status": "failed"})).json()["data"] == []
    assert_envelope(await api.get(f"{path}/deliveries", params={"status": "lost"}), 422)
    assert_envelope(await api.post("/v1/webhook_deliveries/dlv_nope/redeliver"), 404)
    await api.patch(path, json={"disabled": True})
    assert_envelope(await api.post(f"{path}/test"), 409, "endpoint_disabled")


async def test_the_openapi_document_lists_every_event(client) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {
        "file.validated",
        "fine_tuning.job.created",
        "fine_tuning.job.status_changed",
        "fine_tuning.job.succeeded",
        "fine_tuning.job.failed",
        "fine_tuning.job.cancelled",
        "fine_tuning.job.checkpoint.created",
        "model.deleted",
        "webhook_endpoint.disabled",
    } <= set(spec["webhooks"])


async def test_star_alone_means_every_event_and_redelivery_rules(api) -> None:
    created = await create(api, enabled_events="*")
    assert created["enabled_events"] == ["*"]
    path = f"{ENDPOINTS}/{created['id']}"
    delivery = (await api.post(f"{path}/test")).json()
    await api.patch(path, json={"disabled": True})
    held = (await api.get(f"/v1/webhook_deliveries/{delivery['id']}")).json()
    assert held["status"] == "pending" and held["next_attempt_at"] is None  # waits, not due
    refused = await api.post(f"/v1/webhook_deliveries/{delivery['id']}/redeliver")
    assert_envelope(refused, 409, "endpoint_disabled")
    await api.patch(path, json={"disabled": False})
    released = (await api.get(f"/v1/webhook_deliveries/{delivery['id']}")).json()
    assert released["next_attempt_at"] is not None


async def test_settled_deliveries_and_their_events_are_purged_after_retention(api, session) -> None:
    """What the dispatcher runs hourly: settled deliveries older than the retention go with
    their attempts and events; pending ones and recent ones stay."""
    created = await create(api)
    path = f"{ENDPOINTS}/{created['id']}"
    old, recent, waiting = [(await api.post(f"{path}/test")).json() for _ in range(3)]
    long_ago = utcnow() - timedelta(days=40)
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_([old["id"], recent["id"]]))
        .values(status="succeeded")
    )
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_([old["id"], waiting["id"]]))
        .values(created_at=long_ago)
    )
    await session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id.in_([old["event_id"], waiting["event_id"]]))
        .values(created_at=long_ago)
    )
    assert await DispatchQueue(session).purge(utcnow() - timedelta(days=30)) == 1
    left = set(await session.scalars(select(WebhookDelivery.id)))
    assert old["id"] not in left and {recent["id"], waiting["id"]} <= left
    events = set(await session.scalars(select(WebhookEvent.id)))
    assert old["event_id"] not in events and waiting["event_id"] in events
    assert await session.scalar(select(func.count()).select_from(WebhookEvent)) == len(events)
    assert_envelope(await api.get(f"/v1/webhook_deliveries/{old['id']}"), 404)


async def test_redelivery_keeps_a_pending_deliverys_place_in_order(api, session) -> None:
    created = await create(api)
    sent = (await api.post(f"{ENDPOINTS}/{created['id']}/test")).json()

    async def seq() -> int:
        return int(
            await session.scalar(
                select(WebhookDelivery.seq).where(WebhookDelivery.id == sent["id"])
            )
        )

    before = await seq()
    assert (await api.post(f"/v1/webhook_deliveries/{sent['id']}/redeliver")).status_code == 202
    assert await seq() == before  # still pending: what waits behind it keeps waiting
    await session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == sent["id"]).values(status="failed")
    )
    assert (await api.post(f"/v1/webhook_deliveries/{sent['id']}/redeliver")).status_code == 202
    assert await seq() > before  # settled: sent again after what came since
