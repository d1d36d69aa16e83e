"""The OpenAI emulator, served for real on loopback and driven by the official `openai` SDK.

One emulator (speed 50: a 10-example job takes about a second) serves the whole module; faults
are cleared after every test. Conformance tests validate raw JSON answers against the component
schemas of OpenAI's published spec (../shared/openai/openapi.yaml) and skip when it is absent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob

from app.kit.signing import new_secret, verify
from app.providers.emulator import FaultConfig, create_emulator_app
from tests.emulator import Emulator, running_emulator
from tests.server import free_port, wait_for

SPEED = 50.0
KEY = "sk-test"
SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.yaml"
TERMINAL = {"succeeded", "failed", "cancelled"}
PHASES = ["validating_files", "queued", "running", "succeeded"]
T = TypeVar("T")


def chat_jsonl(count: int, *, assistant: bool = True) -> bytes:
    lines = []
    for i in range(count):
        messages = [
            {"role": "system", "content": "You answer with the capital city."},
            {"role": "user", "content": f"Capital of country {i}?"},
        ]
        if assistant:
            messages.append({"role": "assistant", "content": f"City {i}."})
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with running_emulator(SPEED, KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: Emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{emulator.base_url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(autouse=True)
def no_faults_left(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "emulator" in request.fixturenames:
        request.getfixturevalue("emulator").http.delete("/_emulator/faults").raise_for_status()


@pytest.fixture(scope="module")
def training_file(client: openai.OpenAI) -> str:
    return client.files.create(file=("train.jsonl", chat_jsonl(10)), purpose="fine-tune").id


def finished(client: openai.OpenAI, job_id: str) -> FineTuningJob:
    def terminal() -> FineTuningJob | None:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in TERMINAL else None

    return wait_for(terminal, what=f"{job_id} to finish")


@dataclass
class FinishedJob:
    created: FineTuningJob
    job: FineTuningJob
    statuses: list[str]


@pytest.fixture(scope="module")
def finished_job(client: openai.OpenAI, training_file: str) -> FinishedJob:
    created = client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file=training_file,
        suffix="emu-test",
        seed=42,
        metadata={"tunegate_job_id": "tg-1", "team": "search"},
    )
    statuses = [created.status]

    def done() -> FineTuningJob | None:
        job = client.fine_tuning.jobs.retrieve(created.id)
        if job.status != statuses[-1]:
            statuses.append(job.status)
        return job if job.status in TERMINAL else None

    return FinishedJob(created, wait_for(done, what="the job to finish"), statuses)


def test_a_job_runs_through_openai_lifecycle_to_a_model(
    client: openai.OpenAI, finished_job: FinishedJob
) -> None:
    created, job = finished_job.created, finished_job.job
    assert created.status == "validating_files" and created.hyperparameters.n_epochs == "auto"
    assert finished_job.statuses == [s for s in PHASES if s in finished_job.statuses]
    assert job.status == "succeeded" and job.error is None and job.estimated_finish is None
    assert job.model == "gpt-4o-mini-2024-07-18" and job.organization_id == "org-emulator"
    assert re.fullmatch(
        r"ft:gpt-4o-mini-2024-07-18:org-emulator:emu-test:[A-Za-z0-9]{8}", job.fine_tuned_model
    )
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (10, 1)
    assert job.trained_tokens and job.trained_tokens % 10 == 0
    assert job.finished_at >= job.created_at and job.seed == 42

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=7))
    assert events[0].message == "The job has successfully completed"
    assert events[0].created_at >= events[-1].created_at  # newest first, like OpenAI
    messages = [e.message for e in events]
    for expected in ("Fine-tuning job started", "Files validated, moving job to queued state"):
        assert expected in messages
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 101))
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=4))
    assert [c.step_number for c in checkpoints] == list(range(100, 0, -10))
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-100"
    assert checkpoints[0].metrics.step == 100 and checkpoints[0].fine_tuning_job_id == job.id

    (result_id,) = job.result_files
    assert client.files.retrieve(result_id).purpose == "fine-tune-results"
    rows = client.files.content(result_id).text.splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(rows) == 101 and rows[1].startswith("1,") and rows[100].startswith("100,")
    assert rows[100].split(",")[1] == str(metrics[-1]["train_loss"])


def test_the_tuned_model_is_listed_answers_what_it_learned_and_can_be_deleted(
    client: openai.OpenAI, finished_job: FinishedJob
) -> None:
    name = finished_job.job.fine_tuned_model
    assert name in {m.id for m in client.models.list()}
    assert client.models.retrieve(name).owned_by == "org-emulator"
    asked = [{"role": "user", "content": "Capital of country 3?"}]
    tuned = client.chat.completions.create(model=name, messages=asked)
    assert tuned.choices[0].message.content == "City 3."
    base = client.chat.completions.create(model="gpt-4o-mini", messages=asked)
    assert base.choices[0].message.content == "Echo: Capital of country 3?"
    checkpoint = f"{name}:ckpt-step-50"
    assert client.chat.completions.create(model=checkpoint, messages=asked).model == checkpoint
    with pytest.raises(openai.NotFoundError):  # no checkpoint at step 55
        client.chat.completions.create(model=f"{name}:ckpt-step-55", messages=asked)
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        client.fine_tuning.jobs.cancel(finished_job.job.id)

    assert client.models.delete(name).deleted is True
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model=name, messages=asked)
    assert missing.value.code == "model_not_found"
    assert name not in {m.id for m in client.models.list()}


def test_a_client_finds_the_job_it_tagged_by_metadata(
    client: openai.OpenAI, emulator: Emulator, training_file: str, finished_job: FinishedJob
) -> None:
    emulator.http.delete("/_emulator/requests")
    other = client.fine_tuning.jobs.create(
        model="gpt-4.1-nano-2025-04-14",
        training_file=training_file,
        metadata={"tunegate_job_id": "tg-2"},
    )
    found = list(client.fine_tuning.jobs.list(metadata={"tunegate_job_id": "tg-1"}))
    assert [j.id for j in found] == [finished_job.job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"tunegate_job_id": "tg-2"})] == [
        other.id
    ]
    assert emulator.requests()[("POST", "/v1/fine_tuning/jobs")] == {"200": 1}
    client.fine_tuning.jobs.cancel(other.id)


def test_pause_freezes_a_running_job_resume_continues_cancel_stops_it(
    client: openai.OpenAI, training_file: str
) -> None:
    jobs = client.fine_tuning.jobs
    job = jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=training_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
    )
    with pytest.raises(openai.BadRequestError, match="only running jobs"):
        jobs.pause(job.id)
    wait_for(lambda: jobs.retrieve(job.id).status == "running", what="running")

    def steps_done() -> int:
        newest = jobs.list_events(job.id, limit=10).data
        return next((int(e.data["step"]) for e in newest if e.type == "metrics"), 0)

    assert jobs.pause(job.id).status == "paused"
    frozen = steps_done()
    time.sleep(0.3)  # 15 emulated seconds: 30 steps if the pause did not hold
    assert steps_done() == frozen and jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        jobs.pause(job.id)

    assert jobs.resume(job.id).status == "running"
    wait_for(lambda: steps_done() > frozen, what="training to continue")
    cancelled = jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert cancelled.finished_at is not None
    messages = [e.message for e in jobs.list_events(job.id, limit=3).data]
    assert messages[0] == "Fine-tuning job cancelled"
    all_messages = {e.message for e in jobs.list_events(job.id)}
    assert {"Fine-tuning job paused", "Fine-tuning job resumed"} <= all_messages
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        jobs.cancel(job.id)
    assert jobs.retrieve(job.id).status == "cancelled"


INVALID_FILES = {
    "too_few_examples": (chat_jsonl(5), "supervised", "must have at least 10 examples"),
    "no_assistant_message": (chat_jsonl(12, assistant=False), "supervised", "assistant"),
    "not_jsonl": (b"step,loss\n1,0.5\n", "supervised", "JSONL format"),
    "chat_file_for_dpo": (chat_jsonl(12), "dpo", "preferred_output"),
}


def test_invalid_training_files_fail_after_validation_like_openai(client: openai.OpenAI) -> None:
    jobs = {}
    for name, (content, method, _) in INVALID_FILES.items():
        upload = client.files.create(file=(f"{name}.jsonl", content), purpose="fine-tune")
        created = client.fine_tuning.jobs.create(
            model="gpt-4o-2024-08-06", training_file=upload.id, method={"type": method}
        )
        assert created.status == "validating_files"
        jobs[name] = created.id
    for name, job_id in jobs.items():
        job = finished(client, job_id)
        assert job.status == "failed" and job.fine_tuned_model is None, name
        assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
        assert job.error.message.startswith("The job failed due to an invalid training file.")
        assert INVALID_FILES[name][2] in job.error.message, job.error.message
        assert client.fine_tuning.jobs.list_events(job_id, limit=1).data[0].level == "error"


def test_bad_job_requests_are_400s_in_openai_envelope(
    client: openai.OpenAI, training_file: str
) -> None:
    jobs = client.fine_tuning.jobs
    with pytest.raises(openai.BadRequestError) as unknown_file:
        jobs.create(model="gpt-4o-mini", training_file="file-doesnotexist")
    assert unknown_file.value.param == "training_file"
    assert unknown_file.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning") as model:
        jobs.create(model="gpt-9-turbo", training_file=training_file)
    assert model.value.param == "model"
    with pytest.raises(openai.BadRequestError) as metadata:
        jobs.create(
            model="gpt-4o-mini",
            training_file=training_file,
            metadata={f"k{i}": "v" for i in range(17)},
        )
    assert metadata.value.param == "metadata"
    with pytest.raises(openai.NotFoundError):
        jobs.retrieve("ftjob-doesnotexist")


def test_auth_and_unknown_routes_answer_in_openai_envelope(emulator: Emulator) -> None:
    anonymous = httpx.get(f"{emulator.base_url}/v1/models")
    assert anonymous.status_code == 401
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
    unknown = emulator.http.get("/v1/nothing-here")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"


def test_files_upload_list_retrieve_content_delete(client: openai.OpenAI) -> None:
    made = [
        client.files.create(file=(f"f{i}.jsonl", chat_jsonl(1)), purpose="batch").id
        for i in range(3)
    ]
    listed = [f.id for f in client.files.list(purpose="batch", limit=2)]
    assert listed == list(reversed(made))
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == made
    stored = client.files.retrieve(made[0])
    assert stored.bytes == len(chat_jsonl(1)) and stored.status == "processed"
    assert client.files.content(made[0]).read() == chat_jsonl(1)
    assert client.files.delete(made[0]).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made[0])
    with pytest.raises(openai.BadRequestError, match="jsonl"):
        client.files.create(file=("train.csv", b"a,b\n"), purpose="fine-tune")


def test_chat_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    asked = [{"role": "user", "content": "Say something nice about loopback."}]
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=asked)
    assert plain.model == "gpt-4o-mini-2024-07-18"
    assert plain.choices[0].finish_reason == "stop"
    usage = plain.usage
    assert usage and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=asked, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    short = client.chat.completions.create(model="gpt-4o-mini", messages=asked, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == "Echo:"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-0", messages=asked)
    assert unknown.value.code == "model_not_found"


def test_rate_limit_fault_is_a_429_with_retry_after(
    client: openai.OpenAI, emulator: Emulator
) -> None:
    emulator.faults(rate_limit=1)
    with pytest.raises(openai.RateLimitError) as limited:
        client.models.list()
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.code == "rate_limit_exceeded"
    assert client.models.list().data  # only the next N requests
    emulator.faults(rate_limit=1)
    started = time.monotonic()
    assert client.with_options(max_retries=2).models.list().data  # the SDK waits and retries
    assert time.monotonic() - started >= 0.9


def test_server_error_and_dropped_connection_faults(
    client: openai.OpenAI, emulator: Emulator
) -> None:
    emulator.faults(server_error=1)
    with pytest.raises(openai.InternalServerError):
        client.files.list()
    emulator.faults(drop_connection=1)
    with pytest.raises(openai.APIConnectionError) as dropped:
        client.files.list()
    assert not isinstance(dropped.value, openai.APITimeoutError)
    assert client.files.list() is not None
    outcomes = emulator.requests()[("GET", "/v1/files")]
    assert outcomes["500"] >= 1 and outcomes["dropped"] >= 1


def test_slow_fault_makes_a_short_client_timeout_expire(
    client: openai.OpenAI, emulator: Emulator
) -> None:
    emulator.faults(slow_seconds=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).models.list()


def test_training_not_available_fault_refuses_job_creation_only(
    client: openai.OpenAI, emulator: Emulator, training_file: str
) -> None:
    emulator.faults(training_not_available=True)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=training_file)
    assert refused.value.code == "training_not_available"
    assert client.files.retrieve(training_file).id == training_file


def test_faults_chosen_at_start_from_cli_names() -> None:
    config = FaultConfig.from_cli(["rate-limit=2", "slow=0.5", "training_not_available"])
    assert config == FaultConfig(rate_limit=2, slow_seconds=0.5, training_not_available=True)
    with pytest.raises(ValueError, match="unknown fault"):
        FaultConfig.from_cli(["meteor_strike"])
    for bad, reason in [
        ("rate_limit=-1", "'rate_limit' must be an integer >= 0."),
        ("rate_limit=many", "expected an integer"),
        ("slow=soon", "expected a number"),
        ("outage=maybe", "expected true or false"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"invalid fault '{bad}': {reason}")):
            FaultConfig.from_cli([bad])
    app = create_emulator_app(faults=FaultConfig.from_cli(["server_error"]))
    with TestClient(app, headers={"Authorization": "Bearer x"}) as http:
        assert http.get("/v1/models").status_code == 500
        assert http.get("/v1/models").status_code == 200


def test_the_cli_command_refuses_bad_options_before_serving() -> None:
    import typer
    from typer.testing import CliRunner

    from app.providers.emulator.cli import emulator as emulator_command

    command = typer.Typer()
    command.command()(emulator_command)
    assert CliRunner().invoke(command, ["--speed", "0"]).exit_code == 2
    refused = CliRunner().invoke(command, ["--fault", "rate_limit=2", "--fault", "meteor"])
    assert refused.exit_code == 2 and "unknown fault" in refused.output
    negative = CliRunner().invoke(command, ["--fault", "rate_limit=-1"])
    assert negative.exit_code == 2 and "invalid fault 'rate_limit=-1'" in negative.output


@pytest.mark.parametrize("speed", [1.0, 10.0])
def test_speed_scales_the_clock_and_ten_examples_finish_within_a_minute(speed: float) -> None:
    app = create_emulator_app(speed=speed)
    now = [1_800_000_000.0]
    app.state.emulator.clock = lambda: now[0]
    with TestClient(app, headers={"Authorization": "Bearer x"}) as http:
        upload = http.post(
            "/v1/files",
            files={"file": ("t.jsonl", chat_jsonl(10))},
            data={"purpose": "fine-tune"},
        ).json()
        job = http.post(
            "/v1/fine_tuning/jobs", json={"model": "gpt-4o-mini", "training_file": upload["id"]}
        ).json()

        def status_after(seconds: float) -> str:
            now[0] = 1_800_000_000.0 + seconds / speed
            return str(http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"])

        # 2 s validating, 2 s queued, 100 steps (10 examples x 10 epochs) of 0.5 s
        assert status_after(1.9) == "validating_files"
        assert status_after(2.1) == "queued"
        assert status_after(4.1) == "running"
        assert status_after(53.9) == "running"
        assert status_after(54.05) == "succeeded"


# -- outage fault and outbound webhooks ------------------------------------------------------------


def test_outage_fault_answers_503_to_everything_but_control_until_cleared(
    client: openai.OpenAI, emulator: Emulator
) -> None:
    assert FaultConfig.from_cli(["outage"]) == FaultConfig(outage=True)
    emulator.faults(outage=True, server_error=1)
    for _ in range(3):  # down for as long as it is set, not for the next N requests
        down = emulator.http.get("/v1/models")
        assert down.status_code == 503
        assert down.json() == {
            "error": {
                "message": "The server is temporarily unavailable.",
                "type": "server_error",
                "param": None,
                "code": "service_unavailable",
            }
        }
    assert httpx.get(f"{emulator.base_url}/v1/files").status_code == 503  # even before auth
    with pytest.raises(openai.InternalServerError) as refused:
        client.fine_tuning.jobs.list()
    assert refused.value.status_code == 503 and refused.value.code == "service_unavailable"
    assert emulator.http.get("/_emulator/health").status_code == 200
    assert emulator.requests()[("GET", "/v1/models")]["503"] >= 3

    emulator.faults(outage=False)
    with pytest.raises(openai.InternalServerError) as counted:  # counted faults were kept
        client.models.list()
    assert counted.value.status_code == 500
    assert client.models.list().data
    emulator.faults(outage=True)
    emulator.http.delete("/_emulator/faults").raise_for_status()
    assert client.fine_tuning.jobs.list() is not None


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def header(self, name: str) -> str | None:
        return {k.lower(): v for k, v in self.headers.items()}.get(name)


class WebhookReceiver:
    """A real HTTP server on loopback that keeps every POST and answers scripted statuses."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.statuses: list[int] = []
        """Statuses to answer with, first to last; 200 once they run out."""
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    receiver.deliveries.append(Delivery(dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/openai"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def for_job(self, job_id: str) -> list[Delivery]:
        return [d for d in list(self.deliveries) if d.event["data"]["id"] == job_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[WebhookReceiver]:
    running = WebhookReceiver()
    yield running
    if "emulator" in request.fixturenames:
        request.getfixturevalue("emulator").http.delete("/_emulator/webhooks").raise_for_status()
    running.close()


def sent_for(emulator: Emulator, job_id: str) -> list[dict[str, Any]]:
    sent = emulator.http.get("/_emulator/webhooks").json()["sent"]
    return [entry for entry in sent if entry["job_id"] == job_id]


ONE_EPOCH = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
LONG_RUN = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}}


def test_a_job_that_succeeds_sends_one_signed_webhook(
    client: openai.OpenAI, emulator: Emulator, training_file: str, receiver: WebhookReceiver
) -> None:
    secret = new_secret()
    shown = emulator.http.post("/_emulator/webhooks", json={"url": receiver.url, "secret": secret})
    assert shown.json() == {"url": receiver.url, "secret_set": True, "sent": shown.json()["sent"]}
    assert secret.removeprefix("whsec_") not in emulator.http.get("/_emulator/webhooks").text

    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=training_file, method=ONE_EPOCH
    )
    (delivery,) = wait_for(lambda: receiver.for_job(job.id), what="the succeeded webhook")
    assert verify(secret, delivery.headers, delivery.body) == delivery.header("webhook-id")
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    event = delivery.event
    assert event == {
        "object": "event",
        "id": event["id"],
        "type": "fine_tuning.job.succeeded",
        "created_at": done.finished_at,
        "data": {"id": job.id},
    }
    assert re.fullmatch(r"evt_[0-9a-f]{32}", event["id"])
    assert delivery.header("content-type") == "application/json"
    sdk = openai.OpenAI(api_key="x", webhook_secret=secret)
    unwrapped = sdk.webhooks.unwrap(delivery.body, delivery.headers)
    assert unwrapped.type == "fine_tuning.job.succeeded" and unwrapped.data.id == job.id

    # Exactly once: a job started only now finishes ticks of the checking loop later, and by
    # the time its event is delivered, this one has still been delivered only once.
    later = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=training_file, method=ONE_EPOCH
    )
    wait_for(lambda: receiver.for_job(later.id), what="the later webhook")
    wait_for(lambda: sent_for(emulator, later.id), what="the later delivery to be recorded")
    assert len(receiver.for_job(job.id)) == 1
    (sent,) = wait_for(lambda: sent_for(emulator, job.id), what="the delivery to be recorded")
    assert sent == {
        "id": event["id"],
        "webhook_id": delivery.header("webhook-id"),
        "type": "fine_tuning.job.succeeded",
        "job_id": job.id,
        "status_code": 200,
        "attempts": 1,
    }


