"""Evals: the scoring and statistics (pure functions), the API in-process, and the evaluator
worker in-process against a fake OpenAI-compatible server on loopback (tests/fake_llm.py)
reached through the real `openai` provider."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator

import numpy as np
import orjson
import pytest
from sqlalchemy import update

from app.evals import judge, metrics
from app.evals.service import read_examples
from app.evals.tasks import process_one
from app.kit.time import utcnow
from app.models import Eval, Job, Scope
from app.providers.openai import OpenAIProvider
from app.workers.runner import WorkerContext
from tests.conftest import make_settings
from tests.datasets import FILMS, sentiment_jsonl
from tests.fake_llm import GOOD_MODEL, FakeLLM, running_fake_llm
from tests.test_auth import assert_envelope

BASE = "gpt-4o-mini-2024-07-18"  # echoes: right on no sentiment example
JUDGE = "gpt-4o-2024-08-06"
EXACT = metrics.Normalization()


# -- scoring and statistics ----------------------------------------------------------------


def answer(output: str | None, expected: str) -> metrics.Answer:
    if output is None:
        return metrics.Answer(None, False, 0.0, None, None, None, None)
    scored = metrics.score(output, expected, EXACT, json_task=False)
    return metrics.Answer(output, scored.exact_match, scored.f1, None, 10, 5, 1)


def test_token_f1_counts_shared_words_and_unspaced_characters() -> None:
    assert metrics.token_f1("The cat sat.", "the cat sat") == 1.0
    assert metrics.token_f1("a cat", "the dog") == 0.0
    assert metrics.token_f1("cat sat on mat", "cat sat") == pytest.approx(2 / 3)
    # Chinese has no spaces: each character is a word, punctuation of any script is not.
    assert metrics.token_f1("這部電影真棒。", "這部電影真棒") == 1.0
    assert metrics.token_f1("真棒", "糟透了") == 0.0
    # Wherever the characters stand in a run of letters.
    assert metrics.token_f1("iPhone手机", "iPhone 手机") == 1.0


def test_normalization_labels_and_json_detection() -> None:
    assert metrics.Normalization()(" Yes \n") == "Yes"
    assert metrics.Normalization(ignore_case=True)(" Yes ") == "yes"
    assert metrics.Normalization(trim=False)(" Yes ") == " Yes "
    assert metrics.detect_labels(["1", "0", "1", "0 "], EXACT) == ["0", "1"]
    assert metrics.detect_labels(["a long free answer", "another one"], EXACT) is None
    assert metrics.detect_labels([str(i) for i in range(30)] * 2, EXACT) is None
    assert metrics.expects_json(['{"a": 1}', "[1, 2]"])
    assert not metrics.expects_json(['{"a": 1}', "plain"])
    assert metrics.score('{"a": 1}', '{"a": 2}', EXACT, json_task=True).valid_json
    assert metrics.score("{broken", '{"a": 2}', EXACT, json_task=True).valid_json is False


def aggregate(answers, expected, labels=("0", "1")):
    labels = list(labels) if labels else None
    resamples = metrics.Resamples(len(expected))
    return metrics.aggregate(answers, expected, labels, EXACT, False, resamples)


def compare(model, baseline, expected):
    resamples = metrics.Resamples(len(expected))
    tests = metrics.compare(model, baseline, expected, ["0", "1"], EXACT, False, resamples)
    metrics.holm([tests])
    return tests


def test_aggregates_have_intervals_per_label_accuracy_and_a_confusion_matrix() -> None:
    expected = ["1", "0"] * 10
    perfect = [answer(text, text) for text in expected]
    result = aggregate(perfect, expected)
    # Twenty right out of twenty is not certainty: Wilson's interval, not a point.
    assert result["accuracy"]["value"] == 1.0 and result["accuracy"]["ci_method"] == "wilson"
    assert result["accuracy"]["ci_low"] == pytest.approx(0.8389, abs=1e-3)
    assert result["accuracy"]["ci_high"] == 1.0
    assert result["per_label"]["1"]["correct"] == 10 and result["per_label"]["1"]["ci_low"] < 1
    assert result["confusion_matrix"]["matrix"] == [[10, 0, 0], [0, 10, 0]]
    assert result["f1"]["ci_method"] == "bootstrap"

    # Always "1": half right; "0" examples land in the "1" column; a failure is "(other)".
    always_one = [answer("1", text) for text in expected[:-1]] + [answer(None, "0")]
    mixed = aggregate(always_one, expected)
    assert mixed["accuracy"]["value"] == 0.5
    assert mixed["accuracy"]["ci_low"] < 0.5 < mixed["accuracy"]["ci_high"]
    assert mixed["per_label"]["0"]["accuracy"] == 0.0 and mixed["errors"] == 1
    assert mixed["confusion_matrix"]["columns"] == ["0", "1", metrics.OTHER_LABEL]
    assert mixed["confusion_matrix"]["matrix"] == [[0, 9, 1], [0, 10, 0]]
    assert mixed["latency_ms"]["p50"] == 10


def test_a_paired_difference_is_better_only_beyond_noise() -> None:
    expected = ["1", "0"] * 15
    perfect = [answer(text, text) for text in expected]
    echo = [answer("x", text) for text in expected]
    differences = compare(perfect, echo, expected)
    assert differences["accuracy"]["verdict"] == "better"
    assert differences["accuracy"]["difference"] == 1.0
    assert differences["accuracy"]["p_value"] < 1e-6
    assert compare(echo, perfect, expected)["accuracy"]["verdict"] == "worse"
    # Four examples apart in thirty: the bootstrap interval excludes 0, yet the exact test
    # (McNemar: four disagreements, all one way, p = 0.125) does not call it.
    four = [answer(text, text) for text in expected[:4]] + echo[4:]
    close = compare(four, echo, expected)
    assert close["accuracy"]["ci_low"] > 0 and close["accuracy"]["p_value"] == 0.125
    assert close["accuracy"]["verdict"] == "no_significant_difference"
    # One example: nothing can be better.
    assert compare(perfect[:1], echo[:1], expected[:1])["accuracy"]["verdict"] == (
        "no_significant_difference"
    )


def test_p_values_are_adjusted_for_the_models_compared() -> None:
    tests = [{"accuracy": {"difference": 0.2, "p_value": p}} for p in (0.01, 0.04, 0.03)]
    metrics.holm(tests)
    adjusted = [t["accuracy"]["p_value_adjusted"] for t in tests]
    assert adjusted == [0.03, 0.06, 0.06]  # Holm: 3 x 0.01, then max(2 x 0.03, ...), ...
    assert [t["accuracy"]["verdict"] for t in tests] == [
        "better",
        "no_significant_difference",
        "no_significant_difference",
    ]


def test_the_judge_counts_a_win_only_when_both_orders_agree() -> None:
    assert judge.parse_verdict("B") == "B"
    assert judge.parse_verdict("Answer: A. It is more accurate.") == "A"
    assert judge.parse_verdict("tie") == "tie"
    assert judge.parse_verdict("A tie.") == "tie"
    assert judge.parse_verdict("I cannot decide") is None
    assert judge.outcome("B", "A") == "win"  # the model preferred in both positions
    assert judge.outcome("A", "B") == "loss"
    assert judge.outcome("A", "A") == "tie"  # the judge just prefers position A
    assert judge.outcome("tie", "A") == "tie"
    assert judge.outcome(None, "A") == "invalid"
    summary = judge.summarize(["win", "win", "tie", "loss", "invalid"])
    assert (summary["wins"], summary["win_rate"], summary["invalid"]) == (2, 0.5, 1)


# -- the API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeLLM]:
    with running_fake_llm() as running:
        yield running


@pytest.fixture
async def provider(fake_llm: FakeLLM) -> AsyncIterator[OpenAIProvider]:
    instance = OpenAIProvider(api_key="sk-fake-evals", base_url=f"{fake_llm.base_url}/v1")
    yield instance
    await instance.aclose()


@pytest.fixture
def app(app_factory, provider):
    return app_factory(providers={"openai": provider}, evals={"concurrency": 3})


@pytest.fixture
async def api(client_for, factories):
    return client_for((await factories.key(scope=Scope.write)).key)


async def upload(api, content: bytes, name: str = "held_out.jsonl") -> str:
    files = {"file": (name, io.BytesIO(content), "application/jsonl")}
    answer = await api.post("/v1/files", files=files, data={"purpose": "evals"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


async def test_creating_an_eval_checks_models_and_file(api, client_for, factories) -> None:
    held_out = await upload(api, sentiment_jsonl(FILMS[:6]))
    created = await api.post("/v1/evals", json={"models": [BASE, GOOD_MODEL], "file": held_out})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "eval" and body["status"] == "queued"
    assert body["models"] == [BASE, GOOD_MODEL] and body["results"] is None
    assert body["normalize"] == {"trim": True, "ignore_case": False}

    for bad in (
        {"models": [BASE], "file": held_out},
        {"models": [BASE, BASE], "file": held_out},
        {"models": [BASE, GOOD_MODEL], "file": held_out, "temperature": 5},
        {"models": [BASE, GOOD_MODEL], "file": held_out, "surprise": 1},
        {"models": [BASE, GOOD_MODEL], "file": held_out, "metrics": ["vibes"]},
    ):
        assert_envelope(await api.post("/v1/evals", json=bad), 422)
    unknown = await api.post("/v1/evals", json={"models": [BASE, "gpt-nope"], "file": held_out})
    assert assert_envelope(unknown, 404, "model_not_found")["param"] == "models[1]"
    foreign = client_for((await factories.key(scope=Scope.write)).key)
    theirs = await upload(foreign, sentiment_jsonl(FILMS[:2]))
    missing = await api.post("/v1/evals", json={"models": [BASE, GOOD_MODEL], "file": theirs})
    assert assert_envelope(missing, 404)["param"] == "file"
    csv_file = await upload(api, b"prompt,completion\nhi,there\n" * 10, "data.csv")
    not_chat = await api.post("/v1/evals", json={"models": [BASE, GOOD_MODEL], "file": csv_file})
    assert_envelope(not_chat, 400, "invalid_eval_file")
    # Another project sees none of it; a queued eval is cancelled at once.
    assert_envelope(await foreign.get(f"/v1/evals/{body['id']}"), 404, "eval_not_found")
    assert [e["id"] for e in (await api.get("/v1/evals")).json()["data"]] == [body["id"]]
    cancelled = await api.post(f"/v1/evals/{body['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    assert_envelope(await api.post(f"/v1/evals/{body['id']}/cancel"), 409, "eval_finished")
    assert (await api.delete(f"/v1/evals/{body['id']}")).json()["deleted"] is True
    assert_envelope(await api.get(f"/v1/evals/{body['id']}"), 404)


async def test_a_job_may_ask_for_an_evaluation_only_with_a_validation_file(api) -> None:
    training = await upload(api, sentiment_jsonl(), "train.jsonl")
    body = {"model": BASE, "training_file": training, "evaluate": True}
    refused = await api.post("/v1/fine_tuning/jobs", json=body)
    assert assert_envelope(refused, 422)["param"] == "evaluate"


# -- the evaluator worker ------------------------------------------------------------------


def worker_for(app_factory) -> WorkerContext:
    evals = {"concurrency": 3, "write_interval": "PT0S"}  # every answer written at once
    settings = make_settings(data_dir=app_factory.data_dir, evals=evals)
    return WorkerContext(settings, app_factory.database)


async def test_an_eval_compares_models_with_intervals_and_a_judge(
    api, app_factory, provider, fake_llm
) -> None:
    films = FILMS[:15]
    held_out = await upload(api, sentiment_jsonl(films) + b"not json\n\n")
    created = await api.post(
        "/v1/evals",
        json={
            "models": [BASE, GOOD_MODEL],
            "file": held_out,
            "judge": {"model": JUDGE, "rubric": "The right sentiment label."},
        },
    )
    assert created.status_code == 200, created.text
    eval_id = created.json()["id"]
    storage = app_factory.storage()
    assert await process_one(worker_for(app_factory), {"openai": provider}, storage)

    done = (await api.get(f"/v1/evals/{eval_id}")).json()
    assert done["status"] == "succeeded", done["error"]
    n = 2 * len(films)
    assert done["progress"] == {
        "examples": n,
        "completions_done": 4 * n,
        "completions_total": 4 * n,
    }
    results = done["results"]
    assert results["task"] == "classification" and results["labels"] == ["0", "1"]
    assert results["skipped_lines"] == 1
    good, base = results["models"][GOOD_MODEL], results["models"][BASE]
    assert good["accuracy"]["value"] == 1.0 and good["accuracy"]["ci_low"] > 0.85
    assert base["accuracy"]["value"] == 0.0
    assert good["confusion_matrix"]["matrix"] == [[15, 0, 0], [0, 15, 0]]
    assert base["confusion_matrix"]["matrix"] == [[0, 0, 15], [0, 0, 15]]
    assert good["per_label"]["1"]["accuracy"] == 1.0
    assert good["latency_ms"]["p50"] >= 0 and good["tokens"]["completion"]["mean"] == 1
    (comparison,) = results["comparisons"]
    assert comparison["metrics"]["accuracy"]["verdict"] == "better"
    assert results["verdict"].startswith(f"{GOOD_MODEL} is better than {BASE} on accuracy")
    (judged,) = results["judge"]["comparisons"]
    assert (judged["wins"], judged["losses"], judged["invalid"]) == (n, 0, 0)
    assert judged["win_rate"] == 1.0

    page = (await api.get(f"/v1/evals/{eval_id}/results", params={"limit": 4})).json()
    assert [item["example"] for item in page["data"]] == [0, 1, 2, 3] and page["has_more"]
    first = page["data"][0]
    assert first["expected"] == "1" and first["prompt"][-1]["content"].endswith("真棒。")
    answers = {a["model"]: a for a in first["answers"]}
    assert answers[GOOD_MODEL] | {"latency_ms": 0} == answers[GOOD_MODEL] | {
        "output": "1",
        "exact_match": True,
        "label": "1",
        "latency_ms": 0,
    }
    assert answers[BASE]["label"] == metrics.OTHER_LABEL
    assert first["judge"][GOOD_MODEL] == {
        "baseline_first": "B",
        "model_first": "A",
        "outcome": "win",
    }
    rest = (await api.get(f"/v1/evals/{eval_id}/results", params={"after": "3"})).json()
    assert rest["data"][0]["example"] == 4
    for cursor in ("x", "²", "99999999999"):
        bad = await api.get(f"/v1/evals/{eval_id}/results", params={"after": cursor})
        assert_envelope(bad, 422)


async def test_a_stopped_evaluator_is_resumed_without_asking_again_and_cancel_stops_it(
    api, app_factory, provider, fake_llm, session
) -> None:
    held_out = await upload(api, sentiment_jsonl(FILMS[:10]))
    created = await api.post("/v1/evals", json={"models": [BASE, GOOD_MODEL], "file": held_out})
    eval_id = created.json()["id"]
    worker, storage = worker_for(app_factory), app_factory.storage()
    before = sum(fake_llm.requests.values())

    # The worker dies after 12 answers, 3 more in flight: its task is cancelled while the
    # server holds them.
    fake_llm.hold(after=12)
    running = asyncio.create_task(process_one(worker, {"openai": provider}, storage))
    while sum(fake_llm.requests.values()) - before < 15:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the 12th answer is written
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    fake_llm.release()
    # Its lease runs out; the next evaluator takes the eval over and finishes it.
    await session.execute(update(Eval).where(Eval.id == eval_id).values(lease_until=utcnow()))
    await session.commit()
    assert await process_one(worker, {"openai": provider}, storage)
    done = (await api.get(f"/v1/evals/{eval_id}")).json()
    assert done["status"] == "succeeded" and done["results"]["examples"] == 20
    # 40 answers, and again only the 3 that were lost (not the 12 written).
    assert sum(fake_llm.requests.values()) - before == 40 + 3

    again = await api.post("/v1/evals", json={"models": [BASE, GOOD_MODEL], "file": held_out})
    second = again.json()["id"]
    fake_llm.hold()
    running = asyncio.create_task(process_one(worker, {"openai": provider}, storage))
    await asyncio.sleep(0.3)
    assert (await api.post(f"/v1/evals/{second}/cancel")).json()["status"] == "running"
    fake_llm.release()
    assert await running
    cancelled = (await api.get(f"/v1/evals/{second}")).json()
    assert cancelled["status"] == "cancelled" and cancelled["results"] is None


async def test_three_models_each_keep_their_judge_verdicts_and_aliases_are_pinned(
    api, app_factory, provider, fake_llm
) -> None:
    held_out = await upload(api, sentiment_jsonl(FILMS[:5]))
    # An alias is evaluated as the model it names when the eval is created.
    alias = await api.post("/v1/model_aliases", json={"name": "prod", "model": GOOD_MODEL})
    assert alias.status_code == 200, alias.text
    created = await api.post(
        "/v1/evals",
        json={
            "models": [BASE, "prod", "gpt-4o-2024-08-06"],
            "file": held_out,
            "judge": {"model": JUDGE, "rubric": "The right sentiment label."},
        },
    )
    assert created.status_code == 200, created.text
    eval_id = created.json()["id"]
    switched = await api.patch("/v1/model_aliases/prod", json={"model": BASE})
    assert switched.status_code == 200
    assert await process_one(worker_for(app_factory), {"openai": provider}, app_factory.storage())
    results = (await api.get(f"/v1/evals/{eval_id}")).json()["results"]
    assert results["models"]["prod"]["accuracy"]["value"] == 1.0  # GOOD_MODEL's answers
    judged = {c["model"]: c for c in results["judge"]["comparisons"]}
    assert judged["prod"]["wins"] == 10 and judged["prod"]["invalid"] == 0
    assert judged["gpt-4o-2024-08-06"]["ties"] == 10  # two echoes: neither is the label
    page = (await api.get(f"/v1/evals/{eval_id}/results")).json()["data"]
    assert all(set(item["judge"]) == {"prod", "gpt-4o-2024-08-06"} for item in page)

    split = await api.post(
        "/v1/model_aliases", json={"name": "ab", "models": {GOOD_MODEL: 50, BASE: 50}}
    )
    assert split.status_code == 200, split.text
    refused = await api.post("/v1/evals", json={"models": [BASE, "ab"], "file": held_out})
    assert assert_envelope(refused, 400, "split_alias")["param"] == "models[1]"


async def test_a_model_that_fails_every_request_fails_the_eval(api, app_factory, fake_llm) -> None:
    held_out = await upload(api, sentiment_jsonl(FILMS[:10]))
    created = await api.post("/v1/evals", json={"models": [BASE, GOOD_MODEL], "file": held_out})
    eval_id = created.json()["id"]
    # The provider refuses tunegate's credentials on every request (a fault that will not pass).
    refusing = OpenAIProvider(api_key="sk-refused", base_url=f"{fake_llm.base_url}/refuse/v1")
    try:
        assert await process_one(
            worker_for(app_factory), {"openai": refusing}, app_factory.storage()
        )
    finally:
        await refusing.aclose()
    failed = (await api.get(f"/v1/evals/{eval_id}")).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "model_failed"
    assert failed["progress"]["completions_done"] < 20  # it stopped early


async def test_evaluate_needs_supervised_chat_data_and_a_deleted_eval_unlinks_its_job(
    client_for, session, factories
) -> None:
    credentials = await factories.key(scope=Scope.write)
    api = client_for(credentials.key)
    training = await upload(api, sentiment_jsonl(), "train.jsonl")
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}
    body = {"model": BASE, "training_file": training, "validation_file": training}
    refused = await api.post("/v1/fine_tuning/jobs", json=body | {"evaluate": True, "method": dpo})
    assert assert_envelope(refused, 422)["param"] == "evaluate"

    # An eval a job made, deleted: the job no longer names it.
    job = Job(
        id="ftjob-evaldeleted0000000001",
        project_id=credentials.project.id,
        provider="openai",
        model=BASE,
        training_file=training,
        validation_file=training,
        method={"type": "supervised"},
        hyperparameters={},
        status="succeeded",
        result_files=[],
        submit_attempts=0,
        evaluate=True,
    )
    session.add(job)
    await session.flush()
    row = Eval(
        id="eval_deletedjob000000000001",
        project_id=credentials.project.id,
        models=[BASE, GOOD_MODEL],
        file_id=training,
        fine_tuning_job_id=job.id,
        config={},
        status="succeeded",
    )
    session.add(row)
    job.eval_id = row.id
    await session.commit()
    linked = (await api.get(f"/v1/fine_tuning/jobs/{job.id}")).json()
    assert linked["eval_id"] == row.id and linked["evaluate"] is True
    assert (await api.delete(f"/v1/evals/{row.id}")).json()["deleted"] is True
    assert (await api.get(f"/v1/fine_tuning/jobs/{job.id}")).json()["eval_id"] is None


def test_held_out_files_are_read_like_any_dataset(tmp_path) -> None:
    """A byte-order mark, CRLF line ends, blank lines and an over-long line: every example is
    found at its line, what is not one is counted as skipped."""
    lines = sentiment_jsonl(FILMS[:2]).decode().splitlines()
    text = "\ufeff" + "\r\n".join([lines[0], "", lines[1], "x" * 5000, lines[2], lines[3]])
    path = tmp_path / "held_out.jsonl"
    path.write_text(text + "\r\n", encoding="utf-8")
    examples, skipped = read_examples(path, limit=100, max_line_bytes=4096)
    assert [e.line for e in examples] == [1, 3, 5, 6] and skipped == 1
    assert examples[0].expected == "1" and examples[0].prompt[0]["content"].endswith("真棒。")
    assert [e.line for e in read_examples(path, limit=2, max_line_bytes=4096)[0]] == [1, 3]


def test_an_answer_in_text_parts_is_an_example(tmp_path) -> None:
    parts = [{"type": "text", "text": "po"}, {"type": "text", "text": "sitive"}]
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    lines = [
        {"messages": [{"role": "user", "content": "Review?"}, {"role": "assistant", "content": p}]}
        for p in (parts, image, None)
    ]
    path = tmp_path / "held_out.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    examples, skipped = read_examples(path, limit=100, max_line_bytes=4096)
    assert [(e.line, e.expected) for e in examples] == [(1, "positive")] and skipped == 2


async def test_metrics_that_do_not_apply_are_named_with_the_reason(
    api, app_factory, provider, fake_llm
) -> None:
    # Free-text answers, each different: not labels, not JSON.
    lines = [
        orjson.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Describe film {i}."},
                    {"role": "assistant", "content": f"Film {i} is a quiet story about {i} cats."},
                ]
            }
        )
        for i in range(6)
    ]
    held_out = await upload(api, b"\n".join(lines) + b"\n")
    worker, storage = worker_for(app_factory), app_factory.storage()

    only_labels = {"models": [BASE, GOOD_MODEL], "file": held_out}
    created = await api.post(
        "/v1/evals", json=only_labels | {"metrics": ["accuracy", "json_valid"]}
    )
    assert created.status_code == 200, created.text
    assert await process_one(worker, {"openai": provider}, storage)
    results = (await api.get(f"/v1/evals/{created.json()['id']}")).json()["results"]
    assert results["task"] == "free_text" and results["primary_metric"] is None
    assert set(results["not_applicable"]) == {"accuracy", "json_valid"}
    assert "not a few labels" in results["not_applicable"]["accuracy"]
    assert "accuracy" not in results["models"][GOOD_MODEL]
    assert results["verdict"].startswith("No verdict: none of the metrics asked for")
    assert "f1 or exact_match" in results["verdict"]

    with_f1 = await api.post("/v1/evals", json=only_labels | {"metrics": ["accuracy", "f1"]})
    assert await process_one(worker, {"openai": provider}, storage)
    results = (await api.get(f"/v1/evals/{with_f1.json()['id']}")).json()["results"]
    assert results["primary_metric"] == "f1" and list(results["not_applicable"]) == ["accuracy"]
    assert results["verdict"].startswith(GOOD_MODEL) and "on f1" in results["verdict"]


def test_the_exact_paired_test_holds_past_a_thousand_disagreements() -> None:
    # 700 right where the baseline was wrong, 400 the other way: 2**1100 is beyond a float.
    differences = np.array([1.0] * 700 + [-1.0] * 400)
    p = metrics.paired_p_value(differences)
    assert 0.0 <= p < 1e-15
    assert metrics.paired_p_value(np.array([1.0, -1.0] * 600)) == pytest.approx(1.0)
