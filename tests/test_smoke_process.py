"""`tunegate serve` as a real process: embedded database, bootstrap key, CLI keys, clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _tunegate() -> list[str]:
    script = Path(sys.executable).parent / "tunegate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(base: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tunegate serve exited early with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("tunegate serve did not become ready within 60 s")


@pytest.fixture
def server_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env |= {
        "TUNEGATE_DATA_DIR": str(tmp_path / "data"),
        "TUNEGATE_BOOTSTRAP_ADMIN_KEY": "tg-bootstrap-smoke-0123456789",
        "TUNEGATE_LOG__FORMAT": "json",
    }
    return env


def test_serve_keys_and_revocation_end_to_end(server_env: dict[str, str], tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*_tunegate(), "serve", "--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        _wait_ready(base, process, time.monotonic() + 60)
        bootstrap = {"Authorization": "Bearer tg-bootstrap-smoke-0123456789"}
        projects = httpx.get(f"{base}/v1/projects", headers=bootstrap, timeout=10)
        assert projects.status_code == 200
        assert [p["name"] for p in projects.json()["data"]] == ["default"]

        nope = httpx.get(f"{base}/v1/nope", timeout=10)
        assert nope.status_code == 404 and nope.json()["error"]["code"] == "unknown_url"

        created = subprocess.run(
            [*_tunegate(), "keys", "create", "--project", "smoke", "--scope", "admin"],
            env=server_env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("tg-") and "\n" not in key
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/v1/projects", headers=headers, timeout=10).status_code == 200

        prefix = key.split("-")[1]
        revoked = subprocess.run(
            [*_tunegate(), "keys", "revoke", prefix],
            env=server_env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert revoked.returncode == 0, revoked.stderr
        after = httpx.get(f"{base}/v1/projects", headers=headers, timeout=10)
        assert after.status_code == 401
        assert after.json()["error"]["code"] == "invalid_api_key"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0
    log_text = log_path.read_text()
    assert '"request_id"' in log_text
    assert "tg-bootstrap-smoke-0123456789" not in log_text
    assert key not in log_text
    # The embedded PostgreSQL stopped with the process.
    assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()


def test_cli_reports_unknown_keys_cleanly(server_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [*_tunegate(), "keys", "revoke", "doesnotexist"],
        env=server_env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "No API key" in result.stderr
    assert "Traceback" not in result.stderr
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