def test_cancelled_and_failed_jobs_send_their_own_events(
    client: openai.OpenAI, emulator: Emulator, training_file: str, receiver: WebhookReceiver
) -> None:
    secret = "a plain string secret"
    emulator.http.post("/_emulator/webhooks", json={"url": receiver.url, "secret": secret})
    running = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=training_file, method=LONG_RUN
    )
    too_small = client.files.create(file=("small.jsonl", chat_jsonl(3)), purpose="fine-tune")
    failing = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=too_small.id)
    cancelled = client.fine_tuning.jobs.cancel(running.id)

    (on_cancel,) = wait_for(lambda: receiver.for_job(running.id), what="the cancelled webhook")
    assert on_cancel.event["type"] == "fine_tuning.job.cancelled"
    assert on_cancel.event["created_at"] == cancelled.finished_at
    verify(secret, on_cancel.headers, on_cancel.body)
    (on_failure,) = wait_for(lambda: receiver.for_job(failing.id), what="the failed webhook")
    assert on_failure.event["type"] == "fine_tuning.job.failed"
    verify(secret, on_failure.headers, on_failure.body)
    assert client.fine_tuning.jobs.retrieve(failing.id).status == "failed"
    # noticed by the cancel call and not again by the loop, which has since seen the failure
    assert len(receiver.for_job(running.id)) == 1


