"""A submitter killed with SIGKILL at the worst moment still yields exactly one upstream job.

Real processes: the official SDK -> `tunegate serve --no-workers` and `tunegate worker --role
submitter` on one database -> the OpenAI emulator on loopback. The emulator handles the
submitter's request (the file or the job now exists upstream) but keeps its answer back, so the
worker is killed after the provider acted and before tunegate recorded anything. A second worker
then takes the job over once the short lease (`TUNEGATE_JOBS__SUBMIT_LEASE`) has run out.

The emulator's `slow_seconds` fault cannot make this moment: it delays a request before the
handler runs, so during the delay nothing exists upstream yet and afterwards the answer is sent
at once. The emulator runs in this process (`tests.emulator`) so its answers can be held.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.datasets import adder_jsonl
from tests.emulator import Emulator, running_emulator
from tests.server import (
    RunningServer,
    separate_database,
    start_server,
    wait_for,
    worker_process,
)

pytestmark = pytest.mark.slow

ADMIN_KEY = "tg-killtest1-0123456789abcdefghijklmnopqrstuvwxyzABCD"
EMULATOR_KEY = "sk-emulator-key"
DATABASE = "tunegate_submitter_kill"
JOBS = "/v1/fine_tuning/jobs"
FILES = "/v1/files"
# Long enough for a worker to upload, look up and create; short, because the second worker
# waits for it to run out before it may take the job over.
LEASE = "PT2S"


@pytest.fixture(scope="module")
def process_database_url(database_url: str) -> Iterator[str]:
    with separate_database(database_url, DATABASE) as url:
        yield url


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    with running_emulator(1.0, EMULATOR_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, emulator: Emulator, process_database_url: str
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("submitter-kill"),
        "--no-workers",
        TUNEGATE_DATABASE_URL=process_database_url,
        TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        TUNEGATE_JOBS__SUBMIT_LEASE=LEASE,
        TUNEGATE_JOBS__POLL_INTERVAL="PT0.1S",
        OPENAI_API_KEY=EMULATOR_KEY,
        OPENAI_BASE_URL=f"{emulator.base_url}/v1",
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture
def training_file(client: openai.OpenAI) -> str:
    """A new file for every test: one already at the provider would not be uploaded again."""
    content = adder_jsonl(12)
    return client.files.create(file=("train.jsonl", content), purpose="fine-tune").id


def alive(process: subprocess.Popen[bytes], log_path: Path) -> None:
    assert process.poll() is None, (
        f"the submitter exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
    )


def upstream_jobs(emulator: Emulator, job_id: str) -> list[dict[str, Any]]:
    """Every job the provider holds that carries tunegate's tag for `job_id` (the filter is
    checked here too, so an emulator ignoring it cannot hide a duplicate)."""
    listed = emulator.http.get(JOBS, params={"limit": 100}).json()
    assert not listed["has_more"]
    return [j for j in listed["data"] if (j["metadata"] or {}).get("tunegate_job_id") == job_id]


def provider_job_id(client: openai.OpenAI, job_id: str) -> str | None:
    extra = client.fine_tuning.jobs.retrieve(job_id).model_extra or {}
    found = extra.get("provider_job_id")
    return str(found) if found else None


@pytest.mark.parametrize(
    "held",
    [
        pytest.param(("POST", JOBS), id="killed-after-the-job-was-created-upstream"),
        pytest.param(("POST", FILES), id="killed-after-the-file-was-uploaded"),
    ],
)
def test_a_submitter_killed_before_hearing_back_leaves_exactly_one_upstream_job(
    held: tuple[str, str],
    client: openai.OpenAI,
    emulator: Emulator,
    server: RunningServer,
    training_file: str,
    tmp_path: Path,
) -> None:
    emulator.http.delete("/_emulator/requests").raise_for_status()
    emulator.hold.arm(*held)
    try:
        with worker_process(server, tmp_path / "first-submitter.log", "submitter") as first:
            job = client.fine_tuning.jobs.create(
                model="gpt-4o-mini-2024-07-18",
                training_file=training_file,
                metadata={"team": "math"},
            )
            wait_for(
                lambda: (
                    alive(first, tmp_path / "first-submitter.log") or emulator.hold.holding.is_set()
                ),
                30,
                f"the emulator to hold the answer to {' '.join(held)}",
            )
            if held == ("POST", JOBS):
                # The worst moment: the provider made the job, tunegate has not heard of it.
                assert len(upstream_jobs(emulator, job.id)) == 1
            assert provider_job_id(client, job.id) is None
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
    finally:
        emulator.hold.release()

    with worker_process(server, tmp_path / "second-submitter.log", "submitter") as second:
        adopted = wait_for(
            lambda: (
                alive(second, tmp_path / "second-submitter.log") or provider_job_id(client, job.id)
            ),
            30,
            "the second submitter to take the job over",
        )
        assert client.fine_tuning.jobs.retrieve(job.id).status != "failed"
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0

    upstream = upstream_jobs(emulator, job.id)
    assert [j["id"] for j in upstream] == [adopted]
    assert upstream[0]["metadata"] == {"team": "math", "tunegate_job_id": job.id}
    # One creation reached the provider and succeeded, whoever made it.
    assert emulator.requests()[("POST", JOBS)] == {"200": 1}


def test_a_job_cancelled_while_the_provider_creates_it_is_cancelled_there_too(
    client: openai.OpenAI,
    emulator: Emulator,
    server: RunningServer,
    training_file: str,
    tmp_path: Path,
) -> None:
    emulator.hold.arm("POST", JOBS)
    try:
        with worker_process(server, tmp_path / "submitter.log", "submitter") as worker:
            job = client.fine_tuning.jobs.create(
                model="gpt-4o-mini-2024-07-18", training_file=training_file
            )
            wait_for(
                lambda: alive(worker, tmp_path / "submitter.log") or emulator.hold.holding.is_set(),
                30,
                "the emulator to hold the job creation",
            )
            assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
            emulator.hold.release()
            (upstream,) = wait_for(
                lambda: [j for j in upstream_jobs(emulator, job.id) if j["status"] == "cancelled"],
                30,
                "the provider's job to be cancelled",
            )
    finally:
        emulator.hold.release()
    assert provider_job_id(client, job.id) == upstream["id"]
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert any("Cancelled at the provider too" in m for m in messages)
