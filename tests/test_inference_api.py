"""`/v1/chat/completions` and `/v1/completions` in-process: who may call which model (no
provider is called before the model is resolved for the caller's project), rate limits, body
limits and bad bodies in OpenAI's envelope. The answers themselves, streamed and not, come from
the emulator in tests/test_jobs_process.py."""

from __future__ import annotations

import pytest

from app.inference.proxy import HotPaths
from app.kit.time import utcnow
from app.models import FineTunedModel, Scope
from tests.test_auth import assert_envelope

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
TUNED = "ft:gpt-4o-mini-2024-07-18:acme:bot:abc123"


@pytest.fixture
async def owner(factories):
    credentials = await factories.key(scope=Scope.read)
    await factories.fine_tuned_model(credentials.project, TUNED)
    return credentials


def ask(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_another_projects_fine_tuned_model_is_not_found(owner, client_for, factories):
    mine = client_for(owner.key)
    other = client_for((await factories.key(scope=Scope.read)).key)
    # The owner's request gets as far as the provider, which this app does not have.
    assert_envelope(await mine.post(CHAT, json=ask(TUNED)), 503, "provider_not_configured")
    error = assert_envelope(await other.post(CHAT, json=ask(TUNED)), 404, "model_not_found")
    assert error["param"] == "model" and TUNED in error["message"]
    assert_envelope(await other.post(CHAT, json=ask(TUNED, stream=True)), 404, "model_not_found")
    assert_envelope(await mine.post(CHAT, json=ask("ft:nope:x:y:z")), 404, "model_not_found")
    assert_envelope(await mine.post(CHAT, json=ask("gpt-nonexistent")), 404, "model_not_found")


async def test_a_deleted_model_is_not_found(owner, client_for, session):
    tuned = await session.get(FineTunedModel, TUNED)
    tuned.deleted_at = utcnow()
    await session.commit()
    mine = client_for(owner.key)
    assert_envelope(await mine.post(CHAT, json=ask(TUNED)), 404, "model_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"model": "gpt-4o-mini", "messages": []},
        {"model": "gpt-4o-mini", "messages": "hi"},
        {"model": 5, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "gpt-4o-mini", "messages": [{"role": "user"}], "stream": "yes"},
    ],
)
async def test_bad_bodies_are_refused_in_the_envelope(owner, client_for, body) -> None:
    response = await client_for(owner.key).post(CHAT, json=body)
    assert_envelope(response, 422)


async def test_no_key_is_401(client) -> None:
    assert_envelope(await client.post(CHAT, json=ask("gpt-4o-mini")), 401, "invalid_api_key")
    body = {"model": "davinci-002", "prompt": "hi"}
    assert_envelope(await client.post(TEXT, json=body), 401, "invalid_api_key")


async def test_legacy_completions_resolve_models_like_chat(owner, client_for, factories) -> None:
    mine = client_for(owner.key)
    other = client_for((await factories.key(scope=Scope.read)).key)
    body = {"model": TUNED, "prompt": "2 + 2 ="}
    assert_envelope(await mine.post(TEXT, json=body), 503, "provider_not_configured")
    assert_envelope(await other.post(TEXT, json=body), 404, "model_not_found")
    assert_envelope(await other.post(TEXT, json=body | {"stream": True}), 404, "model_not_found")
    for bad in (
        {"model": TUNED},  # prompt is required (null is allowed: OpenAI's document start)
        {"model": TUNED, "prompt": {"text": "hi"}},
        {"model": TUNED, "prompt": ["a", 1]},
        {"model": TUNED, "prompt": "hi", "stream": 1},
    ):
        assert_envelope(await mine.post(TEXT, json=bad), 422)
    null_prompt = await mine.post(TEXT, json={"model": TUNED, "prompt": None})
    assert_envelope(null_prompt, 503, "provider_not_configured")


async def test_completions_have_their_own_per_key_rate_limit(
    app_factory, client_for, factories
) -> None:
    limited = app_factory(inference={"rate_limit_per_minute": 2})
    credentials = await factories.key(scope=Scope.read)
    other = await factories.key(scope=Scope.read)
    mine = client_for(credentials.key, target=limited)
    for _ in range(2):  # the model is unknown, but the request counts
        assert (await mine.post(CHAT, json=ask("gpt-nonexistent"))).status_code == 404
    refused = await mine.post(TEXT, json={"model": "davinci-002", "prompt": "hi"})
    error = assert_envelope(refused, 429, "rate_limit_exceeded")
    assert "per minute" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Other endpoints, and other keys, are not limited by it.
    assert (await mine.get("/v1/models")).status_code == 200
    theirs = client_for(other.key, target=limited)
    assert (await theirs.post(CHAT, json=ask("gpt-nonexistent"))).status_code == 404


async def test_completion_bodies_may_exceed_the_general_body_limit(
    app_factory, client_for, factories
) -> None:
    small = app_factory(max_request_bytes=2048, inference={"max_request_bytes": 8192})
    credentials = await factories.key(scope=Scope.read)
    mine = client_for(credentials.key, target=small)
    long = [{"role": "user", "content": "x" * 4000}]
    answer = await mine.post(CHAT, json={"model": "gpt-nonexistent", "messages": long})
    assert_envelope(answer, 404, "model_not_found")  # read, then the model is unknown
    huge = [{"role": "user", "content": "x" * 10_000}]
    too_big = await mine.post(CHAT, json={"model": "gpt-nonexistent", "messages": huge})
    assert_envelope(too_big, 413)
    assert_envelope(await mine.post("/v1/model_aliases", json={"name": "a" * 3000}), 413)


