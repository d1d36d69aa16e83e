"""`tunegate serve` as a real process: embedded database, bootstrap key, CLI keys, clean stop."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from tests.server import server_env, start_server, tunegate_command

pytestmark = pytest.mark.slow

BOOTSTRAP_KEY = "tg-bootstrap-smoke-0123456789"


def test_serve_keys_and_revocation_end_to_end(tmp_path: Path) -> None:
    server = start_server(tmp_path, TUNEGATE_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY)
    base = server.base_url
    try:
        bootstrap = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
        projects = httpx.get(f"{base}/v1/projects", headers=bootstrap, timeout=10)
        assert projects.status_code == 200
        assert [p["name"] for p in projects.json()["data"]] == ["default"]

        nope = httpx.get(f"{base}/v1/nope", timeout=10)
        assert nope.status_code == 404 and nope.json()["error"]["code"] == "unknown_url"

        created = server.cli("keys", "create", "--project", "smoke", "--scope", "admin")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert key.startswith("tg-") and "\n" not in key
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/v1/projects", headers=headers, timeout=10).status_code == 200

        revoked = server.cli("keys", "revoke", key.split("-")[1])
        assert revoked.returncode == 0, revoked.stderr
        after = httpx.get(f"{base}/v1/projects", headers=headers, timeout=10)
        assert after.status_code == 401
        assert after.json()["error"]["code"] == "invalid_api_key"
    finally:
        returncode = server.stop()
    assert returncode == 0
    log_text = server.log_path.read_text()
    assert '"request_id"' in log_text
    assert BOOTSTRAP_KEY not in log_text
    assert key not in log_text
    # The embedded PostgreSQL stopped with the process.
    assert not (server.data_dir / "postgres" / "postmaster.pid").exists()


def test_cli_reports_unknown_keys_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [*tunegate_command(), "keys", "revoke", "doesnotexist"],
        env=server_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "No API key" in result.stderr
    assert "Traceback" not in result.stderr