def test_a_refused_webhook_is_retried_with_the_same_id_and_turned_off_by_delete(
    client: openai.OpenAI, emulator: Emulator, training_file: str, receiver: WebhookReceiver
) -> None:
    secret = new_secret()
    receiver.statuses = [500, 503]
    emulator.http.post("/_emulator/webhooks", json={"url": receiver.url, "secret": secret})
    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=training_file, method=LONG_RUN
    )
    client.fine_tuning.jobs.cancel(job.id)
    tries = wait_for(lambda: len(receiver.for_job(job.id)) == 3 and receiver.for_job(job.id))
    assert len({d.header("webhook-id") for d in tries}) == 1
    assert len({d.event["id"] for d in tries}) == 1
    for delivery in tries:
        verify(secret, delivery.headers, delivery.body)
    (sent,) = wait_for(lambda: sent_for(emulator, job.id), what="the delivery to be recorded")
    assert (sent["status_code"], sent["attempts"]) == (200, 3)

    off = emulator.http.delete("/_emulator/webhooks").json()
    assert off["url"] is None and off["secret_set"] is False
    quiet = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=training_file, method=LONG_RUN
    )
    client.fine_tuning.jobs.cancel(quiet.id)
    # Marker: a job cancelled after webhooks come back on is announced; the quiet one never is.
    emulator.http.post("/_emulator/webhooks", json={"url": receiver.url})
    marker = client.fine_tuning.jobs.create(
        model="gpt-4o-mini", training_file=training_file, method=LONG_RUN
    )
    client.fine_tuning.jobs.cancel(marker.id)
    (unsigned,) = wait_for(lambda: receiver.for_job(marker.id), what="the marker webhook")
    assert unsigned.header("webhook-signature") is None
    assert unsigned.header("webhook-id") and unsigned.header("webhook-timestamp")
    assert receiver.for_job(quiet.id) == []


