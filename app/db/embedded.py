"""The embedded PostgreSQL used when no database URL is configured.

`pgserver` ships a real PostgreSQL 16 in a wheel. The server's data lives in
`<data_dir>/postgres`; several tunegate processes on one data dir share one server, and the last
one to exit stops it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

_servers: dict[Path, Any] = {}


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded server and return a SQLAlchemy asyncpg URL for it."""
    pgdata = (data_dir / "postgres").resolve()
    server = _servers.get(pgdata)
    if server is None:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        # pgserver reads XDG_RUNTIME_DIR for its lock files; give it a private one when unset.
        if "XDG_RUNTIME_DIR" not in os.environ:
            runtime = pgdata.parent / "run"
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        _forget_dead_handles(pgdata)
        import pgserver  # imported lazily: only the embedded mode needs it

        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        _servers[pgdata] = server
    return asyncpg_url_from_libpq(server.get_uri())


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when its last user exits, counting users in a file of pids. A
    process killed with SIGKILL never removes its pid, and the server would then never stop;
    drop pids of processes that no longer exist before joining."""
    handles = pgdata / ".handle_pids.json"
    if not handles.is_file():
        return
    import psutil

    try:
        pids = json.loads(handles.read_text())
        alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))
    except (OSError, ValueError):
        log.warning("could not read %s; leaving it as it is", handles)


def stop_embedded_postgres() -> None:
    while _servers:
        _, server = _servers.popitem()
        try:
            server.cleanup()
        except Exception:  # pragma: no cover - best effort at shutdown
            log.warning("embedded postgres did not stop cleanly", exc_info=True)


def asyncpg_url_from_libpq(uri: str) -> str:
    """`postgresql://user:@/db?host=/sock` -> `postgresql+asyncpg://user@/db?host=/sock`."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    user = parts.username or "postgres"
    database = parts.path.lstrip("/") or "postgres"
    host = query.get("host", [None])[0]
    netloc = f"{user}@{parts.hostname}:{parts.port}" if parts.hostname else f"{user}@"
    url = f"postgresql+asyncpg://{netloc}/{database}"
    if host:
        url += f"?host={host}"
    return url
