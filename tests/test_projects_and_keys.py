"""Admin endpoints: projects and API keys, OpenAI-style pagination, tenancy."""

from __future__ import annotations

from app.models import Scope
from tests.test_auth import assert_envelope


async def test_project_lifecycle_and_duplicate_names(client_for, factories) -> None:
    admin = client_for((await factories.key(scope=Scope.admin)).key)
    created = await admin.post("/v1/projects", json={"name": "team-search"})
    assert created.status_code == 200, created.text
    project = created.json()
    assert project["object"] == "project" and project["id"].startswith("proj_")
    assert (await admin.get(f"/v1/projects/{project['id']}")).json() == project
    error = assert_envelope(await admin.post("/v1/projects", json={"name": "team-search"}), 409)
    assert error["param"] == "name"
    assert_envelope(await admin.get("/v1/projects/proj_doesnotexist"), 404)


async def test_pagination_follows_openai_cursor_rules(client_for, factories) -> None:
    admin = client_for((await factories.key(scope=Scope.admin)).key)
    made = [
        (await admin.post("/v1/projects", json={"name": f"page-{i}"})).json()["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    after = None
    while True:
        query = {"limit": 2, "order": "asc"} | ({"after": after} if after else {})
        page = (await admin.get("/v1/projects", params=query)).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [p["id"] for p in page["data"]]
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["id"]
        after = page["last_id"]
    assert [i for i in seen if i in made] == made
    newest_first = (await admin.get("/v1/projects", params={"limit": 100})).json()["data"]
    ids = [p["id"] for p in newest_first]
    assert ids.index(made[-1]) < ids.index(made[0])
    error = assert_envelope(await admin.get("/v1/projects", params={"after": "proj_nope"}), 404)
    assert error["param"] == "after"


async def test_admin_creates_keys_for_another_project_which_stay_in_it(client_for, factories):
    admin = client_for((await factories.key(scope=Scope.admin)).key)
    other = (await admin.post("/v1/projects", json={"name": "tenant-b"})).json()
    made = await admin.post(
        "/v1/api_keys", json={"project_id": other["id"], "scope": "read", "name": "ci"}
    )
    assert made.status_code == 200, made.text
    key = made.json()
    assert key["project_id"] == other["id"] and key["scope"] == "read" and key["name"] == "ci"
    assert key["key"].startswith("tg-")

    listed = (await admin.get("/v1/api_keys", params={"project_id": other["id"]})).json()
    assert [k["id"] for k in listed["data"]] == [key["id"]]
    own = (await admin.get("/v1/api_keys")).json()
    assert key["id"] not in [k["id"] for k in own["data"]]

    tenant = client_for(key["key"])
    assert_envelope(await tenant.get("/v1/api_keys"), 403)

    assert_envelope(await admin.post("/v1/api_keys", json={"project_id": "proj_missing"}), 404)
    assert_envelope(await admin.post("/v1/api_keys", json={"scope": "root"}), 422)


async def test_revoke_by_prefix_and_delete(client_for, factories) -> None:
    admin_creds = await factories.key(scope=Scope.admin)
    admin = client_for(admin_creds.key)
    a = (await admin.post("/v1/api_keys", json={"scope": "read"})).json()
    b = (await admin.post("/v1/api_keys", json={"scope": "read"})).json()
    assert (await client_for(a["key"]).get("/healthz")).status_code == 200

    revoked = await admin.post(f"/v1/api_keys/{a['prefix']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["id"] == a["id"]
    assert_envelope(await client_for(a["key"]).get("/v1/projects"), 401)

    deleted = await admin.delete(f"/v1/api_keys/{b['id']}")
    assert deleted.json() == {"id": b["id"], "object": "api_key.deleted", "deleted": True}
    assert_envelope(await client_for(b["key"]).get("/v1/projects"), 401)
    assert_envelope(await admin.delete("/v1/api_keys/key_unknown"), 404)
    # Revoking twice is harmless and keeps the first revocation time.
    again = await admin.post(f"/v1/api_keys/{a['id']}/revoke")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]


async def test_project_update_renames_sets_budget_and_refuses_bad_changes(
    client_for, factories
) -> None:
    admin = client_for((await factories.key(scope=Scope.admin)).key)
    project = (await admin.post("/v1/projects", json={"name": "patch-me"})).json()
    await admin.post("/v1/projects", json={"name": "taken"})
    url = f"/v1/projects/{project['id']}"

    renamed = await admin.patch(url, json={"name": "patched", "training_budget_usd": 5})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "patched" and renamed.json()["training_budget_usd"] == 5
    # Only the fields sent change: the budget stays until it is set to null.
    assert (await admin.patch(url, json={})).json()["training_budget_usd"] == 5
    cleared = (await admin.patch(url, json={"training_budget_usd": None})).json()
    assert cleared["training_budget_usd"] is None and cleared["name"] == "patched"

    assert assert_envelope(await admin.patch(url, json={"name": "taken"}), 409)["param"] == "name"
    assert assert_envelope(await admin.patch(url, json={"name": None}), 422)["param"] == "name"
    assert (await admin.get(url)).json()["name"] == "patched"
