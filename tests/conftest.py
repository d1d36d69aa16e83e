"""Test infrastructure shared by every test module.

- A real PostgreSQL: `TEST_DATABASE_URL` when set (its database is wiped and rebuilt), else an
  embedded server (`pgserver`) in a temporary directory.
- The schema is built once per run by running the migrations.
- Each test runs inside a transaction that is rolled back at the end; the app's units of work
  become savepoints inside it ("join a session into an external transaction").
- The app is called over HTTP, in-process (`httpx.ASGITransport`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from app.config import Settings
from app.db.embedded import start_embedded_postgres, stop_embedded_postgres
from app.db.engine import Database, create_engine, normalize_url
from app.db.migrate import upgrade_to_head
from app.files.storage import LocalBlobStorage
from app.main import create_app
from tests.factories import Factories


async def _reset_public_schema(url: str) -> None:
    engine = create_engine(url, Settings())
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    configured = os.environ.get("TEST_DATABASE_URL")
    scratch = None
    if configured:
        url = normalize_url(configured)
        asyncio.run(_reset_public_schema(url))
    else:
        # Not under pytest's tmp_path: pgserver runs PostgreSQL as its own user when we are root,
        # and pytest's 0700 temporary directories would keep that user out.
        scratch = Path(tempfile.mkdtemp(prefix="tunegate-test-pg-"))
        url = start_embedded_postgres(scratch)
    upgrade_to_head(url)
    yield url
    if scratch is not None:
        stop_embedded_postgres()
        shutil.rmtree(scratch, ignore_errors=True)


def make_settings(**overrides: Any) -> Settings:
    """Settings for in-process apps: no .env file, development defaults, then overrides."""
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, make_settings())
    yield engine
    await engine.dispose()


@pytest.fixture
async def connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            yield conn
        finally:
            await transaction.rollback()


@pytest.fixture
def sessionmaker(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        bind=connection,
        expire_on_commit=False,
        autoflush=False,
        join_transaction_mode="create_savepoint",
    )


@pytest.fixture
async def session(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with sessionmaker() as session:
        yield session


@dataclass
class AppFactory:
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    data_dir: Path

    @property
    def database(self) -> Database:
        database = Database(self.engine)
        database.sessionmaker = self.sessionmaker
        return database

    def storage(self) -> LocalBlobStorage:
        return LocalBlobStorage(self.data_dir / "storage", self.data_dir / "tmp")

    def __call__(self, providers: dict[str, Any] | None = None, **overrides: Any) -> Any:
        settings = make_settings(data_dir=self.data_dir, **overrides)
        return create_app(
            settings, database=self.database, storage=self.storage(), providers=providers or {}
        )


@pytest.fixture
def app_factory(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> AppFactory:
    return AppFactory(engine, sessionmaker, tmp_path / "data")


@pytest.fixture
def app(app_factory: AppFactory) -> Any:
    return app_factory()


ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def client_for(app: Any) -> AsyncIterator[ClientFactory]:
    """`client_for(key)` -> an HTTP client for the in-process app, authenticated with `key`."""
    clients: list[httpx.AsyncClient] = []

    def make(key: str | None = None, target: Any = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=target or app, raise_app_exceptions=False)
        client = httpx.AsyncClient(
            transport=transport, base_url="http://tunegate.test", headers=headers
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def client(client_for: ClientFactory) -> httpx.AsyncClient:
    """An unauthenticated client."""
    return client_for()


@pytest.fixture
def factories(session: AsyncSession) -> Factories:
    return Factories(session)
