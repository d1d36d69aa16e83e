"""Jobs end to end with real processes: the official SDK -> `tunegate serve` (its submitter) ->
the OpenAI emulator (`tunegate emulator`) on loopback."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from standardwebhooks import Webhook

from tests.datasets import adder_jsonl
from tests.receiver import Receiver
from tests.server import (
    RunningServer,
    free_port,
    server_env,
    start_server,
    tunegate_command,
    wait_for,
)

pytestmark = pytest.mark.slow
T = TypeVar("T")
ADMIN_KEY = "tg-jobsflow01-0123456789abcdefghijklmnopqrstuvwxyzABCD"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("emulator")
    process = subprocess.Popen(
        [*tunegate_command(), "emulator", "--port", str(port), "--speed", "50"],
        env=server_env(workdir / "data"),
        stdout=(workdir / "emulator.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def up() -> bool:
        assert process.poll() is None, (workdir / "emulator.log").read_text()
        try:
            return http.get("/_emulator/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 30, "the emulator")
    yield http
    http.close()
    process.terminate()
    process.wait(timeout=20)


def start_on_emulator(
    workdir: Path, emulator: httpx.Client, sync_interval: str, **env: str
) -> RunningServer:
    """A tunegate whose OpenAI is the emulator, syncing jobs every `sync_interval`."""
    return start_server(
        workdir,
        TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        TUNEGATE_JOBS__POLL_INTERVAL="PT0.2S",
        TUNEGATE_JOBS__SYNC_INTERVAL_RUNNING=sync_interval,
        TUNEGATE_JOBS__SYNC_INTERVAL_QUEUED=sync_interval,
        TUNEGATE_JOBS__SYNC_INTERVAL_PAUSED=sync_interval,
        OPENAI_API_KEY="sk-emulator-key",
        OPENAI_BASE_URL=f"{emulator.base_url}/v1",
        **env,
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, emulator: httpx.Client
) -> Iterator[RunningServer]:
    running = start_on_emulator(
        tmp_path_factory.mktemp("jobs-serve"),
        emulator,
        "PT0.3S",
        TUNEGATE_INFERENCE__TIMEOUT="PT1.5S",
        TUNEGATE_INFERENCE__USAGE_FLUSH_INTERVAL="PT0.2S",
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_bytes(adder_jsonl(12))
    with path.open("rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id


def upstream_creates(emulator: httpx.Client) -> dict[str, int]:
    for row in emulator.get("/_emulator/requests").json()["data"]:
        if row["method"] == "POST" and row["path"] == "/v1/fine_tuning/jobs":
            return dict(row["outcomes"])
    return {}


def submitted(client: openai.OpenAI, job_id: str) -> Callable[[], Any]:
    def check() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        extra = job.model_extra or {}
        return job if extra.get("provider_job_id") or job.status == "failed" else None

    return check


def test_a_job_is_submitted_once_and_can_be_cancelled(
    client: openai.OpenAI, emulator: httpx.Client, training_file: str
) -> None:
    emulator.delete("/_emulator/requests")
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=training_file,
        suffix="adder",
        metadata={"team": "math"},
    )
    assert job.status == "validating_files" and job.id.startswith("ftjob-")
    done = wait_for(submitted(client, job.id), 30, "submission")
    upstream_id = done.model_extra["provider_job_id"]
    assert upstream_creates(emulator) == {"200": 1}
    upstream = emulator.get(
        f"/v1/fine_tuning/jobs/{upstream_id}", headers={"Authorization": "Bearer x"}
    ).json()
    assert upstream["metadata"] == {"team": "math", "tunegate_job_id": job.id}
    assert upstream["suffix"] if "suffix" in upstream else True

    listed = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert job.id in listed  # auto-pagination over limit=1 pages
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    upstream = emulator.get(
        f"/v1/fine_tuning/jobs/{upstream_id}", headers={"Authorization": "Bearer x"}
    ).json()
    assert upstream["status"] == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert any("cancelled" in m for m in events) and any("Created" in m for m in events)


def test_a_cancel_the_provider_refuses_names_tunegates_job_and_syncs_it(
    emulator: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Syncs a minute apart: only the refusal itself can make tunegate read the job soon.
    running = start_on_emulator(tmp_path_factory.mktemp("refused-cancel"), emulator, "PT60S")
    try:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key=ADMIN_KEY, max_retries=0)
        training = client.files.create(file=("t.jsonl", adder_jsonl(12)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini-2024-07-18", training_file=training.id
        )
        upstream_id = wait_for(submitted(client, job.id), 30, "submission").model_extra[
            "provider_job_id"
        ]
        # The job ends at the provider; tunegate has not heard of it.
        ended = emulator.post(
            f"/v1/fine_tuning/jobs/{upstream_id}/cancel", headers={"Authorization": "Bearer x"}
        )
        assert ended.status_code == 200, ended.text
        assert client.fine_tuning.jobs.retrieve(job.id).status != "cancelled"
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.cancel(job.id)
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "refused_by_provider", error
        assert job.id in error["message"] and upstream_id not in error["message"], error
        wait_for(
            lambda: client.fine_tuning.jobs.retrieve(job.id).status == "cancelled" or None,
            10,
            "the job's state from the provider",
        )
    finally:
        assert running.stop() == 0


def test_a_429_storm_is_ridden_out_without_a_duplicate(
    client: openai.OpenAI, emulator: httpx.Client, training_file: str
) -> None:
    emulator.delete("/_emulator/requests")
    emulator.post("/_emulator/faults", json={"rate_limit": 3}).raise_for_status()
    job = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training_file)
    done = wait_for(submitted(client, job.id), 60, "submission through 429s")
    assert done.status != "failed", done
    creates = upstream_creates(emulator)
    assert creates.get("200") == 1, creates
    client.fine_tuning.jobs.cancel(job.id)


def test_training_not_available_fails_the_job_with_the_providers_message(
    client: openai.OpenAI, emulator: httpx.Client, training_file: str
) -> None:
    emulator.post("/_emulator/faults", json={"training_not_available": True}).raise_for_status()
    try:
        job = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training_file)
        failed = wait_for(
            lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "failed" and j,
            30,
            "the job to fail",
        )
    finally:
        emulator.delete("/_emulator/faults")
    assert failed.error is not None and failed.error.code == "training_not_available"
    assert failed.error.message
    assert failed.finished_at is not None


def finished(client: openai.OpenAI, job_id: str) -> Callable[[], Any]:
    def check() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in {"succeeded", "failed", "cancelled"} else None

    return check


def test_a_job_runs_to_succeeded_and_its_model_is_served_by_the_models_api(
    client: openai.OpenAI, emulator: httpx.Client, training_file: str, server: RunningServer
) -> None:
    receiver = Receiver()
    receiver.up()
    subscribed = httpx.post(
        f"{server.base_url}/v1/webhook_endpoints",
        json={"url": receiver.url("/jobs")},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18", training_file=training_file, suffix="adder"
    )
    done = wait_for(finished(client, job.id), 60, "the job to finish")
    assert done.status == "succeeded", done
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:")
    assert done.trained_tokens and done.finished_at and done.error is None
    assert isinstance(done.hyperparameters.n_epochs, int)

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=20))  # auto-paginates
    assert any(e.type == "metrics" for e in events)
    assert events[0].created_at >= events[-1].created_at  # newest first
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint.startswith(done.fine_tuned_model)

    (result_file,) = done.result_files
    assert client.files.retrieve(result_file).purpose == "fine-tune-results"
    assert client.files.content(result_file).text.startswith("step,")

    # The fine-tuned model answers through tunegate (the emulator answers trained prompts with
    # the trained answer), its base model does not.
    asked = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "3 + 3?"},
    ]
    tuned = client.chat.completions.create(model=done.fine_tuned_model, messages=asked)
    assert tuned.choices[0].message.content == "6" and tuned.model == done.fine_tuned_model
    assert tuned.usage is not None and tuned.usage.completion_tokens >= 1
    base = client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=asked)
    assert base.choices[0].message.content != "6"
    # An alias answers for its model and switches atomically.
    aliases = f"{server.base_url}/v1/model_aliases"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    alias = {"name": "adder-bot", "model": done.fine_tuned_model}
    assert httpx.post(aliases, json=alias, headers=headers).status_code == 200
    via_alias = client.chat.completions.create(model="adder-bot", messages=asked)
    assert via_alias.choices[0].message.content == "6"
    assert via_alias.model == done.fine_tuned_model
    switch = {"model": "gpt-4o-mini-2024-07-18"}
    assert httpx.patch(f"{aliases}/adder-bot", json=switch, headers=headers).status_code == 200
    after_switch = client.chat.completions.create(model="adder-bot", messages=asked)
    assert after_switch.choices[0].message.content == base.choices[0].message.content
    streamed = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=asked,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "6"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    model = client.models.retrieve(done.fine_tuned_model)
    assert model.id == done.fine_tuned_model and model.object == "model"
    assert done.fine_tuned_model in {m.id for m in client.models.list()}
    assert client.models.delete(done.fine_tuned_model).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(done.fine_tuned_model)
    with pytest.raises(openai.NotFoundError) as gone:
        client.chat.completions.create(model=done.fine_tuned_model, messages=asked)
    assert gone.value.code == "model_not_found"

    # The webhooks of all this reached a subscribed receiver, each verifiable, in order.
    def types() -> list[str]:
        return [r.json["type"] for r in receiver.at("/jobs")]

    wait_for(lambda: "model.deleted" in types(), 30, "the model.deleted webhook")
    receiver.down()
    verifier = Webhook(subscribed["secret"])
    payloads = [verifier.verify(r.body, r.headers) for r in receiver.at("/jobs")]
    about_job = [p for p in payloads if p["type"].startswith("fine_tuning.job.")]
    assert all(
        p["data"].get("id") == job.id or p["data"].get("fine_tuning_job_id") == job.id
        for p in about_job
    )
    lifecycle = [p for p in about_job if p["type"] != "fine_tuning.job.checkpoint.created"]
    assert lifecycle[0]["type"] == "fine_tuning.job.created"
    assert lifecycle[0]["data"]["status"] == "validating_files"
    assert [p["type"] for p in lifecycle[-2:]] == [
        "fine_tuning.job.status_changed",
        "fine_tuning.job.succeeded",
    ]
    changes = [p["data"]["status"] for p in lifecycle if p["type"].endswith("status_changed")]
    assert changes[-1] == "succeeded" and "running" in changes
    assert len(changes) == len(set(changes))  # each change once
    succeeded = lifecycle[-1]["data"]
    assert succeeded["fine_tuned_model"] == done.fine_tuned_model
    assert succeeded["finished_at"] == done.finished_at
    assert any(p["type"] == "fine_tuning.job.checkpoint.created" for p in about_job)
    assert payloads[-1]["type"] == "model.deleted"
    assert payloads[-1]["data"] == {"id": done.fine_tuned_model, "object": "model", "deleted": True}
    assert len({p["id"] for p in payloads}) == len(payloads)


def test_pause_and_resume_go_through_to_the_provider(
    client: openai.OpenAI, emulator: httpx.Client, training_file: str
) -> None:
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=training_file,
        hyperparameters={"n_epochs": 50},
    )
    with pytest.raises(openai.BadRequestError):  # not running yet
        client.fine_tuning.jobs.resume(job.id)
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 60, "running")
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    upstream_id = paused.model_extra["provider_job_id"]

    def upstream_status() -> str:
        return str(
            emulator.get(
                f"/v1/fine_tuning/jobs/{upstream_id}", headers={"Authorization": "Bearer x"}
            ).json()["status"]
        )

    assert upstream_status() == "paused"
    time.sleep(1)  # syncs meanwhile leave it paused
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "running" and upstream_status() == "running"
    client.fine_tuning.jobs.cancel(job.id)
    assert upstream_status() == "cancelled"


def test_chat_completions_reach_base_models_and_upstream_errors_keep_openais_shape(
    client: openai.OpenAI, emulator: httpx.Client
) -> None:
    hello = [{"role": "user", "content": "hello there"}]
    answer = client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=hello)
    assert answer.object == "chat.completion" and answer.choices[0].message.content
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="gpt-4o-mini-2024-07-18", messages=hello, stream=True
        )
        if c.choices
    ]
    assert len(pieces) > 1 and "".join(pieces) == answer.choices[0].message.content
    try:
        emulator.post("/_emulator/faults", json={"rate_limit": 1})
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=hello)
        assert limited.value.status_code == 429
        assert limited.value.response.headers.get("retry-after")
        emulator.post("/_emulator/faults", json={"server_error": 1})
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=hello)
        assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
        emulator.post("/_emulator/faults", json={"slow_seconds": 3})
        with pytest.raises(openai.InternalServerError) as late:  # TUNEGATE_INFERENCE__TIMEOUT
            client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=hello)
        assert late.value.status_code == 504 and late.value.code == "upstream_timeout"
        emulator.delete("/_emulator/faults")
        emulator.post("/_emulator/faults", json={"rate_limit": 1})
        with pytest.raises(openai.RateLimitError):  # before the first chunk: a plain 429
            list(
                client.chat.completions.create(
                    model="gpt-4o-mini-2024-07-18", messages=hello, stream=True
                )
            )
    finally:
        emulator.delete("/_emulator/faults")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-unknown", messages=hello)
    assert unknown.value.code == "model_not_found"


def test_a_client_that_disconnects_mid_stream_closes_the_upstream_request(
    client: openai.OpenAI, emulator: httpx.Client
) -> None:
    def streams() -> dict[str, int]:
        return dict(emulator.get("/_emulator/streams").json())

    before = streams()
    words = [{"role": "user", "content": " ".join(["word"] * 40)}]
    stream = client.chat.completions.create(
        model="gpt-4o-mini-2024-07-18",
        messages=words,
        stream=True,
        extra_body={"emulator_chunk_delay": 0.25},  # passes through tunegate untouched
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert streams()["started"] == before["started"] + 1
    closed_at = time.monotonic()
    stream.close()
    wait_for(
        lambda: streams()["cancelled"] > before["cancelled"], 5, "the upstream stream to close"
    )
    assert time.monotonic() - closed_at < 3  # not the ~10 s the whole answer takes
    assert streams()["finished"] == before["finished"]


def test_usage_totals_match_what_the_upstream_reported(
    client: openai.OpenAI, server: RunningServer
) -> None:
    base = "gpt-4o-mini-2024-07-18"
    http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def totals() -> dict[str, Any]:
        report = http.get("/v1/usage", params={"group_by": "model"}).json()
        return next((row for row in report["data"] if row["key"] == base), {"requests": 0})

    time.sleep(0.6)  # earlier tests' records are written
    before = totals()
    asked = [{"role": "user", "content": "count these five words please"}]
    plain = [client.chat.completions.create(model=base, messages=asked) for _ in range(2)]
    chunks = list(client.chat.completions.create(model=base, messages=asked, stream=True))
    assert all(chunk.usage is None for chunk in chunks)  # not asked for: not forwarded
    with_usage = list(
        client.chat.completions.create(
            model=base, messages=asked, stream=True, stream_options={"include_usage": True}
        )
    )
    reported = [answer.usage for answer in plain] + [plain[0].usage, with_usage[-1].usage]
    expected = {
        "requests": before["requests"] + 4,
        "prompt_tokens": before.get("prompt_tokens", 0) + sum(u.prompt_tokens for u in reported),
        "completion_tokens": before.get("completion_tokens", 0)
        + sum(u.completion_tokens for u in reported),
    }
    after = wait_for(
        lambda: (found := totals())["requests"] >= expected["requests"] and found, 10, "usage"
    )
    assert {k: after[k] for k in expected} == expected
    assert after["total_tokens"] == after["prompt_tokens"] + after["completion_tokens"]
    by_day = http.get("/v1/usage", params={"group_by": "day"}).json()
    assert by_day["totals"]["requests"] >= after["requests"]
    assert http.get("/v1/usage", params={"start": 10, "end": 5}).status_code == 422
    http.close()


def test_legacy_completions_serve_a_prompt_completion_fine_tune(
    client: openai.OpenAI, emulator: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    lines = [
        json.dumps({"prompt": f"{n} doubled ->", "completion": f" {2 * n}\n"}) for n in range(12)
    ]
    path = tmp_path_factory.mktemp("legacy") / "double.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with path.open("rb") as handle:
        training = client.files.create(file=handle, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="babbage-002", training_file=training)
    done = wait_for(finished(client, job.id), 60, "the job to finish")
    assert done.status == "succeeded" and done.fine_tuned_model, done
    tuned = client.completions.create(model=done.fine_tuned_model, prompt="5 doubled ->")
    assert tuned.object == "text_completion" and tuned.model == done.fine_tuned_model
    assert tuned.choices[0].text == " 10\n" and tuned.choices[0].finish_reason == "stop"
    assert tuned.usage is not None and tuned.usage.completion_tokens >= 1
    base = client.completions.create(model="babbage-002", prompt="5 doubled ->")
    assert base.choices[0].text != " 10\n"
    # Several prompts at once, and a stop sequence, pass through.
    several = client.completions.create(
        model=done.fine_tuned_model, prompt=["1 doubled ->", "2 doubled ->"], stop=["\n"]
    )
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [" 2", " 4"]
    streamed = list(
        client.completions.create(
            model=done.fine_tuned_model,
            prompt="11 doubled ->",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == " 22\n"
    assert streamed[-1].usage is not None and streamed[-1].usage.total_tokens > 0
    plain_stream = list(
        client.completions.create(model=done.fine_tuned_model, prompt="1 doubled ->", stream=True)
    )
    assert all(c.usage is None for c in plain_stream)  # not asked for: not forwarded
    try:
        emulator.post("/_emulator/faults", json={"server_error": 1})
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model="babbage-002", prompt="hi")
        assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
    finally:
        emulator.delete("/_emulator/faults")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="ft:babbage-002:nobody:x:y", prompt="hi")
    assert unknown.value.code == "model_not_found"


def test_an_ab_alias_splits_live_traffic_by_weight_and_reports_each_arm(
    client: openai.OpenAI, training_file: str, server: RunningServer
) -> None:
    base = "gpt-4o-mini-2024-07-18"
    job = client.fine_tuning.jobs.create(model=base, training_file=training_file, suffix="ab")
    done = wait_for(finished(client, job.id), 60, "the job to finish")
    assert done.status == "succeeded" and done.fine_tuned_model, done
    tuned = done.fine_tuned_model
    http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    split = {"name": "adder-ab", "models": {tuned: 90, base: 10}}
    created = http.post("/v1/model_aliases", json=split)
    assert created.status_code == 200, created.text
    assert created.json()["models"] == {tuned: 90, base: 10}
    asked = [{"role": "user", "content": "3 + 3?"}]

    def ask(user: str | None = None) -> Any:
        extra = {"user": user} if user else {}
        return client.chat.completions.create(
            model="adder-ab", messages=asked, max_tokens=1, **extra
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(), range(1000)))
    served = Counter(answer.model for answer in answers)
    print(f"1,000 requests to a 90/10 split: {dict(served)}")
    assert set(served) == {tuned, base}
    assert abs(served[tuned] / 1000 - 0.90) <= 0.05 and abs(served[base] / 1000 - 0.10) <= 0.05
    # Each arm answers as itself: the fine-tuned model knows the sum, its base does not.
    assert all(a.choices[0].message.content == "6" for a in answers if a.model == tuned)
    alice = [ask("alice") for _ in range(20)]
    assert len({answer.model for answer in alice}) == 1
    served[alice[0].model] += 20

    # Feedback through the request ids the SDK read from `x-request-id`.
    tuned_ids = [a._request_id for a in answers if a.model == tuned][:6]
    base_ids = [a._request_id for a in answers if a.model == base][:4]
    sent = [{"request_id": i, "score": 1.0, "label": "right"} for i in tuned_ids[:5]]
    sent += [{"request_id": tuned_ids[5], "score": -1.0, "comment": "too short"}]
    sent += [{"request_id": i, "score": -0.5, "label": "wrong"} for i in base_ids]
    for feedback in sent:
        answer = http.post("/v1/feedback", json=feedback)
        assert answer.status_code == 200, answer.text
        assert answer.json()["alias"] == "adder-ab"
    assert http.post("/v1/feedback", json={"request_id": "nope", "score": 1}).status_code == 404

    def report() -> Any:
        found = http.get("/v1/evals/ab/adder-ab").json()
        return found if found["requests"] >= 1020 else None

    found = wait_for(report, 10, "the usage records")
    arms = {arm["model"]: arm for arm in found["arms"]}
    assert found["weights"] == {tuned: 90, base: 10} and list(arms) == [tuned, base]
    assert {model: arm["requests"] for model, arm in arms.items()} == dict(served)
    assert arms[tuned]["share"] == served[tuned] / 1020 and arms[tuned]["errors"] == 0
    latency = arms[base]["latency_ms"]
    assert 0 <= latency["p50"] <= latency["p95"] and latency["mean"] is not None
    assert arms[tuned]["completion_tokens"] == served[tuned]  # max_tokens=1
    assert arms[tuned]["feedback"]["count"] == 6
    assert arms[tuned]["feedback"]["mean_score"] == pytest.approx(4 / 6)
    assert arms[tuned]["feedback"]["labels"] == {"right": 5}
    assert arms[base]["feedback"]["count"] == 4
    assert arms[base]["feedback"]["mean_score"] == pytest.approx(-0.5)
    assert arms[base]["feedback"]["score_ci95"] == [-0.5, -0.5]  # all four alike
    http.close()


def test_evaluate_true_queues_an_eval_and_the_cli_prints_the_comparison(
    client: openai.OpenAI, training_file: str, server: RunningServer
) -> None:
    base = "gpt-4o-mini-2024-07-18"
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=training_file,
        validation_file=training_file,  # what the emulator's tuned model learned by heart
        suffix="evald",
        extra_body={"evaluate": True},
    )
    done = wait_for(finished(client, job.id), 60, "the job to finish")
    assert done.status == "succeeded", done
    eval_id = (done.model_extra or {}).get("eval_id")
    http = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def evaluated() -> Any:
        found = http.get(f"/v1/evals/{eval_id}").json()
        return found if found["status"] == "succeeded" else None

    summary = wait_for(evaluated, 60, "the job's eval")["results"]
    assert summary["task"] == "free_text" and summary["examples"] == 12
    assert summary["models"][done.fine_tuned_model]["exact_match"]["value"] == 1.0
    assert summary["models"][base]["exact_match"]["value"] == 0.0

    connection = ("--api-key", ADMIN_KEY, "--base-url", server.base_url)
    models = f"{base},{done.fine_tuned_model}"
    ran = server.cli(
        "evals", "run", "--models", models, "--file", training_file, *connection,
        "--interval", "0.2", timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "exact_match" in ran.stdout and "1.000 [0.758, 1.000]" in ran.stdout  # Wilson
    assert f"{done.fine_tuned_model} is better than {base} on f1" in ran.stdout
    refused = server.cli("evals", "run", "--models", base, "--file", training_file, *connection)
    assert refused.returncode == 2 and "at least two models" in refused.stderr
