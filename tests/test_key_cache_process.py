"""The key cache of a real `tunegate serve`: keys it has checked are served from memory, and a
revocation made by another process (the CLI) or through the API is refused at once."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.server import start_server

pytestmark = pytest.mark.slow

BOOTSTRAP_KEY = "tg-bootstrap-keycache-0123456789"


def checks(base: str, source: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(rf'^tunegate_api_key_checks_total{{source="{source}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_checked_keys_come_from_memory_and_revocations_are_seen_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path, TUNEGATE_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY)
    base = server.base_url
    try:
        admin = {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
        keys = []
        for _ in range(2):
            created = server.cli("keys", "create", "--project", "default", "--scope", "read")
            assert created.returncode == 0, created.stderr
            keys.append(created.stdout.strip())
        first, second = ({"Authorization": f"Bearer {key}"} for key in keys)

        before = checks(base, "cache"), checks(base, "database")
        for _ in range(5):
            assert httpx.get(f"{base}/v1/models", headers=first, timeout=10).status_code == 200
        cached = checks(base, "cache") - before[0]
        asked = checks(base, "database") - before[1]
        assert (cached, asked) == (4, 1), "one database check, then memory"

        # Revoked by another process: the next request is refused, no waiting.
        revoked = server.cli("keys", "revoke", keys[0].split("-")[1])
        assert revoked.returncode == 0, revoked.stderr
        refused = httpx.get(f"{base}/v1/models", headers=first, timeout=10)
        assert refused.status_code == 401
        assert "revoked" in refused.json()["error"]["message"]

        # Deleted through the API (the admin key is itself served from memory by now).
        assert httpx.get(f"{base}/v1/models", headers=second, timeout=10).status_code == 200
        listed = httpx.get(f"{base}/v1/api_keys", headers=admin, timeout=10).json()["data"]
        (row,) = [k for k in listed if k["prefix"] == keys[1].split("-")[1]]
        deleted = httpx.delete(f"{base}/v1/api_keys/{row['id']}", headers=admin, timeout=10)
        assert deleted.status_code == 200
        gone = httpx.get(f"{base}/v1/models", headers=second, timeout=10)
        assert gone.status_code == 401
    finally:
        assert server.stop() == 0