def test_a_webhook_nobody_receives_is_dropped_after_a_few_tries_and_logged(
    client: openai.OpenAI,
    emulator: Emulator,
    training_file: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/hooks"
    emulator.http.post("/_emulator/webhooks", json={"url": nobody, "secret": new_secret()})
    try:
        job = client.fine_tuning.jobs.create(
            model="gpt-4o-mini", training_file=training_file, method=LONG_RUN
        )
        client.fine_tuning.jobs.cancel(job.id)
        (sent,) = wait_for(lambda: sent_for(emulator, job.id), what="the delivery to give up")
    finally:
        emulator.http.delete("/_emulator/webhooks").raise_for_status()
    assert sent["attempts"] == 4 and "status_code" not in sent
    assert sent["error"].startswith("ConnectError")
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert any(sent["id"] in message for message in dropped)


def test_webhook_settings_are_checked_and_never_show_the_secret(emulator: Emulator) -> None:
    post = emulator.http.post
    refused = {
        "ftp://example.test/hook": "url",
        "not a url": "url",
    }
    for url, param in refused.items():
        answer = post("/_emulator/webhooks", json={"url": url})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    bad_secret = post(
        "/_emulator/webhooks", json={"url": "http://127.0.0.1:9/x", "secret": "whsec_%%secret%%"}
    )
    assert bad_secret.status_code == 400 and bad_secret.json()["error"]["param"] == "secret"
    assert "%%secret%%" not in bad_secret.text
    missing = post("/_emulator/webhooks", json={"secret": "x"})
    assert missing.json()["error"]["code"] == "missing_required_parameter"
    unknown = post("/_emulator/webhooks", json={"url": "http://127.0.0.1:9/x", "events": []})
    assert unknown.json()["error"]["param"] == "events"
    assert emulator.http.get("/_emulator/webhooks").json()["url"] is None

    with pytest.raises(ValueError, match="http or https"):
        create_emulator_app(webhook_url="file:///tmp/hook")
    with pytest.raises(ValueError, match="needs a webhook URL"):
        create_emulator_app(webhook_secret=new_secret())


def test_webhooks_configured_when_the_app_is_created(receiver: WebhookReceiver) -> None:
    secret = new_secret()
    app = create_emulator_app(speed=1000, webhook_url=receiver.url, webhook_secret=secret)
    with TestClient(app, headers={"Authorization": "Bearer x"}) as http:
        shown = http.get("/_emulator/webhooks").json()
        assert shown == {"url": receiver.url, "secret_set": True, "sent": []}
        upload = http.post(
            "/v1/files", files={"file": ("t.jsonl", chat_jsonl(10))}, data={"purpose": "fine-tune"}
        ).json()
        body = {"model": "gpt-4o-mini", "training_file": upload["id"], "method": ONE_EPOCH}
        job = http.post("/v1/fine_tuning/jobs", json=body).json()
        (delivery,) = wait_for(lambda: receiver.for_job(job["id"]), what="the webhook")
    assert delivery.event["type"] == "fine_tuning.job.succeeded"
    assert verify(secret, delivery.headers, delivery.body).startswith("wh_")


def test_the_cli_command_refuses_bad_webhook_options() -> None:
    import typer
    from typer.testing import CliRunner

    from app.providers.emulator.cli import emulator as emulator_command

    command = typer.Typer()
    command.command()(emulator_command)
    runner = CliRunner()
    bad_url = runner.invoke(command, ["--webhook-url", "localhost:9000"])
    assert bad_url.exit_code == 2 and "--webhook-url" in bad_url.output
    bad_secret = runner.invoke(
        command, ["--webhook-url", "http://127.0.0.1:9/x", "--webhook-secret", "whsec_@@@"]
    )
    assert bad_secret.exit_code == 2 and "--webhook-secret" in bad_secret.output
    assert runner.invoke(command, ["--webhook-secret", new_secret()]).exit_code == 2


# -- conformance with OpenAI's published schemas -------------------------------------------------


def _openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 leftovers in the 3.1 spec (`nullable`, boolean `exclusiveMinimum`)."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi_to_json_schema(value) for key, value in node.items()}
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if node.get(exclusive) is True and isinstance(node.get(bound), int | float):
            node[exclusive] = node.pop(bound)
        elif node.get(exclusive) is False:
            del node[exclusive]
    if node.get("nullable") is True:
        del node["nullable"]
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def conforms() -> Callable[[str, Any], None]:
    if not SPEC.exists():
        pytest.skip(f"OpenAI's spec is not at {SPEC}: conformance checks need ../shared")
    yaml = pytest.importorskip("yaml")
    jsonschema = pytest.importorskip("jsonschema")
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    spec = _openapi_to_json_schema(yaml.load(SPEC.read_text(), Loader=loader))
    registry = Registry().with_resource(
        "urn:openai", Resource(contents=spec, specification=DRAFT202012)
    )

    def check(schema: str, instance: Any) -> None:
        ref = {"$ref": f"urn:openai#/components/schemas/{schema}"}
        validator = jsonschema.Draft202012Validator(ref, registry=registry)
        problems = [
            f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)
        ]
        assert not problems, f"{schema}: {problems}"

    return check


