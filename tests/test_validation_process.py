"""The validator worker inside `tunegate serve`: queued reports finish by themselves, progress
is visible while they run, and a cancel stops a running validation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import RunningServer, start_server, wait_for

pytestmark = pytest.mark.slow

ADMIN_KEY = "tg-validator1-0123456789abcdefghijklmnopqrstuvwxyzABCD"
LINE = (
    b'{"messages": [{"role": "system", "content": "You answer questions about airports."}, '
    b'{"role": "user", "content": "Can I bring %d kilograms of pork products into the country?"}, '
    b'{"role": "assistant", "content": "No. Pork products are not allowed through customs, '
    b'whatever the weight; declare them or leave them behind."}]}\n'
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("validator"),
        TUNEGATE_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
        TUNEGATE_VALIDATION__INLINE_MAX_BYTES="0",
        TUNEGATE_VALIDATION__POLL_INTERVAL="PT0.2S",
    )
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120
    ) as client:
        yield client


def _upload(api: httpx.Client, path: Path) -> dict:
    with path.open("rb") as handle:
        response = api.post(
            "/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"}
        )
    assert response.status_code == 200, response.text
    return response.json()


def _wait(api: httpx.Client, url: str, done, timeout: float = 60) -> dict:
    def reached() -> dict | None:
        body = api.get(url).json()
        return body if done(body) else None

    return wait_for(reached, timeout, f"{url} to reach the expected state")


def test_queued_report_is_finished_by_the_worker(api: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_bytes(b"".join(LINE.replace(b"%d", str(i).encode()) for i in range(60)))
    file = _upload(api, path)
    assert file["validation"]["status"] == "queued"
    url = f"/v1/files/{file['id']}/validations/{file['validation']['id']}"
    done = _wait(api, url, lambda v: v["status"] in {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["verdict"] == "valid"
    assert done["report"]["examples"] == 60 and done["progress"]["bytes_done"] == file["bytes"]


def test_running_validation_shows_progress_and_can_be_cancelled(
    api: httpx.Client, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as handle:
        for block in range(400):  # ~120 MB: long enough to be seen running
            handle.write(
                b"".join(LINE.replace(b"%d", str(block * 1000 + i).encode()) for i in range(1000))
            )
    file = _upload(api, path)
    url = f"/v1/files/{file['id']}/validations/{file['validation']['id']}"
    running = _wait(
        api, url, lambda v: v["status"] == "running" and v["progress"]["bytes_done"] > 0
    )
    assert 0 < running["progress"]["bytes_done"] < file["bytes"]
    assert running["progress"]["lines_done"] > 0
    cancel = api.post(f"{url}/cancel")
    assert cancel.status_code == 200, cancel.text
    stopped = _wait(api, url, lambda v: v["status"] in {"cancelled", "succeeded", "failed"})
    assert stopped["status"] == "cancelled"
    assert stopped["report"] is None
