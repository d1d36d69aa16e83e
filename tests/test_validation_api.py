"""Validation reports, estimates, conversions and splits over HTTP (in-process)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from app.kit.time import utcnow
from app.models import Scope, ValidationReport
from app.validation.service import ValidationContext
from app.validation.tasks import process_one
from app.workers.runner import WorkerContext
from tests.conftest import make_settings
from tests.test_auth import assert_envelope

SEEDS = Path(__file__).parent / "fixtures" / "seeds"


def chat_line(question: str, answer: str, system: str | None = "You are terse.") -> bytes:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}, ensure_ascii=False).encode() + b"\n"


def chat_file(n: int) -> bytes:
    return b"".join(chat_line(f"What is {i} + {i}?", str(2 * i)) for i in range(n))


@pytest.fixture
async def api(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


async def upload(api, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
    response = await api.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": purpose}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def test_fine_tune_upload_is_validated_for_the_default_model(api) -> None:
    good = await upload(api, chat_file(60))
    summary = good["validation"]
    assert summary["status"] == "succeeded" and summary["verdict"] == "valid"
    assert summary["model"] == "gpt-4o-mini-2024-07-18" and summary["examples"] == 60
    assert summary["errors"] == 0 and summary["estimated_cost_usd"] > 0

    small = await upload(api, (SEEDS / "marv_en.jsonl").read_bytes(), "marv.jsonl")
    assert small["validation"]["verdict"] == "invalid"  # 3 examples: OpenAI needs 10
    listed = (await api.get("/v1/files")).json()["data"]
    assert {f["id"]: f["validation"]["verdict"] for f in listed} == {
        good["id"]: "valid",
        small["id"]: "invalid",
    }
    batch = await upload(api, chat_file(3), purpose="batch")
    assert batch["validation"] is None


async def test_on_demand_report_pinpoints_errors(api) -> None:
    lines = chat_file(12) + b'{"messages": [{"role": "user", "content": "hi"}]}\n' + b"{not json\n"
    file = await upload(api, lines)
    response = await api.post(
        f"/v1/files/{file['id']}/validations", json={"model": "gpt-4o-mini", "n_epochs": 2}
    )
    assert response.status_code == 200, response.text
    validation = response.json()
    assert validation["object"] == "file.validation" and validation["status"] == "succeeded"
    assert validation["verdict"] == "invalid"
    report = validation["report"]
    codes = {e["code"]: e for e in report["errors"]}
    assert codes["example_missing_assistant_message"]["occurrences"][0]["line"] == 13
    assert codes["invalid_json"]["occurrences"][0]["line"] == 14
    assert report["cost"]["n_epochs"] == 2 and report["cost"]["n_epochs_source"] == "given"
    fetched = await api.get(f"/v1/files/{file['id']}/validations/{validation['id']}")
    assert fetched.json() == validation
    listed = (await api.get(f"/v1/files/{file['id']}/validations")).json()["data"]
    assert validation["id"] in [v["id"] for v in listed]


async def test_validation_requests_are_checked(api, client_for, factories) -> None:
    file = await upload(api, chat_file(12))
    url = f"/v1/files/{file['id']}/validations"
    error = assert_envelope(await api.post(url, json={"model": "gpt-9-ultra"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "gpt-4o-mini" in error["message"]
    error = assert_envelope(
        await api.post(url, json={"model": "gpt-3.5-turbo", "method": "dpo"}), 422
    )
    assert error["param"] == "method"
    assert_envelope(await api.post(url, json={"model": "gpt-4o-mini", "n_epochs": 0}), 422)
    assert_envelope(
        await api.post("/v1/files/file-nope/validations", json={"model": "gpt-4o-mini"}), 404
    )
    stranger = client_for((await factories.key(scope=Scope.write)).key)
    assert_envelope(await stranger.post(url, json={"model": "gpt-4o-mini"}), 404)
    vid = file["validation"]["id"]
    assert_envelope(await stranger.get(f"{url}/{vid}"), 404)
    assert_envelope(await api.get(f"/v1/files/{file['id']}/validations/fval_nope"), 404)


async def test_estimates(api) -> None:
    file = await upload(api, chat_file(60))
    per_epoch = None
    for epochs in (1, 4):
        response = await api.post(
            "/v1/fine_tuning/estimates",
            json={
                "model": "gpt-4o-mini",
                "training_file": file["id"],
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": epochs}},
                },
            },
        )
        assert response.status_code == 200, response.text
        estimate = response.json()
        assert estimate["object"] == "fine_tuning.estimate" and estimate["n_epochs"] == epochs
        per_epoch = per_epoch or estimate["trained_tokens"]
        assert estimate["trained_tokens"] == per_epoch * epochs
        assert estimate["estimated_cost_usd"] == pytest.approx(
            per_epoch * epochs * 3.0 / 1e6, abs=1e-4
        )
    auto = (
        await api.post(
            "/v1/fine_tuning/estimates", json={"model": "gpt-4o-mini", "training_file": file["id"]}
        )
    ).json()
    assert auto["n_epochs"] == 3 and auto["n_epochs_source"] == "default_heuristic"
    both = await api.post(
        "/v1/fine_tuning/estimates",
        json={
            "model": "gpt-4o-mini",
            "training_file": file["id"],
            "hyperparameters": {"n_epochs": 2},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        },
    )
    assert assert_envelope(both, 422)["param"] == "hyperparameters"
    missing = await api.post(
        "/v1/fine_tuning/estimates", json={"model": "gpt-4o-mini", "training_file": "file-x"}
    )
    assert assert_envelope(missing, 404)["param"] == "training_file"


async def test_estimates_refuse_what_job_creation_refuses(api) -> None:
    file = await upload(api, chat_file(60))
    base = {"model": "gpt-4o-mini", "training_file": file["id"]}
    other_method = await api.post(
        "/v1/fine_tuning/estimates",
        json=base | {"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}},
    )
    assert assert_envelope(other_method, 422)["param"] == "method"
    beta = await api.post(
        "/v1/fine_tuning/estimates",
        json=base
        | {"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
    )
    assert assert_envelope(beta, 422)["param"] == "hyperparameters.beta"
    top_level_beta = await api.post(
        "/v1/fine_tuning/estimates", json=base | {"hyperparameters": {"beta": 0.1}}
    )
    assert assert_envelope(top_level_beta, 422)["param"] == "hyperparameters.beta"


async def test_every_seed_format_converts_to_chat_that_validates(api) -> None:
    for name in (
        "sentiment_simple_zh.csv",
        "fund_qa_zh.jsonl",
        "gemini_contents.jsonl",
        "gemini_input_output.jsonl",
    ):
        source = await upload(api, (SEEDS / name).read_bytes(), name)
        response = await api.post(
            f"/v1/files/{source['id']}/conversions", json={"system_message": "Answer briefly."}
        )
        assert response.status_code == 200, response.text
        conversion = response.json()
        converted = conversion["file"]
        assert converted["format"] == "chat" and converted["examples"] == source["examples"]
        assert converted["derived_from"]["file_id"] == source["id"]
        assert converted["derived_from"]["operation"] == "conversion"
        hint = (await _report(api, source))["errors"]
        unsupported = [e for e in hint if e["code"] == "unsupported_format"]
        assert unsupported and f"/v1/files/{source['id']}/conversions" in json.dumps(unsupported)
        codes = {e["code"] for e in (await _report(api, converted))["errors"]}
        assert codes <= {"too_few_examples"}, (name, codes)
        first = json.loads(
            (await api.get(f"/v1/files/{converted['id']}/content")).content.splitlines()[0]
        )
        # The option adds a system message where the data has none (Gemini's own is kept).
        own = "You are a helpful and harmless AI assistant."
        expected = own if name == "gemini_contents.jsonl" else "Answer briefly."
        assert first["messages"][0] == {"role": "system", "content": expected}


async def _report(api, file) -> dict:
    url = f"/v1/files/{file['id']}/validations/{file['validation']['id']}"
    return (await api.get(url)).json()["report"]


async def test_split_is_deterministic_and_disjoint(api) -> None:
    source = await upload(api, chat_file(40))
    body = {"validation_fraction": 0.25, "seed": 7}
    first = (await api.post(f"/v1/files/{source['id']}/splits", json=body)).json()
    again = (await api.post(f"/v1/files/{source['id']}/splits", json=body)).json()
    assert first["object"] == "file.split"
    assert first["train_file"]["examples"] == 30 and first["validation_file"]["examples"] == 10
    assert first["train_file"]["sha256"] == again["train_file"]["sha256"]
    train = (await api.get(f"/v1/files/{first['train_file']['id']}/content")).content.splitlines()
    held = (
        await api.get(f"/v1/files/{first['validation_file']['id']}/content")
    ).content.splitlines()
    assert not set(train) & set(held) and sorted(train + held) == sorted(chat_file(40).splitlines())
    for fraction in (0.9, "0.2", True):  # out of range; a string or a boolean is no number
        error = assert_envelope(
            await api.post(
                f"/v1/files/{source['id']}/splits", json={"validation_fraction": fraction}
            ),
            422,
        )
        assert error["param"] == "validation_fraction", error
    csv = await upload(api, (SEEDS / "sentiment_simple_zh.csv").read_bytes(), "s.csv")
    assert_envelope(
        await api.post(f"/v1/files/{csv['id']}/splits", json={"validation_fraction": 0.2}), 400
    )


async def test_large_files_go_to_the_validator_worker(app_factory, client_for, factories, session):
    queued_app = app_factory(validation={"inline_max_bytes": 0})
    api = client_for((await factories.key(scope=Scope.write)).key, target=queued_app)
    file = await upload(api, chat_file(20))
    assert file["validation"]["status"] == "queued"
    settings = make_settings(data_dir=app_factory.data_dir)
    worker = WorkerContext(settings, app_factory.database)
    context = ValidationContext(settings, app_factory.storage(), app_factory.sessionmaker)

    assert await process_one(worker, context) is True
    assert await process_one(worker, context) is False  # nothing left
    done = (await api.get(f"/v1/files/{file['id']}/validations/{file['validation']['id']}")).json()
    assert done["status"] == "succeeded" and done["verdict"] == "valid_with_warnings"
    assert done["progress"]["bytes_done"] == file["bytes"] and done["report"]["examples"] == 20

    # A report left "running" by a dead worker is taken over once its lease has expired.
    stale = (
        await api.post(f"/v1/files/{file['id']}/validations", json={"model": "gpt-4.1-mini"})
    ).json()
    await session.execute(
        update(ValidationReport)
        .where(ValidationReport.id == stale["id"])
        .values(status="running", lease_until=utcnow() - timedelta(seconds=1), attempts=1)
    )
    await session.commit()
    assert await process_one(worker, context) is True
    taken = (await api.get(f"/v1/files/{file['id']}/validations/{stale['id']}")).json()
    assert taken["status"] == "succeeded"

    # A queued report can be cancelled before any worker claims it.
    queued = (
        await api.post(f"/v1/files/{file['id']}/validations", json={"model": "gpt-4o"})
    ).json()
    cancelled = (await api.post(f"/v1/files/{file['id']}/validations/{queued['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled"
    assert await process_one(worker, context) is False
    assert_envelope(await api.post(f"/v1/files/{file['id']}/validations/{stale['id']}/cancel"), 409)


async def test_estimate_for_a_large_file_queues_one_validation_to_poll(
    app_factory, client_for, factories
) -> None:
    queued_app = app_factory(validation={"inline_max_bytes": 0})
    api = client_for((await factories.key(scope=Scope.write)).key, target=queued_app)
    file = await upload(api, chat_file(20), purpose="batch")
    body = {"model": "gpt-4.1-mini", "training_file": file["id"]}
    first = assert_envelope(await api.post("/v1/fine_tuning/estimates", json=body), 409)
    again = assert_envelope(await api.post("/v1/fine_tuning/estimates", json=body), 409)
    assert first["code"] == "validation_pending"
    validation_id = first["message"].split("(")[1].split(",")[0]
    assert validation_id in again["message"]  # the same report, not a new one each time
    polled = await api.get(f"/v1/files/{file['id']}/validations/{validation_id}")
    assert polled.status_code == 200 and polled.json()["status"] == "queued"
