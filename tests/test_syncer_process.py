"""The syncer's reliability with real processes: `tunegate serve --no-workers`, a submitter and
two syncers (`tunegate worker`) on one database, the OpenAI emulator on loopback, the official
SDK as the client.

- Two syncers never sync one job at the same time (their logged sync intervals never overlap)
  and never apply a status change or store a provider event twice.
- A syncer killed with SIGKILL in the middle of a sync is replaced by the other once its lease
  has expired, and nothing is lost.
- A provider that is down for a while leaves every job intact; the syncers back off and recover
  by themselves.
- A flood of signed inbound webhooks for one job causes one sync, not one per webhook.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.kit import signing
from tests.datasets import adder_jsonl
from tests.emulator import Emulator, running_emulator
from tests.server import RunningServer, separate_database, start_server, wait_for, worker_process

pytestmark = pytest.mark.slow

ADMIN_KEY = "tg-syncproc1-0123456789abcdefghijklmnopqrstuvwxyzABCD"
EMULATOR_KEY = "sk-emulator-syncer-process"
LEASE = "PT2S"
WEBHOOK_SECRET = "whsec_" + "Zmxvb2Qtb2Ytd2ViaG9va3MtZmxvb2Qtb2Ytd2ViaG8="
SYNCER_ENV = {
    "TUNEGATE_LOG__LEVEL": "DEBUG",
    "TUNEGATE_JOBS__SYNC_INTERVAL_RUNNING": "PT0.3S",
    "TUNEGATE_JOBS__SYNC_INTERVAL_QUEUED": "PT0.3S",
    "TUNEGATE_JOBS__SYNC_MAX_BACKOFF": "PT2S",
}
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with running_emulator(20.0, EMULATOR_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, emulator: Emulator, database_url: str
) -> Iterator[RunningServer]:
    with separate_database(database_url, "tunegate_syncer_process") as url:
        running = start_server(
            tmp_path_factory.mktemp("syncer-process"),
            "--no-workers",
            TUNEGATE_DATABASE_URL=url,
            TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
            TUNEGATE_JOBS__SYNC_LEASE=LEASE,
            TUNEGATE_JOBS__POLL_INTERVAL="PT0.1S",
            OPENAI_API_KEY=EMULATOR_KEY,
            OPENAI_BASE_URL=f"{emulator.base_url}/v1",
            OPENAI_WEBHOOK_SECRET=WEBHOOK_SECRET,
        )
        try:
            yield running
        finally:
            assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY, max_retries=0)


def training_file(client: openai.OpenAI, n: int) -> str:
    content = adder_jsonl(n, shift=n)
    return client.files.create(file=("train.jsonl", content), purpose="fine-tune").id


def create_jobs(client: openai.OpenAI, count: int) -> list[str]:
    return [
        client.fine_tuning.jobs.create(
            model="gpt-4o-mini-2024-07-18", training_file=training_file(client, 12 + i)
        ).id
        for i in range(count)
    ]


def all_finished(client: openai.OpenAI, job_ids: list[str]) -> bool:
    return all(client.fine_tuning.jobs.retrieve(j).status in TERMINAL for j in job_ids)


def every_event(client: openai.OpenAI, job_id: str) -> list[Any]:
    return list(client.fine_tuning.jobs.list_events(job_id, limit=100))


def upstream_events(emulator: Emulator, provider_job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100} | ({"after": after} if after else {})
        page = emulator.http.get(
            f"/v1/fine_tuning/jobs/{provider_job_id}/events", params=params
        ).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def assert_complete_and_once(client: openai.OpenAI, emulator: Emulator, job_id: str) -> None:
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded", job
    assert job.fine_tuned_model and job.result_files and job.trained_tokens
    events = every_event(client, job_id)
    changes = Counter(
        (e.data or {}).get("status") for e in events if (e.data or {}).get("previous_status")
    )
    assert changes and max(changes.values()) == 1, changes  # each status change applied once
    provider_job = (job.model_extra or {})["provider_job_id"]
    upstream = upstream_events(emulator, provider_job)
    # Every provider event stored, none twice: ours = theirs + our own status events + created.
    assert len(events) == len(upstream) + sum(changes.values()) + 1
    assert not any(provider_job in e.message for e in events)  # named by tunegate's id
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job_id))
    assert checkpoints and len({c.id for c in checkpoints}) == len(checkpoints)


def sync_intervals(*logs: Path) -> dict[str, list[tuple[float, float, str]]]:
    intervals: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for log in logs:
        for line in log.read_text().splitlines():
            if '"job sync"' not in line:
                continue
            record = json.loads(line)
            intervals[record["job_id"]].append((record["began"], record["ended"], log.name))
    return intervals


def test_two_syncers_share_the_jobs_without_overlap_or_duplicates(
    client: openai.OpenAI, emulator: Emulator, server: RunningServer, tmp_path: Path
) -> None:
    logs = [tmp_path / "syncer-a.log", tmp_path / "syncer-b.log"]
    with (
        worker_process(server, tmp_path / "submitter.log", "submitter"),
        worker_process(server, logs[0], "syncer", **SYNCER_ENV),
        worker_process(server, logs[1], "syncer", **SYNCER_ENV),
    ):
        job_ids = create_jobs(client, 6)
        wait_for(lambda: all_finished(client, job_ids), 90, "every job to finish")
    for job_id in job_ids:
        assert_complete_and_once(client, emulator, job_id)
    intervals = sync_intervals(*logs)
    assert {name for spans in intervals.values() for *_, name in spans} == {
        log.name for log in logs
    }, "both syncers took part"
    for job_id, spans in intervals.items():
        spans.sort()
        for (_, ended, _), (began, _, _) in pairwise(spans):
            assert began >= ended, f"two syncs of {job_id} overlapped"


def test_a_killed_syncer_is_replaced_after_its_lease_and_nothing_is_lost(
    client: openai.OpenAI, emulator: Emulator, server: RunningServer, tmp_path: Path
) -> None:
    with worker_process(server, tmp_path / "submitter.log", "submitter"):
        (job_id,) = create_jobs(client, 1)
        provider_job = wait_for(
            lambda: (client.fine_tuning.jobs.retrieve(job_id).model_extra or {}).get(
                "provider_job_id"
            ),
            30,
            "the job to be submitted",
        )
    # The next retrieve of this job at the provider is answered only after the kill.
    emulator.hold.arm("GET", f"/v1/fine_tuning/jobs/{provider_job}")
    try:
        with worker_process(server, tmp_path / "doomed.log", "syncer", **SYNCER_ENV) as doomed:
            wait_for(emulator.hold.holding.is_set, 30, "the syncer to be mid-sync")
            os.kill(doomed.pid, signal.SIGKILL)
            assert doomed.wait(timeout=10) == -signal.SIGKILL
            killed_at = time.monotonic()
    finally:
        emulator.hold.release()
    status = client.fine_tuning.jobs.retrieve(job_id).status
    assert status not in TERMINAL

    with worker_process(server, tmp_path / "heir.log", "syncer", **SYNCER_ENV):
        wait_for(lambda: all_finished(client, [job_id]), 60, "the other syncer to finish it")
    assert time.monotonic() - killed_at >= 1.5  # it waited for the dead syncer's lease
    assert_complete_and_once(client, emulator, job_id)


def test_a_provider_outage_is_waited_out(
    client: openai.OpenAI, emulator: Emulator, server: RunningServer, tmp_path: Path
) -> None:
    with (
        worker_process(server, tmp_path / "submitter.log", "submitter"),
        worker_process(server, tmp_path / "syncer.log", "syncer", **SYNCER_ENV),
    ):
        job_ids = create_jobs(client, 2)
        wait_for(
            lambda: all(
                (client.fine_tuning.jobs.retrieve(j).model_extra or {}).get("provider_job_id")
                for j in job_ids
            ),
            30,
            "the jobs to be submitted",
        )
        emulator.faults(outage=True)
        try:
            time.sleep(5)
            for job_id in job_ids:
                job = client.fine_tuning.jobs.retrieve(job_id)
                assert job.status not in {"failed", "cancelled"} and job.error is None
        finally:
            emulator.http.delete("/_emulator/faults").raise_for_status()
        wait_for(lambda: all_finished(client, job_ids), 60, "the jobs to finish after it")
    for job_id in job_ids:
        assert_complete_and_once(client, emulator, job_id)
    log = (tmp_path / "syncer.log").read_text()
    assert "sync failed; backing off" in log


def test_a_flood_of_webhooks_for_one_job_causes_one_sync(
    client: openai.OpenAI, emulator: Emulator, server: RunningServer, tmp_path: Path
) -> None:
    hourly = SYNCER_ENV | {
        "TUNEGATE_JOBS__SYNC_INTERVAL_RUNNING": "PT1H",
        "TUNEGATE_JOBS__SYNC_INTERVAL_QUEUED": "PT1H",
    }
    retrieve = ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}")

    def retrieves() -> int:
        return sum(emulator.requests().get(retrieve, {}).values())

    with (
        worker_process(server, tmp_path / "submitter.log", "submitter"),
        worker_process(server, tmp_path / "syncer.log", "syncer", **hourly),
    ):
        emulator.http.delete("/_emulator/requests").raise_for_status()
        (job_id,) = create_jobs(client, 1)
        provider_job = wait_for(
            lambda: (client.fine_tuning.jobs.retrieve(job_id).model_extra or {}).get(
                "provider_job_id"
            ),
            30,
            "the job to be submitted",
        )
        wait_for(lambda: retrieves() >= 1, 30, "the first sync")
        time.sleep(1)
        emulator.http.delete("/_emulator/requests").raise_for_status()

        event = {
            "object": "event",
            "type": "fine_tuning.job.succeeded",
            "created_at": int(time.time()),
            "data": {"id": provider_job},
        }
        body = json.dumps(event).encode()
        answers: list[int] = []

        def send(i: int) -> None:
            headers = signing.headers([WEBHOOK_SECRET], f"msg_flood_{i}", int(time.time()), body)
            answer = httpx.post(
                f"{server.base_url}/v1/provider_webhooks/openai",
                content=body,
                headers={**headers, "content-type": "application/json"},
                timeout=10,
            )
            answers.append(answer.status_code)

        # The first webhook starts a sync whose fetch the emulator holds; the other 39 arrive
        # while it is under way. However the flood is spread in time, they may cause one more
        # sync after it, not one each.
        emulator.hold.arm("GET", f"/v1/fine_tuning/jobs/{provider_job}")
        try:
            send(0)
            wait_for(emulator.hold.holding.is_set, 30, "the sync the webhook asked for")
            senders = [threading.Thread(target=send, args=(i,)) for i in range(1, 40)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
        finally:
            emulator.hold.release()
        assert answers == [200] * 40
        time.sleep(3)
        assert 1 <= retrieves() <= 2, "one sync (and at most one more for webhooks mid-sync)"
