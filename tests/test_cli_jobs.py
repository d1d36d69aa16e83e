"""`tunegate jobs create/follow/list/cancel` as a user runs them: real CLI processes talking to a
real `tunegate serve`, whose submitter sends jobs to the OpenAI emulator (`tunegate emulator`),
all on loopback. The official SDK plays "another client" (and checks what the CLI did)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.datasets import adder_jsonl
from tests.server import (
    RunningServer,
    free_port,
    server_env,
    start_server,
    tunegate_command,
    wait_for,
)

pytestmark = pytest.mark.slow
ADMIN_KEY = "tg-clijobs001-0123456789abcdefghijklmnopqrstuvwxyzABCD"
MODEL = "gpt-4o-mini-2024-07-18"
STAMP = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] ")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Slow time: an emulated job validates and queues for 80 s before its first step, so
    # every job here is still unfinished (and without metrics) when a test cancels it, and
    # the server's syncer, if it runs, has nothing to finish.
    port = free_port()
    workdir = tmp_path_factory.mktemp("emulator")
    process = subprocess.Popen(
        [*tunegate_command(), "emulator", "--port", str(port), "--speed", "0.05"],
        env=server_env(workdir / "data"),
        stdout=(workdir / "emulator.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (workdir / "emulator.log").read_text()
        try:
            return httpx.get(f"{base_url}/_emulator/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 30, "the emulator")
    yield base_url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, emulator: str) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("cli-jobs-serve"),
        TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        TUNEGATE_JOBS__POLL_INTERVAL="PT0.2S",
        OPENAI_API_KEY="sk-emulator-key",
        OPENAI_BASE_URL=f"{emulator}/v1",
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def sdk(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=ADMIN_KEY, max_retries=0)


def cli_env(server: RunningServer) -> dict[str, str]:
    return server.env | {"TUNEGATE_URL": server.base_url, "TUNEGATE_API_KEY": ADMIN_KEY}


def tunegate(
    server: RunningServer, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tunegate_command(), *args],
        env=cli_env(server),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=server.data_dir.parent,
    )


def write_examples(path: Path, count: int) -> Path:
    path.write_bytes(adder_jsonl(count))
    return path


@pytest.fixture(scope="module")
def train_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_examples(tmp_path_factory.mktemp("data") / "train.jsonl", 12)


@pytest.fixture(scope="module")
def training_file(sdk: openai.OpenAI, train_path: Path) -> str:
    with train_path.open("rb") as handle:
        return sdk.files.create(file=handle, purpose="fine-tune").id


def at_provider(sdk: openai.OpenAI, job_id: str) -> Any:
    """Wait until the submitter has created the job at the emulator (so a cancel reaches it)."""

    def check() -> Any:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        return job if (job.model_extra or {}).get("provider_job_id") else None

    return wait_for(check, 30, f"{job_id} to reach the provider")


def expected_event_lines(sdk: openai.OpenAI, job_id: str) -> list[str]:
    events = list(sdk.fine_tuning.jobs.list_events(job_id))
    return [
        f"[{datetime.fromtimestamp(e.created_at):%Y-%m-%d %H:%M:%S}] {e.message}"
        for e in reversed(events)
    ]


@pytest.fixture(scope="module")
def created(
    server: RunningServer, train_path: Path
) -> tuple[subprocess.CompletedProcess[str], str]:
    result = tunegate(
        server,
        "jobs",
        "create",
        "--file",
        str(train_path),
        "--model",
        MODEL,
        "--suffix",
        "adder",
        "--n-epochs",
        "2",
        "--metadata",
        "team=math",
    )
    assert result.returncode == 0, result.stderr
    return result, result.stdout.strip()


def test_create_uploads_a_local_file_and_prints_the_job_id(
    created: tuple[subprocess.CompletedProcess[str], str], sdk: openai.OpenAI
) -> None:
    result, job_id = created
    assert re.fullmatch(r"ftjob-\w+", job_id), result.stdout
    assert "Uploaded train.jsonl as file-" in result.stderr
    assert f"Created {job_id}: validating_files" in result.stderr
    job = sdk.fine_tuning.jobs.retrieve(job_id)
    assert sdk.files.retrieve(job.training_file).filename == "train.jsonl"
    assert job.metadata == {"team": "math"}
    assert job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None
    assert job.method.supervised.hyperparameters.n_epochs == 2


def test_list_shows_the_job_newest_first(
    created: tuple[subprocess.CompletedProcess[str], str],
    server: RunningServer,
    sdk: openai.OpenAI,
    training_file: str,
) -> None:
    _, job_id = created
    newer = sdk.fine_tuning.jobs.create(model=MODEL, training_file=training_file).id
    try:
        table = tunegate(server, "jobs", "list")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["id", "status", "model", "fine_tuned_model", "created"]
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert rows[job_id][1] in {"validating_files", "queued", "running"}
        assert rows[job_id][2:4] == [MODEL, "-"]
        assert [line.split()[0] for line in lines[1:3]] == [newer, job_id]
        created_at = sdk.fine_tuning.jobs.retrieve(job_id).created_at
        assert " ".join(rows[job_id][4:]) == f"{datetime.fromtimestamp(created_at):%Y-%m-%d %H:%M}"

        one = tunegate(server, "jobs", "list", "--limit", "1", "--json")
        assert one.returncode == 0, one.stderr
        assert [job["id"] for job in json.loads(one.stdout)] == [newer]
        assert "--all" in one.stderr  # says there are more

        everything = tunegate(server, "jobs", "list", "--all", "--json")
        ids = [job["id"] for job in json.loads(everything.stdout)]
        assert ids[:2] == [newer, job_id]
    finally:
        at_provider(sdk, newer)
        sdk.fine_tuning.jobs.cancel(newer)


def test_cancel_prints_the_new_status_and_follow_replays_the_events(
    created: tuple[subprocess.CompletedProcess[str], str],
    server: RunningServer,
    sdk: openai.OpenAI,
) -> None:
    _, job_id = created
    at_provider(sdk, job_id)
    cancelled = tunegate(server, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{job_id}: cancelled"
    assert sdk.fine_tuning.jobs.retrieve(job_id).status == "cancelled"

    again = tunegate(server, "jobs", "cancel", job_id)
    assert again.returncode == 1
    assert "job_finished" in again.stderr and "Traceback" not in again.stderr

    # Page size 1 makes every event a page of its own: all must still come, once, in order.
    for extra in ([], ["--events-page-size", "1"]):
        before = expected_event_lines(sdk, job_id)
        followed = tunegate(server, "jobs", "follow", job_id, *extra)
        assert followed.returncode == 1, followed.stderr
        lines = followed.stdout.splitlines()
        # (A sync that was under way at the cancel may still add a provider event.)
        assert lines[:-1] in (before, expected_event_lines(sdk, job_id))
        assert all(STAMP.match(line) for line in lines[:-1])
        assert any(line.endswith(f"] Created fine-tuning job: {job_id}") for line in lines)
        assert any(line.endswith("] The job was cancelled.") for line in lines)
        assert lines[-1] == f"Job {job_id} was cancelled."


def test_follow_on_a_terminal_draws_a_bar_and_prints_the_events(
    server: RunningServer, sdk: openai.OpenAI, training_file: str
) -> None:
    job_id = sdk.fine_tuning.jobs.create(model=MODEL, training_file=training_file).id
    at_provider(sdk, job_id)
    sdk.fine_tuning.jobs.cancel(job_id)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*tunegate_command(), "jobs", "follow", job_id],
        env=cli_env(server),
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the other end closed: the process has ended
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=30) == 1
    assert b"\x1b[?25l" in output  # rich's live display (it hides the cursor) drew the bar
    screen = ANSI.sub("", output.decode(errors="replace"))
    events = expected_event_lines(sdk, job_id)
    assert any(f"Created fine-tuning job: {job_id}" in line for line in events)
    for line in events:
        assert screen.count(line) == 1, screen
    assert f"Job {job_id} was cancelled." in screen


def test_create_with_an_unknown_file_id_is_a_clean_error(server: RunningServer) -> None:
    result = tunegate(server, "jobs", "create", "--file", "file-doesnotexist0000", "--model", MODEL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "file-doesnotexist0000" in result.stderr and "invalid_file" in result.stderr
    assert "Traceback" not in result.stderr


def test_create_with_an_invalid_local_file_names_the_validation_report(
    server: RunningServer, tmp_path: Path
) -> None:
    path = write_examples(tmp_path / "tiny.jsonl", 3)
    result = tunegate(server, "jobs", "create", "--file", str(path), "--model", MODEL)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "invalid_training_file" in result.stderr and "too_few_examples" in result.stderr
    assert re.search(r"/v1/files/file-\w+/validations/\w+", result.stderr), result.stderr
    assert f"tunegate files validate {path}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_option_is_refused_before_anything_is_uploaded(
    server: RunningServer, sdk: openai.OpenAI, train_path: Path
) -> None:
    before = len(list(sdk.files.list()))
    result = tunegate(
        server, "jobs", "create", "--file", str(train_path), "--model", MODEL, "--n-epochs", "0"
    )
    assert result.returncode == 2
    assert "--n-epochs" in result.stderr and "Traceback" not in result.stderr
    assert len(list(sdk.files.list())) == before


def find_job(sdk: openai.OpenAI, run: str) -> str:
    def check() -> str | None:
        jobs = list(sdk.fine_tuning.jobs.list(metadata={"run": run}))
        return jobs[0].id if jobs else None

    return wait_for(check, 60, f"the job tagged {run}")


def test_create_follow_ends_when_another_client_cancels_the_job(
    server: RunningServer, sdk: openai.OpenAI, training_file: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex
    out = tmp_path / "follow.out"
    errors = tmp_path / "follow.err"
    with out.open("w") as stdout, errors.open("w") as stderr:
        process = subprocess.Popen(
            [
                *tunegate_command(),
                "jobs",
                "create",
                "--file",
                training_file,
                "--model",
                MODEL,
                "--metadata",
                f"run={run}",
                "--follow",
                "--interval",
                "0.2",
            ],
            env=cli_env(server),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        job_id = find_job(sdk, run)
        wait_for(lambda: "Created fine-tuning job" in out.read_text(), 60, "the first event")
        at_provider(sdk, job_id)
        assert process.poll() is None  # still following
        before_cancel = expected_event_lines(sdk, job_id)
        sdk.fine_tuning.jobs.cancel(job_id)
        assert process.wait(timeout=60) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in errors.read_text()
    lines = out.read_text().splitlines()
    assert lines[0] == job_id and lines[-1] == f"Job {job_id} was cancelled."
    printed = lines[1:-1]
    assert all(STAMP.match(line) for line in printed), printed
    assert len(set(printed)) == len(printed)  # each event once
    assert set(before_cancel) <= set(printed) <= set(expected_event_lines(sdk, job_id))
    assert any(line.endswith("The job was cancelled.") for line in printed)


def test_ctrl_c_stops_following_without_cancelling(
    server: RunningServer, sdk: openai.OpenAI, training_file: str, tmp_path: Path
) -> None:
    job_id = sdk.fine_tuning.jobs.create(model=MODEL, training_file=training_file).id
    out = tmp_path / "follow.out"
    try:
        with out.open("w") as stdout:
            process = subprocess.Popen(
                [*tunegate_command(), "jobs", "follow", job_id, "--interval", "0.2"],
                env=cli_env(server),
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
            )
        wait_for(lambda: "Created fine-tuning job" in out.read_text(), 60, "the first event")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130
        assert "the job goes on" in stderr and "Traceback" not in stderr
        assert sdk.fine_tuning.jobs.retrieve(job_id).status != "cancelled"
    finally:
        at_provider(sdk, job_id)
        sdk.fine_tuning.jobs.cancel(job_id)