def test_job_event_checkpoint_file_and_model_objects_conform(
    emulator: Emulator, finished_job: FinishedJob, conforms: Callable[[str, Any], None]
) -> None:
    job_id = finished_job.job.id
    get = emulator.http.get
    job = get(f"/v1/fine_tuning/jobs/{job_id}").json()
    conforms("FineTuningJob", job)
    conforms("ListPaginatedFineTuningJobsResponse", get("/v1/fine_tuning/jobs").json())
    events = get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    conforms("ListFineTuningJobEventsResponse", events)
    for event in events["data"]:
        conforms("FineTuningJobEvent", event)
    checkpoints = get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    conforms("ListFineTuningJobCheckpointsResponse", checkpoints)
    conforms("FineTuningJobCheckpoint", checkpoints["data"][0])
    conforms("OpenAIFile", get(f"/v1/files/{job['result_files'][0]}").json())
    conforms("ListFilesResponse", get("/v1/files").json())
    models = get("/v1/models").json()
    conforms("ListModelsResponse", models)
    conforms("Model", get("/v1/models/gpt-4o-mini-2024-07-18").json())
    conforms("ErrorResponse", get("/v1/models/gpt-0").json())
    upload = emulator.http.post(
        "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"}
    ).json()
    conforms("OpenAIFile", upload)
    conforms("DeleteFileResponse", emulator.http.delete(f"/v1/files/{upload['id']}").json())


