"""A/B on live traffic, in-process: split aliases (validation, atomic switches, how requests are
spread over the arms), feedback about completions and the per-arm report.

Completions here go to an OpenAI provider whose address refuses connections: each one is a
502 that reaches the usage records with the arm it was sent to, which is what the feedback and
the report read. Answers from a real upstream, through the `openai` SDK, are in
tests/test_jobs_process.py."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select

from app.inference.service import choose_arm
from app.models import Scope, UsageRecord
from app.providers.openai import OpenAIProvider
from tests.server import free_port
from tests.test_auth import assert_envelope

CHAT = "/v1/chat/completions"
ALIASES = "/v1/model_aliases"
A = "ft:gpt-4o-mini-2024-07-18:acme:bot:aaaa1111"
B = "ft:gpt-4o-mini-2024-07-18:acme:bot:bbbb2222"
C = "ft:gpt-4o-mini-2024-07-18:acme:bot:cccc3333"


@pytest.fixture
async def project(factories):
    """A write key of a project with three fine-tuned models, and a read key of it."""
    writer = await factories.key(scope=Scope.write)
    for model in (A, B, C):
        await factories.fine_tuned_model(writer.project, model)
    reader = await factories.key(writer.project, scope=Scope.read)
    return writer, reader


@pytest.fixture
async def app_with_openai(app_factory):
    """An app whose OpenAI provider is at a loopback port nothing listens on (every completion
    is a 502), and whose usage records are written only when something flushes them: here the
    feedback endpoint, or the test (a background write would share the test's connection)."""
    provider = OpenAIProvider(api_key="sk-test", base_url=f"http://127.0.0.1:{free_port()}/v1")
    app = app_factory(providers={"openai": provider}, inference={"usage_flush_interval": "PT1H"})
    yield app
    await app.state.usage.close()
    await provider.aclose()


@pytest.fixture
def clients(project, app_with_openai, client_for):
    """The project's writer and reader, calling the app with an OpenAI provider."""
    writer, reader = project
    return (
        client_for(writer.key, target=app_with_openai),
        client_for(reader.key, target=app_with_openai),
    )


def ask(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def shares(counts: Counter, total: int) -> dict[str, float]:
    return {model: count / total for model, count in counts.items()}


async def test_split_aliases_are_validated_and_switch_atomically(
    project, client_for, factories
) -> None:
    writer_key, reader_key = project
    writer, reader = client_for(writer_key.key), client_for(reader_key.key)
    created = await writer.post(ALIASES, json={"name": "bot", "models": {A: 90, B: 10}})
    assert created.status_code == 200, created.text
    assert created.json()["models"] == {A: 90, B: 10}
    assert created.json()["model"] == A  # the heaviest arm
    plain = await writer.post(ALIASES, json={"name": "plain", "model": C})
    assert plain.json()["models"] == {C: 100} and plain.json()["model"] == C
    # One arm in `models` is an alias of one model.
    single = await writer.post(ALIASES, json={"name": "single", "models": {B: 7}})
    assert single.json()["models"] == {B: 100} and single.json()["model"] == B

    too_many = {f"ft:gpt-4o-mini-2024-07-18:acme:bot:x{i}": 1 for i in range(11)}
    for bad, param in [
        ({"name": "x", "models": {A: 0, B: 10}}, f"models.{A}"),
        ({"name": "x", "models": {A: 1001, B: 10}}, f"models.{A}"),
        ({"name": "x", "models": {A: 1.5, B: 10}}, f"models.{A}"),
        ({"name": "x", "models": {A: "90", B: 10}}, f"models.{A}"),
        ({"name": "x", "models": {A: True, B: 10}}, f"models.{A}"),
        ({"name": "x", "models": {}}, "models"),
        ({"name": "x", "models": too_many}, "models"),
        ({"name": "x", "models": [A, B]}, "models"),
        ({"name": "x", "model": A, "models": {A: 1, B: 1}}, "models"),
        ({"name": "x"}, "model"),
        ({"name": "x", "model": None}, "model"),
        ({"name": "x", "models": {A: 1}, "weights": {A: 1}}, "weights"),
    ]:
        error = assert_envelope(await writer.post(ALIASES, json=bad), 422)
        assert error["param"] == param, (bad, error)
    # Every arm must be a model of the project; an alias may not take a base model's name.
    foreign = (await factories.key(scope=Scope.write)).key
    theirs = await client_for(foreign).post(ALIASES, json={"name": "x", "models": {A: 1, B: 1}})
    assert_envelope(theirs, 404, "model_not_found")
    unknown = await writer.post(ALIASES, json={"name": "x", "models": {A: 1, "ft:nope:x:y:z": 1}})
    assert "ft:nope:x:y:z" in assert_envelope(unknown, 404, "model_not_found")["message"]
    shadow = await writer.post(ALIASES, json={"name": "gpt-4o-mini", "models": {A: 1, B: 1}})
    assert_envelope(shadow, 409, "alias_shadows_model")
    assert_envelope(await reader.post(ALIASES, json={"name": "x", "models": {A: 1}}), 403)

    # PATCH replaces the arms and weights in one go, or goes back to one model.
    ramp = await writer.patch(f"{ALIASES}/bot", json={"models": {A: 50, B: 25, C: 25}})
    assert ramp.json()["models"] == {A: 50, B: 25, C: 25} and ramp.json()["model"] == A
    tie = await writer.patch(f"{ALIASES}/bot", json={"models": {C: 5, B: 5}})
    assert tie.json()["model"] == B  # equal weights: the first id in sorted order
    refused = await writer.patch(f"{ALIASES}/bot", json={"models": {A: 1, "ft:nope:x:y:z": 1}})
    assert_envelope(refused, 404, "model_not_found")
    both = await writer.patch(f"{ALIASES}/bot", json={"model": A, "models": {A: 1}})
    assert assert_envelope(both, 422)["param"] == "models"
    assert (await reader.get(f"{ALIASES}/bot")).json()["models"] == {C: 5, B: 5}
    assert_envelope(await writer.patch(f"{ALIASES}/nobody", json={"model": A}), 404)

    models = {m["id"]: m for m in (await reader.get("/v1/models")).json()["data"]}
    assert models["bot"]["alias_for"] == B and models["bot"]["arms"] == {B: 5, C: 5}
    assert models["plain"]["alias_for"] == C and models["plain"]["arms"] is None
    assert (await reader.get("/v1/models/bot")).json() == models["bot"]
    back = await writer.patch(f"{ALIASES}/bot", json={"model": A})
    assert back.json()["models"] == {A: 100}
    assert (await reader.get("/v1/models/bot")).json()["arms"] is None


def test_arms_are_chosen_by_weight_and_stick_to_a_user() -> None:
    weights = {A: 90, B: 10}
    random_counts = Counter(choose_arm("bot", weights, None) for _ in range(20_000))
    assert abs(shares(random_counts, 20_000)[A] - 0.9) < 0.015
    users = [f"user-{n}" for n in range(20_000)]
    by_user = {user: choose_arm("bot", weights, user) for user in users}
    assert abs(shares(Counter(by_user.values()), 20_000)[A] - 0.9) < 0.015
    # The same user, the same arm: every time, and for scaled weights in any key order.
    assert all(choose_arm("bot", weights, user) == by_user[user] for user in users[:500])
    assert all(choose_arm("bot", {B: 1, A: 9}, user) == by_user[user] for user in users)
    # The hash is of the alias too: one user is not on the same side of every test.
    other = {user: choose_arm("other-bot", weights, user) for user in users}
    assert sum(other[user] != by_user[user] for user in users) > 1000
    # Ramping B from 10 to 30 moves a fifth of the users, all from A to B.
    ramped = {user: choose_arm("bot", {A: 70, B: 30}, user) for user in users}
    moved = [user for user in users if ramped[user] != by_user[user]]
    assert all(by_user[user] == A and ramped[user] == B for user in moved)
    assert abs(len(moved) / len(users) - 0.2) < 0.015
    # Three arms, uneven.
    three = Counter(choose_arm("bot", {A: 1, B: 2, C: 7}, f"u{n}") for n in range(20_000))
    assert [round(shares(three, 20_000)[m], 1) for m in (A, B, C)] == [0.1, 0.2, 0.7]


async def _records(session, project_id: str) -> list:
    rows = await session.execute(
        select(UsageRecord.request_id, UsageRecord.model, UsageRecord.alias).where(
            UsageRecord.project_id == project_id
        )
    )
    return list(rows)


async def test_completions_through_a_split_alias_are_recorded_per_arm_and_reported(
    project, clients, app_with_openai, client_for, factories, session
) -> None:
    writer, reader = clients
    created = await writer.post(ALIASES, json={"name": "bot", "models": {A: 3, B: 1}})
    assert created.status_code == 200, created.text
    for _ in range(200):
        answer = await reader.post(CHAT, json=ask("bot"))
        assert_envelope(answer, 502, "upstream_error")  # the arm's provider's answer
    alice = [await reader.post(CHAT, json=ask("bot", user="alice")) for _ in range(10)]
    await app_with_openai.state.usage.flush()

    records = await _records(session, project[0].project.id)
    assert len(records) == 210 and {r.alias for r in records} == {"bot"}
    arm_of = {r.request_id: r.model for r in records}
    assert {arm_of[a.headers["x-request-id"]] for a in alice} == {
        choose_arm("bot", {A: 3, B: 1}, "alice")
    }
    by_arm = Counter(arm_of.values())
    assert set(by_arm) == {A, B} and 0.6 < by_arm[A] / 210 < 0.9

    report = (await reader.get("/v1/evals/ab/bot")).json()
    assert report["object"] == "ab.report" and report["alias"] == "bot"
    assert report["weights"] == {A: 3, B: 1} and report["requests"] == 210
    assert [arm["model"] for arm in report["arms"]] == [A, B]
    arms = {arm["model"]: arm for arm in report["arms"]}
    assert {model: arm["requests"] for model, arm in arms.items()} == dict(by_arm)
    assert arms[A]["weight"] == 3 and arms[A]["expected_share"] == 0.75
    assert arms[A]["share"] == pytest.approx(by_arm[A] / 210)
    assert arms[A]["errors"] == by_arm[A]  # every one a 502
    assert arms[A]["latency_ms"] == {"p50": None, "p95": None, "mean": None}  # none answered
    assert arms[B]["feedback"] == {
        "count": 0,
        "scored": 0,
        "mean_score": None,
        "score_ci95": None,
        "labels": {},
    }
    # After a switch to one model, the former arm is still reported, with weight 0.
    await writer.patch(f"{ALIASES}/bot", json={"model": C})
    after = (await reader.get("/v1/evals/ab/bot")).json()
    assert after["weights"] == {C: 100}
    assert [(arm["model"], arm["weight"]) for arm in after["arms"]] == [(C, 100), (A, 0), (B, 0)]
    # A window without these requests, a window backwards, another project's view.
    old = (await reader.get("/v1/evals/ab/bot", params={"start": 0, "end": 1000})).json()
    assert old["requests"] == 0 and old["start"] == 0 and old["end"] == 1000
    assert_envelope(await reader.get("/v1/evals/ab/bot", params={"start": 5, "end": 5}), 422)
    stranger = client_for((await factories.key(scope=Scope.read)).key, target=app_with_openai)
    assert (
        assert_envelope(await stranger.get("/v1/evals/ab/bot"), 404, "alias_not_found")["param"]
        == "alias"
    )
    assert_envelope(await reader.get("/v1/evals/ab/nobody"), 404, "alias_not_found")


async def test_feedback_names_a_completion_of_the_project_and_reaches_the_report(
    clients, app_with_openai, client_for, factories
) -> None:
    writer, reader = clients
    await writer.post(ALIASES, json={"name": "bot", "models": {A: 1, B: 1}})
    # Request ids as a caller may choose them (up to 128 characters); each user sticks to an arm.
    asked = {}
    for n in range(40):
        request_id = f"chat-{n:03d}-" + "x" * 110
        answer = await reader.post(
            CHAT, json=ask("bot", user=f"user-{n}"), headers={"x-request-id": request_id}
        )
        assert answer.headers["x-request-id"] == request_id
        asked[request_id] = choose_arm("bot", {A: 1, B: 1}, f"user-{n}")
    on_a = [request_id for request_id, arm in asked.items() if arm == A]
    on_b = [request_id for request_id, arm in asked.items() if arm == B]
    assert len(on_a) >= 5 and len(on_b) >= 5

    # The records are still in memory (nothing has flushed them): feedback writes them first.
    first = await reader.post(
        "/v1/feedback", json={"request_id": on_a[0], "score": 1, "comment": "spot on"}
    )
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["id"].startswith("fb_") and body["object"] == "feedback"
    assert (body["model"], body["alias"], body["score"]) == (A, "bot", 1.0)
    assert body["comment"] == "spot on" and body["label"] is None
    for request_id, score, label in [
        (on_a[1], 1, "helpful"),
        (on_a[2], -0.5, "helpful"),
        (on_a[3], None, "wrong"),
        (on_b[0], -1, "wrong"),
        (on_b[1], -0.5, None),
    ]:
        sent = {"request_id": request_id, "score": score, "label": label}
        answer = await writer.post("/v1/feedback", json=sent)
        assert answer.status_code == 200, answer.text

    for bad, param in [
        ({"request_id": on_a[0]}, "score"),
        ({"request_id": on_a[0], "score": None, "label": None}, "score"),
        ({"request_id": on_a[0], "score": 1.5}, "score"),
        ({"request_id": on_a[0], "score": -1.01}, "score"),
        ({"request_id": on_a[0], "score": "1"}, "score"),
        ({"request_id": on_a[0], "score": True}, "score"),
        ({"request_id": on_a[0], "label": ""}, "label"),
        ({"request_id": on_a[0], "label": "x" * 65}, "label"),
        ({"request_id": on_a[0], "score": 1, "comment": "x" * 4001}, "comment"),
        ({"request_id": on_a[0], "score": 1, "rating": 5}, "rating"),
        ({"request_id": "", "score": 1}, "request_id"),
        ({"score": 1}, "request_id"),
    ]:
        error = assert_envelope(await reader.post("/v1/feedback", json=bad), 422)
        assert error["param"] == param, (bad, error)
    unknown = await reader.post("/v1/feedback", json={"request_id": "req_nope", "score": 1})
    assert assert_envelope(unknown, 404, "request_not_found")["param"] == "request_id"
    stranger = client_for((await factories.key(scope=Scope.read)).key, target=app_with_openai)
    theirs = await stranger.post("/v1/feedback", json={"request_id": on_a[0], "score": -1})
    assert_envelope(theirs, 404, "request_not_found")
    assert_envelope(await client_for(target=app_with_openai).post("/v1/feedback", json={}), 401)

    arms = {arm["model"]: arm for arm in (await reader.get("/v1/evals/ab/bot")).json()["arms"]}
    assert arms[A]["feedback"]["count"] == 4 and arms[A]["feedback"]["scored"] == 3
    assert arms[A]["feedback"]["mean_score"] == pytest.approx(0.5)
    low, high = arms[A]["feedback"]["score_ci95"]
    assert -1 <= low < 0.5 < high == 1.0  # 0.5 ± 1.96 * 0.866 / sqrt(3), within [-1, 1]
    assert arms[A]["feedback"]["labels"] == {"helpful": 2, "wrong": 1}
    assert arms[B]["feedback"]["mean_score"] == pytest.approx(-0.75)
    assert arms[B]["feedback"]["labels"] == {"wrong": 1}
    assert arms[A]["requests"] + arms[B]["requests"] == 40
