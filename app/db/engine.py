"""Engine and session factory; one `Database` per process, opened by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import Settings
from app.db.embedded import start_embedded_postgres


def resolve_database_url(settings: Settings) -> str:
    """The configured URL with the asyncpg driver, or the embedded server's URL."""
    if settings.database_url is None:
        return start_embedded_postgres(settings.data_dir)
    return normalize_url(settings.database_url.get_secret_value())


def normalize_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"}:
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if parsed.drivername != "postgresql+asyncpg":
        raise ValueError(
            f"unsupported database driver {parsed.drivername!r}: tunegate needs PostgreSQL"
        )
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str, settings: Settings) -> AsyncEngine:
    db = settings.database
    statement_timeout_ms = int(db.statement_timeout.total_seconds() * 1000)
    return create_async_engine(
        url,
        pool_size=db.pool_size,
        max_overflow=db.max_overflow,
        pool_timeout=db.pool_timeout.total_seconds(),
        pool_pre_ping=True,
        # Statement parameters can hold user data and keys: keep them out of error messages.
        hide_parameters=True,
        connect_args={
            "server_settings": {
                "application_name": "tunegate",
                "statement_timeout": str(statement_timeout_ms),
            }
        },
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@dataclass
class Database:
    """What the app needs from the database: a session factory (tests swap it) and an engine."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession] = field(init=False)

    def __post_init__(self) -> None:
        self.sessionmaker = make_sessionmaker(self.engine)

    def plain_dsn(self) -> str:
        """The database's URL for a connection of one's own (asyncpg's, e.g. to LISTEN)."""
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def dispose(self) -> None:
        await self.engine.dispose()
