"""The jobs API in-process: every check before submission, listing, cancel, events, isolation."""

from __future__ import annotations

import pytest

from app.models import Scope
from tests.datasets import adder_jsonl
from tests.test_auth import assert_envelope


class _StubProvider:
    """Stands in for a provider that is configured but never reached by these tests: the
    submitter is not running in-process, so jobs stay stored and unsubmitted."""

    name = "openai"
    supports_pause = True


@pytest.fixture
def app(app_factory):
    return app_factory(providers={"openai": _StubProvider()})


@pytest.fixture
async def api(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


async def upload(api, content: bytes, purpose: str = "fine-tune") -> str:
    response = await api.post(
        "/v1/files", files={"file": ("t.jsonl", content)}, data={"purpose": purpose}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def test_create_stores_the_job_as_openai_describes_it(api) -> None:
    training = await upload(api, adder_jsonl(20))
    body = {
        "model": "gpt-4o-mini-2024-07-18",
        "training_file": training,
        "suffix": "adder",
        "metadata": {"team": "math"},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    }
    response = await api.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files" and job["provider"] == "openai"
    assert job["provider_job_id"] is None and job["fine_tuned_model"] is None
    assert job["method"] == {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {
                "n_epochs": 2,
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
            }
        },
    }
    assert isinstance(job["seed"], int) and job["metadata"] == {"team": "math"}
    assert job["estimated_cost"] > 0 and job["error"] is None and job["result_files"] == []

    assert (await api.get(f"/v1/fine_tuning/jobs/{job['id']}")).json() == job
    listed = (await api.get("/v1/fine_tuning/jobs", params={"metadata[team]": "math"})).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    assert (await api.get("/v1/fine_tuning/jobs", params={"metadata[team]": "art"})).json()[
        "data"
    ] == []
    events = (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/events")).json()["data"]
    assert events[0]["object"] == "fine_tuning.job.event" and "Created" in events[-1]["message"]
    assert (await api.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")).json()["data"] == []

    # Not yet at the provider: cancel is local, then the job is finished and stays so.
    cancelled = (await api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    error = assert_envelope(await api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 400)
    assert error["code"] == "job_finished"
    assert_envelope(await api.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 400)


async def test_files_used_by_unfinished_jobs_cannot_be_deleted(api) -> None:
    training = await upload(api, adder_jsonl(20))
    job = (
        await api.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": training}
        )
    ).json()
    error = assert_envelope(await api.delete(f"/v1/files/{training}"), 409)
    assert error["code"] == "file_in_use" and job["id"] in error["message"]
    await api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert (await api.delete(f"/v1/files/{training}")).status_code == 200


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"model": "gpt-2-small"}, 404, "model"),
        ({"training_file": "file-doesnotexist"}, 400, "training_file"),
        ({"suffix": "has spaces"}, 422, "suffix"),
        ({"suffix": "x" * 65}, 422, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 422, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(16)}}, 422, "metadata"),
        ({"metadata": {"tunegate_job_id": "x"}}, 422, "metadata.tunegate_job_id"),  # reserved
        ({"hyperparameters": {"n_epochs": 51}}, 422, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 0}}, 422, "hyperparameters.batch_size"),
        (
            {"hyperparameters": {"learning_rate_multiplier": 0}},
            422,
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            {"hyperparameters": {"learning_rate_multiplier": "2"}},  # a string, not a number
            422,
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}},
            422,
            "method.dpo.hyperparameters.beta",
        ),
        ({"method": {"type": "reinforcement"}}, 422, "method.type"),
        (
            {
                "hyperparameters": {"n_epochs": 2},
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 3}},
                },
            },
            422,
            "hyperparameters",
        ),
        ({"provider": "together"}, 400, "provider"),
        ({"hyperparameters": {"lora_r": 8}}, 422, "hyperparameters.lora_r"),  # local only
        ({"hyperparameters": {"lora_r": 0}}, 422, "hyperparameters.lora_r"),
        (
            {"hyperparameters": {"target_modules": ["q proj"]}},
            422,
            "hyperparameters.target_modules[0]",
        ),
        ({"surprise": True}, 422, "surprise"),
    ],
)
async def test_bad_job_requests_get_precise_answers(api, change, status, param) -> None:
    training = await upload(api, adder_jsonl(20))
    body = {"model": "gpt-4o-mini", "training_file": training} | change
    error = assert_envelope(await api.post("/v1/fine_tuning/jobs", json=body), status)
    assert error["param"] == param, error