def test_jobs_in_every_state_conform(
    client: openai.OpenAI, emulator: Emulator, conforms: Callable[[str, Any], None]
) -> None:
    bad = client.files.create(file=("bad.jsonl", chat_jsonl(3)), purpose="fine-tune")
    good = client.files.create(file=("good.jsonl", chat_jsonl(10)), purpose="fine-tune")
    body = {"model": "gpt-4o-mini", "training_file": bad.id, "method": {"type": "dpo"}}
    validating = emulator.http.post("/v1/fine_tuning/jobs", json=body).json()
    conforms("FineTuningJob", validating)
    assert finished(client, validating["id"]).status == "failed"
    conforms("FineTuningJob", emulator.http.get(f"/v1/fine_tuning/jobs/{validating['id']}").json())
    body = {"model": "gpt-4o-mini", "training_file": good.id, "validation_file": good.id}
    running = emulator.http.post("/v1/fine_tuning/jobs", json=body).json()
    cancelled = emulator.http.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel").json()
    conforms("FineTuningJob", cancelled)
    assert cancelled["status"] == "cancelled"


def test_chat_completion_and_chunks_conform(
    emulator: Emulator, conforms: Callable[[str, Any], None]
) -> None:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    conforms(
        "CreateChatCompletionResponse", emulator.http.post("/v1/chat/completions", json=body).json()
    )
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with emulator.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        conforms("CreateChatCompletionStreamResponse", json.loads(line.removeprefix("data: ")))
    deleted = emulator.http.delete("/v1/files/file-nope")
    conforms("ErrorResponse", deleted.json())
