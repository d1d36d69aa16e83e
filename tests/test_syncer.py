"""The job syncer in-process: the submitter and the syncer drive the real `openai` provider (the
official SDK) against the OpenAI emulator on loopback; the API is read over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from app.jobs.syncer import Syncer
from app.jobs.tasks import submit_one
from app.kit import signing
from app.kit.time import utcnow
from app.models import FineTunedModel, Job, JobEvent, Scope
from app.providers import budget
from app.providers.openai import OpenAIProvider
from app.workers.runner import WorkerContext
from tests.conftest import make_settings
from tests.datasets import adder_jsonl
from tests.emulator import Emulator, running_emulator
from tests.test_auth import assert_envelope

KEY = "sk-emulator-syncer"
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM="
JOBS = {
    "sync_concurrency": 1,  # the test database is one connection
    "sync_interval_running": "PT0.05S",
    "sync_interval_queued": "PT0.05S",
    "provider_requests_per_second": 1000,
}


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with running_emulator(speed=100, key=KEY) as running:
        yield running


@pytest.fixture
async def provider(emulator: Emulator) -> AsyncIterator[OpenAIProvider]:
    instance = OpenAIProvider(api_key=KEY, base_url=f"{emulator.base_url}/v1", max_retries=0)
    yield instance
    await instance.aclose()


@pytest.fixture
def app(app_factory, provider):
    return app_factory(
        providers={"openai": provider}, jobs=JOBS, openai_webhook_secret=WEBHOOK_SECRET
    )


@pytest.fixture
async def api(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


class Workers:
    """The submitter and the syncer of one process, stepped by the test."""

    def __init__(self, app_factory, provider: OpenAIProvider, **jobs: Any) -> None:
        settings = make_settings(data_dir=app_factory.data_dir, jobs=JOBS | jobs)
        self.context = WorkerContext(settings, app_factory.database)
        self.storage = app_factory.storage()
        self.providers = {"openai": provider}
        self.syncer = Syncer(self.context, self.providers, self.storage)

    async def submit(self) -> None:
        assert await submit_one(self.context, self.storage, self.providers)

    async def sweep(self) -> int:
        started = await self.syncer.sweep()
        await self.syncer.drain()
        return started

    async def until(self, api, job_id: str, statuses: set[str], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            await self.sweep()
            job = (await api.get(f"/v1/fine_tuning/jobs/{job_id}")).json()
            if job["status"] in statuses:
                return job
            assert time.monotonic() < deadline, f"job stuck in {job['status']}"
            await asyncio.sleep(0.05)


@pytest.fixture
def workers(app_factory, provider) -> Workers:
    return Workers(app_factory, provider)


async def create_job(api, n: int = 12, **extra: Any) -> dict:
    upload = await api.post(
        "/v1/files", files={"file": ("t.jsonl", adder_jsonl(n))}, data={"purpose": "fine-tune"}
    )
    assert upload.status_code == 200, upload.text
    body = {"model": "gpt-4o-mini-2024-07-18", "training_file": upload.json()["id"], **extra}
    response = await api.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_job_is_followed_to_succeeded_with_everything_it_made(
    api, workers, session, emulator, provider
) -> None:
    job = await create_job(api, suffix="adder")
    await workers.submit()
    done = await workers.until(api, job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done
    upstream = emulator.http.get(f"/v1/fine_tuning/jobs/{done['provider_job_id']}").json()
    assert done["fine_tuned_model"] == upstream["fine_tuned_model"]
    assert (
        done["fine_tuned_model"].startswith("ft:gpt-4o-mini-2024-07-18:")
        and "adder" in (done["fine_tuned_model"])
    )
    assert done["trained_tokens"] == upstream["trained_tokens"] > 0
    assert done["finished_at"] == upstream["finished_at"]
    assert done["hyperparameters"]["n_epochs"] == upstream["hyperparameters"]["n_epochs"]
    assert isinstance(done["hyperparameters"]["batch_size"], int)  # "auto" resolved

    # The result file is a tunegate file of the job's project, readable with the files API.
    (result_id,) = done["result_files"]
    result = (await api.get(f"/v1/files/{result_id}")).json()
    assert result["purpose"] == "fine-tune-results"
    content = (await api.get(f"/v1/files/{result_id}/content")).text
    assert content.splitlines()[0].startswith("step,train_loss")

    # Every provider event exactly once, plus tunegate's own status changes.
    upstream_events = await provider.list_events(done["provider_job_id"], None, 10_000)
    stored = (
        await session.scalars(
            select(JobEvent.provider_event_id).where(
                JobEvent.job_id == job["id"], JobEvent.provider_event_id.is_not(None)
            )
        )
    ).all()
    assert sorted(stored) == sorted(e.id for e in upstream_events)
    in_order = (
        await session.scalars(
            select(JobEvent.provider_event_id)
            .where(JobEvent.job_id == job["id"], JobEvent.provider_event_id.is_not(None))
            .order_by(JobEvent.created_at, JobEvent.id)
        )
    ).all()
    assert list(in_order) == [e.id for e in upstream_events]  # the provider's order, exactly
    events = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/events")).json()["data"]
    # Messages name the job and its file as the caller knows them.
    messages = (
        await session.scalars(select(JobEvent.message).where(JobEvent.job_id == job["id"]))
    ).all()
    assert not any(done["provider_job_id"] in m for m in messages), messages
    assert f"Validating training file: {done['training_file']}" in messages, messages
    statuses = [e["data"]["status"] for e in events if (e["data"] or {}).get("previous_status")]
    assert statuses[0] == "succeeded"  # newest first

    # Per-step metrics, one point per step, and the chart a person can look at.
    metrics = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics")).json()
    total = max(e.data["total_steps"] for e in upstream_events if e.type == "metrics" and e.data)
    assert [p["step"] for p in metrics["data"]] == list(range(1, total + 1))
    assert all(p["train_loss"] > 0 for p in metrics["data"])
    chart = await api.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics.svg")
    assert chart.headers["content-type"].startswith("image/svg+xml")
    assert chart.text.lstrip().startswith("<svg") or "<svg" in chart.text[:200]

    checkpoints = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")).json()
    upstream_checkpoints = emulator.http.get(
        f"/v1/fine_tuning/jobs/{done['provider_job_id']}/checkpoints"
    ).json()
    assert {c["id"] for c in checkpoints["data"]} == {c["id"] for c in upstream_checkpoints["data"]}
    assert all(c["fine_tuning_job_id"] == job["id"] for c in checkpoints["data"])

    # The fine-tuned model is recorded for the project; the job is no longer scheduled.
    model = await session.get(FineTunedModel, done["fine_tuned_model"])
    assert model is not None and model.job_id == job["id"] and model.base_model == job["model"]
    row = await session.get(Job, job["id"], populate_existing=True)
    assert row is not None and row.sync_due_at is None and row.sync_lease_until is None

    # Syncing again changes nothing: nothing is due, nothing is stored twice.
    assert await workers.sweep() == 0


async def test_a_provider_outage_backs_off_and_recovers_by_itself(
    api, workers, session, emulator
) -> None:
    job = await create_job(api)
    await workers.submit()
    emulator.faults(outage=True)
    try:
        await session.execute(update(Job).values(sync_due_at=utcnow()))
        await session.commit()
        assert await workers.sweep() == 1
        row = await session.get(Job, job["id"], populate_existing=True)
        assert row is not None and row.sync_failures == 1 and row.status == "validating_files"
        assert row.sync_due_at is not None and row.sync_due_at > utcnow()  # backing off
        assert "503" in (row.last_sync_error or "") or "unavailable" in (row.last_sync_error or "")
        # A second failure waits longer.
        first_wait = row.sync_due_at
        await session.execute(update(Job).values(sync_due_at=utcnow()))
        await session.commit()
        await workers.sweep()
        row = await session.get(Job, job["id"], populate_existing=True)
        assert row is not None and row.sync_failures == 2
        assert row.sync_due_at > first_wait
        kept = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
        assert kept["status"] == "validating_files" and kept["error"] is None
    finally:
        emulator.http.delete("/_emulator/faults")
    await session.execute(update(Job).values(sync_due_at=utcnow()))
    await session.commit()
    done = await workers.until(api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    row = await session.get(Job, job["id"], populate_existing=True)
    assert row is not None and row.sync_failures == 0 and row.last_sync_error is None


def signed(body: dict[str, Any], webhook_id: str, *, secret: str = WEBHOOK_SECRET) -> dict:
    raw = json.dumps(body).encode()
    headers = signing.headers([secret], webhook_id, int(time.time()), raw)
    return {"content": raw, "headers": {**headers, "content-type": "application/json"}}


async def test_inbound_webhooks_are_verified_and_make_the_job_due_once(
    api, client_for, workers, session, emulator
) -> None:
    job = await create_job(api)
    await workers.submit()
    await workers.sweep()  # the first sync after submission
    row = await session.get(Job, job["id"], populate_existing=True)
    assert row is not None and row.provider_job_id is not None
    await session.execute(
        update(Job).where(Job.id == job["id"]).values(sync_due_at=utcnow().replace(year=2100))
    )
    await session.commit()
    assert await workers.sweep() == 0

    anonymous = client_for(None)
    event = {
        "object": "event",
        "id": "evt_1",
        "type": "fine_tuning.job.succeeded",
        "created_at": int(time.time()),
        "data": {"id": row.provider_job_id},
    }
    url = "/v1/provider_webhooks/openai"
    bad = signed(event, "msg_bad", secret="whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC0wMTIzNDU=")
    error = assert_envelope(await anonymous.post(url, **bad), 400)
    assert error["code"] == "invalid_signature" and WEBHOOK_SECRET not in error["message"]
    stale = signed(event, "msg_stale")
    stale["headers"]["webhook-timestamp"] = str(int(time.time()) - 600)
    assert_envelope(await anonymous.post(url, **stale), 400)

    emulator.http.delete("/_emulator/requests")
    answers = [(await anonymous.post(url, **signed(event, f"msg_{i}"))).json() for i in range(30)]
    assert {a["outcome"] for a in answers} == {"sync_requested"}
    assert answers[0]["fine_tuning_job_id"] == job["id"]
    again = (await anonymous.post(url, **signed(event, "msg_0"))).json()
    assert again["outcome"] == "duplicate"
    unknown = {**event, "data": {"id": "ftjob-nobodyknows"}}
    assert (await anonymous.post(url, **signed(unknown, "msg_unknown"))).json()[
        "outcome"
    ] == "ignored_unknown_job"

    # Thirty webhooks, one sync.
    assert await workers.sweep() == 1
    assert await workers.sweep() == 0
    retrieves = emulator.requests().get(("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"), {})
    assert sum(retrieves.values()) == 1


async def test_a_sync_can_be_requested_and_is_scoped_to_the_project(
    api, client_for, factories, workers, session
) -> None:
    job = await create_job(api)
    await workers.submit()
    await session.execute(
        update(Job).where(Job.id == job["id"]).values(sync_due_at=utcnow().replace(year=2100))
    )
    await session.commit()
    other = client_for((await factories.key(scope=Scope.write)).key)
    assert_envelope(await other.post(f"/v1/fine_tuning/jobs/{job['id']}/sync"), 404)
    assert_envelope(await other.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics"), 404)
    assert_envelope(await other.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics.svg"), 404)
    answer = await api.post(f"/v1/fine_tuning/jobs/{job['id']}/sync")
    assert answer.status_code == 200 and answer.json()["id"] == job["id"]
    assert await workers.sweep() == 1


async def test_the_rate_budget_is_shared_and_refills(app_factory) -> None:
    sessionmaker = app_factory.sessionmaker
    name = f"budget-test-{time.monotonic_ns()}"
    assert await budget.take(sessionmaker, name, 100, rate=10) == 10  # a one-second burst
    assert await budget.take(sessionmaker, name, 5, rate=10) == 0
    await asyncio.sleep(0.35)
    assert 2 <= await budget.take(sessionmaker, name, 100, rate=10) <= 4
    await budget.refund(sessionmaker, name, 3, rate=10)
    assert await budget.take(sessionmaker, name, 3, rate=10) == 3


# The models registry, fed by the syncer


async def test_models_lists_base_and_own_fine_tuned_models_and_deletes_them(
    api, client_for, factories, workers, session, emulator
) -> None:
    listed = (await api.get("/v1/models")).json()
    assert listed["object"] == "list"
    base = {m["id"]: m for m in listed["data"]}
    mini = base["gpt-4o-mini-2024-07-18"]
    assert mini["object"] == "model" and mini["kind"] == "base" and mini["provider"] == "openai"
    # The undated name is a model too, as at OpenAI: the snapshot it names, under that name.
    undated = (await api.get("/v1/models/gpt-4o-mini")).json()
    assert undated == mini | {"id": "gpt-4o-mini"}, undated
    # An alias of it is listed as it is retrieved.
    made = await api.post("/v1/model_aliases", json={"name": "mini", "model": "gpt-4o-mini"})
    assert made.status_code == 200, made.text
    aliased = {m["id"]: m for m in (await api.get("/v1/models")).json()["data"]}.get("mini")
    assert aliased is not None and aliased["alias_for"] == "gpt-4o-mini", aliased
    assert (await api.get("/v1/models/mini")).json() == aliased
    assert mini["context_limit"] > 0 and mini["training_usd_per_1m"] > 0
    assert set(mini["methods"]) == {"supervised", "dpo"}

    job = await create_job(api, suffix="registry")
    await workers.submit()
    done = await workers.until(api, job["id"], {"succeeded", "failed"})
    model_id = done["fine_tuned_model"]
    tuned = (await api.get(f"/v1/models/{model_id}")).json()
    assert tuned["id"] == model_id and tuned["kind"] == "fine-tuned"
    assert tuned["fine_tuning_job_id"] == job["id"] and tuned["base_model"] == job["model"]
    assert model_id in {m["id"] for m in (await api.get("/v1/models")).json()["data"]}

    # Another project sees neither the model nor its deletion.
    other = client_for((await factories.key(scope=Scope.write)).key)
    assert model_id not in {m["id"] for m in (await other.get("/v1/models")).json()["data"]}
    assert assert_envelope(await other.get(f"/v1/models/{model_id}"), 404)["code"] == (
        "model_not_found"
    )
    assert_envelope(await other.delete(f"/v1/models/{model_id}"), 404)
    assert_envelope(await api.get("/v1/models/ft:gpt-4o-mini:nobody:x:y"), 404)
    refused = assert_envelope(await api.delete("/v1/models/gpt-4o-mini-2024-07-18"), 403)
    assert refused["code"] == "model_not_deletable"

    deleted = (await api.delete(f"/v1/models/{model_id}")).json()
    assert deleted == {"id": model_id, "object": "model", "deleted": True}
    gone = emulator.http.get(f"/v1/models/{model_id}")
    assert gone.status_code == 404  # deleted at the provider too
    assert_envelope(await api.get(f"/v1/models/{model_id}"), 404)
    assert model_id not in {m["id"] for m in (await api.get("/v1/models")).json()["data"]}


async def test_a_base_model_shutting_down_soon_warns_at_job_creation(
    api, app_factory, provider, session
) -> None:
    from datetime import timedelta

    from app.models import ProviderBaseModel
    from app.registry.service import refresh_base_models

    assert await refresh_base_models(app_factory.sessionmaker, {"openai": provider}) > 0
    soon = (utcnow() + timedelta(days=30)).date().isoformat()
    await session.execute(
        update(ProviderBaseModel)
        .where(ProviderBaseModel.id == "gpt-4o-mini-2024-07-18")
        .values(shutdown_date=soon)
    )
    await session.commit()
    job = await create_job(api)
    events = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/events")).json()["data"]
    warnings = [e for e in events if e["level"] == "warn"]
    assert len(warnings) == 1 and soon in warnings[0]["message"]
    listed = {m["id"]: m for m in (await api.get("/v1/models")).json()["data"]}
    assert listed["gpt-4o-mini-2024-07-18"]["shutdown_date"] == soon

    # Far away: no warning.
    far = (utcnow() + timedelta(days=400)).date().isoformat()
    await session.execute(update(ProviderBaseModel).values(shutdown_date=far))
    await session.commit()
    calm = await create_job(api)
    events = (await api.get(f"/v1/fine_tuning/jobs/{calm['id']}/events")).json()["data"]
    assert [e for e in events if e["level"] == "warn"] == []


def test_metrics_keep_finite_numbers_only() -> None:
    """PostgreSQL's jsonb has no NaN or infinity: such values are left out, not a failed sync."""
    from app.jobs.syncer import _metric_rows, _metric_rows_from_csv
    from app.providers.base import ProviderEvent

    event = ProviderEvent(
        id="ftevent-1",
        created_at=1_700_000_000,
        level="info",
        message="Step 3",
        type="metrics",
        data={"step": 3, "total_steps": 9, "train_loss": 0.5, "valid_loss": float("nan"),
              "train_mean_token_accuracy": float("inf"), "flag": True},
    )  # fmt: skip
    (row,) = _metric_rows("ftjob-x", [event])
    assert row["step"] == 3 and row["values"] == {"train_loss": 0.5}
    csv = b"step,train_loss,valid_loss\n1,0.9,NaN\n2,inf,0.7\nx,1,1\n"
    rows = _metric_rows_from_csv("ftjob-x", csv)
    assert [(r["step"], r["values"]) for r in rows] == [
        (1, {"train_loss": 0.9}),
        (2, {"valid_loss": 0.7}),
    ]
    assert _metric_rows_from_csv("ftjob-x", b"\xff\xfe not text") == []


async def test_a_sweep_syncs_only_what_the_rate_budget_allows(
    api, app_factory, provider, session
) -> None:
    # 3 requests per second: one sync's worth (its burst is one second, at least one sync).
    workers = Workers(app_factory, provider, provider_requests_per_second=3, sync_concurrency=4)
    first, second = await create_job(api), await create_job(api)
    await workers.submit()
    await workers.submit()
    await session.execute(update(Job).values(sync_due_at=utcnow()))
    await session.commit()
    assert await workers.sweep() == 1
    rows = {
        job.id: job
        for job in await session.scalars(
            select(Job)
            .where(Job.id.in_([first["id"], second["id"]]))
            .execution_options(populate_existing=True)
        )
    }
    synced = [j for j in rows.values() if j.last_synced_at is not None]
    waiting = [j for j in rows.values() if j.last_synced_at is None]
    assert len(synced) == 1 and len(waiting) == 1
    # The job left over went back as it was: due, not leased, so the next sweep takes it.
    assert waiting[0].sync_lease_until is None and waiting[0].sync_due_at <= utcnow()
    await asyncio.sleep(1.1)
    assert await workers.sweep() == 1