async def test_invalid_files_are_refused_with_the_report_to_read(api) -> None:
    too_few = await upload(api, adder_jsonl(3))
    error = assert_envelope(
        await api.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": too_few}
        ),
        400,
    )
    assert error["code"] == "invalid_training_file" and "too_few_examples" in error["message"]
    assert f"/v1/files/{too_few}/validations/" in error["message"]
    batch = await upload(api, adder_jsonl(20), purpose="batch")
    error = assert_envelope(
        await api.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": batch}
        ),
        400,
    )
    assert "purpose" in error["message"]
    dpo_for_chat = await api.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "gpt-4o-mini",
            "training_file": await upload(api, adder_jsonl(20)),
            "method": {"type": "dpo"},
        },
    )
    assert assert_envelope(dpo_for_chat, 400)["code"] == "invalid_training_file"


async def test_budget_refusal_names_estimate_and_budget(api, client_for, factories) -> None:
    admin = await factories.key(scope=Scope.admin)
    admin_api = client_for(admin.key)
    writer = client_for((await factories.key(admin.project, scope=Scope.write)).key)
    updated = await admin_api.patch(
        f"/v1/projects/{admin.project.id}", json={"training_budget_usd": 0.0001}
    )
    assert updated.json()["training_budget_usd"] == 0.0001
    training = await upload(writer, adder_jsonl(40))
    error = assert_envelope(
        await writer.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o", "training_file": training}
        ),
        400,
    )
    assert error["code"] == "budget_exceeded" and "$0.00" in error["message"]


async def test_without_a_provider_submission_says_what_to_configure(
    app_factory, client_for, factories
):
    bare = app_factory()  # no providers configured
    api = client_for((await factories.key(scope=Scope.write)).key, target=bare)
    training = await upload(api, adder_jsonl(20))
    error = assert_envelope(
        await api.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": training}
        ),
        400,
    )
    assert error["code"] == "provider_not_configured" and "OPENAI_API_KEY" in error["message"]


async def test_jobs_are_private_to_their_project(api, client_for, factories) -> None:
    training = await upload(api, adder_jsonl(20))
    job = (
        await api.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": training}
        )
    ).json()
    stranger = client_for((await factories.key(scope=Scope.write)).key)
    for path in ("", "/events", "/checkpoints"):
        assert_envelope(await stranger.get(f"/v1/fine_tuning/jobs/{job['id']}{path}"), 404)
    assert_envelope(await stranger.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 404)
    assert (await stranger.get("/v1/fine_tuning/jobs")).json()["data"] == []
    other_file = await upload(stranger, adder_jsonl(20))
    error = assert_envelope(
        await api.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": other_file}
        ),
        400,
    )
    assert error["param"] == "training_file"


async def test_an_undated_model_name_becomes_the_snapshot_it_names(api) -> None:
    training = await upload(api, adder_jsonl(20))
    created = await api.post(
        "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": training}
    )
    assert created.status_code == 200, created.text
    assert created.json()["model"] == "gpt-4o-mini-2024-07-18"


async def test_create_is_idempotent(api) -> None:
    training = await upload(api, adder_jsonl(20))
    body = {"model": "gpt-4o-mini", "training_file": training}
    first = await api.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    again = await api.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "job-1"})
    assert first.json()["id"] == again.json()["id"]
    assert len((await api.get("/v1/fine_tuning/jobs")).json()["data"]) == 1
    other = await api.post(
        "/v1/fine_tuning/jobs", json=body | {"suffix": "x"}, headers={"Idempotency-Key": "job-1"}
    )
    assert_envelope(other, 422)


async def test_a_bad_suffix_says_what_is_allowed(api) -> None:
    body = {"model": "gpt-4o-mini-2024-07-18", "training_file": "file-x", "suffix": "a b"}
    error = assert_envelope(await api.post("/v1/fine_tuning/jobs", json=body), 422)
    assert error["param"] == "suffix" and "letters, digits, '-' or '_'" in error["message"]


async def test_continued_fine_tuning_starts_only_from_the_projects_own_models(
    api, client_for, factories
) -> None:
    owner = await factories.key(scope=Scope.write)
    theirs = "ft:gpt-4o-mini-2024-07-18:org-a::Theirs01"
    await factories.fine_tuned_model(owner.project, theirs)
    me = await factories.key(scope=Scope.write)
    mine = "ft:gpt-4o-mini-2024-07-18:org-a::Mine0001"
    await factories.fine_tuned_model(me.project, mine)
    caller = client_for(me.key)
    training = await upload(caller, adder_jsonl(20))
    before = (await caller.get("/v1/fine_tuning/jobs")).json()["data"]  # the one that made mine
    for model in (theirs, "ft:gpt-4o-mini-2024-07-18:org-a::NoSuch01"):
        error = assert_envelope(
            await caller.post(
                "/v1/fine_tuning/jobs", json={"model": model, "training_file": training}
            ),
            404,
        )
        assert error["code"] == "model_not_found" and error["param"] == "model"
    assert (await caller.get("/v1/fine_tuning/jobs")).json()["data"] == before
    created = await caller.post(
        "/v1/fine_tuning/jobs", json={"model": mine, "training_file": training}
    )
    assert created.status_code == 200, created.text
    assert created.json()["model"] == mine
