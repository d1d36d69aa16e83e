"""Webhook dispatcher benchmark: deliveries per second, and the delay from commit to receipt.

Everything runs as the real processes of a deployment, on loopback: one `tunegate worker --role
dispatcher --metrics-port …` on a real PostgreSQL (TEST_DATABASE_URL's server, in a database of
its own, or an embedded one), and a receiver: this script started with `--receiver`, a minimal
HTTP/1.1 keep-alive server on plain asyncio that answers every POST `200` with an empty body and
records when it arrived and its `webhook-id` (every `--verify-every`-th request's Standard
Webhooks signature is checked with the `standardwebhooks` package, so what is counted is signed
deliveries, not just requests). Events are written with `app.webhooks.events.emit`, in a
transaction of their own, exactly as a state change writes them (event, one pending delivery per
endpoint, NOTIFY).

What it measures:

1. **Baseline**: the same receiver, POSTed directly from this process by the `httpx2.AsyncClient`
   a dispatcher builds (its connection limits and keep-alive, headers and target-checking
   transport; taken from a `Dispatcher` that never touches the database), `--concurrency` in
   flight, with the same signed bodies and headers: the ceiling of "Python HTTP client -> this
   receiver" on this machine, in requests/s.
2. **Throughput**: with no dispatcher running, `--deliveries` deliveries are written as a
   backlog (events to `--endpoints` endpoints, all pointing at the receiver on different paths,
   `--batch` events per transaction, each event about a subject of its own so per-subject
   ordering does not serialise them); then the dispatcher starts and sends them. The rate is
   deliveries / (last receipt - first receipt); the rate from the process start (Python start-up
   included) is reported too. Afterwards every delivery must be `succeeded` in the database, and
   (endpoint, webhook-id) pairs received more than once are counted as duplicates (should be 0).
   Ratio = dispatcher rate / baseline rate. Target: >= 500 deliveries/s (`--target`). The
   backlog is ANALYZEd before the dispatcher starts, as autovacuum would soon do.
3. **Latency**: with the dispatcher running and idle, events for one endpoint (of a project of
   its own) are emitted one per transaction at `--rate` per second for `--seconds`, noting
   time.time() when each commit returns; the delay is receipt time - commit time (p50, p90, p99,
   max). Next to it, the dispatcher's poll interval, the delay one would wait without
   LISTEN/NOTIFY. Repeated at `--high-rate` (0 to skip). How long the commit call took is
   reported too (the commit happened somewhere in it; when this script is slow to resume after
   it, a delay can even come out negative). When the receipts fall behind the emission rate
   the dispatcher did not keep up (one endpoint holds at most `ENDPOINT_CONCURRENCY` in flight)
   and the delays grow during the run: `kept_up` says so.

The dispatcher, the receiver, PostgreSQL and this script share the machine's CPUs (the issue's
target is for 2 cores). Each phase reports the CPU used, in cores, by each process and by the
whole machine; `rest` is mostly PostgreSQL. Something else busy during the baseline (when
PostgreSQL is idle) is warned about: such a run's numbers are low.

    .venv/bin/python bench/webhooks.py                                   # 20,000 deliveries
    .venv/bin/python bench/webhooks.py --deliveries 2000 --seconds 5     # quick
    .venv/bin/python bench/webhooks.py --keep     # keep the temp dir (logs, receiver records)

The last line printed is JSON with all the numbers. Exit status: 0 when the dispatcher's rate
meets the target and every delivery arrived, validly signed, and succeeded; 1 otherwise; 2 on an
error (a time-out, a process that died ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from syncer import (
    database,
    free_port,
    percentile,
    process,
    tunegate,
    wait_until,
)

from app.config import Environment, Settings, WebhooksSettings
from app.db.engine import Database, make_sessionmaker
from app.kit import signing
from app.kit.ids import new_id
from app.kit.time import utcnow
from app.models import Project, WebhookEndpoint
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.events import emit, event_body
from app.workers.runner import WorkerContext

DATABASE = "tunegate_bench_webhooks"
PROJECT = "proj_benchwebhooks"
LATENCY_PROJECT = "proj_benchwebhookslat"
EVENT_TYPE = "fine_tuning.job.status_changed"
POLL_INTERVAL = 1.0  # the dispatcher's TUNEGATE_WEBHOOKS__POLL_INTERVAL default, in seconds
STALL_SECONDS = 60.0  # no new receipt for this long while waiting: an error

# -- the receiver (a process of its own) -----------------------------------------------------

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class ReceiverState:
    """What the receiver saw since the last dump."""

    def __init__(self, out: Path, secrets: dict[str, str], verify_every: int) -> None:
        from standardwebhooks import Webhook

        self.out = out
        self.verifiers = {path: Webhook(secret) for path, secret in secrets.items()}
        self.verify_every = verify_every
        self.posts_ever = 0
        self.open = 0
        self.reset()

    def reset(self) -> None:
        self.records: list[tuple[float, str, str]] = []
        self.keys: set[tuple[str, str]] = set()
        self.connections = 0  # connections whose first POST came since the last dump
        self.verified = 0
        self.bad_signatures = 0
        self.errors: list[str] = []

    def handle(
        self, now: float, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> bytes:
        if method == b"POST":
            path = target.decode()
            msg_id = headers.get(b"webhook-id", b"").decode()
            self.records.append((now, path, msg_id))
            self.keys.add((path, msg_id))
            self.posts_ever += 1
            if self.verify_every and self.posts_ever % self.verify_every == 0:
                self.verify(path, headers, body)
            return OK_RESPONSE
        if target == b"/_stats":
            return json_response(self.stats())
        if target == b"/_dump":
            stats = self.stats()
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({**stats, "records": self.records, "errors": self.errors}))
            tmp.replace(self.out)
            self.reset()
            return json_response(stats)
        return NOT_FOUND

    def verify(self, path: str, headers: dict[bytes, bytes], body: bytes) -> None:
        verifier = self.verifiers.get(path)
        try:
            if verifier is None:
                raise ValueError(f"no secret for path {path}")
            payload = verifier.verify(body, {k.decode(): v.decode() for k, v in headers.items()})
            if payload.get("id") != headers.get(b"webhook-id", b"").decode():
                raise ValueError("the body's id is not the webhook-id")
            self.verified += 1
        except Exception as exc:
            self.bad_signatures += 1
            if len(self.errors) < 10:
                self.errors.append(f"{path}: {type(exc).__name__}: {exc}")

    def stats(self) -> dict[str, Any]:
        return {
            "requests": len(self.records),
            "unique": len(self.keys),
            "connections": self.connections,
            "open": self.open,
            "verified": self.verified,
            "bad_signatures": self.bad_signatures,
        }


def json_response(payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies; nothing else is needed here."""

    def __init__(self, state: ReceiverState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.head: tuple[bytes, bytes, dict[bytes, bytes]] | None = None
        self.length = 0
        self.transport: asyncio.Transport | None = None
        self.posted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.open -= 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer
        buffer += data
        now = time.time()
        while True:
            if self.head is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > 65536:
                        self.transport.write(BAD_REQUEST)
                        self.transport.close()
                    return
                lines = bytes(buffer[:end]).split(b"\r\n")
                del buffer[: end + 4]
                try:
                    method, target, _ = lines[0].split(b" ", 2)
                    headers = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        headers[name.strip().lower()] = value.strip()
                    self.length = int(headers.get(b"content-length", b"0"))
                except ValueError:
                    self.transport.write(BAD_REQUEST)
                    self.transport.close()
                    return
                self.head = (method, target, headers)
            if len(buffer) < self.length:
                return
            body = bytes(buffer[: self.length])
            del buffer[: self.length]
            method, target, headers = self.head
            self.head = None
            if not self.posted and method == b"POST":
                self.posted = True
                self.state.connections += 1
            self.transport.write(self.state.handle(now, method, target, headers, body))


def receiver_main(port: int, out: Path, secrets_file: Path, verify_every: int) -> int:
    secrets = json.loads(secrets_file.read_text())
    state = ReceiverState(out, secrets, verify_every)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(
            lambda: ReceiverProtocol(state), "127.0.0.1", port, backlog=1024, reuse_address=True
        )
        async with server:
            await stop.wait()
        if state.records:
            state.handle(time.time(), b"GET", b"/_dump", {}, b"")

    asyncio.run(serve())
    return 0


# -- the benchmark ---------------------------------------------------------------------------


class BenchError(Exception):
    """Something went wrong (not a missed target): exit status 2."""


def job_data(i: int) -> dict[str, Any]:
    """What a `fine_tuning.job.status_changed` event carries: the job (a typical size)."""
    return {
        "id": f"ftjob-bench{i:08d}",
        "object": "fine_tuning.job",
        "created_at": 1767225600,
        "model": "gpt-4o-mini-2024-07-18",
        "fine_tuned_model": None,
        "organization_id": "org-bench",
        "status": "running",
        "training_file": "file-benchtrainingfile000000",
        "validation_file": None,
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.8},
        "method": {"type": "supervised"},
        "result_files": [],
        "trained_tokens": None,
        "error": None,
        "seed": 42,
        "estimated_finish": None,
        "metadata": {"bench": "webhooks", "n": str(i)},
        "user_provided_suffix": None,
    }


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(
        times.user + times.nice + times.system + getattr(times, "irq", 0.0)
        + getattr(times, "softirq", 0.0)
    )  # fmt: skip


