"""Webhook delivery with real processes: `tunegate serve --no-workers` plus `tunegate worker
--role dispatcher` processes on one database, and a real receiver on loopback.

Shows what the issue asks: signatures verify with the `standardwebhooks` package (also across a
secret rotation); a receiver that is down is retried until it is back, each attempt logged; 410
disables an endpoint and records `webhook_endpoint.disabled`; continuous failure disables it too;
a slow receiver does not stall deliveries to another endpoint; a dispatcher killed with SIGKILL
mid-delivery loses nothing (the same `webhook-id` comes again); two dispatchers never send one
delivery at the same time.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.receiver import Answer, Receiver, running_receiver
from tests.server import RunningServer, separate_database, start_server, wait_for, worker_process

pytestmark = pytest.mark.slow

ADMIN_KEY = "tg-webhooks01-0123456789abcdefghijklmnopqrstuvwxyzABCD"
DATABASE = "tunegate_webhooks_process"
# Short on purpose: attempts 0.5 s apart, then 1 s, then 2 s (about 8 s in all).
SCHEDULE = '["PT0.5S","PT0.5S","PT1S","PT1S","PT1S","PT2S","PT2S"]'
DISPATCHER_ENV = {
    "TUNEGATE_WEBHOOKS__RETRY_SCHEDULE": SCHEDULE,
    "TUNEGATE_WEBHOOKS__TIMEOUT": "PT2S",
    "TUNEGATE_WEBHOOKS__LEASE": "PT4S",
    "TUNEGATE_WEBHOOKS__POLL_INTERVAL": "PT0.2S",
    "TUNEGATE_WEBHOOKS__DISABLE_AFTER": "PT6S",
    "TUNEGATE_WEBHOOKS__CONCURRENCY": "8",
    "TUNEGATE_WEBHOOKS__ENDPOINT_CONCURRENCY": "2",
}


@pytest.fixture(scope="module")
def process_database_url(database_url: str) -> Iterator[str]:
    with separate_database(database_url, DATABASE) as url:
        yield url


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, process_database_url: str
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("webhooks"),
        "--no-workers",
        TUNEGATE_DATABASE_URL=process_database_url,
        TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        **DISPATCHER_ENV,
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    ) as client:
        yield client


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


@pytest.fixture
def dispatcher(server: RunningServer, tmp_path: Path) -> Iterator[Any]:
    with worker_process(server, tmp_path / "dispatcher.log", "dispatcher") as process:
        yield process


def endpoint(api: httpx.Client, url: str, events: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if events is not None:
        body["enabled_events"] = events
    response = api.post("/v1/webhook_endpoints", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def send_test(api: httpx.Client, endpoint_id: str) -> dict[str, Any]:
    response = api.post(f"/v1/webhook_endpoints/{endpoint_id}/test")
    assert response.status_code == 202, response.text
    return dict(response.json())


def delivery(api: httpx.Client, delivery_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/webhook_deliveries/{delivery_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def settled(api: httpx.Client, delivery_id: str, status: str = "succeeded") -> Any:
    def check() -> dict[str, Any] | None:
        found = delivery(api, delivery_id)
        return found if found["status"] == status else None

    return check


def test_a_delivery_verifies_with_standardwebhooks_also_across_a_rotation(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    created = endpoint(api, receiver.url("/signed"))
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert "secret" not in api.get(f"/v1/webhook_endpoints/{created['id']}").json()

    first = send_test(api, created["id"])
    done = wait_for(settled(api, first["id"]), 20, "the test delivery")
    (received,) = receiver.at("/signed")
    payload = Webhook(secret).verify(received.body, received.headers)
    assert payload["id"] == received.webhook_id == first["event_id"] == done["event_id"]
    assert payload["type"] == "webhook_endpoint.test"
    assert isinstance(payload["created_at"], int) and payload["data"]["test"] is True
    assert received.headers["content-type"] == "application/json"
    (attempt,) = done["attempts"]
    assert attempt["status_code"] == 200 and attempt["response_body"] == "ok"
    assert attempt["duration_ms"] >= 0 and attempt["error"] is None

    rotated = api.post(f"/v1/webhook_endpoints/{created['id']}/rotate_secret").json()
    assert rotated["secret"] != secret and rotated["secret_rotated_until"] > time.time()
    second = send_test(api, created["id"])
    wait_for(settled(api, second["id"]), 20, "the delivery after the rotation")
    latest = receiver.at("/signed")[-1]
    assert len(latest.headers["webhook-signature"].split()) == 2  # both secrets sign
    for each in (secret, rotated["secret"]):
        assert Webhook(each).verify(latest.body, latest.headers)["id"] == second["event_id"]


def test_a_receiver_that_is_down_is_retried_until_it_is_back(
    api: httpx.Client, dispatcher: Any
) -> None:
    outage = Receiver()
    outage.up()
    url = outage.url("/outage")
    outage.down()  # the port now refuses connections
    try:
        created = endpoint(api, url)
        sent = send_test(api, created["id"])
        wait_for(lambda: len(delivery(api, sent["id"])["attempts"]) >= 2, 20, "two failed attempts")
        outage.up()
        done = wait_for(settled(api, sent["id"]), 20, "delivery once the receiver is back")
    finally:
        outage.down()
    *failed, last = done["attempts"]
    assert failed and all(a["status_code"] is None and a["error"] for a in failed)
    assert last["status_code"] == 200 and done["attempt_count"] == len(done["attempts"])
    assert [a["number"] for a in done["attempts"]] == list(range(1, len(done["attempts"]) + 1))
    assert len(outage.at("/outage")) == 1


def test_error_answers_are_retried_and_retry_after_is_honoured(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    receiver.answer("/flaky", Answer(500, body=b"boom"), Answer(503, retry_after="2"))
    created = endpoint(api, receiver.url("/flaky"))
    sent = send_test(api, created["id"])
    done = wait_for(settled(api, sent["id"]), 20, "delivery after two errors")
    assert [a["status_code"] for a in done["attempts"]] == [500, 503, 200]
    assert done["attempts"][0]["response_body"] == "boom"
    starts = [r.started for r in receiver.at("/flaky")]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert gaps[1] >= 1.9  # Retry-After: 2 beats the schedule's 0.5 s


def test_410_disables_the_endpoint_and_records_the_event(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    watcher = endpoint(api, receiver.url("/watcher"), ["webhook_endpoint.disabled"])
    receiver.answer("/gone", then=Answer(410, body=b"gone"))
    gone = endpoint(api, receiver.url("/gone"))
    sent = send_test(api, gone["id"])
    wait_for(
        lambda: api.get(f"/v1/webhook_endpoints/{gone['id']}").json()["status"] == "disabled",
        20,
        "the endpoint to be disabled",
    )
    found = api.get(f"/v1/webhook_endpoints/{gone['id']}").json()
    assert "410" in found["disabled_reason"]
    assert delivery(api, sent["id"])["attempt_count"] == 1  # not retried
    (notice,) = wait_for(lambda: receiver.at("/watcher"), 20, "webhook_endpoint.disabled")
    payload = Webhook(watcher["secret"]).verify(notice.body, notice.headers)
    assert payload["type"] == "webhook_endpoint.disabled"
    assert payload["data"]["id"] == gone["id"] and payload["data"]["status"] == "disabled"
    refused = api.post(f"/v1/webhook_endpoints/{gone['id']}/test")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "endpoint_disabled"


def test_an_endpoint_failing_continuously_is_disabled(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    receiver.answer("/broken", then=Answer(500))
    broken = endpoint(api, receiver.url("/broken"))
    sent = send_test(api, broken["id"])
    wait_for(
        lambda: api.get(f"/v1/webhook_endpoints/{broken['id']}").json()["status"] == "disabled",
        30,
        "the failing endpoint to be disabled (TUNEGATE_WEBHOOKS__DISABLE_AFTER=6 s)",
    )
    found = api.get(f"/v1/webhook_endpoints/{broken['id']}").json()
    assert "failed continuously" in found["disabled_reason"]
    attempts = delivery(api, sent["id"])["attempts"]
    assert len(attempts) >= 5 and all(a["status_code"] == 500 for a in attempts)
    elapsed = receiver.at("/broken")[-1].started - receiver.at("/broken")[0].started
    assert elapsed >= 5.5


def test_a_slow_receiver_does_not_stall_other_endpoints(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    receiver.answer("/slow", then=Answer(delay=1.5))
    slow = endpoint(api, receiver.url("/slow"))
    fast = endpoint(api, receiver.url("/fast"))
    slow_sent = [send_test(api, slow["id"]) for _ in range(6)]
    fast_sent = [send_test(api, fast["id"]) for _ in range(6)]
    for sent in slow_sent + fast_sent:
        wait_for(settled(api, sent["id"]), 20, "every delivery")
    # The slow one takes its six in three waves of two (1.5 s each); the fast one's six all
    # arrived before the third wave began.
    slow_starts = sorted(r.started for r in receiver.at("/slow"))
    fast_done = max(r.finished for r in receiver.at("/fast"))
    assert fast_done < slow_starts[4], (fast_done - slow_starts[0], slow_starts)
    # Never more than TUNEGATE_WEBHOOKS__ENDPOINT_CONCURRENCY (2) at once to the slow one.
    moments = sorted(
        [(r.started, 1) for r in receiver.at("/slow")]
        + [(r.finished, -1) for r in receiver.at("/slow")]
    )
    open_now = peak = 0
    for _, change in moments:
        open_now += change
        peak = max(peak, open_now)
    assert peak <= 2


def test_a_dispatcher_killed_mid_delivery_loses_nothing(
    api: httpx.Client, server: RunningServer, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.answer("/crash", *[Answer(delay=1.5) for _ in range(4)])
    target = endpoint(api, receiver.url("/crash"))
    with worker_process(server, tmp_path / "first.log", "dispatcher") as first:
        sent = [send_test(api, target["id"]) for _ in range(4)]
        wait_for(lambda: len(receiver.received_at("/crash")) >= 2, 20, "deliveries under way")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    with worker_process(server, tmp_path / "second.log", "dispatcher"):
        for each in sent:
            wait_for(settled(api, each["id"]), 30, "every delivery after the crash")
    ids = Counter(r.webhook_id for r in receiver.received_at("/crash"))
    assert set(ids) == {each["event_id"] for each in sent}  # every event, nothing else
    assert max(ids.values()) >= 2  # what was under way at the kill came again, same webhook-id
    for received in receiver.received_at("/crash"):
        Webhook(target["secret"]).verify(received.body, received.headers)


def test_two_dispatchers_never_send_one_delivery_at_the_same_time(
    api: httpx.Client, server: RunningServer, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.answer("/pair", then=Answer(delay=0.1))
    targets = [endpoint(api, receiver.url("/pair")) for _ in range(3)]
    with (
        worker_process(server, tmp_path / "a.log", "dispatcher"),
        worker_process(server, tmp_path / "b.log", "dispatcher"),
    ):
        sent = [send_test(api, t["id"]) for _ in range(10) for t in targets]
        for each in sent:
            wait_for(settled(api, each["id"]), 30, "every delivery")
    ids = Counter(r.webhook_id for r in receiver.at("/pair"))
    assert ids == Counter({each["event_id"]: 1 for each in sent})
    assert all(len(delivery(api, each["id"])["attempts"]) == 1 for each in sent)


def test_one_endpoints_backlog_does_not_starve_another(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    receiver.answer("/backlog", then=Answer(delay=0.3))
    busy = endpoint(api, receiver.url("/backlog"))
    quiet = endpoint(api, receiver.url("/quiet"))
    backlog = [send_test(api, busy["id"]) for _ in range(60)]  # 9 s at 2 at a time
    for _ in range(3):
        send_test(api, quiet["id"])
    wait_for(lambda: len(receiver.at("/quiet")) == 3, 10, "the quiet endpoint's deliveries")
    quiet_done = max(r.finished for r in receiver.at("/quiet"))
    backlog_before = [r for r in receiver.at("/backlog") if r.finished <= quiet_done]
    assert len(backlog_before) < len(backlog) / 2, len(backlog_before)
    api.patch(f"/v1/webhook_endpoints/{busy['id']}", json={"disabled": True})


def test_odd_answers_and_an_endpoint_deleted_mid_delivery(
    api: httpx.Client, receiver: Receiver, dispatcher: Any
) -> None:
    receiver.answer("/odd", then=Answer(200, body=b"\x00\xff binary \x00"))
    odd = endpoint(api, receiver.url("/odd"))
    sent = send_test(api, odd["id"])
    done = wait_for(settled(api, sent["id"]), 20, "a delivery answered with NUL bytes")
    assert "binary" in done["attempts"][0]["response_body"]

    receiver.answer("/doomed", then=Answer(delay=1.0))
    doomed = endpoint(api, receiver.url("/doomed"))
    send_test(api, doomed["id"])
    wait_for(lambda: receiver.received_at("/doomed"), 10, "the delivery under way")
    assert api.delete(f"/v1/webhook_endpoints/{doomed['id']}").status_code == 200
    wait_for(lambda: receiver.at("/doomed"), 10, "the receiver to answer")
    after = send_test(api, odd["id"])  # the dispatcher carries on
    wait_for(settled(api, after["id"]), 20, "a delivery after the deleted endpoint's")