async def test_aliases_name_a_projects_model_and_switch(owner, client_for, factories) -> None:
    second = TUNED.replace("abc123", "def456")
    await factories.fine_tuned_model(owner.project, second)
    mine = client_for(owner.key)  # a read key: aliases need write
    writer = client_for((await factories.key(owner.project, scope=Scope.write)).key)
    other = client_for((await factories.key(scope=Scope.write)).key)
    assert_envelope(await mine.post("/v1/model_aliases", json={"name": "bot", "model": TUNED}), 403)
    created = await writer.post("/v1/model_aliases", json={"name": "support-bot", "model": TUNED})
    assert created.status_code == 200, created.text
    assert created.json()["model"] == TUNED and created.json()["object"] == "model_alias"
    again = await writer.post("/v1/model_aliases", json={"name": "support-bot", "model": TUNED})
    assert_envelope(again, 409, "alias_exists")
    # The alias resolves for its project (to a provider this app lacks), for no other.
    assert_envelope(await mine.post(CHAT, json=ask("support-bot")), 503, "provider_not_configured")
    assert_envelope(await other.post(CHAT, json=ask("support-bot")), 404, "model_not_found")
    assert_envelope(await other.get("/v1/model_aliases/support-bot"), 404, "alias_not_found")
    shadow = await writer.post(
        "/v1/model_aliases", json={"name": "gpt-4o-mini-2024-07-18", "model": TUNED}
    )
    assert_envelope(shadow, 409, "alias_shadows_model")
    foreign = await other.post("/v1/model_aliases", json={"name": "mine", "model": TUNED})
    assert_envelope(foreign, 404, "model_not_found")
    for bad in ({"name": "-x", "model": TUNED}, {"name": "a b", "model": TUNED}, {"name": "x"}):
        assert_envelope(await writer.post("/v1/model_aliases", json=bad), 422)

    switched = await writer.patch("/v1/model_aliases/support-bot", json={"model": second})
    assert switched.status_code == 200 and switched.json()["model"] == second
    assert_envelope(
        await writer.patch("/v1/model_aliases/support-bot", json={"model": "nope"}),
        404,
        "model_not_found",
    )
    listed = (await mine.get("/v1/model_aliases")).json()
    assert [a["name"] for a in listed["data"]] == ["support-bot"]
    models = {m["id"]: m for m in (await mine.get("/v1/models")).json()["data"]}
    assert models["support-bot"]["kind"] == "alias"
    assert models["support-bot"]["alias_for"] == second
    assert (await mine.get("/v1/models/support-bot")).json() == models["support-bot"]
    assert_envelope(await other.get("/v1/models/support-bot"), 404, "model_not_found")
    assert "support-bot" not in {m["id"] for m in (await other.get("/v1/models")).json()["data"]}
    assert (await writer.delete("/v1/model_aliases/support-bot")).json()["deleted"] is True
    assert_envelope(await mine.get("/v1/model_aliases/support-bot"), 404, "alias_not_found")


async def test_malformed_bodies_get_precise_errors(owner, client_for) -> None:
    mine = client_for(owner.key)
    headers = {"content-type": "application/json"}
    bad_json = await mine.post(CHAT, content=b'{"model": "gpt-4o-mini", ', headers=headers)
    assert "could not parse" in assert_envelope(bad_json, 400, "invalid_json")["message"]
    latin1 = await mine.post(CHAT, content='{"model": "é"}'.encode("latin-1"), headers=headers)
    assert_envelope(latin1, 400, "invalid_encoding")
    text = await mine.post(
        CHAT, content=b"model=gpt-4o-mini", headers={"content-type": "text/plain"}
    )
    assert_envelope(text, 415)
    assert_envelope(await mine.post(CHAT, json=[ask("gpt-4o-mini")]), 422)
    assert_envelope(await mine.post(CHAT, content=b"", headers=headers), 422)
    options = await mine.post(CHAT, json=ask("gpt-4o-mini", stream_options="usage"))
    assert assert_envelope(options, 422)["param"] == "stream_options"
    bad_message = await mine.post(CHAT, json={"model": "gpt-4o-mini", "messages": ["hi"]})
    assert assert_envelope(bad_message, 422)["param"] == "messages[0]"
    # Other methods on the path are the router's: 405 with what is allowed.
    refused = await mine.get(CHAT)
    assert_envelope(refused, 405) and refused.headers["allow"] == "POST"
    # Requests and their ids are logged and answered like any other.
    assert refused.headers["x-request-id"].startswith("req_")
    answered = await mine.post(CHAT, json=ask("gpt-nonexistent"), headers={"x-request-id": "r-1"})
    assert answered.headers["x-request-id"] == "r-1"


async def test_a_read_key_may_call_completions_and_a_bad_key_may_not(owner, client_for) -> None:
    wrong = client_for("tg-abcdefghij-" + "x" * 40)
    assert_envelope(await wrong.post(CHAT, json=ask("gpt-4o-mini")), 401, "invalid_api_key")
    malformed = client_for("not a key")
    assert_envelope(await malformed.post(TEXT, json={"model": "x", "prompt": "y"}), 401)


async def test_the_documented_routes_answer_through_the_same_proxy(
    owner, app_factory, client_for
) -> None:
    """Requests that reach FastAPI's router (not sent ahead by HotPaths) get the same answers."""
    routed = app_factory()
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not HotPaths]
    mine = client_for(owner.key, target=routed)
    assert_envelope(await mine.post(CHAT, json=ask("gpt-nonexistent")), 404, "model_not_found")
    body = {"model": TUNED, "prompt": "2 + 2 ="}
    assert_envelope(await mine.post(TEXT, json=body), 503, "provider_not_configured")
    assert_envelope(await mine.post(TEXT, json={"model": TUNED}), 422)