class CpuMeter:
    """CPU time used from creation to `read()`, in cores (1.0: one core busy all along), for
    named processes and the whole machine; `rest` is the machine less those processes, mostly
    PostgreSQL (and anything else running on the machine at the time)."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, dict[str, float]]:
        per = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return time.monotonic(), machine_busy_seconds(), per

    def read(self) -> dict[str, float]:
        (t0, busy0, per0), (t1, busy1, per1) = self.start, self._sample()
        elapsed = max(1e-6, t1 - t0)
        found = {name: (per1[name] - per0[name]) / elapsed for name in per1}
        machine = (busy1 - busy0) / elapsed
        found |= {"rest": max(0.0, machine - sum(found.values())), "machine": machine}
        return {name: round(value, 2) for name, value in found.items()}


def cpu_text(cpu: dict[str, float]) -> str:
    return "CPU in cores: " + ", ".join(f"{name} {value:.2f}" for name, value in cpu.items())


class Receiver:
    """The bench's side of the receiver process: stats, dumps."""

    def __init__(self, port: int, out: Path, pid: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.out = out
        self.pid = pid
        self.http = httpx2.AsyncClient(base_url=self.base, timeout=30, trust_env=False)

    async def stats(self) -> dict[str, Any]:
        answer = await self.http.get("/_stats")
        answer.raise_for_status()
        return dict(answer.json())

    async def dump(self) -> dict[str, Any]:
        answer = await self.http.get("/_dump")
        answer.raise_for_status()
        return dict(json.loads(self.out.read_text()))

    async def wait_for(
        self, unique: int, within: float, what: str, children: list[Any] | None = None
    ) -> None:
        """Until `unique` distinct (path, webhook-id) pairs arrived; BenchError on a time-out, on
        no progress for STALL_SECONDS, or when a child process exits."""
        deadline = time.monotonic() + within
        last_seen, last_change, last_print = -1, time.monotonic(), time.monotonic()
        while True:
            seen = (await self.stats())["unique"]
            now = time.monotonic()
            if seen >= unique:
                return
            if seen != last_seen:
                last_seen, last_change = seen, now
            for child in children or []:
                if child.poll() is not None:
                    raise BenchError(f"{what}: a process exited with status {child.returncode}")
            if now > deadline:
                raise BenchError(
                    f"timed out waiting for {what}: {seen}/{unique} after {within:g} s"
                )
            if now - last_change > STALL_SECONDS:
                raise BenchError(f"{what}: stuck at {seen}/{unique} for {STALL_SECONDS:g} s")
            if now - last_print > 10:
                print(f"  ... {seen}/{unique} received", flush=True)
                last_print = now
            await asyncio.sleep(0.1)


def signed_request(secret: str, i: int) -> tuple[bytes, dict[str, str]]:
    event_id = new_id("evt_")
    body = event_body(event_id, EVENT_TYPE, utcnow(), job_data(i)).encode()
    return body, signing.headers([secret], event_id, int(time.time()), body)


def dispatcher_client(engine: AsyncEngine, concurrency: int) -> tuple[httpx2.AsyncClient, Any]:
    """The httpx2 client a dispatcher with `concurrency` slots builds (its limits, headers and
    target-checking transport), and its URL policy; the database is never touched."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        env=Environment.development,
        webhooks=WebhooksSettings(concurrency=concurrency),
    )
    dispatcher = Dispatcher(WorkerContext(settings, Database(engine)), listen=False)
    return dispatcher.client, dispatcher.policy


async def baseline(
    engine: AsyncEngine,
    receiver: Receiver,
    paths: list[str],
    secrets: dict[str, str],
    count: int,
    concurrency: int,
) -> dict[str, Any]:
    """`count` signed POSTs by the dispatcher's httpx2 client straight to the receiver,
    `concurrency` at a time, with no database."""
    client, policy = dispatcher_client(engine, concurrency)
    failures = 0

    async def post(i: int) -> None:
        nonlocal failures
        path = paths[i % len(paths)]
        url = receiver.base + path
        # Signed per attempt and the URL checked, as the dispatcher does.
        body, headers = signed_request(secrets[path], i)
        policy.check_url(url)
        async with client.stream("POST", url, content=body, headers=headers) as response:
            async for _ in response.aiter_raw():
                pass
            if not 200 <= response.status_code < 300:
                failures += 1

    async def worker(numbers: range) -> None:
        for i in numbers:
            await post(i)

    await receiver.dump()  # start from nothing (this opens the bench's own connection)
    async with client:
        # Warm up: open the connections, import what is imported lazily.
        await asyncio.gather(
            *(worker(range(k, 2 * concurrency, concurrency)) for k in range(concurrency))
        )
        warm = await receiver.dump()
        meter = CpuMeter(client=os.getpid(), receiver=receiver.pid)
        began = time.perf_counter()
        await asyncio.gather(*(worker(range(k, count, concurrency)) for k in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu = meter.read()
    dump = await receiver.dump()
    if failures or len(dump["records"]) != count:
        raise BenchError(f"baseline: {failures} failed requests, {len(dump['records'])}/{count}")
    return {
        "rps": count / elapsed,
        "seconds": elapsed,
        "connections": warm["connections"] + dump["connections"],
        "verified": dump["verified"],
        "bad_signatures": dump["bad_signatures"],
        "errors": dump["errors"],
        "cpu": cpu,
    }


async def create_endpoints(
    sessionmaker: async_sessionmaker[AsyncSession],
    project_id: str,
    urls_and_secrets: list[tuple[str, str]],
) -> None:
    now = utcnow()
    async with sessionmaker() as session, session.begin():
        session.add(Project(id=project_id, name=project_id, created_at=now))
        await session.flush()
        session.add_all(
            WebhookEndpoint(
                id=new_id("we_"),
                project_id=project_id,
                url=url,
                description="bench/webhooks.py",
                enabled_events=["*"],
                status="enabled",
                secret=secret,
                created_at=now,
                updated_at=now,
            )
            for url, secret in urls_and_secrets
        )


async def emit_backlog(
    sessionmaker: async_sessionmaker[AsyncSession], events: int, batch: int
) -> float:
    began = time.perf_counter()
    for start in range(0, events, batch):
        async with sessionmaker() as session, session.begin():
            for i in range(start, min(events, start + batch)):
                event = await emit(session, PROJECT, EVENT_TYPE, f"ftjob-bench{i:08d}", job_data(i))
                if event is None:
                    raise BenchError("emit wrote nothing: no endpoint subscribes")
    return time.perf_counter() - began


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def delivery_statuses(engine: AsyncEngine, project_id: str) -> dict[str, int]:
    found = await scalar(
        engine,
        "SELECT coalesce(json_object_agg(status, n), '{}') FROM (SELECT status, count(*) n "
        "FROM webhook_deliveries WHERE project_id = :p GROUP BY status) s",
        p=project_id,
    )
    return dict(found if isinstance(found, dict) else json.loads(found))


async def wait_succeeded(engine: AsyncEngine, project_id: str, total: int, within: float) -> Any:
    """The delivery statuses once all are `succeeded` (outcomes are written just after the
    receiver answers), or whatever they are at the time-out."""
    deadline = time.monotonic() + within
    while True:
        statuses = await delivery_statuses(engine, project_id)
        if statuses.get("succeeded", 0) >= total or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.2)


async def metrics(port: int) -> dict[str, float]:
    """The dispatcher's own numbers, from its Prometheus endpoint."""
    found: dict[str, float] = {}
    async with httpx2.AsyncClient(timeout=10, trust_env=False) as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    for line in answer.text.splitlines():
        if line.startswith("tunegate_webhook") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            if name.endswith(("_sum", "_count", "_total")) or "_total{" in name:
                found[name] = float(value)
    return found


def duplicates(records: list[list[Any]]) -> int:
    counts = Counter((path, msg_id) for _, path, msg_id in records)
    return sum(n - 1 for n in counts.values() if n > 1)


async def emit_at_rate(
    sessionmaker: async_sessionmaker[AsyncSession], rate: float, seconds: float, tag: str
) -> tuple[dict[str, float], list[float], float]:
    """Events to LATENCY_PROJECT, one per transaction, at `rate`/s: {event id: time.time() when
    the commit returned}, how long each commit call took (the commit happened somewhere in it),
    and the rate achieved."""
    total = max(1, round(rate * seconds))
    committed: dict[str, float] = {}
    commit_ms: list[float] = []
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        async with sessionmaker() as session:
            transaction = await session.begin()
            event = await emit(
                session, LATENCY_PROJECT, EVENT_TYPE, f"ftjob-{tag}{i:08d}", job_data(i)
            )
            before = time.time()
            await transaction.commit()
            committed_at = time.time()
        if event is None:
            raise BenchError("emit wrote nothing: no endpoint subscribes")
        committed[event.id] = committed_at
        commit_ms.append(1000 * (committed_at - before))

    tasks = []
    start = loop.time() + 0.05
    for i in range(total):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    achieved = total / (loop.time() - start)
    return committed, commit_ms, achieved


async def latency(
    sessionmaker: async_sessionmaker[AsyncSession],
    receiver: Receiver,
    dispatcher: Any,
    rate: float,
    seconds: float,
    tag: str,
) -> dict[str, Any]:
    meter = CpuMeter(dispatcher=dispatcher.pid, receiver=receiver.pid, bench=os.getpid())
    committed, commit_ms, achieved = await emit_at_rate(sessionmaker, rate, seconds, tag)
    await receiver.wait_for(len(committed), 60 + seconds, f"latency at {rate:g}/s", [dispatcher])
    cpu = meter.read()
    dump = await receiver.dump()
    received: dict[str, float] = {}
    for moment, _, msg_id in dump["records"]:
        received.setdefault(msg_id, moment)
    missing = [event_id for event_id in committed if event_id not in received]
    if missing:
        raise BenchError(f"latency at {rate:g}/s: {len(missing)} events never arrived")
    delays = [1000 * (received[event_id] - at) for event_id, at in committed.items()]
    # Keeping up, the last receipt comes just after the last commit: the receipt rate over the
    # whole run is the emission rate. A backlog that grows shows as a lower receipt rate.
    span = max(received[event_id] for event_id in committed) - min(committed.values())
    receipt_rate = len(committed) / max(1e-6, span)
    return {
        "rate": rate,
        "achieved_rate": round(achieved, 1),
        "receipt_rate": round(receipt_rate, 1),
        "kept_up": receipt_rate >= 0.95 * achieved,
        "events": len(committed),
        "p50": round(percentile(delays, 0.50), 2),
        "p90": round(percentile(delays, 0.90), 2),
        "p99": round(percentile(delays, 0.99), 2),
        "max": round(max(delays), 2),
        "min": round(min(delays), 2),
        "mean": round(statistics.fmean(delays), 2),
        "commit_call_ms_p50": round(percentile(commit_ms, 0.50), 2),
        "commit_call_ms_p99": round(percentile(commit_ms, 0.99), 2),
        "duplicates": duplicates(dump["records"]),
        "bad_signatures": dump["bad_signatures"],
        "errors": dump["errors"],
        "cpu": cpu,
    }


def print_latency(result: dict[str, Any]) -> None:
    print(
        f"latency at {result['rate']:g} events/s (achieved {result['achieved_rate']:g}/s, "
        f"{result['events']} events, one endpoint): commit -> receipt p50 {result['p50']:.1f} ms, "
        f"p90 {result['p90']:.1f} ms, p99 {result['p99']:.1f} ms, max {result['max']:.1f} ms; "
        f"polling alone would wait up to {1000 * POLL_INTERVAL:.0f} ms "
        f"(p99 = {result['p99'] / (10 * POLL_INTERVAL):.1f} % of it)\n"
        f"  the commit call took p50 {result['commit_call_ms_p50']:.1f} ms, "
        f"p99 {result['commit_call_ms_p99']:.1f} ms; {cpu_text(result['cpu'])}",
        flush=True,
    )
    if not result["kept_up"]:
        print(
            f"  the dispatcher did not keep up: received at {result['receipt_rate']:g}/s, "
            f"emitted at {result['achieved_rate']:g}/s (delays grew during the run)",
            flush=True,
        )


async def bench(
    args: argparse.Namespace, url: str, workdir: Path, receiver: Receiver, secrets: dict[str, str]
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "deliveries": 0,
        "endpoints": args.endpoints,
        "concurrency": args.concurrency,
        "target_rps": args.target,
    }

    engine = create_async_engine(url, pool_size=20, max_overflow=10)
    try:
        return await phases(args, url, workdir, receiver, secrets, engine, result)
    finally:
        await engine.dispose()


async def phases(
    args: argparse.Namespace,
    url: str,
    workdir: Path,
    receiver: Receiver,
    secrets: dict[str, str],
    engine: AsyncEngine,
    result: dict[str, Any],
) -> dict[str, Any]:
    paths = [f"/hooks/{k}" for k in range(args.endpoints)]

    # 1. Baseline ---------------------------------------------------------------------------
    base = await baseline(engine, receiver, paths, secrets, args.deliveries, args.concurrency)
    print(
        f"baseline: the dispatcher's httpx2 client -> receiver, {args.deliveries} signed POSTs, "
        f"{args.concurrency} in flight: {base['rps']:.0f} requests/s ({base['seconds']:.2f} s, "
        f"{base['connections']} connections, {base['verified']} signatures verified)\n"
        f"  {cpu_text(base['cpu'])}",
        flush=True,
    )
    if base["bad_signatures"]:
        raise BenchError(f"baseline: bad signatures at the receiver: {base['errors']}")
    result["baseline_rps"] = round(base["rps"], 1)
    result["cpus"] = psutil.cpu_count()
    result["cpu_baseline"] = base["cpu"]
    if base["cpu"]["rest"] > 0.2:
        print(
            f"WARNING: other processes used {base['cpu']['rest']:.2f} cores during the baseline; "
            "this machine is busy and every number below is lower than on an idle one",
            flush=True,
        )

    # 2. Throughput from a backlog ----------------------------------------------------------
    sessionmaker = make_sessionmaker(engine)
    await create_endpoints(
        sessionmaker, PROJECT, [(receiver.base + path, secrets[path]) for path in paths]
    )
    latency_path = "/latency/0"
    await create_endpoints(
        sessionmaker, LATENCY_PROJECT, [(receiver.base + latency_path, secrets[latency_path])]
    )
    events = -(-args.deliveries // args.endpoints)
    total = events * args.endpoints
    result["deliveries"] = total
    emit_seconds = await emit_backlog(sessionmaker, events, args.batch)
    print(
        f"backlog: {events} events x {args.endpoints} endpoints = {total} pending deliveries "
        f"written in {emit_seconds:.1f} s ({events / emit_seconds:.0f} events/s, "
        f"{args.batch} per transaction)",
        flush=True,
    )
    async with engine.connect() as conn:  # as autovacuum would, soon after such a backlog
        await conn.execute(text("ANALYZE webhook_deliveries"))

    metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")} | {
        "TUNEGATE_DATA_DIR": str(workdir / "data"),
        "TUNEGATE_DATABASE_URL": url,
        "TUNEGATE_LOG__LEVEL": "WARNING",
        "TUNEGATE_WEBHOOKS__CONCURRENCY": str(args.concurrency),
    }
    if args.endpoint_concurrency is not None:
        env["TUNEGATE_WEBHOOKS__ENDPOINT_CONCURRENCY"] = str(args.endpoint_concurrency)
    command = [
        *tunegate(),
        "worker",
        "--role",
        "dispatcher",
        "--metrics-port",
        str(metrics_port),
    ]
    started = time.time()
    with process(command, env, workdir / "dispatcher.log") as dispatcher:
        result["dispatcher_pid"] = dispatcher.pid
        print(f"dispatcher started (pid {dispatcher.pid})", flush=True)
        await receiver.wait_for(1, 120, "the dispatcher's first delivery", [dispatcher])
        # From the first delivery on: the process's start-up is not part of its CPU use.
        meter = CpuMeter(dispatcher=dispatcher.pid, receiver=receiver.pid, bench=os.getpid())
        within = max(120.0, total / 20)
        await receiver.wait_for(total, within, "the backlog's deliveries", [dispatcher])
        cpu = meter.read()
        statuses = await wait_succeeded(engine, PROJECT, total, 60)
        dump = await receiver.dump()
        times = sorted(moment for moment, _, _ in dump["records"])
        first, last = times[0], times[-1]
        steady = (total - 1) / max(1e-6, last - first)
        from_start = total / (last - started)
        attempts = await scalar(
            engine,
            "SELECT sum(attempt_count) FROM webhook_deliveries WHERE project_id = :p",
            p=PROJECT,
        )
        dispatcher_metrics = await metrics(metrics_port)
        result |= {
            "dispatcher_rps": round(steady, 1),
            "dispatcher_rps_from_start": round(from_start, 1),
            "ratio": round(steady / base["rps"], 3),
            "seconds_first_to_last": round(last - first, 2),
            "seconds_start_to_first": round(first - started, 2),
            "seconds_start_to_last": round(last - started, 2),
            "received": len(dump["records"]),
            "duplicates": duplicates(dump["records"]),
            "statuses": statuses,
            "attempts": attempts,
            "connections": dump["connections"],
            "verified": dump["verified"],
            "bad_signatures": dump["bad_signatures"],
            "cpu_throughput": cpu,
        }
        count = dispatcher_metrics.get("tunegate_webhook_attempt_duration_seconds_count", 0)
        if count:
            result["attempt_ms_mean"] = round(
                1000 * dispatcher_metrics["tunegate_webhook_attempt_duration_seconds_sum"] / count,
                2,
            )
        lag_count = dispatcher_metrics.get("tunegate_webhook_first_attempt_lag_seconds_count")
        if lag_count:
            result["first_attempt_lag_s_mean"] = round(
                dispatcher_metrics["tunegate_webhook_first_attempt_lag_seconds_sum"] / lag_count,
                2,
            )
        print(
            f"throughput: {total} deliveries, first -> last receipt {last - first:.2f} s = "
            f"{steady:.0f} deliveries/s (from the process start {last - started:.2f} s = "
            f"{from_start:.0f}/s; first receipt {first - started:.2f} s after start); "
            f"ratio to baseline {result['ratio']:.2f}; target {args.target:g}/s "
            f"{'met' if steady >= args.target else 'MISSED'}",
            flush=True,
        )
        print(
            f"  statuses {statuses}, {attempts} attempts, {result['duplicates']} duplicates, "
            f"{dump['connections']} connections, {dump['verified']} signatures verified "
            f"({dump['bad_signatures']} bad); mean attempt "
            f"{result.get('attempt_ms_mean', float('nan')):.1f} ms\n  {cpu_text(cpu)}",
            flush=True,
        )
        if dump["errors"]:
            print(f"  signature errors: {dump['errors']}", flush=True)

        # 3. Latency ----------------------------------------------------------------------
        await asyncio.sleep(1.5)  # idle: the last outcomes written, back to waiting
        runs = [args.rate] + ([args.high_rate] if args.high_rate else [])
        latencies = []
        for n, rate in enumerate(runs):
            found = await latency(
                sessionmaker, receiver, dispatcher, rate, args.seconds, f"lat{n}-"
            )
            print_latency(found)
            latencies.append(found)
        if dispatcher.poll() is not None:
            raise BenchError(f"the dispatcher exited with status {dispatcher.returncode}")

    keys = ("p50", "p90", "p99", "max", "min", "mean", "rate", "achieved_rate")
    keys += ("receipt_rate", "kept_up", "events", "commit_call_ms_p50", "commit_call_ms_p99")
    result["latency_ms"] = {key: latencies[0][key] for key in keys}
    if len(latencies) > 1:
        result["latency_high_ms"] = {key: latencies[1][key] for key in keys}
    result["cpu_latency"] = [found["cpu"] for found in latencies]
    result["poll_interval_ms"] = 1000 * POLL_INTERVAL
    result["latency_duplicates"] = sum(found["duplicates"] for found in latencies)
    result["bad_signatures"] += sum(found["bad_signatures"] for found in latencies)
    return result


def run(args: argparse.Namespace, workdir: Path) -> int:
    paths = [f"/hooks/{k}" for k in range(args.endpoints)] + ["/latency/0"]
    secrets = {path: signing.new_secret() for path in paths}
    secrets_file = workdir / "secrets.json"
    secrets_file.write_text(json.dumps(secrets))
    port = free_port()
    out = workdir / "receiver.json"
    env = dict(os.environ)
    receiver_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--receiver",
        "--port", str(port),
        "--out", str(out),
        "--secrets", str(secrets_file),
        "--verify-every", str(args.verify_every),
    ]  # fmt: skip
    with database(workdir, DATABASE) as url:
        with process(receiver_cmd, env, workdir / "receiver.log") as child:
            wait_until(
                lambda: httpx.get(f"http://127.0.0.1:{port}/_stats", timeout=5).is_success,
                30,
                "the receiver",
            )
            receiver = Receiver(port, out, child.pid)
            result = asyncio.run(bench(args, url, workdir, receiver, secrets))
    if result["duplicates"] or result["latency_duplicates"]:
        print(
            f"WARNING: duplicates received: {result['duplicates']} (throughput), "
            f"{result['latency_duplicates']} (latency)"
        )
    result.pop("dispatcher_pid", None)
    print(json.dumps(result))
    delivered = (
        result["statuses"] == {"succeeded": result["deliveries"]}
        and result["received"] - result["duplicates"] == result["deliveries"]
        and result["bad_signatures"] == 0
    )
    return 0 if delivered and result["dispatcher_rps"] >= args.target else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=20_000, help="backlog size")
    parser.add_argument("--endpoints", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64, help="deliveries in flight")
    parser.add_argument(
        "--endpoint-concurrency", type=int, default=None, help="per endpoint (default: the app's)"
    )
    parser.add_argument("--batch", type=int, default=500, help="backlog events per transaction")
    parser.add_argument("--rate", type=float, default=100.0, help="latency phase, events/s")
    parser.add_argument("--high-rate", type=float, default=300.0, help="second latency run; 0: no")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of a latency run")
    parser.add_argument("--target", type=float, default=500.0, help="deliveries/s to reach")
    parser.add_argument("--verify-every", type=int, default=100, help="receiver checks 1 in N")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--secrets", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        return receiver_main(args.port, args.out, args.secrets, args.verify_every)
    if args.deliveries < 1 or args.endpoints < 1 or args.concurrency < 1 or args.rate <= 0:
        parser.error("--deliveries, --endpoints, --concurrency and --rate must be positive")

    workdir = Path(tempfile.mkdtemp(prefix="tunegate-bench-webhooks-"))
    failed = True
    try:
        status = run(args, workdir)
        failed = status != 0
        return status
    except (BenchError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
            raise
        print(
            f"benchmark failed: {exc.code if isinstance(exc, SystemExit) else exc}", file=sys.stderr
        )
        return 2
    except Exception:
        traceback.print_exc()
        print("benchmark failed", file=sys.stderr)
        return 2
    finally:
        log = workdir / "dispatcher.log"
        if failed and log.exists() and log.stat().st_size:
            tail = log.read_text(errors="replace")[-3000:]
            print(f"--- dispatcher log ({log}), last lines ---\n{tail}", file=sys.stderr)
        if args.keep or failed:
            if not args.keep:
                shutil.rmtree(workdir / "pg", ignore_errors=True)  # an embedded server's data
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
