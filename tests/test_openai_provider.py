"""The `openai` provider against the OpenAI emulator, over loopback HTTP, through the real SDK.

One emulator (speed 100: a 10-example job takes about half a second) serves the module; faults
are switched with `POST /_emulator/faults` and cleared after every test. The provider is the
production class, unchanged: only its base URL points at the emulator.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx2
import openai
import pytest

from app.config import Settings
from app.providers.base import (
    Provider,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderJob,
    ProviderNotFound,
    ProviderNotSupported,
    ProviderPermissionDenied,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    retry_after_seconds,
)
from app.providers.openai import OpenAIProvider, translate_error
from app.providers.registry import build_providers, close_providers
from tests.emulator import Emulator, running_emulator

SPEED = 100.0
KEY = "sk-provider-test-0123456789abcdef"
TERMINAL = {"succeeded", "failed", "cancelled"}
T = TypeVar("T")


async def wait_for(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def chat_jsonl(count: int) -> str:
    lines = []
    for i in range(count):
        messages = [
            {"role": "system", "content": "You answer with the capital city."},
            {"role": "user", "content": f"Capital of country {i}?"},
            {"role": "assistant", "content": f"City {i}."},
        ]
        lines.append(json.dumps({"messages": messages}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with running_emulator(SPEED, KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def no_faults_left(emulator: Emulator) -> Iterator[None]:
    yield
    emulator.http.delete("/_emulator/faults").raise_for_status()


@pytest.fixture(scope="module")
async def provider(emulator: Emulator) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(api_key=KEY, base_url=f"{emulator.base_url}/v1", timeout=10)
    yield provider
    await provider.aclose()


@pytest.fixture(scope="module")
async def training_file(provider: OpenAIProvider, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("provider") / "blob-3f2a"  # stored under a content hash
    path.write_text(chat_jsonl(10))
    return await provider.upload_file("train.jsonl", path)


async def finished(provider: Provider, job_id: str) -> ProviderJob:
    async def terminal() -> ProviderJob | None:
        job = await provider.retrieve_job(job_id)
        return job if job.status in TERMINAL else None

    return await wait_for(terminal, f"{job_id} to finish")


async def new_job(provider: Provider, training_file: str, **changes: Any) -> ProviderJob:
    """`provider.create_job` of gpt-4o-mini with every optional argument unset but `changes`."""
    arguments: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "training_file": training_file,
        "validation_file": None,
        "method": None,
        "hyperparameters": None,
        "suffix": None,
        "seed": None,
        "metadata": {},
    }
    return await provider.create_job(**(arguments | changes))


@dataclass
class FinishedJob:
    created: ProviderJob
    job: ProviderJob


@pytest.fixture(scope="module")
async def finished_job(provider: OpenAIProvider, training_file: str) -> FinishedJob:
    created = await new_job(
        provider,
        training_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10}}},
        suffix="provider-test",
        seed=7,
        metadata={"tunegate_job_id": "ftjob-x"},
        idempotency_key="ftjob-x-create",
    )
    return FinishedJob(created, await finished(provider, created.id))


async def test_a_job_is_created_tagged_found_by_its_tag_and_runs_to_a_model(
    provider: OpenAIProvider, finished_job: FinishedJob
) -> None:
    created, job = finished_job.created, finished_job.job
    assert created.status == "validating_files" and created.model == "gpt-4o-mini-2024-07-18"
    assert created.metadata == {"tunegate_job_id": "ftjob-x"} and created.error is None
    assert created.raw["user_provided_suffix"] == "provider-test"

    found = await provider.find_job_by_metadata("tunegate_job_id", "ftjob-x")
    assert found is not None and found.id == created.id
    assert await provider.find_job_by_metadata("tunegate_job_id", "ftjob-unknown") is None
    assert await provider.find_job_by_metadata("other_key", "ftjob-x") is None

    assert job.status == "succeeded" and job.error is None
    assert job.fine_tuned_model is not None
    assert job.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:org-emulator:provider-test:")
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.hyperparameters["n_epochs"] == 10 and job.method is not None
    assert job.method["type"] == "supervised"
    assert len(job.result_files) == 1 and job.finished_at and job.finished_at >= job.created_at


async def test_find_job_by_metadata_returns_the_newest_of_several_tagged_jobs(
    provider: OpenAIProvider, training_file: str
) -> None:
    made = []
    for _ in range(2):
        made.append(
            await new_job(
                provider,
                training_file,
                model="gpt-4.1-nano-2025-04-14",
                metadata={"tunegate_job_id": "ftjob-twice", "team": "search"},
            )
        )
    found = await provider.find_job_by_metadata("tunegate_job_id", "ftjob-twice")
    assert found is not None and found.id == made[-1].id
    for job in made:
        assert (await provider.cancel_job(job.id)).status == "cancelled"


async def test_events_after_a_cursor_are_only_newer_ones_oldest_first(
    provider: OpenAIProvider, emulator: Emulator, finished_job: FinishedJob
) -> None:
    job_id = finished_job.job.id
    # What OpenAI lists (newest first, 100 steps + bookkeeping: more than one page of 100).
    sdk = openai.OpenAI(api_key=KEY, base_url=f"{emulator.base_url}/v1", max_retries=0)
    everything = [e.id for e in sdk.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]
    sdk.close()
    assert len(everything) > 100

    first = await provider.list_events(job_id, limit=100)
    assert [e.id for e in first] == everything[:100]
    assert first[0].message.startswith("Created fine-tuning job")
    assert [e.created_at for e in first] == sorted(e.created_at for e in first)
    metrics = [e for e in first if e.type == "metrics"]
    assert metrics and metrics[0].data is not None and metrics[0].data["step"] == 1

    rest = await provider.list_events(job_id, after=first[-1].id)
    assert [e.id for e in rest] == everything[100:]
    assert rest[-1].message == "The job has successfully completed"
    assert await provider.list_events(job_id, after=rest[-1].id) == []

    middle = await provider.list_events(job_id, after=everything[9], limit=5)
    assert [e.id for e in middle] == everything[10:15]


async def test_checkpoints_after_a_cursor_oldest_first(
    provider: OpenAIProvider, finished_job: FinishedJob
) -> None:
    job = finished_job.job
    checkpoints = await provider.list_checkpoints(job.id)
    assert [c.step_number for c in checkpoints] == list(range(10, 101, 10))
    last = checkpoints[-1]
    assert last.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-100"
    assert last.metrics["step"] == 100 and "train_loss" in last.metrics
    newer = await provider.list_checkpoints(job.id, after=checkpoints[4].id)
    assert [c.step_number for c in newer] == [60, 70, 80, 90, 100]
    assert await provider.list_checkpoints(job.id, after=last.id) == []


async def test_pause_resume_and_cancel_a_running_job(
    provider: OpenAIProvider, training_file: str
) -> None:
    assert provider.supports_pause
    job = await new_job(
        provider,
        training_file,
        model="gpt-4o-mini-2024-07-18",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}},
        metadata={"tunegate_job_id": "ftjob-pause"},
    )
    with pytest.raises(ProviderBadRequest, match="only running jobs") as early:
        await provider.pause_job(job.id)
    assert early.value.retryable is False and early.value.status == 400

    async def running() -> bool:
        return (await provider.retrieve_job(job.id)).status == "running"

    await wait_for(running, "the job to run")
    before = await provider.list_events(job.id)
    paused = await provider.pause_job(job.id)
    assert paused.status == "paused"
    resumed = await provider.resume_job(job.id)
    assert resumed.status == "running"

    async def newer_events() -> list[Any]:
        return await provider.list_events(job.id, after=before[-1].id)

    newer = await wait_for(newer_events, "events after the resume")
    assert not {e.id for e in newer} & {e.id for e in before}
    assert {"Fine-tuning job paused", "Fine-tuning job resumed"} <= {e.message for e in newer}

    cancelled = await provider.cancel_job(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    with pytest.raises(ProviderBadRequest, match="already cancelled"):
        await provider.cancel_job(job.id)


async def test_chat_completions_plain_and_streamed_then_the_model_is_deleted(
    provider: OpenAIProvider, finished_job: FinishedJob
) -> None:
    model = finished_job.job.fine_tuned_model
    assert model is not None
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Capital of country 3?"}],
    }
    plain = await provider.chat_completion(body)
    assert plain["object"] == "chat.completion" and plain["model"] == model
    assert plain["choices"][0]["message"]["content"] == "City 3."
    assert plain["usage"]["total_tokens"] > 0

    chunks = [
        chunk
        async for chunk in provider.stream_chat_completion(
            {**body, "stream_options": {"include_usage": True}}
        )
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "City 3."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]

    # Closing the iterator early ends the upstream request; the provider stays usable.
    stream = cast(AsyncGenerator[dict[str, Any], None], provider.stream_chat_completion(body))
    first = await anext(stream)
    assert first["object"] == "chat.completion.chunk"
    await stream.aclose()

    await provider.delete_model(model)
    with pytest.raises(ProviderNotFound) as gone:
        await provider.chat_completion(body)
    assert gone.value.code == "model_not_found" and gone.value.retryable is False
    with pytest.raises(ProviderNotFound):
        await anext(provider.stream_chat_completion(body))
    with pytest.raises(ProviderNotFound):
        await provider.delete_model(model)


async def test_chat_completion_passes_every_parameter_through(provider: OpenAIProvider) -> None:
    # A typed `chat.completions.create(**body)` would refuse the unknown parameter (TypeError).
    answer = await provider.chat_completion(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "one two three four"}],
            "max_tokens": 3,
            "n": 2,
            "some_future_parameter": {"kept": True},
        }
    )
    assert [c["finish_reason"] for c in answer["choices"]] == ["length", "length"]
    assert answer["choices"][0]["message"]["content"] == "Echo: one"


async def test_base_models_come_from_the_table_even_when_the_listing_fails(
    provider: OpenAIProvider, emulator: Emulator
) -> None:
    models = {m.id: m for m in await provider.list_base_models()}
    assert len(models) == 8
    mini = models["gpt-4o-mini-2024-07-18"]
    assert (mini.context_limit, mini.training_usd_per_1m) == (65_536, 3.00)
    assert mini.methods == ("supervised", "dpo") and mini.shutdown_date is None
    assert models["gpt-3.5-turbo-0125"].context_limit == 16_385
    assert models["babbage-002"].methods == ("supervised",)
    assert models["davinci-002"].training_usd_per_1m == 6.00

    emulator.faults(server_error=1)
    assert len(await provider.list_base_models()) == 8


async def test_upload_refusals_are_bad_requests(provider: OpenAIProvider, tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_text("prompt,completion\na,b\n")
    with pytest.raises(ProviderBadRequest, match="jsonl") as refused:
        await provider.upload_file("train.csv", path)
    assert refused.value.param == "file" and refused.value.retryable is False


async def test_rate_limit_is_retryable_with_retry_after(
    provider: OpenAIProvider, emulator: Emulator, finished_job: FinishedJob
) -> None:
    emulator.faults(rate_limit=1)
    with pytest.raises(ProviderRateLimited) as limited:
        await provider.retrieve_job(finished_job.job.id)
    error = limited.value
    assert error.retryable and error.retry_after == 1.0 and error.status == 429
    assert error.code == "rate_limit_exceeded" and "Rate limit reached" in error.message
    assert (await provider.retrieve_job(finished_job.job.id)).status == "succeeded"


async def test_server_error_and_dropped_connection_are_retryable(
    provider: OpenAIProvider, emulator: Emulator, finished_job: FinishedJob
) -> None:
    emulator.faults(server_error=1)
    with pytest.raises(ProviderServerError) as server:
        await provider.list_events(finished_job.job.id)
    assert server.value.retryable and server.value.status == 500
    emulator.faults(drop_connection=1)
    with pytest.raises(ProviderConnectionError) as dropped:
        await provider.retrieve_job(finished_job.job.id)
    assert dropped.value.retryable and dropped.value.status is None
    emulator.faults(drop_connection=1)
    with pytest.raises(ProviderConnectionError):
        await anext(
            provider.stream_chat_completion(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            )
        )


async def test_a_slow_upstream_is_a_retryable_timeout(emulator: Emulator) -> None:
    impatient = OpenAIProvider(api_key=KEY, base_url=f"{emulator.base_url}/v1", timeout=0.2)
    emulator.faults(slow_seconds=1.0)
    try:
        with pytest.raises(ProviderTimeout) as slow:
            await impatient.retrieve_job("ftjob-any")
        assert slow.value.retryable
    finally:
        await impatient.aclose()


async def test_training_not_available_is_a_terminal_permission_error(
    provider: OpenAIProvider, emulator: Emulator, training_file: str
) -> None:
    emulator.faults(training_not_available=True)
    with pytest.raises(ProviderPermissionDenied) as refused:
        await new_job(provider, training_file, metadata={"tunegate_job_id": "ftjob-refused"})
    error = refused.value
    assert error.code == "training_not_available" and error.retryable is False
    assert error.status == 403 and error.message.startswith("Fine-tuning is not available")
    assert await provider.find_job_by_metadata("tunegate_job_id", "ftjob-refused") is None


async def test_bad_job_requests_and_unknown_jobs_are_terminal(provider: OpenAIProvider) -> None:
    with pytest.raises(ProviderBadRequest) as unknown_file:
        await new_job(provider, "file-doesnotexist")
    assert unknown_file.value.param == "training_file" and not unknown_file.value.retryable
    with pytest.raises(ProviderNotFound) as missing:
        await provider.retrieve_job("ftjob-doesnotexist")
    assert missing.value.param == "fine_tuning_job_id" and not missing.value.retryable


def _status_error(status: int, body: dict[str, Any], headers: dict[str, str]) -> Exception:
    """The exception the SDK itself raises for such an answer."""
    request = httpx2.Request("GET", "https://api.openai.com/v1/fine_tuning/jobs")
    response = httpx2.Response(status, json=body, headers=headers, request=request)
    client = openai.OpenAI(api_key=KEY)
    try:
        return client._make_status_error_from_response(response)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("status", "headers", "expected", "retry_after"),
    [
        (401, {}, ProviderAuthError, None),
        (403, {}, ProviderPermissionDenied, None),
        (408, {}, ProviderServerError, None),
        (409, {}, ProviderServerError, None),
        (422, {}, ProviderBadRequest, None),
        (429, {"retry-after-ms": "1500", "retry-after": "9"}, ProviderRateLimited, 1.5),
        (503, {"retry-after": "3"}, ProviderServerError, 3.0),
        (413, {}, ProviderBadRequest, None),
    ],
)
def test_status_codes_map_to_one_hierarchy_without_leaking_the_key(
    status: int,
    headers: dict[str, str],
    expected: type[ProviderError],
    retry_after: float | None,
) -> None:
    body = {
        "error": {
            "message": f"Incorrect API key provided: {KEY}.",
            "type": "invalid_request_error",
            "param": "p",
            "code": "some_code",
        }
    }
    error = _status_error(status, body, headers)
    assert isinstance(error, openai.OpenAIError)
    translated = translate_error(error, secrets=[KEY])
    assert type(translated) is expected and translated.status == status
    assert translated.retryable is (status in {408, 409, 429, 503})
    assert (translated.code, translated.param, translated.retry_after) == (
        "some_code",
        "p",
        retry_after,
    )
    assert KEY not in translated.message and "[redacted]" in translated.message
    assert KEY not in repr(translated)


def test_an_error_event_in_the_middle_of_a_stream_is_a_server_error() -> None:
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    # What the SDK raises for `data: {"error": {...}}` inside an SSE stream.
    event = openai.APIError(
        "The server had an error", request, body={"message": "Overloaded", "code": "overloaded"}
    )
    translated = translate_error(event)
    assert type(translated) is ProviderServerError and translated.retryable
    assert (translated.message, translated.code, translated.status) == (
        "Overloaded",
        "overloaded",
        None,
    )


def test_retry_after_accepts_http_dates_and_ignores_nonsense() -> None:
    now = 1_800_000_000.0
    date = "Fri, 15 Jan 2027 08:00:05 GMT"  # 1_800_000_005
    assert retry_after_seconds(httpx2.Headers({"Retry-After": date}), now=now) == 5.0
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "soon"})) is None
    assert retry_after_seconds(httpx2.Headers({"Retry-After": "-1"})) is None
    assert retry_after_seconds(httpx2.Headers({})) is None


async def test_pause_is_not_supported_by_default_and_the_registry_needs_a_key(
    provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The base class's answer for providers that cannot pause (the local trainer …).
    with pytest.raises(ProviderNotSupported) as unsupported:
        await Provider.pause_job(provider, "ftjob-any")
    assert unsupported.value.retryable is False

    for name in ("OPENAI_API_KEY", "TUNEGATE_OPENAI__API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TUNEGATE_LOCAL__ENABLED", "off")  # the local provider needs no key
    assert build_providers(Settings(_env_file=None)) == {}
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    configured = build_providers(Settings(_env_file=None))
    assert list(configured) == ["openai"] and isinstance(configured["openai"], OpenAIProvider)
    await close_providers(configured)
