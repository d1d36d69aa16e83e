"""Bad input of every kind gets a precise answer in OpenAI's envelope, never a 500 or a hang."""

from __future__ import annotations

import pytest

from app.models import Scope
from tests.test_auth import assert_envelope


@pytest.fixture
async def admin(client_for, factories):
    creds = await factories.key(scope=Scope.admin)
    return client_for(creds.key)


async def test_unknown_route_is_404_envelope(client) -> None:
    error = assert_envelope(await client.get("/v1/nope"), 404, "unknown_url")
    assert error["message"] == "Invalid URL (GET /v1/nope)"
    assert error["type"] == "invalid_request_error"


async def test_wrong_method_is_405_envelope(admin) -> None:
    response = await admin.put("/v1/projects", json={})
    assert_envelope(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"
    nested = await admin.put("/v1/api_keys/key_x")
    assert nested.headers["allow"] == "DELETE, GET"
    assert (await admin.get("/v1/api_keys/key_x/revoke")).headers["allow"] == "POST"


async def test_trailing_slash_is_not_redirected(admin) -> None:
    response = await admin.get("/v1/projects/", headers={"host": "evil.example"})
    assert_envelope(response, 404)
    assert "location" not in response.headers


@pytest.mark.parametrize(
    "url",
    ["/v1/projects/%00", "/v1/projects?after=%00", "/v1/api_keys/%00"],
)
async def test_nul_characters_are_refused_cleanly(admin, url) -> None:
    response = await admin.get(url)
    assert response.status_code in (404, 422), response.text
    assert_envelope(response, response.status_code)


async def test_nul_in_json_is_400(admin) -> None:
    response = await admin.post(
        "/v1/projects",
        content=b'{"name": "x\\u0000"}',
        headers={"content-type": "application/json"},
    )
    assert_envelope(response, 400, "invalid_json")


async def test_unknown_methods_do_not_grow_metrics(client) -> None:
    for verb in ("AAAA", "BBBB", "CCCC"):
        await client.request(verb, "/x")
    text = (await client.get("/metrics")).text
    assert "AAAA" not in text and 'method="OTHER"' in text


async def test_body_over_the_limit_declared_is_413_before_reading(
    app_factory, client_for, factories
):
    small = app_factory(max_request_bytes=2048)
    creds = await factories.key(scope=Scope.admin)
    api = client_for(creds.key, target=small)
    response = await api.post(
        "/v1/projects",
        content=b"{" + b" " * 5000 + b"}",
        headers={"content-type": "application/json"},
    )
    error = assert_envelope(response, 413, "request_too_large")
    assert "2048" in error["message"]


async def test_streamed_body_over_the_limit_is_cut_off_unread(app_factory, client_for, factories):
    small = app_factory(max_request_bytes=4096)
    creds = await factories.key(scope=Scope.admin)
    api = client_for(creds.key, target=small)
    sent = 0

    async def endless():
        nonlocal sent
        yield b'{"name": "'
        for _ in range(10_000):  # 10 MB if it were all read
            sent += 1
            yield b"a" * 1024

    response = await api.post(
        "/v1/projects", content=endless(), headers={"content-type": "application/json"}
    )
    assert_envelope(response, 413, "request_too_large")
    assert sent < 100, f"the server read {sent} KiB of a body it had already refused"


async def test_non_json_content_type_is_415(admin) -> None:
    response = await admin.post(
        "/v1/projects",
        content=b"name=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_envelope(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"name": ', "not valid JSON"),
        (b"not json at all", "not valid JSON"),
        (b'{"name": "\xff\xfe"}', "UTF-8"),
        (b'{"name": NaN}', "not valid JSON"),
        (b'{"name": Infinity}', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    ],
)
async def test_malformed_json_is_400_with_reason(
    app_factory, client_for, factories, body, fragment
):
    roomy = app_factory(max_request_bytes=1024 * 1024)
    creds = await factories.key(scope=Scope.admin)
    response = await client_for(creds.key, target=roomy).post(
        "/v1/projects", content=body, headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 400)
    message = error["message"].replace("We could not parse the JSON body", "not valid JSON")
    assert fragment in message


async def test_json_with_bom_is_accepted(admin) -> None:
    response = await admin.post(
        "/v1/projects",
        content='\ufeff{"name": "bom-ok"}'.encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"name": "ok", "surprise": 1}, "surprise"),
        ({"name": 42}, "name"),
        ({"name": ""}, "name"),
        ({"name": "../etc"}, "name"),
        ({}, "name"),
        ([1, 2], None),
    ],
)
async def test_invalid_payload_is_422_naming_the_field(admin, payload, param) -> None:
    error = assert_envelope(await admin.post("/v1/projects", json=payload), 422, "invalid_payload")
    assert error["param"] == param


async def test_empty_body_where_one_is_required_is_422(admin) -> None:
    response = await admin.post("/v1/projects", headers={"content-type": "application/json"})
    assert_envelope(response, 422, "invalid_payload")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=abc", "limit"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("order=sideways", "order"),
    ],
)
async def test_query_parameters_of_the_wrong_type_are_422(admin, query, param) -> None:
    error = assert_envelope(await admin.get(f"/v1/projects?{query}"), 422)
    assert error["param"] == param


async def test_unexpected_error_is_500_with_request_id_and_no_internals(app, client_for):
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    app.add_api_route("/test-only/boom", boom)
    response = await client_for().get("/test-only/boom", headers={"x-request-id": "trace-123"})
    error = assert_envelope(response, 500, "internal_error")
    assert error["type"] == "server_error"
    assert "trace-123" in error["message"]
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    assert response.headers["x-request-id"] == "trace-123"


async def test_request_id_is_generated_echoed_and_sanitised(client) -> None:
    generated = await client.get("/healthz")
    assert generated.headers["x-request-id"].startswith("req_")
    echoed = await client.get("/healthz", headers={"x-request-id": "abc-123.def"})
    assert echoed.headers["x-request-id"] == "abc-123.def"
    hostile = await client.get("/healthz", headers={"x-request-id": "a b\tc<script>"})
    assert hostile.headers["x-request-id"].startswith("req_")
