"""Syncer benchmark: 10,000 active jobs against the OpenAI emulator.

Everything runs as the real processes of a deployment, on loopback: the emulator (`tunegate
emulator`, 50-epoch jobs that stay running all along), `tunegate serve --no-workers` (for the
inbound webhook endpoint) and one `tunegate worker --role syncer --metrics-port …`, on a real
PostgreSQL (TEST_DATABASE_URL's server, in a database of its own, or an embedded one).

What it measures:

1. **Sweep**: N jobs are created at the emulator and stored in tunegate as submitted and due;
   the time until the syncer has synced every one of them once.
2. **Steady state**: for `--window` seconds afterwards, provider requests per job per
   running-interval (the syncer's target cost is 3: retrieve, new events, new checkpoints;
   queued jobs are checked less often) and the request rate next to the rate budget.
3. **Database time per sync**, from the worker's own Prometheus histogram.
4. **Lag**: `--probes` jobs are cancelled directly at the provider, one every 0.4 s, and the
   delay until tunegate's row says `cancelled` is measured (p50, p99) — first with polling alone,
   then with the emulator's signed webhook to `/v1/provider_webhooks/openai`. The ratio of the
   two p50s is the webhook's gain.

    .venv/bin/python bench/syncer.py                 # 10,000 jobs
    .venv/bin/python bench/syncer.py --jobs 1000 --window 30 --probes 20   # quick

The last line printed is JSON with the same numbers. Exit status 0 when every sync of the sweep
succeeded and the request rate stayed within the budget, 1 otherwise, 2 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade_to_head  # noqa: E402
from app.kit import signing  # noqa: E402

EMULATOR_KEY = "sk-bench-syncer"
WEBHOOK_SECRET = signing.new_secret()
DATABASE = "tunegate_bench_syncer"
PROJECT = "proj_benchsyncer"
MODEL = "gpt-4o-mini-2024-07-18"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tunegate() -> list[str]:
    script = Path(sys.executable).parent / "tunegate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def wait_until(check: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except httpx.TransportError:
            found = None
        if found:
            return found
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as handle:
        proc = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def database(workdir: Path, name: str = DATABASE) -> Iterator[str]:
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        from app.db.embedded import start_embedded_postgres, stop_embedded_postgres

        url = start_embedded_postgres(workdir / "pg")
        try:
            upgrade_to_head(url)
            yield url
        finally:
            stop_embedded_postgres()
        return
    if base.startswith("postgresql://"):
        base = "postgresql+asyncpg://" + base.removeprefix("postgresql://")

    async def admin(*statements: str) -> None:
        engine = create_async_engine(base, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
        await engine.dispose()

    drop = f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    asyncio.run(admin(drop, f"CREATE DATABASE {name}"))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        asyncio.run(admin(drop))


async def create_upstream_jobs(base_url: str, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {EMULATOR_KEY}"}
    lines = "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{i}+{i}"},
                    {"role": "assistant", "content": str(2 * i)},
                ]
            }
        )
        + "\n"
        for i in range(12)
    )
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        uploaded = await http.post(
            "/v1/files",
            files={"file": ("train.jsonl", lines.encode())},
            data={"purpose": "fine-tune"},
        )
        uploaded.raise_for_status()
        file_id = uploaded.json()["id"]
        limit = asyncio.Semaphore(32)

        async def one(i: int) -> str:
            async with limit:
                answer = await http.post(
                    "/v1/fine_tuning/jobs",
                    json={
                        "model": MODEL,
                        "training_file": file_id,
                        "hyperparameters": {"n_epochs": 50},
                        "metadata": {"tunegate_job_id": f"ftjob-bench{i:08d}"},
                    },
                )
                answer.raise_for_status()
                return str(answer.json()["id"])

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def store_jobs(engine: AsyncEngine, provider_ids: list[str]) -> None:
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO projects (id, name, created_at) VALUES (:id, 'bench', now()) "
                "ON CONFLICT DO NOTHING"
            ),
            {"id": PROJECT},
        )
        rows = [
            {
                "id": f"ftjob-bench{i:08d}",
                "provider_job_id": provider_id,
                "created_at": now,
            }
            for i, provider_id in enumerate(provider_ids)
        ]
        for start in range(0, len(rows), 2000):
            await conn.execute(
                text(
                    "INSERT INTO jobs (id, project_id, provider, provider_job_id, model, "
                    "training_file, method, hyperparameters, status, result_files, "
                    "submit_attempts, submitted_at, sync_due_at, sync_failures, created_at) "
                    "VALUES (:id, :project, 'openai', :provider_job_id, :model, 'file-bench', "
                    "'{\"type\": \"supervised\"}', '{}', 'validating_files', '[]', 1, "
                    ":created_at, :created_at, 0, :created_at)"
                ),
                [{**row, "project": PROJECT, "model": MODEL} for row in rows[start : start + 2000]],
            )


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


def emulator_requests(http: httpx.Client) -> int:
    rows = http.get("/_emulator/requests").json()["data"]
    return sum(
        sum(count for outcome, count in row["outcomes"].items())
        for row in rows
        if row["path"].startswith("/v1/")
    )


def metric_sum_count(url: str, name: str) -> tuple[float, float]:
    total = count = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_lag(
    engine: AsyncEngine, emulator: httpx.Client, probes: list[tuple[str, str]], timeout: float
) -> list[float]:
    """Cancel each probe at the provider, one every 0.4 s; seconds until tunegate shows it."""
    cancelled_at: dict[str, float] = {}
    for job_id, provider_id in probes:
        emulator.post(f"/v1/fine_tuning/jobs/{provider_id}/cancel").raise_for_status()
        cancelled_at[job_id] = time.time()
        time.sleep(0.4)
    ids = list(cancelled_at)

    async def arrived() -> dict[str, float]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT job_id, min(created_at) FROM job_events WHERE job_id = ANY(:ids) "
                    "AND data->>'status' = 'cancelled' AND provider_event_id IS NULL "
                    "GROUP BY job_id"
                ),
                {"ids": ids},
            )
            return {job_id: moment.timestamp() for job_id, moment in rows}

    deadline = time.monotonic() + timeout
    while True:
        seen = asyncio.run(arrived())
        if len(seen) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return [seen[j] - cancelled_at[j] for j in ids if j in seen]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=60.0, help="steady-state seconds")
    parser.add_argument("--probes", type=int, default=40, help="jobs cancelled per lag phase")
    parser.add_argument("--interval", type=float, default=10.0, help="running-job interval (s)")
    parser.add_argument("--budget", type=float, default=1000.0, help="provider requests/s")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tunegate-bench-syncer-"))
    try:
        return run(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    emulator_port, serve_port, metrics_port = free_port(), free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    with database(workdir) as url:
        env = base_env | {
            "TUNEGATE_DATA_DIR": str(workdir / "data"),
            "TUNEGATE_DATABASE_URL": url,
            "TUNEGATE_LOG__LEVEL": "WARNING",
            "OPENAI_API_KEY": EMULATOR_KEY,
            "OPENAI_BASE_URL": f"{emulator_url}/v1",
            "OPENAI_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "TUNEGATE_JOBS__SYNC_INTERVAL_RUNNING": f"PT{args.interval}S",
            "TUNEGATE_JOBS__SYNC_INTERVAL_QUEUED": f"PT{3 * args.interval}S",
            "TUNEGATE_JOBS__SYNC_CONCURRENCY": str(args.concurrency),
            "TUNEGATE_JOBS__PROVIDER_REQUESTS_PER_SECOND": str(args.budget),
            "TUNEGATE_JOBS__POLL_INTERVAL": "PT0.1S",
            "TUNEGATE_DATABASE__POOL_SIZE": str(min(40, args.concurrency + 5)),
        }
        # NullPool: each asyncio.run below has its own event loop, so no connection is reused.
        engine = create_async_engine(url, poolclass=NullPool)
        emulator_cmd = [*tunegate(), "emulator", "--port", str(emulator_port), "--speed", "0.2"]
        serve_cmd = [*tunegate(), "serve", "--no-workers", "--port", str(serve_port)]
        syncer_cmd = [
            *tunegate(), "worker", "--role", "syncer", "--metrics-port", str(metrics_port)
        ]  # fmt: skip
        with (
            process(emulator_cmd, env, workdir / "emulator.log"),
            process(serve_cmd, env, workdir / "serve.log"),
        ):
            emulator = httpx.Client(base_url=emulator_url, timeout=30)
            emulator.headers["Authorization"] = f"Bearer {EMULATOR_KEY}"
            wait_until(lambda: emulator.get("/_emulator/health").is_success, 60, "the emulator")
            serve_url = f"http://127.0.0.1:{serve_port}"
            wait_until(lambda: httpx.get(f"{serve_url}/readyz").is_success, 60, "tunegate serve")

            began = time.monotonic()
            provider_ids = asyncio.run(create_upstream_jobs(emulator_url, args.jobs))
            print(f"{args.jobs} jobs created at the emulator in {time.monotonic() - began:.1f} s")
            asyncio.run(store_jobs(engine, provider_ids))
            emulator.delete("/_emulator/requests")

            with process(syncer_cmd, env, workdir / "syncer.log"):
                start = datetime.now(UTC)
                t0 = time.monotonic()
                synced = 0
                while synced < args.jobs:
                    time.sleep(0.5)
                    synced = asyncio.run(
                        scalar(
                            engine, "SELECT count(*) FROM jobs WHERE last_synced_at >= :t", t=start
                        )
                    )
                    if time.monotonic() - t0 > 1800:
                        raise SystemExit(f"sweep incomplete after 30 min: {synced}/{args.jobs}")
                sweep = time.monotonic() - t0
                sweep_requests = emulator_requests(emulator)
                print(f"sweep: {args.jobs} jobs in {sweep:.1f} s ({args.jobs / sweep:.0f} jobs/s)")

                emulator.delete("/_emulator/requests")
                w0 = time.monotonic()
                time.sleep(args.window)
                window = time.monotonic() - w0
                window_requests = emulator_requests(emulator)
                statuses = asyncio.run(
                    scalar(
                        engine,
                        "SELECT json_object_agg(status, n) FROM "
                        "(SELECT status, count(*) n FROM jobs GROUP BY status) s",
                    )
                )
                per_job_interval = window_requests / args.jobs / (window / args.interval)
                rate = window_requests / window
                print(
                    f"steady state: {window_requests} provider requests in {window:.0f} s = "
                    f"{rate:.0f}/s (budget {args.budget:.0f}/s); {per_job_interval:.2f} requests "
                    f"per job per {args.interval:.0f} s; statuses {statuses}"
                )
                db_sum, db_count = metric_sum_count(
                    f"http://127.0.0.1:{metrics_port}/metrics",
                    "tunegate_job_sync_database_seconds",
                )
                sync_sum, sync_count = metric_sum_count(
                    f"http://127.0.0.1:{metrics_port}/metrics", "tunegate_job_sync_duration_seconds"
                )
                errors = asyncio.run(
                    scalar(engine, "SELECT count(*) FROM jobs WHERE sync_failures > 0")
                )

                probe_rows = [
                    (f"ftjob-bench{i:08d}", provider_ids[i]) for i in range(args.probes * 2)
                ]
                polled = measure_lag(engine, emulator, probe_rows[: args.probes], 600)
                emulator.post(
                    "/_emulator/webhooks",
                    json={
                        "url": f"{serve_url}/v1/provider_webhooks/openai",
                        "secret": WEBHOOK_SECRET,
                    },
                ).raise_for_status()
                hooked = measure_lag(engine, emulator, probe_rows[args.probes :], 600)
        asyncio.run(engine.dispose())

    result = {
        "jobs": args.jobs,
        "sweep_seconds": round(sweep, 2),
        "sweep_jobs_per_second": round(args.jobs / sweep, 1),
        "sweep_requests_per_job": round(sweep_requests / args.jobs, 2),
        "window_seconds": round(window, 1),
        "requests_per_second": round(rate, 1),
        "budget_requests_per_second": args.budget,
        "requests_per_job_per_interval": round(per_job_interval, 3),
        "interval_seconds": args.interval,
        "db_ms_per_sync": round(1000 * db_sum / db_count, 2) if db_count else None,
        "sync_ms_mean": round(1000 * sync_sum / sync_count, 2) if sync_count else None,
        "jobs_with_sync_errors": errors,
        "lag_polling_p50": round(statistics.median(polled), 2) if polled else None,
        "lag_polling_p99": round(percentile(polled, 0.99), 2) if polled else None,
        "lag_webhook_p50": round(statistics.median(hooked), 2) if hooked else None,
        "lag_webhook_p99": round(percentile(hooked, 0.99), 2) if hooked else None,
        "probes_seen": [len(polled), len(hooked)],
    }
    if polled and hooked:
        result["webhook_lag_ratio_p50"] = round(
            statistics.median(polled) / max(1e-3, statistics.median(hooked)), 1
        )
    print(
        "lag (provider change -> tunegate row): polling p50 {lag_polling_p50} s, p99 "
        "{lag_polling_p99} s; with webhook p50 {lag_webhook_p50} s, p99 {lag_webhook_p99} s".format(
            **result
        )
    )
    print(json.dumps(result))
    ok = errors == 0 and rate <= args.budget * 1.05 and len(polled) == len(hooked) == args.probes
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
