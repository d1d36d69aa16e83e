"""Run `tunegate serve` as a real process on loopback, for tests that need one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    """Poll `check` until it answers something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.02)


def tunegate_command() -> list[str]:
    script = Path(sys.executable).parent / "tunegate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEGATE_")}
    env |= {"TUNEGATE_DATA_DIR": str(data_dir), "TUNEGATE_LOG__FORMAT": "json"} | extra
    return env


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    env: dict[str, str]
    log_path: Path

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*tunegate_command(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.data_dir.parent,
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


def start_server(workdir: Path, *args: str, **env: str) -> RunningServer:
    data_dir = workdir / "data"
    port = free_port()
    environment = server_env(data_dir, **env)
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*tunegate_command(), "serve", "--port", str(port), *args],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = RunningServer(process, f"http://127.0.0.1:{port}", data_dir, environment, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"tunegate serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError("tunegate serve did not become ready within 60 s")


@contextmanager
def worker_process(
    server: RunningServer, log_path: Path, *roles: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`tunegate worker --role …` on the server's database and data dir, with `env` on top;
    stopped (or reaped, once killed) on the way out whatever happens."""
    arguments = [argument for role in roles for argument in ("--role", role)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*tunegate_command(), "worker", *arguments],
            env=server.env | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=server.data_dir.parent,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


async def _run_admin_sql(url: str, *statements: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


@contextmanager
def separate_database(database_url: str, name: str) -> Iterator[str]:
    """A database of its own on the test server, for processes that commit for real beside the
    rolled-back transactions of the in-process tests; dropped afterwards."""
    import asyncio

    from sqlalchemy.engine import make_url

    drop = f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    asyncio.run(_run_admin_sql(database_url, drop, f"CREATE DATABASE {name}"))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_run_admin_sql(database_url, drop))
