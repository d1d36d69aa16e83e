"""A/B on live traffic, in-process: split aliases (validation, atomic switches, how requests are
spread over the arms). Answers from a real upstream, through the `openai` SDK, are in
tests/test_jobs_process.py."""

from __future__ import annotations

from collections import Counter

import pytest

from app.inference.service import choose_arm
from app.models import Scope
from tests.test_auth import assert_envelope

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
